/**
 * Under TCG a pool stops the vCPUs of the fresh VMs it holds idle (QMP
 * `stop`) and continues them on acquire, with the guest's clock set again
 * (it stood still while stopped). The bake's own VM waits stopped until
 * it is taken. A VM whose restore left the guest busy (its workload
 * starting) is stopped only once the guest is quiet. A VM reused dirty
 * keeps running. Real
 * restored VMs; no figure is asserted (docs/performance.md has them).
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import type { Pool } from "../../src/pool/pool.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs, waitFor } from "../helpers.js";

/** The VMs a pool holds idle (a test looks inside). */
function idleVms(pool: Pool): { vm: Vm; paused?: Promise<boolean> }[] {
  return (pool as unknown as { idle: { vm: Vm; paused?: Promise<boolean> }[] }).idle;
}

/**
 * Awaits `p` with the event loop held: a pool's wait for a quiet guest runs
 * on unref'd timers (it must not keep a user's script alive), and a test
 * awaiting that state directly has nothing else pending.
 */
async function held<T>(p: Promise<T>): Promise<T> {
  const keep = setInterval(() => undefined, 1000);
  try {
    return await p;
  } finally {
    clearInterval(keep);
  }
}

async function qmpStatus(vm: Vm): Promise<string | undefined> {
  return (await (await vm.qmp()).execute<{ status?: string }>("query-status")).status;
}

async function guestClockLagS(vm: Vm): Promise<number> {
  const r = await vm.exec({ argv: ["date", "+%s"] });
  assert.equal(r.exitCode, 0, r.stderr.toString());
  return Date.now() / 1000 - Number(r.stdout.toString().trim());
}

describe("Pool: idle VMs stopped, resumed on acquire", { timeout: 2 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;
  const saved = process.env.SUPERMACHINE_POOL_PAUSE_IDLE;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-pause-"));
    image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag: `pause-${randomBytes(3).toString("hex")}` });
  });

  after(async () => {
    if (saved === undefined) delete process.env.SUPERMACHINE_POOL_PAUSE_IDLE;
    else process.env.SUPERMACHINE_POOL_PAUSE_IDLE = saved;
    await image?.close();
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("an idle fresh VM is stopped; acquire continues it with the guest's clock set", async (t) => {
    if (image.manifest.accel !== "tcg") {
      process.env.SUPERMACHINE_POOL_PAUSE_IDLE = "1";
      t.diagnostic("KVM here: pausing forced on for the test");
    }
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const [entry] = idleVms(pool);
      assert.ok(entry, "one idle VM");
      assert.equal(await held(entry.paused!), true, "the pool stopped it");
      assert.equal(await qmpStatus(entry.vm), "paused");
      // Long enough that a clock left standing would show.
      await new Promise((r) => setTimeout(r, 5000));
      const vm = await pool.acquire();
      try {
        assert.equal(await qmpStatus(vm), "running");
        assert.equal((await vm.exec({ argv: ["echo", "resumed"] })).stdout.toString(), "resumed\n");
        const lag = await guestClockLagS(vm);
        assert.ok(Math.abs(lag) < 3, `the guest clock is ${lag.toFixed(1)} s behind the host's after 5 s stopped`);
      } finally {
        await vm.release();
      }
      // Its replacement is stopped in turn.
      await waitFor(() => idleVms(pool).length === 1, 120_000, "the replacement");
      assert.equal(await held(idleVms(pool)[0]!.paused!), true);
    } finally {
      await pool.shutdown();
    }
  });

  it("the bake's own VM waits stopped until a pool or takeHandoff() takes it (TCG)", async (t) => {
    if (image.manifest.accel !== "tcg") {
      t.skip("KVM here: the bake's VM keeps running, like idle pool VMs");
      return;
    }
    delete process.env.SUPERMACHINE_POOL_PAUSE_IDLE;
    const again = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag: `pause-handoff-${randomBytes(3).toString("hex")}` });
    try {
      const h = again._handoff;
      assert.ok(h, "the bake's VM");
      assert.equal(h.paused, true);
      assert.equal(await qmpStatus(h.vm), "paused");
      const vm = await again.takeHandoff();
      assert.equal(vm, h.vm);
      assert.equal(await qmpStatus(vm), "running");
      assert.equal((await vm.exec({ argv: ["echo", "awake"] })).stdout.toString(), "awake\n");
      assert.ok(Math.abs(await guestClockLagS(vm)) < 3, "its clock was set on resume");
      await vm.destroy();
    } finally {
      await again.close();
    }
  });

  it("a VM reused dirty (restoreOnRelease: false) keeps running in idle", async () => {
    process.env.SUPERMACHINE_POOL_PAUSE_IDLE = "1";
    const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      const vm = await pool.acquire();
      await vm.exec({ argv: ["true"] });
      await vm.release();
      const [entry] = idleVms(pool);
      assert.ok(entry, "the released VM is idle again");
      assert.equal(entry.paused, undefined, "not stopped");
      assert.equal(await qmpStatus(entry.vm), "running");
      const again = await pool.acquire();
      assert.equal((await again.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      await again.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("SUPERMACHINE_POOL_PAUSE_IDLE=0 leaves idle VMs running", async () => {
    process.env.SUPERMACHINE_POOL_PAUSE_IDLE = "0";
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const [entry] = idleVms(pool);
      assert.ok(entry);
      assert.equal(entry.paused, undefined);
      assert.equal(await qmpStatus(entry.vm), "running");
    } finally {
      await pool.shutdown();
    }
  });

  it("shutdown() while idle VMs are stopped ends their QEMU", async () => {
    process.env.SUPERMACHINE_POOL_PAUSE_IDLE = "1";
    const pool = await image.pool({ min: 2, max: 2 });
    const vms = idleVms(pool).map((e) => e.vm);
    assert.equal(vms.length, 2);
    await held(Promise.all(idleVms(pool).map((e) => e.paused)));
    await pool.shutdown();
    for (const vm of vms) {
      assert.equal(vm.status, "closed");
      assert.ok(vm.qemu.exitStatus, "QEMU exited");
    }
  });

  it("a VM whose workload is still starting is stopped only once the guest is quiet", async () => {
    process.env.SUPERMACHINE_POOL_PAUSE_IDLE = "1";
    const dir = await mkdtemp(join(tmpdir(), "sm-settle-"));
    // The image's CMD starts at every restore: about a second of emulated shell arithmetic, then a mark.
    const busy = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir: dir,
      warmupTag: `settle-${randomBytes(3).toString("hex")}`,
      cmd: ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; touch /tmp/settled"],
    });
    try {
      await busy.close(); // drops the bake's VM: the pool's is restored
      const pool = await busy.pool({ min: 1, max: 1 });
      try {
        const [entry] = idleVms(pool);
        assert.ok(entry?.paused);
        assert.equal(await held(entry.paused), true, "stopped in the end");
        const vm = await pool.acquire();
        // Checked at once: a VM stopped mid-loop would still be counting.
        const r = await vm.exec({ argv: ["test", "-e", "/tmp/settled"] });
        assert.equal(r.exitCode, 0, "the workload had finished before the pool stopped the VM");
        await vm.release();
      } finally {
        await pool.shutdown();
      }
    } finally {
      await busy.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
