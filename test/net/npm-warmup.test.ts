/**
 * The network half of the seed's Pattern 6: `npm install` runs inside the
 * VM during warmup against an npm registry on the host's loopback (reached
 * through a `hosts` name the policy allows), and its result is in every VM
 * restored from the snapshot, with no network at all.
 */

import assert from "node:assert/strict";
import { mkdirSync, symlinkSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Image } from "../../src/image/image.js";
import { defaultCacheDir } from "../../src/paths.js";
import { debianPythonLayout, hostNodeLayerTar } from "../fixtures/oci/images.js";
import { startNpmRegistry, type NpmRegistry } from "../fixtures/npm/registry.js";
import { VM_TEST_TIMEOUT } from "../helpers.js";

describe("npm install in warmup through the VM network", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let work: string;
  let registry: NpmRegistry;
  let nodeRef: string;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), "sm-npm-"));
    // Images go to a cache of their own; the guest kernel is shared.
    mkdirSync(join(work, "cache"), { recursive: true });
    symlinkSync(join(defaultCacheDir(), "kernel"), join(work, "cache", "kernel"));
    registry = await startNpmRegistry([
      { name: "sm-util", version: "1.0.0", files: { "index.js": "exports.shout = (s) => s.toUpperCase() + '!';\n" } },
      { name: "sm-util", version: "1.2.0", files: { "index.js": "exports.shout = (s) => s.toUpperCase() + '!!';\n" } },
      {
        name: "sm-greet",
        version: "2.0.0",
        dependencies: { "sm-util": "^1.0.0" },
        files: { "index.js": "const u = require('sm-util');\nexports.greet = (n) => u.shout('hello ' + n);\n" },
      },
    ]);
    nodeRef = await debianPythonLayout(join(work, "layout"), { extraLayers: [await readFile(await hostNodeLayerTar())], env: ["HOME=/root"], workingDir: "/work", tag: "node" });
  });

  after(async () => {
    await registry?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test("npm install in warmup; every restored VM has node_modules, without a network", async () => {
    const url = `http://registry.local:${registry.port}/`;
    const image = await Image.build({
      ref: nodeRef,
      snapshotsDir: join(work, "snapshots"),
      cacheDir: join(work, "cache"),
      memoryMib: 512,
      network: { allow: ["registry.local"], hosts: { "registry.local": "127.0.0.1" } },
      warmup: async (vm) => {
        await vm.writeFile("/work/package.json", Buffer.from(JSON.stringify({ name: "app", version: "1.0.0", dependencies: { "sm-greet": "^2.0.0" } })));
        const r = await vm.exec({
          argv: ["npm", "install", `--registry=${url}`, "--no-audit", "--no-fund", "--no-update-notifier", "--loglevel=warn"],
          cwd: "/work",
          timeoutMs: 900_000,
        });
        assert.equal(r.exitCode, 0, `npm install failed:\n${r.stdout}\n${r.stderr}`);
      },
    });
    const seen = registry.requests.length;
    assert.ok(registry.requests.includes("/sm-greet") && registry.requests.includes("/sm-util"), registry.requests.join(" "));
    assert.ok(registry.requests.some((r) => r.endsWith("sm-util-1.2.0.tgz")), "the newest matching version was installed");
    // Restored VMs have no network at all, and still have the install.
    const pool = await image.pool({ min: 0, max: 2, network: false });
    try {
      const vms = await Promise.all([pool.acquire(), pool.acquire()]);
      try {
        for (const vm of vms) {
          const r = await vm.exec({ argv: ["node", "-e", "console.log(require('/work/node_modules/sm-greet').greet('vm'))"], timeoutMs: 300_000 });
          assert.equal(r.stdout.toString(), "HELLO VM!!\n", r.stderr.toString());
          const lock = JSON.parse((await vm.readFile("/work/package-lock.json")).toString()) as { packages: Record<string, { version: string }> };
          assert.equal(lock.packages["node_modules/sm-util"]?.version, "1.2.0");
        }
      } finally {
        await Promise.all(vms.map((vm) => vm.release()));
      }
      assert.equal(registry.requests.length, seen, "restored VMs did not fetch again");
    } finally {
      await pool.shutdown();
      await image.close();
    }
  });
});
