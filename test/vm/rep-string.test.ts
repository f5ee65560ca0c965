/**
 * String instructions under the QEMU setup builds (qemu/README.md,
 * supermachine-rep-string.patch: `rep movs` and `rep stos` a page at a time
 * under TCG). A static guest program (test/fixtures/guest/rep-string.c,
 * compiled here) checks them against element-by-element references: sizes,
 * page crossings, overlaps both ways and backward, the registers at a fault
 * in mid-run, and code rewritten by them after it ran.
 */

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, it } from "node:test";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { findQemu } from "../../src/vmm/qemu.js";
import { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, compileGuestProgram, defaultRootfs, descendantsMatching } from "../helpers.js";

describe("rep movs / rep stos in the guest", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let program: Buffer;

  before(async () => {
    program = await compileGuestProgram("rep-string");
  });

  after(() => {
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });

  it("under TCG, the QEMU in use is the setup build with the rep-string patch", (t) => {
    if (chooseAccelerator().accel !== "tcg") {
      t.skip("KVM: the guest's instructions run on the CPU, not in QEMU's translator");
      return;
    }
    const stamp = join(dirname(dirname(findQemu())), "build.json");
    assert.ok(existsSync(stamp), `${findQemu()} is not a setup build (no ${stamp})`);
    const patches = (JSON.parse(readFileSync(stamp, "utf8")) as { patches?: string[] }).patches ?? [];
    assert.ok(patches.includes("supermachine-rep-string.patch"), `built with ${JSON.stringify(patches)}`);
  });

  it("give the results and fault states of an element-by-element loop", async () => {
    const vm = await Vm.boot({ rootfs: await defaultRootfs() });
    try {
      await vm.writeFile("/tmp/rep-string", program);
      assert.equal((await vm.exec({ argv: ["chmod", "755", "/tmp/rep-string"] })).exitCode, 0);
      const r = await vm.exec({ argv: ["/tmp/rep-string"], timeoutMs: 5 * 60_000 });
      const out = r.stdout.toString();
      assert.equal(r.exitCode, 0, out.slice(0, 4000));
      assert.match(out, /^ok: (\d+) cases, 0 failures$/m);
      assert.ok(Number(/ok: (\d+)/.exec(out)![1]) > 10_000, "every case ran");
    } finally {
      await vm.destroy();
    }
  });
});
