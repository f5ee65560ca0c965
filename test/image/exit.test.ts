/**
 * The seed's quick start, run as a user's script in a child Node process,
 * exits by itself once its work is done: idle pool VMs, the bake's stashed
 * VM, the QEMU started ahead of restores and pool refills do not hold the
 * event loop, and the process 'exit' hooks leave no QEMU and no runtime
 * directory behind. Real QEMU, real snapshots.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { REPO_ROOT, VM_TEST_TIMEOUT, defaultRootfs, pidsMatching, processAlive } from "../helpers.js";

/** How long after its last line the script may take to exit before it counts as hung. */
const EXIT_DEADLINE_MS = 30_000;

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** ms between the script's last line and its exit. */
  exitAfterMs: number;
}

describe("a user's script exits by itself", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let work: string;
  let rootfs: string;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), "sm-exit-"));
    rootfs = await defaultRootfs();
  });

  after(async () => {
    await rm(work, { recursive: true, force: true });
  });

  /** Runs `body` as an ES module in a child Node with its own runtime dir. */
  async function runScript(name: string, body: string): Promise<Run & { runtimeDir: string }> {
    const runtimeDir = join(work, `rt-${name}`);
    const file = join(work, `${name}.mjs`);
    await writeFile(
      file,
      `import { Image, Vm } from ${JSON.stringify(join(REPO_ROOT, "dist", "src", "index.js"))};\n` +
        `const snapshotsDir = ${JSON.stringify(join(work, "snapshots"))};\n` +
        `const ref = ${JSON.stringify(`dir:${rootfs}`)};\n` +
        body +
        `\nconsole.log("LAST LINE");\n`,
    );
    const child = spawn(process.execPath, [file], {
      env: { ...process.env, SUPERMACHINE_RUNTIME_DIR: runtimeDir },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    let lastLineAt: number | undefined;
    let killer: NodeJS.Timeout | undefined;
    child.stdout.on("data", (b: Buffer) => {
      stdout += b.toString();
      if (lastLineAt === undefined && stdout.includes("LAST LINE")) {
        lastLineAt = Date.now();
        killer = setTimeout(() => child.kill("SIGKILL"), EXIT_DEADLINE_MS);
      }
    });
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.once("exit", (c, s) => resolve([c, s])));
    if (killer) clearTimeout(killer);
    const exitAfterMs = lastLineAt === undefined ? -1 : Date.now() - lastLineAt;
    return { code, signal, stdout, stderr, exitAfterMs, runtimeDir };
  }

  /** The child's QEMU processes (their sockets live under its runtime dir). */
  function qemusOf(runtimeDir: string): number[] {
    return pidsMatching(new RegExp(`qemu-system.*${runtimeDir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`)).filter(processAlive);
  }

  async function checkExited(r: Run & { runtimeDir: string }, what: string): Promise<void> {
    const diag = `\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;
    assert.notEqual(r.signal, "SIGKILL", `${what}: the script did not exit by itself within ${EXIT_DEADLINE_MS} ms of its last line${diag}`);
    assert.equal(r.code, 0, `${what}: exit code${diag}`);
    assert.ok(r.exitAfterMs >= 0, `${what}: the script never reached its last line${diag}`);
    // SIGKILL reaches a confined QEMU through its wrapper and PID namespace: give it 2 s.
    const until = Date.now() + 2000;
    while (qemusOf(r.runtimeDir).length && Date.now() < until) await new Promise((res) => setTimeout(res, 50));
    assert.deepEqual(qemusOf(r.runtimeDir), [], `${what}: QEMU processes left behind 2 s after the script exited`);
    const parent = join(r.runtimeDir, `supermachine-${process.getuid!()}`);
    const left = existsSync(parent) ? readdirSync(parent) : [];
    assert.deepEqual(left, [], `${what}: runtime directories left behind`);
  }

  it("build (a fresh bake, its VM stashed for the pool), pool({min: 1}), acquire, exec, release, no shutdown", async () => {
    const r = await runScript(
      "quickstart",
      `const image = await Image.build({ ref, snapshotsDir, warmupTag: ${JSON.stringify(`exit-${randomBytes(3).toString("hex")}`)} });
const pool = await image.pool({ min: 1 });
const vm = await pool.acquire();
try {
  const { stdout, exitCode } = await vm.exec({ argv: ["echo", "hello from the VM"], timeoutMs: 5_000 });
  console.log(stdout.toString().trim(), exitCode, image.baked);
} finally {
  await vm.release();
}`,
    );
    await checkExited(r, "quick start");
    assert.match(r.stdout, /hello from the VM 0 true/);
  });

  it("the same with await pool.shutdown() at the end (a cached image this time)", async () => {
    const r = await runScript(
      "shutdown",
      `const image = await Image.build({ ref, snapshotsDir, warmupTag: "exit-shared" });
const pool = await image.pool({ min: 2, max: 3 });
const vm = await pool.acquire();
try {
  console.log((await vm.exec({ argv: ["echo", "hi"] })).stdout.toString().trim());
} finally {
  await vm.release();
}
await pool.shutdown();
console.log("stats", JSON.stringify(pool.stats()));`,
    );
    await checkExited(r, "with shutdown");
    assert.match(r.stdout, /^hi$/m);
    assert.match(r.stdout, /stats \{"alive":0,"inUse":0,"idle":0,"waiting":0/);
  });

  it("a bake whose stashed VM nobody takes, and a booted VM left running after its spawned process ended", async () => {
    const r = await runScript(
      "bake-only",
      `const image = await Image.build({ ref, snapshotsDir, warmupTag: ${JSON.stringify(`exit-${randomBytes(3).toString("hex")}`)} });
console.log("baked", image.baked);
const vm = await Vm.boot({ rootfs: ${JSON.stringify(rootfs)} });
const child = await vm.spawn({ argv: ["sh", "-c", "echo spawned"] });
for await (const chunk of child) process.stdout.write(chunk);
console.log("status", (await child.wait()).exitCode);
// Neither the stashed bake VM nor this booted VM (never released) may keep the process alive.`,
    );
    await checkExited(r, "bake only");
    assert.match(r.stdout, /baked true/);
    assert.match(r.stdout, /spawned\nstatus 0/);
  });
});
