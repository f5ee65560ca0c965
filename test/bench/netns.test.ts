/**
 * bench/netns.ts: a bench that starts VMs runs in a network namespace with
 * only loopback, entered by re-executing itself (or at once, when already
 * in one), and its exit status comes back through the re-exec.
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { describe, it } from "node:test";
import { netInterfaces } from "../../bench/netns.js";
import { REPO_ROOT } from "../helpers.js";

describe("bench network namespace", () => {
  it("lists this process's interfaces (loopback included)", () => {
    assert.ok(netInterfaces().includes("lo"), netInterfaces().join(","));
  });

  it("a script that enters it sees only loopback, gets its arguments, and its exit status comes back", async () => {
    const dir = await mkdtemp(join(tmpdir(), "sm-netns-"));
    try {
      const script = join(dir, "probe.mjs");
      const helper = pathToFileURL(join(REPO_ROOT, "dist", "bench", "netns.js")).href;
      await writeFile(
        script,
        `import { enterLoopbackNetns, netInterfaces } from ${JSON.stringify(helper)};\n` +
          `enterLoopbackNetns({ what: "probe", extraArgs: ["--added"] });\n` +
          `console.log(JSON.stringify({ ifs: netInterfaces(), args: process.argv.slice(2) }));\n` +
          `process.exit(7);\n`,
      );
      const r = spawnSync(process.execPath, [script, "--given"], { encoding: "utf8", env: { ...process.env, SUPERMACHINE_NETNS: "" } });
      assert.equal(r.status, 7, r.stderr);
      const out = JSON.parse(r.stdout.trim()) as { ifs: string[]; args: string[] };
      assert.deepEqual(out.ifs, ["lo"]);
      // Re-executed: the extra argument is there; already inside: only the given one.
      assert.ok(out.args[0] === "--given" && (out.args.length === 1 || out.args[1] === "--added"), JSON.stringify(out.args));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
