/**
 * Accelerator choice: KVM only with a usable /dev/kvm *and* vmx/svm, TCG
 * otherwise; the option beats SUPERMACHINE_ACCEL beats auto.
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { MissingAssetError } from "../../src/errors.js";
import { chooseAccelerator, cpuHasVirtualization, type HostProbe } from "../../src/vmm/accel.js";

const INTEL = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae vmx ssse3\n";
const AMD = "flags\t\t: fpu svm lm\n";
const NONE = "flags\t\t: fpu vme de pse tsc msr pae ssse3 hypervisor\n";
const probe = (cpuinfo: string, kvmUsable: boolean): (() => HostProbe) => () => ({ cpuinfo, kvmUsable, ...(kvmUsable ? {} : { kvmError: "ENOENT" }) });

describe("accelerator choice", () => {
  it("reads vmx/svm from the flags line only", () => {
    assert.equal(cpuHasVirtualization(INTEL), true);
    assert.equal(cpuHasVirtualization(AMD), true);
    assert.equal(cpuHasVirtualization(NONE), false);
    assert.equal(cpuHasVirtualization("model name\t: vmx-like cpu\nflags\t: fpu\n"), false);
    assert.equal(cpuHasVirtualization(undefined), false);
  });

  it("auto picks KVM only when /dev/kvm works and the CPU has hardware virtualization", () => {
    assert.equal(chooseAccelerator(undefined, {}, probe(INTEL, true)).accel, "kvm");
    // Paravirtual KVM (kvm_pvm): /dev/kvm opens, but no vmx/svm: TCG.
    const pvm = chooseAccelerator(undefined, {}, probe(NONE, true));
    assert.equal(pvm.accel, "tcg");
    assert.match(pvm.reason, /no vmx\/svm/);
    const nokvm = chooseAccelerator(undefined, {}, probe(INTEL, false));
    assert.equal(nokvm.accel, "tcg");
    assert.match(nokvm.reason, /\/dev\/kvm is not usable/);
  });

  it("the option beats SUPERMACHINE_ACCEL, which beats auto", () => {
    assert.equal(chooseAccelerator("tcg", { SUPERMACHINE_ACCEL: "kvm" }, probe(INTEL, true)).accel, "tcg");
    assert.equal(chooseAccelerator(undefined, { SUPERMACHINE_ACCEL: "tcg" }, probe(INTEL, true)).accel, "tcg");
    assert.equal(chooseAccelerator(undefined, { SUPERMACHINE_ACCEL: "kvm" }, probe(NONE, true)).accel, "kvm");
    assert.equal(chooseAccelerator("auto", { SUPERMACHINE_ACCEL: "tcg" }, probe(INTEL, true)).accel, "kvm");
  });

  it("KVM requested without /dev/kvm is a clear error", () => {
    assert.throws(() => chooseAccelerator("kvm", {}, probe(INTEL, false)), (e: unknown) => e instanceof MissingAssetError && /accel: "tcg"/.test(e.message));
  });

  it("bad values are TypeErrors naming the source", () => {
    assert.throws(() => chooseAccelerator("hvf" as never, {}, probe(INTEL, true)), /Invalid option accel/);
    assert.throws(() => chooseAccelerator(undefined, { SUPERMACHINE_ACCEL: "xen" }, probe(INTEL, true)), /Invalid option SUPERMACHINE_ACCEL/);
  });
});
