/**
 * The QEMU command line: microvm, -nodefaults, the sandbox, only the devices
 * a VM needs, and the accelerator's own flags.
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { qemuArgs, type QemuLaunch } from "../../src/vmm/qemu.js";

const base: QemuLaunch = {
  accel: "tcg",
  memoryMib: 256,
  vcpus: 1,
  kernel: "/k/vmlinux",
  initrd: "/k/initrd",
  cmdline: "console=ttyS0",
  rootfs: "/r/root.erofs",
  dir: "/run/x",
  name: "sm-test",
};

function devices(a: string[]): string[] {
  return a.flatMap((v, i) => (a[i - 1] === "-device" ? [v.split(",")[0]!] : []));
}

describe("QEMU command line", () => {
  it("microvm with no default devices, seccomp on, QMP on a unix socket", () => {
    const a = qemuArgs(base);
    assert.ok(a.includes("-nodefaults"));
    assert.equal(a[a.indexOf("-M") + 1]!.split(",")[0], "microvm");
    assert.match(a[a.indexOf("-sandbox") + 1]!, /^on,.*spawn=deny/);
    assert.equal(a[a.indexOf("-qmp") + 1], "unix:/run/x/qmp.sock,server=on,wait=off");
    assert.deepEqual(devices(a), ["virtio-serial-device", "virtserialport", "virtio-blk-device"]);
    assert.match(a.join(" "), /id=root,file=\/r\/root.erofs,format=raw,if=none,readonly=on/);
  });

  it("TCG bounds its translation cache; KVM uses the host CPU", () => {
    const t = qemuArgs(base);
    assert.equal(t[t.indexOf("-accel") + 1], "tcg,tb-size=64");
    const k = qemuArgs({ ...base, accel: "kvm" });
    assert.equal(k[k.indexOf("-accel") + 1], "kvm");
    assert.equal(k[k.indexOf("-cpu") + 1], "host");
  });

  it("memory and vCPUs as asked; file-backed RAM for snapshots", () => {
    const a = qemuArgs({ ...base, memoryMib: 512, vcpus: 2, memoryFile: { path: "/s/ram", share: false }, incoming: true });
    assert.equal(a[a.indexOf("-m") + 1], "512M");
    assert.equal(a[a.indexOf("-smp") + 1], "2");
    assert.ok(a.includes("memory-backend-file,id=ram,size=512M,mem-path=/s/ram,share=off"));
    assert.equal(a[a.indexOf("-incoming") + 1], "defer");
  });

  it("no root disk without a rootfs", () => {
    const { rootfs: _r, ...noRoot } = base;
    assert.deepEqual(devices(qemuArgs(noRoot)), ["virtio-serial-device", "virtserialport"]);
  });
});
