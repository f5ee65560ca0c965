/**
 * The guest scheduler's wakeup preemption (agent `sm.wakeup_preempt=0`):
 * off under TCG, where every switch between guest processes flushes QEMU's
 * software TLB, on under KVM, and on under TCG with
 * SUPERMACHINE_WAKEUP_PREEMPTION=1. Read from the guest kernel's own
 * scheduler features (debugfs, which the agent mounts only for its write),
 * in a VM booted from the boot template (whose state predates the command
 * line), in one booted cold, and in a pool's restored VM.
 */

import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs, descendantsMatching } from "../helpers.js";

/** The guest's WAKEUP_PREEMPTION feature ("on" or "off"), and whether debugfs was mounted before we looked. */
async function guestSetting(vm: Vm): Promise<{ preempt: string; debugfsMounted: boolean }> {
  const r = await vm.exec({
    argv: ["sh", "-c", "grep -c debugfs /proc/mounts; mount -t debugfs none /sys/kernel/debug && tr ' ' '\\n' < /sys/kernel/debug/sched/features | grep WAKEUP_PREEMPTION; umount /sys/kernel/debug"],
  });
  const [mounted, feature] = r.stdout.toString().trim().split("\n");
  assert.ok(feature === "WAKEUP_PREEMPTION" || feature === "NO_WAKEUP_PREEMPTION", `scheduler features: ${r.stdout} ${r.stderr}`);
  return { preempt: feature === "WAKEUP_PREEMPTION" ? "on" : "off", debugfsMounted: mounted !== "0" };
}

describe("guest wakeup preemption", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  const want = chooseAccelerator().accel === "tcg" ? "off" : "on";

  after(() => {
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });

  it("off under TCG, on under KVM, in booted and restored VMs; debugfs is not left mounted", async () => {
    const rootfs = await defaultRootfs();
    for (const bootTemplate of [true, false]) {
      const vm = await Vm.boot({ rootfs, bootTemplate });
      try {
        assert.deepEqual(await guestSetting(vm), { preempt: want, debugfsMounted: false }, `bootTemplate ${bootTemplate}`);
      } finally {
        await vm.destroy();
      }
    }
    const image = await Image.build({ ref: `dir:${rootfs}` });
    try {
      await image.close(); // drops the bake's VM: the pool's is restored
      const pool = await image.pool({ min: 1, max: 1 });
      try {
        const vm = await pool.acquire();
        assert.equal((await guestSetting(vm)).preempt, want);
        await vm.release();
      } finally {
        await pool.shutdown();
      }
    } finally {
      await image.close();
    }
  });

  it("SUPERMACHINE_WAKEUP_PREEMPTION=1 keeps the kernel's default", async () => {
    const saved = process.env.SUPERMACHINE_WAKEUP_PREEMPTION;
    process.env.SUPERMACHINE_WAKEUP_PREEMPTION = "1";
    try {
      const vm = await Vm.boot({ rootfs: await defaultRootfs(), bootTemplate: false });
      try {
        assert.equal((await guestSetting(vm)).preempt, "on");
      } finally {
        await vm.destroy();
      }
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_WAKEUP_PREEMPTION;
      else process.env.SUPERMACHINE_WAKEUP_PREEMPTION = saved;
    }
  });
});
