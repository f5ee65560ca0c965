/**
 * The guest's user-space address randomization (BuildOptions.aslr,
 * VmBootOptions.aslr; agent `sm.aslr=0`): off by default under TCG, where a
 * program whose code moves is translated again at every start, on under
 * KVM; either way when asked. Checked in booted VMs (from the boot template,
 * whose state predates the command line) and in a pool's restored VM.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs, descendantsMatching } from "../helpers.js";

const setting = async (vm: Vm) => (await vm.exec({ argv: ["cat", "/proc/sys/kernel/randomize_va_space"] })).stdout.toString().trim();
/** Where the guest's loader put its stack, from two programs in a row. */
const stacks = async (vm: Vm) => {
  const r = await vm.exec({ argv: ["sh", "-c", "grep stack /proc/self/maps; grep stack /proc/self/maps"] });
  return r.stdout.toString().trim().split("\n");
};

describe("guest ASLR", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  const tcg = chooseAccelerator().accel === "tcg";
  let dir: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-aslr-"));
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });

  it("Vm.boot: off under TCG and on under KVM by default; aslr true or false wins", async () => {
    const rootfs = await defaultRootfs();
    for (const [aslr, want] of [[undefined, tcg ? "0" : "2"], [true, "2"], [false, "0"]] as const) {
      const vm = await Vm.boot({ rootfs, ...(aslr === undefined ? {} : { aslr }) });
      try {
        assert.equal(await setting(vm), want, `aslr ${aslr}`);
        const [a, b] = await stacks(vm);
        if (want === "0") assert.equal(a, b, "two programs get the same stack");
        else assert.notEqual(a, b, "two programs get different stacks");
      } finally {
        await vm.destroy();
      }
    }
  });

  it("a non-boolean aslr is a typed error naming the option", async () => {
    await assert.rejects(Vm.boot({ aslr: "no" as unknown as boolean }), (e: Error) => e instanceof TypeError && /Invalid option aslr/.test(e.message));
    await assert.rejects(Image.build({ ref: "dir:/nonexistent", aslr: 1 as unknown as boolean }), (e: Error) => e instanceof TypeError && /Invalid option aslr/.test(e.message));
  });

  it("Image.build: restored VMs keep the bake's setting, and aslr is part of the snapshot key", async () => {
    const ref = `dir:${await defaultRootfs()}`;
    const tag = `aslr-${randomBytes(3).toString("hex")}`;
    const on = await Image.build({ ref, snapshotsDir: dir, warmupTag: tag, aslr: true });
    const off = await Image.build({ ref, snapshotsDir: dir, warmupTag: tag, aslr: false });
    try {
      assert.notEqual(on.snapshotPath, off.snapshotPath);
      for (const [image, want] of [[on, "2"], [off, "0"]] as const) {
        await image.close(); // drops the bake's VM: the pool's is restored
        const pool = await image.pool({ min: 1, max: 1 });
        try {
          const vm = await pool.acquire();
          assert.equal(await setting(vm), want);
          await vm.release();
        } finally {
          await pool.shutdown();
        }
      }
    } finally {
      await on.close();
      await off.close();
    }
  });
});
