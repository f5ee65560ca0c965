/**
 * Images and snapshots from the command line: `pull` (progress lines when
 * not a terminal), `images --json`, `build`, `snapshots ls --json`, `rm`,
 * and `prune`, which removes what is unused and nothing in use (a pool
 * running from a snapshot keeps it). The image comes from a registry on
 * loopback (test/fixtures/registry).
 */

import assert from "node:assert/strict";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { busyboxTar, newLayout } from "../fixtures/oci/images.js";
import { buildTar } from "../fixtures/oci/tar.js";
import { pushLayout, startRegistry, type RegistryFixture } from "../fixtures/registry/registry.js";
import { VM_TEST_TIMEOUT } from "../helpers.js";
import { cliEnv, type CliEnv } from "./cli-env.js";

interface Listed {
  name?: string;
  id?: string;
  refs?: string[];
  ref?: string | null;
  sizeBytes: number;
  inUse?: unknown[];
}

describe("supermachine pull / build / images / snapshots / rm / prune", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let c: CliEnv;
  let reg: RegistryFixture;
  let ref: string;
  before(async () => {
    c = cliEnv("cache");
    reg = await startRegistry();
    const layout = await newLayout(join(c.work, "layout"));
    const app = await layout.addImage({
      layers: [{ tar: busyboxTar() }, { tar: buildTar([{ name: "srv", type: "dir" }]) }],
      config: { config: { Env: ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"], Cmd: ["sh", "-c", "echo from the image cmd"] } },
    });
    layout.tag(app.manifest, "app");
    await layout.save();
    await pushLayout(reg, layout.dir, "app", "test/app:1");
    ref = `${reg.host}/test/app:1`;
  });
  after(async () => {
    await reg?.stop();
    try {
      assert.deepEqual(c.qemus(), [], "no VM left behind");
    } finally {
      c.remove();
    }
  });

  // Async: the registry fixture's proxy lives in this process and must keep answering.
  const json = async <T>(args: string[]): Promise<T> => {
    const r = await c.runAsync(args);
    assert.equal(r.status, 0, `${args.join(" ")}: ${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  };

  it("pull prints progress lines (not a terminal) and the digest; images --json lists it", async () => {
    const r = await c.runAsync(["pull", ref]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^127\.0\.0\.1:\d+\/test\/app:1@sha256:[0-9a-f]{64}\n$/);
    assert.match(r.stderr, /layer 1 [0-9a-f]{12} {2}pulled /);
    assert.match(r.stderr, /unpack layer 2\/2/);
    assert.match(r.stderr, /pack root filesystem/);
    assert.doesNotMatch(r.stderr, /\x1b\[/, "no terminal escapes when stderr is not a terminal");
    const imgs = await json<Listed[]>(["images", "--json"]);
    const mine = imgs.find((i) => i.refs?.includes(ref));
    assert.ok(mine, JSON.stringify(imgs));
    assert.ok(mine.sizeBytes > 100_000, "size counts the rootfs and the blobs");
  });

  it("build bakes snapshots (flags, and a JSON file of BuildOptions); snapshots ls --json lists them", async () => {
    const b = await c.runAsync(["build", "--name", "app-snap", "--json", ref]);
    assert.equal(b.status, 0, b.stderr);
    assert.equal(JSON.parse(b.stdout).baked, true);
    assert.match(b.stderr, /bake app-snap: boot/);
    assert.match(b.stderr, /snapshot app-snap baked/);
    const file = join(c.work, "build.json");
    writeFileSync(file, JSON.stringify({ ref: "default", name: "other-snap", memoryMib: 192, env: { A: "1" }, nope: true }));
    const bad = await c.runAsync(["build", "-f", file]);
    assert.equal(bad.status, 125, "an unknown key is refused");
    assert.match(bad.stderr, /unknown key "nope"/);
    writeFileSync(file, JSON.stringify({ ref: "default", name: "other-snap", memoryMib: 192, env: { A: "1" } }));
    const g = await c.runAsync(["build", "-f", file]);
    assert.equal(g.status, 0, g.stderr);
    const snaps = await json<Listed[]>(["snapshots", "ls", "--json"]);
    assert.deepEqual(snaps.map((s) => s.name).sort(), ["app-snap", "other-snap"]);
    assert.equal(snaps.find((s) => s.name === "app-snap")!.ref, ref);
    const other = snaps.find((s) => s.name === "other-snap") as Listed & { memoryMib: number };
    assert.equal(other.memoryMib, 192);
  });

  it("prune removes what is unused and nothing in use (a pool running from a snapshot keeps it)", async () => {
    process.env.SUPERMACHINE_CACHE_DIR = c.cacheDir;
    const image = await Image.fromSnapshot(join(c.snapshotsDir, "app-snap"));
    const pool = await image.pool({ min: 1 });
    try {
      const listed = await json<Listed[]>(["snapshots", "ls", "--json"]);
      assert.equal(listed.find((s) => s.name === "app-snap")!.inUse!.length, 2, "the Image and the pool each hold a lease");
      const dry = await json<{ removed: Listed[]; keptInUse: Listed[] }>(["prune", "--all", "--dry-run", "--json"]);
      assert.ok(dry.removed.some((e) => e.name === "other-snap"));
      assert.ok(existsSync(join(c.snapshotsDir, "other-snap")), "--dry-run removes nothing");
      const recent = await json<{ removed: Listed[] }>(["prune", "--unused-for", "1d", "--json"]);
      assert.deepEqual(recent.removed, [], "nothing is a day old");
      const rm = await c.runAsync(["rm", "app-snap"]);
      assert.equal(rm.status, 125);
      assert.match(rm.stderr, /in use by process/);
      const r = await json<{ removed: Listed[]; keptInUse: Listed[] }>(["prune", "--all", "--json"]);
      assert.deepEqual(r.keptInUse.map((e) => e.name), ["app-snap"]);
      assert.ok(r.removed.some((e) => e.name === "other-snap"));
      assert.ok(existsSync(join(c.snapshotsDir, "app-snap", "manifest.json")), "the snapshot in use is still there");
      assert.ok(!existsSync(join(c.snapshotsDir, "other-snap")));
      assert.deepEqual(await json<Listed[]>(["images", "--json"]), [], "images are never in use: a snapshot holds its own rootfs");
      // The pool still restores from its snapshot after the prune.
      const vm = await pool.acquire();
      try {
        assert.equal((await vm.exec({ argv: ["echo", "still here"] })).stdout.toString(), "still here\n");
      } finally {
        await vm.release();
      }
    } finally {
      await pool.shutdown();
      await image.close();
    }
    const last = await json<{ removed: Listed[] }>(["prune", "--all", "--json"]);
    assert.deepEqual(last.removed.map((e) => e.name), ["app-snap"]);
    assert.deepEqual(await json<Listed[]>(["snapshots", "ls", "--json"]), []);
  });

  it("run IMAGE without a COMMAND runs the image's CMD; rm IMAGE removes it from the cache", async () => {
    const r = await c.runAsync(["run", "-q", ref]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "from the image cmd\n");
    const gone = await c.runAsync(["rm", ref]);
    assert.equal(gone.status, 0, gone.stderr);
    assert.deepEqual((await json<Listed[]>(["images", "--json"])).filter((i) => i.refs?.includes(ref)), []);
  });
});
