/**
 * Pools reuse a VM's QEMU process for the next VM of the same snapshot
 * (docs/qemu-reuse.md), with the QEMU `npm run setup` builds with
 * qemu/supermachine-reload.patch. On real VMs:
 * - the next VM runs in the same QEMU process and starts from the snapshot:
 *   files, processes, identity of the previous holder are gone;
 * - guest code the previous holder changed in place runs as the snapshot
 *   has it: the reload drops the translations of pages whose bytes it
 *   changes (a stale translation would run the previous holder's code);
 * - what the previous holder sent through the stream ring is not readable
 *   from the ring's disk in the next VM;
 * - a pool at its max starts no spare process; below it, or without
 *   reuse, one waits for the next restore;
 * - SUPERMACHINE_REUSE_QEMU=0 gives a new process per VM;
 * - nothing is left running after shutdown().
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { readlinkSync } from "node:fs";
import { basename, join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { SupermachineError } from "../../src/errors.js";
import { findQemu } from "../../src/vmm/qemu.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, descendantsMatching, processAlive } from "../helpers.js";
import { defaultImageRef } from "../../src/guest/default-image.js";
import { exitProgram } from "../fixtures/exit-elf.js";

async function waitUntil(cond: () => boolean, timeoutMs = 60_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** This process's QEMU processes (not the sandbox wrappers whose command lines name it). */
function qemus(): number[] {
  return descendantsMatching(/qemu-system/).filter((pid) => {
    try {
      return basename(readlinkSync(`/proc/${pid}/exe`)).startsWith("qemu-system");
    } catch {
      return false;
    }
  });
}

async function run(vm: Vm, script: string): Promise<{ code: number; out: string }> {
  const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs: 120_000 });
  return { code: r.exitCode, out: r.stdout.toString() + r.stderr.toString() };
}

describe("pools reuse QEMU processes (x-supermachine-reload)", { timeout: 4 * VM_TEST_TIMEOUT }, () => {
  let dir: string;
  let image: Image | undefined;

  before(async () => {
    assert.match(findQemu(), /\/qemu\/bin\/qemu-system-x86_64$/, "npm run setup -- --test builds the QEMU with the reload command; the tests need it");
    dir = await mkdtemp(join(tmpdir(), "sm-reuse-"));
    image = await Image.build({
      ref: await defaultImageRef(),
      snapshotsDir: join(dir, "snapshots"),
      warmupTag: `reuse-${randomBytes(3).toString("hex")}`,
      warmup: async (vm) => {
        await vm.writeFile("/tmp/p", exitProgram(1));
        const r = await vm.exec({ argv: ["sh", "-c", "chmod 755 /tmp/p && /tmp/p"] });
        assert.equal(r.exitCode, 1);
      },
    });
  });

  after(async () => {
    await image?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("runs the next VM in the same process, from the snapshot, with the snapshot's code", async () => {
    const pool = await image!.pool({ min: 0, max: 1 });
    const pids: number[] = [];
    try {
      // The image's first VM is the bake's own (its RAM is the bake's file, not the snapshot's): not reused.
      const bake = await pool.acquire();
      pids.push(bake.qemu.pid!);
      await bake.release();
      const a = await pool.acquire();
      pids.push(a.qemu.pid!);
      assert.notEqual(pids[1], pids[0]);
      const idA = a.id;
      assert.equal((await run(a, "/tmp/p")).code, 1);
      // The program's code page, changed in place (same inode, same page), then run.
      await a.writeFile("/tmp/q", exitProgram(2));
      const ddA = await run(a, "dd if=/tmp/q of=/tmp/p conv=notrunc 2>/dev/null && /tmp/p; echo rc=$?");
      assert.equal(ddA.out, "rc=2\n");
      await a.writeFile("/tmp/left-by-a", Buffer.from("a"));
      await run(a, "sleep 600 >/dev/null 2>&1 & echo started");
      const probe = "test -e /tmp/left-by-a && echo file; cat /proc/[0-9]*/comm 2>/dev/null | grep -qx sleep && echo sleeper; echo end";
      assert.equal((await run(a, probe)).out, "file\nsleeper\nend\n");
      await a.release();

      const b = await pool.acquire();
      pids.push(b.qemu.pid!);
      assert.equal(pids[2], pids[1], "the next VM runs in the previous one's QEMU process");
      assert.notEqual(b.id, idA);
      // The snapshot's program, not a stale translation of the one A wrote.
      assert.equal((await run(b, "/tmp/p")).code, 1);
      assert.equal((await run(b, probe)).out, "end\n");
      // B changes it too (A's /tmp/q went with A); C (same process again) gets the snapshot's.
      await b.writeFile("/tmp/q", exitProgram(2));
      assert.equal((await run(b, "dd if=/tmp/q of=/tmp/p conv=notrunc 2>/dev/null && /tmp/p")).code, 2);
      await b.release();
      const c = await pool.acquire();
      pids.push(c.qemu.pid!);
      assert.equal(pids[3], pids[1]);
      assert.equal((await run(c, "/tmp/p")).code, 1);
      await c.release();
    } finally {
      await pool.shutdown();
    }
    for (const pid of new Set(pids)) assert.equal(processAlive(pid), false, `QEMU ${pid} still runs after shutdown()`);
  });

  it("leaves nothing of the previous holder's stdin on the stream ring's disk", async () => {
    const pool = await image!.pool({ min: 0, max: 1 });
    const marker = `ring-marker-${randomBytes(6).toString("hex")}`;
    try {
      const a = await pool.acquire();
      assert.equal(a.conn.info?.features.includes("ring"), true, "the VM has the stream ring");
      const child = await a.spawn({ argv: ["sh", "-c", "cat > /dev/null"] });
      // Whole 256 KiB regions go through the ring.
      const chunk = Buffer.alloc(256 * 1024, `${marker}\n`);
      for (let i = 0; i < 4; i++) await child.writeStdin(chunk);
      await child.closeStdin();
      assert.equal((await child.wait()).exitCode, 0);
      const ringDev = "for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = sm-ring ] && echo /dev/${d##*/}; done";
      // The marker is there to find while A holds the VM (the check can fail).
      const seen = await run(a, `dev=$(${ringDev}); [ -n "$dev" ] || exit 9; grep -c ${marker} $dev`);
      assert.notEqual(seen.code, 9, "no ring disk found");
      assert.ok(Number(seen.out.trim()) > 0, `the marker is on A's ring: ${seen.out}`);
      const pidA = a.qemu.pid;
      await a.release();
      const b = await pool.acquire();
      assert.equal(b.qemu.pid, pidA);
      const r = await run(b, `dev=$(${ringDev}); [ -n "$dev" ] || exit 9; grep -c ${marker} $dev`);
      assert.equal(r.code, 1, `B must not find A's bytes on the ring: ${r.out}`);
      await b.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("the previous holder's vm.network gets none of the next VM's events or counters", async () => {
    const pool = await image!.pool({ min: 0, max: 1, network: { allow: ["127.0.0.1"] } });
    try {
      const a = await pool.acquire();
      const pidA = a.qemu.pid;
      const netA = a.network;
      const seenA: string[] = [];
      netA.on("denied", (e) => seenA.push(e.address ?? ""));
      await run(a, "wget -q -O- http://192.0.2.1/ 2>&1; true");
      await waitUntil(() => seenA.length > 0);
      const statsA = netA.stats();
      const seenCount = seenA.length;
      await a.release();
      const b = await pool.acquire();
      assert.equal(b.qemu.pid, pidA);
      const seenB: string[] = [];
      b.network.on("denied", (e) => seenB.push(e.address ?? ""));
      await run(b, "wget -q -O- http://198.51.100.7/ 2>&1; true");
      await waitUntil(() => seenB.length > 0);
      assert.deepEqual(seenB, ["198.51.100.7"]);
      assert.equal(seenA.length, seenCount);
      assert.ok(seenA.every((x) => x === "192.0.2.1"));
      assert.deepEqual(netA.stats(), statsA);
      assert.equal(b.network.stats().connectionsDenied, 1);
      await b.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("a VM that was snapshotted (Vm.snapshot: a full migration stream) is reused too", async () => {
    const pool = await image!.pool({ min: 0, max: 1 });
    try {
      const a = await pool.acquire();
      const pidA = a.qemu.pid;
      await a.snapshot(join(dir, `snap-${randomBytes(3).toString("hex")}`));
      await a.release();
      const b = await pool.acquire();
      assert.equal(b.qemu.pid, pidA);
      assert.equal((await run(b, "echo ok")).out, "ok\n");
      await b.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("a reload QEMU refuses (a truncated state file) fails the acquire with the reason, and leaves no process", async () => {
    const pool = await image!.pool({ min: 0, max: 1, acquireTimeoutMs: 120_000 });
    const state = join(image!.snapshotPath, "state");
    const saved = await readFile(state);
    let pidA: number | undefined;
    try {
      const a = await pool.acquire();
      pidA = a.qemu.pid!;
      await a.release();
      await writeFile(state, saved.subarray(0, saved.length >> 1));
      await assert.rejects(pool.acquire(), (e: unknown) => e instanceof SupermachineError && /Loading the state failed/.test((e as Error).message));
    } finally {
      await writeFile(state, saved);
      await pool.shutdown();
    }
    assert.equal(processAlive(pidA!), false);
  });

  it("a released VM's process kept for reuse ends when no restore takes it in time (a quiet pool at min 0 holds none)", async () => {
    process.env.SUPERMACHINE_RECYCLED_TTL_MS = "1500";
    const pool = await image!.pool({ min: 0, max: 1 });
    try {
      const a = await pool.acquire();
      const pid = a.qemu.pid!;
      await a.release();
      assert.equal(processAlive(pid), true, "kept for the next restore");
      const deadline = Date.now() + 60_000;
      while (processAlive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      assert.equal(processAlive(pid), false);
      assert.equal(pool.stats().alive, 0);
    } finally {
      delete process.env.SUPERMACHINE_RECYCLED_TTL_MS;
      await pool.shutdown();
    }
  });

  it("a pool at its max keeps no spare process (its next VM takes the ended one's); below its max it keeps one", async () => {
    const full = await image!.pool({ min: 1, max: 1 });
    try {
      const a = await full.acquire();
      // A spare starts right after a restore; none may appear.
      for (let end = Date.now() + 3000; Date.now() < end; ) {
        assert.deepEqual(qemus(), [a.qemu.pid], "only the VM's own process");
        await new Promise((r) => setTimeout(r, 100));
      }
      const pid = a.qemu.pid;
      await a.release();
      const b = await full.acquire();
      assert.equal(b.qemu.pid, pid, "the next VM runs in the ended one's process");
      await b.release();
    } finally {
      await full.shutdown();
    }
    const growing = await image!.pool({ min: 1, max: 2 });
    try {
      await waitUntil(() => qemus().length === 2);
      const [a, b] = [await growing.acquire(), await growing.acquire()];
      assert.notEqual(a.qemu.pid, b.qemu.pid);
      assert.deepEqual(qemus().sort(), [a.qemu.pid, b.qemu.pid].sort(), "the second VM took the spare");
      await a.release();
      await b.release();
    } finally {
      await growing.shutdown();
    }
  });

  it("starts a new process per VM with SUPERMACHINE_REUSE_QEMU=0 (from a spare started ahead)", async () => {
    process.env.SUPERMACHINE_REUSE_QEMU = "0";
    const pool = await image!.pool({ min: 0, max: 1 });
    try {
      const a = await pool.acquire();
      const pidA = a.qemu.pid!;
      // Every VM needs a new process: one waits, started ahead.
      await waitUntil(() => qemus().length === 2);
      await a.release();
      const b = await pool.acquire();
      assert.notEqual(b.qemu.pid, pidA);
      assert.equal(processAlive(pidA), false);
      await b.release();
    } finally {
      delete process.env.SUPERMACHINE_REUSE_QEMU;
      await pool.shutdown();
    }
  });
});
