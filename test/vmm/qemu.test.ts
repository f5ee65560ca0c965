/**
 * The QEMU command line: microvm, -nodefaults, the sandbox, only the devices
 * a VM needs, and the accelerator's own flags.
 */

import assert from "node:assert/strict";
import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { QemuError } from "../../src/errors.js";
import { DEFAULT_TCG_CPU, GUEST_MAC, QemuProcess, qemuArgs, tcgCpuModel, type QemuLaunch } from "../../src/vmm/qemu.js";

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

  it("TCG's CPU model: the default, or the launch's (a restore passes its snapshot's); KVM ignores it", () => {
    const t = qemuArgs(base);
    assert.equal(t[t.indexOf("-cpu") + 1], DEFAULT_TCG_CPU);
    const q = qemuArgs({ ...base, cpuModel: "qemu64" });
    assert.equal(q[q.indexOf("-cpu") + 1], "qemu64");
    const k = qemuArgs({ ...base, accel: "kvm", cpuModel: "qemu64" });
    assert.equal(k[k.indexOf("-cpu") + 1], "host");
  });

  it("SUPERMACHINE_TCG_CPU picks the model of new VMs; anything but a model name is refused", () => {
    assert.equal(tcgCpuModel({}), DEFAULT_TCG_CPU);
    assert.equal(tcgCpuModel({ SUPERMACHINE_TCG_CPU: "" }), DEFAULT_TCG_CPU);
    assert.equal(tcgCpuModel({ SUPERMACHINE_TCG_CPU: "Nehalem-v2" }), "Nehalem-v2");
    assert.equal(tcgCpuModel({ SUPERMACHINE_TCG_CPU: "max,-erms,+avx,tsc-frequency=2100000" }), "max,-erms,+avx,tsc-frequency=2100000");
    for (const bad of ["max,", "max,,avx", "max,-erms,", "max,a b", "max,x=y=z", "qemu64 -monitor stdio", "-help", "a".repeat(65), "x\ny"]) {
      assert.throws(() => tcgCpuModel({ SUPERMACHINE_TCG_CPU: bad }), (e: unknown) => e instanceof QemuError && /SUPERMACHINE_TCG_CPU/.test(e.message), bad);
    }
  });

  it("memory and vCPUs as asked; file-backed RAM for snapshots", () => {
    const a = qemuArgs({ ...base, memoryMib: 512, vcpus: 2, memoryFile: { path: "/s/ram", share: false }, incoming: true });
    assert.equal(a[a.indexOf("-m") + 1], "512M");
    assert.equal(a[a.indexOf("-smp") + 1], "2");
    assert.ok(a.includes("memory-backend-file,id=ram,size=512M,mem-path=/s/ram,share=off"));
    assert.equal(a[a.indexOf("-incoming") + 1], "unix:/run/x/mig-in.sock", "listening from the start (before QEMU drops privileges)");
  });

  // Regression: Vm.snapshot of a booted VM failed with 'Unknown ramblock
  // "microvm.ram"' in the helper QEMU, whose RAM block is "ram".
  it("anonymous RAM is a backend named like the file-backed one", () => {
    const a = qemuArgs(base);
    assert.ok(a.includes("memory-backend-ram,id=ram,size=256M"), a.join(" "));
    assert.ok(a.includes("memory-backend=ram"));
  });

  it("a NIC on the host stack's socket only with netSocket, with the one fixed MAC", () => {
    assert.ok(!qemuArgs(base).includes("-netdev"));
    const a = qemuArgs({ ...base, netSocket: "/run/x/net.sock" });
    assert.equal(a[a.indexOf("-netdev") + 1], "stream,id=net0,server=off,addr.type=unix,addr.path=/run/x/net.sock");
    assert.ok(a.includes(`virtio-net-device,netdev=net0,mac=${GUEST_MAC}`));
    assert.deepEqual(devices(a), ["virtio-serial-device", "virtserialport", "virtio-blk-device", "virtio-net-device"]);
    for (const bad of ["/run/x,y/net.sock", "net.sock", `/${"x".repeat(107)}`]) {
      assert.throws(() => qemuArgs({ ...base, netSocket: bad }), (e: unknown) => e instanceof TypeError && /netSocket/.test(e.message), bad);
    }
  });

  it("no root disk without a rootfs", () => {
    const { rootfs: _r, ...noRoot } = base;
    assert.deepEqual(devices(qemuArgs(noRoot)), ["virtio-serial-device", "virtserialport"]);
  });

  it("disks after the root disk, found by serial: writable overlays never flushed, read-only images read-only, commas escaped", () => {
    const a = qemuArgs({
      ...base,
      rootfs: "/r/a,b.erofs",
      disks: [
        { serial: "sm-disk", file: "/run/x/disk.img.qcow2", format: "qcow2", readOnly: false, backing: ["/s/disk.img"] },
        { serial: "sm-vol-1", file: "/s/vol-x.img", format: "raw", readOnly: true, backing: [] },
      ],
    });
    const drives = a.filter((_, i) => a[i - 1] === "-drive");
    assert.deepEqual(drives, [
      "id=root,file=/r/a,,b.erofs,format=raw,if=none,readonly=on",
      "id=disk0,file=/run/x/disk.img.qcow2,format=qcow2,if=none,cache=unsafe",
      "id=disk1,file=/s/vol-x.img,format=raw,if=none,readonly=on",
    ]);
    const blk = a.filter((v, i) => a[i - 1] === "-device" && v.startsWith("virtio-blk-device"));
    assert.deepEqual(blk, ["virtio-blk-device,drive=root,serial=sm-root", "virtio-blk-device,drive=disk0,serial=sm-disk", "virtio-blk-device,drive=disk1,serial=sm-vol-1"]);
  });
});

describe("QEMU process", () => {
  it("reports a device QEMU disabled (virtio error on its stderr), split across writes, and nothing for guest console lines", async () => {
    const dir = await mkdtemp(join(tmpdir(), "sm-qemu-"));
    try {
      // A stand-in for QEMU: the guest console (stdout) says the same words,
      // which must not count; QEMU's own stderr line arrives in two pieces.
      const fake = join(dir, "qemu");
      await writeFile(
        fake,
        "#!/bin/sh\necho 'qemu-system-x86_64: virtio: fake from the guest console'\n" +
          "printf 'qemu-system-x86_64: vir' >&2; sleep 0.2; printf 'tio: zero sized buffers are not allowed\\n' >&2\nsleep 0.3\n",
      );
      await chmod(fake, 0o755);
      const q = await QemuProcess.start({ ...base, qemuBinary: fake, dir });
      const seen: string[] = [];
      q.onDeviceError = (m) => seen.push(m);
      // A running QEMU does not hold the event loop (by design): the test does.
      const hold = setInterval(() => undefined, 1000);
      await q.exited.finally(() => clearInterval(hold));
      assert.deepEqual(seen, ["virtio: zero sized buffers are not allowed"]);
      assert.match(q.consoleTail(), /fake from the guest console/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
