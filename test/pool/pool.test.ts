/**
 * Pool semantics on real restored VMs: max under contention, FIFO waiters,
 * exact stats, acquireTimeoutMs, idle eviction, shutdown, leases, healing
 * after a VM's QEMU is killed, `await using`.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { AbortError, ClosedError, GuestDiedError, PoolError, TimeoutError } from "../../src/errors.js";
import { qemuStartCount } from "../../src/vmm/qemu.js";
import { Image } from "../../src/image/image.js";
import type { Pool, PoolStats } from "../../src/pool/pool.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs, descendantsMatching, killQemuUnderExec, processAlive, waitFor } from "../helpers.js";

function expectStats(pool: Pool, want: Partial<PoolStats>, what: string): void {
  const got = pool.stats();
  for (const [k, v] of Object.entries(want)) assert.equal(got[k as keyof PoolStats], v, `${what}: ${k} is ${got[k as keyof PoolStats]}, expected ${v} (${JSON.stringify(got)})`);
}

describe("Pool", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;
  const warmupTag = `pool-${randomBytes(3).toString("hex")}`;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-pool-"));
    image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag });
    await image.close();
  });

  after(async () => {
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("max is respected under 3x max concurrent acquires; waiters are served FIFO; stats are exact", async () => {
    const pool = await image.pool({ min: 0, max: 2, acquireTimeoutMs: 0 });
    try {
      expectStats(pool, { alive: 0, inUse: 0, idle: 0, waiting: 0, min: 0, max: 2 }, "empty");
      const order: number[] = [];
      const held: Vm[] = [];
      const acquires = Array.from({ length: 6 }, (_, i) =>
        pool.acquire().then((vm) => {
          order.push(i);
          held.push(vm);
          return vm;
        }),
      );
      let maxAlive = 0;
      const watch = setInterval(() => (maxAlive = Math.max(maxAlive, pool.stats().alive)), 1);
      try {
        await waitFor(() => held.length === 2, 120_000, "the first two VMs");
        expectStats(pool, { alive: 2, inUse: 2, idle: 0, waiting: 4 }, "saturated");
        // Release one at a time: each goes to the longest waiter.
        for (let k = 2; k < 6; k++) {
          await held[k - 2]!.release();
          await waitFor(() => held.length === k + 1, 120_000, `waiter ${k}`);
          expectStats(pool, { inUse: 2, waiting: 5 - k }, `after release ${k - 1}`);
        }
        await Promise.all(acquires);
      } finally {
        clearInterval(watch);
      }
      assert.deepEqual(order, [0, 1, 2, 3, 4, 5], "FIFO");
      assert.ok(maxAlive <= 2, `alive reached ${maxAlive} > max`);
      await Promise.all(held.slice(4).map((v) => v.release()));
      await waitFor(() => pool.stats().inUse === 0, 60_000, "releases");
      expectStats(pool, { inUse: 0, waiting: 0 }, "all released");
    } finally {
      await pool.shutdown();
    }
    expectStats(pool, { alive: 0, inUse: 0, idle: 0, waiting: 0 }, "after shutdown");
  });

  it("acquireTimeoutMs fires with a typed error; shutdown rejects waiters; acquire after shutdown throws", async () => {
    const pool = await image.pool({ min: 1, max: 1, acquireTimeoutMs: 500 });
    const held = await pool.acquire();
    expectStats(pool, { alive: 1, inUse: 1, idle: 0 }, "one held");
    await assert.rejects(pool.acquire(), (e: unknown) => e instanceof TimeoutError && /acquireTimeoutMs/.test(e.message));
    expectStats(pool, { waiting: 0 }, "timed-out waiter gone");
    const patient = await image.pool({ min: 0, max: 1, acquireTimeoutMs: 0 });
    const p1 = await patient.acquire();
    const waiting = patient.acquire().then(
      () => undefined,
      (e: unknown) => e,
    );
    await waitFor(() => patient.stats().waiting === 1, 10_000, "a waiter");
    await patient.shutdown();
    assert.ok((await waiting) instanceof PoolError);
    await assert.rejects(patient.acquire(), PoolError);
    await assert.rejects(p1.exec({ argv: ["true"] }), (e: unknown) => e instanceof ClosedError || e instanceof GuestDiedError);
    await held.release();
    await pool.shutdown();
  });

  it("shutdown() with the replacement's restore in flight ends it where it is: the pool's QEMU is gone when it resolves", async () => {
    const before = new Set(descendantsMatching(/qemu-system/));
    const pool = await image.pool({ min: 1, max: 1 });
    const vm = await pool.acquire();
    const mine = descendantsMatching(/qemu-system/).filter((p) => !before.has(p));
    assert.ok(mine.length >= 1, "the pool's VM runs a QEMU of its own");
    // The release starts the replacement's restore (into the same QEMU when
    // reused); shutdown() aborts it and resolves only once it has ended.
    await vm.release();
    assert.ok(pool.stats().alive >= 1, `a restore is in flight (${JSON.stringify(pool.stats())})`);
    await pool.shutdown();
    expectStats(pool, { alive: 0, inUse: 0, idle: 0, waiting: 0 }, "after shutdown");
    assert.deepEqual(mine.filter(processAlive), [], "no QEMU of the pool is left");
    await assert.rejects(pool.acquire(), PoolError);
  });

  it("release() of a VM whose QEMU cannot be reused returns without waiting for that QEMU's exit; shutdown() waits for it", async () => {
    // A fresh bake: the pool's first VM is the bake's own, started from the
    // boot template, whose QEMU cannot take a restore (Vm._mayRecycle).
    const img = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag: `${warmupTag}-teardown` });
    try {
      const pool = await img.pool({ min: 1, max: 1 });
      const vm = await pool.acquire();
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      const qemu = vm.qemu;
      assert.equal(qemu.exitStatus, undefined);
      await vm.release();
      // No event-loop turn since release() resolved: had it waited for the
      // teardown, QEMU's exit would have been seen.
      assert.equal(qemu.exitStatus, undefined, "release() resolved before the VM's QEMU exited");
      assert.equal(vm.status, "closed");
      await pool.shutdown();
      assert.notEqual(qemu.exitStatus, undefined, "shutdown() resolved after that QEMU's exit");
      assert.equal(processAlive(qemu.pid!), false, "the released VM's QEMU is gone");
      expectStats(pool, { alive: 0, inUse: 0, idle: 0, waiting: 0 }, "after shutdown");
    } finally {
      await img.close();
    }
  });

  it("a restore aborted before it starts starts no QEMU; one aborted while its QEMU starts rejects with AbortError, its QEMU gone", async () => {
    // A fresh Image object: no QEMU of an earlier pool to reuse.
    const img = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag });
    try {
      const starts = qemuStartCount();
      await assert.rejects(img.restore({ signal: AbortSignal.abort() }), AbortError);
      assert.equal(qemuStartCount(), starts, "no QEMU started for a restore aborted before it began");
      const before = new Set(descendantsMatching(/qemu-system/));
      const ac = new AbortController();
      const restoring = img.restore({ signal: ac.signal });
      await waitFor(() => qemuStartCount() > starts, 60_000, "the restore's QEMU to start");
      ac.abort();
      await assert.rejects(restoring, AbortError);
      assert.deepEqual(descendantsMatching(/qemu-system/).filter((p) => !before.has(p) && processAlive(p)), [], "no QEMU of the aborted restore is left");
    } finally {
      await img.close();
    }
  });

  it("idle VMs above min are evicted after idleTimeoutMs", async () => {
    const pool = await image.pool({ min: 1, max: 3, idleTimeoutMs: 300, restoreOnRelease: false });
    try {
      const vms = await Promise.all([pool.acquire(), pool.acquire(), pool.acquire()]);
      expectStats(pool, { alive: 3, inUse: 3 }, "three out");
      for (const v of vms) await v.release();
      expectStats(pool, { alive: 3, idle: 3 }, "three idle");
      await waitFor(() => pool.stats().idle === 1, 30_000, "eviction down to min");
      expectStats(pool, { alive: 1, idle: 1, inUse: 0 }, "evicted");
    } finally {
      await pool.shutdown();
    }
  });

  it("a lease ends at release: releasing twice is harmless and the old handle cannot touch the next holder's VM", async () => {
    const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      const first = await pool.acquire();
      await first.exec({ argv: ["sh", "-c", "echo one > /tmp/owner"] });
      await first.release();
      await first.release();
      const second = await pool.acquire();
      await assert.rejects(first.exec({ argv: ["true"] }), ClosedError);
      await first.release();
      expectStats(pool, { inUse: 1 }, "the old handle's release did not return the new lease");
      assert.equal((await second.exec({ argv: ["cat", "/tmp/owner"] })).stdout.toString(), "one\n");
      await second.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("await using releases the VM at the end of the block", async () => {
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      {
        await using vm = await pool.acquire();
        assert.equal((await vm.exec({ argv: ["echo", "scoped"] })).stdout.toString(), "scoped\n");
        expectStats(pool, { inUse: 1 }, "inside the block");
      }
      expectStats(pool, { inUse: 0 }, "after the block");
    } finally {
      await pool.shutdown();
    }
  });

  it("killing a pooled VM's QEMU: the holder gets a typed error and the pool heals back to min", async () => {
    const pool = await image.pool({ min: 2, max: 3 });
    try {
      const vm = await pool.acquire();
      const idleBefore = pool.stats().idle;
      assert.ok(idleBefore >= 1);
      await killQemuUnderExec(vm);
      await vm.release();
      await waitFor(() => pool.stats().idle === 2 && pool.stats().alive === 2, 120_000, "the pool to heal back to min");
      // An idle VM killed behind the pool's back is replaced too.
      const idleVm = (pool as unknown as { idle: { vm: Vm }[] }).idle[0]!.vm;
      process.kill(idleVm.pid!, "SIGKILL");
      await waitFor(() => idleVm.status === "dead", 30_000, "the pool to notice the death");
      await waitFor(() => pool.stats().idle === 2 && pool.stats().alive === 2, 120_000, "healing again");
      const fresh = await pool.acquire();
      assert.equal((await fresh.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      await fresh.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("a VM whose agent stops answering (QEMU frozen) fails its holder with a typed error and is replaced", async () => {
    const saved = process.env.SUPERMACHINE_LIVENESS_MS;
    process.env.SUPERMACHINE_LIVENESS_MS = "3000";
    const pool = await image.pool({ min: 1, max: 2 });
    try {
      const vm = await pool.acquire();
      process.kill(vm.pid!, "SIGSTOP");
      const t0 = Date.now();
      await assert.rejects(vm.exec({ argv: ["echo", "never"] }), (e: unknown) => e instanceof GuestDiedError && /stopped answering/.test(e.message));
      assert.ok(Date.now() - t0 < 60_000);
      await vm.release();
      await waitFor(() => pool.stats().idle >= 1 && pool.stats().inUse === 0, 120_000, "a replacement");
      const fresh = await pool.acquire();
      assert.equal((await fresh.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      await fresh.release();
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_LIVENESS_MS;
      else process.env.SUPERMACHINE_LIVENESS_MS = saved;
      await pool.shutdown();
    }
  });

  it("a size override on an image loaded from a snapshot directory (no build to replay) is refused with the fix named", async () => {
    const loaded = await Image.fromSnapshot(image.snapshotPath);
    await assert.rejects(loaded.pool({ memoryMib: 512 }), (e: unknown) => e instanceof PoolError && /Image\.build\(\{ \.\.\., memoryMib: 512, vcpus: 1 \}\)/.test(e.message));
    await assert.rejects(image.pool({ min: 3, max: 2 }), /Invalid option min/);
    await assert.rejects(image.pool({ memoryMib: 8 }), /Invalid option memoryMib/);
  });
});
