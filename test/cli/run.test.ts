/**
 * `supermachine run` end to end: streams the command's output, exits with
 * its status, leaves no VM behind.
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, mkdirSync, readdirSync, rmSync, writeFileSync, chmodSync, copyFileSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { REPO_ROOT, VM_TEST_TIMEOUT, pidsMatching } from "../helpers.js";

const BIN = join(REPO_ROOT, "bin", "supermachine.js");

// The CLI's VMs get a runtime dir of their own, so leftovers are told apart
// from the VMs of other test files running at the same time.
const runtimeDir = mkdtempSync(join(tmpdir(), "sm-cli-rt-"));

function run(args: string[]) {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: "utf8", timeout: 300_000, env: { ...process.env, SUPERMACHINE_RUNTIME_DIR: runtimeDir } });
}

describe("supermachine run", { timeout: VM_TEST_TIMEOUT }, () => {
  it("runs a command in the default image and exits with its status", () => {
    const r = run(["run", "-q", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert.equal(r.status, 7, r.stderr);
    assert.equal(r.stdout, "out\n");
    assert.match(r.stderr, /err\n/);
    const mine = new RegExp(`qemu-system.*${runtimeDir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`);
    assert.deepEqual(pidsMatching(mine), [], "no VM left behind");
    assert.deepEqual(readdirSync(join(runtimeDir, `supermachine-${process.getuid!()}`)), [], "no runtime dir left behind");
  });

  it("boots a host directory with --rootfs and passes env and workdir", () => {
    const dir = mkdtempSync(join(tmpdir(), "sm-cli-"));
    try {
      for (const d of ["bin", "etc", "work"]) mkdirSync(join(dir, d));
      copyFileSync("/bin/busybox", join(dir, "bin", "busybox"));
      chmodSync(join(dir, "bin", "busybox"), 0o755);
      symlinkSync("busybox", join(dir, "bin", "sh"));
      symlinkSync("busybox", join(dir, "bin", "cat"));
      writeFileSync(join(dir, "work", "hello.txt"), "from the host directory\n");
      const r = run(["run", "-q", "--rootfs", dir, "-e", "GREETING=hi there", "-w", "/work", "--", "sh", "-c", 'echo "$GREETING"; cat hello.txt']);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, "hi there\nfrom the host directory\n");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("a command killed by signal N exits 128+N (SIGTERM: 143, SIGKILL: 137)", () => {
    const term = run(["run", "-q", "--", "sh", "-c", "kill -TERM $$"]);
    assert.equal(term.status, 143, term.stderr);
    const kill = run(["run", "-q", "--", "sh", "-c", "kill -KILL $$"]);
    assert.equal(kill.status, 137, kill.stderr);
  });

  it("--timeout kills the command: exit 124", () => {
    const r = run(["run", "-q", "--timeout", "1000", "--", "sleep", "60"]);
    assert.equal(r.status, 124, r.stderr);
  });

  it("usage errors exit 2; a bad rootfs exits 125 with a message", () => {
    assert.equal(run(["run", "-q"]).status, 2);
    const r = run(["run", "-q", "--rootfs", "/nonexistent-dir", "--", "true"]);
    assert.equal(r.status, 125);
    assert.match(r.stderr, /does not exist/);
  });
});
