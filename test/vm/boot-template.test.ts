/**
 * Boot templates (docs/boot-templates.md) on real VMs: a cold boot after
 * the first restores the machine's template and boots on as itself (its
 * own hostname, its own root image as a partition of the template's
 * placeholder disk, or the disk probed again when the host gives no size;
 * under TCG pretranslated from the blocks a bake recorded beside the template;
 * a template's guest zeroes its free memory first, so its RAM holds less);
 * VMs from one template
 * share nothing; a template whose files were tampered with is rebuilt, not
 * used; bootTemplate: false and SUPERMACHINE_BOOT_TEMPLATE=0 boot cold.
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { lstat, mkdtemp, readFile, readdir, rm, stat, symlink, writeFile } from "node:fs/promises";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { defaultImageRef } from "../../src/guest/default-image.js";
import { Image } from "../../src/image/image.js";
import { defaultCacheDir } from "../../src/paths.js";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { TB_HINTS_FILE, checkTbHints } from "../../src/vmm/pretranslate.js";
import { VM_TEST_TIMEOUT, bootDefault } from "../helpers.js";

const tcg = chooseAccelerator().accel === "tcg";

interface Start {
  id: string;
  how: string;
  template?: boolean;
}

describe("boot templates", { timeout: VM_TEST_TIMEOUT }, () => {
  let cacheDir: string;
  const starts: Start[] = [];
  const onStart = (m: unknown) => void starts.push(m as Start);
  const saved = process.env.SUPERMACHINE_BOOT_TEMPLATE;

  before(async () => {
    // A cache of its own (kernel and initramfs linked in): the first boot here builds the template.
    cacheDir = await mkdtemp(join(tmpdir(), "sm-tpl-"));
    for (const sub of ["kernel", "initramfs", "restore", "rootfs"]) await symlink(join(defaultCacheDir(), sub), join(cacheDir, sub)).catch(() => undefined);
    subscribe("supermachine:vm:start", onStart);
  });
  after(async () => {
    unsubscribe("supermachine:vm:start", onStart);
    if (saved === undefined) delete process.env.SUPERMACHINE_BOOT_TEMPLATE;
    else process.env.SUPERMACHINE_BOOT_TEMPLATE = saved;
    await rm(cacheDir, { recursive: true, force: true });
  });

  it("the first cold boot builds the template; the next ones restore it and boot on as themselves, sharing nothing", async () => {
    starts.length = 0;
    const first = await bootDefault({ cacheDir, hostname: "first-vm" });
    try {
      assert.equal((await first.exec({ argv: ["hostname"] })).stdout.toString(), "first-vm\n");
    } finally {
      await first.destroy();
    }
    const templates = await readdir(join(cacheDir, "boot-templates"));
    assert.equal(templates.filter((n) => /^[0-9a-f]{64}$/.test(n)).length, 1, templates.join(" "));
    const a = await bootDefault({ cacheDir, hostname: "vm-a" });
    const b = await bootDefault({ cacheDir, hostname: "vm-b" });
    try {
      assert.deepEqual(starts.map((s) => [s.how, s.template === true]), [["boot", true], ["boot", true], ["boot", true]]);
      assert.equal((await a.exec({ argv: ["hostname"] })).stdout.toString(), "vm-a\n");
      assert.equal((await b.exec({ argv: ["hostname"] })).stdout.toString(), "vm-b\n");
      // The root is a partition of the placeholder disk with the image's
      // own size (in 512-byte sectors), and it is what is mounted; the
      // agent did not fall back to probing the disk again.
      const size = await a.exec({ argv: ["sh", "-c", "cat /sys/block/vda/vda1/size; ls /bin/busybox"] });
      assert.equal(size.exitCode, 0, size.stderr.toString());
      assert.equal(Number(size.stdout.toString().split("\n")[0]) * 512, (await stat(a.launch.rootfsImage!)).size, size.stdout.toString());
      assert.doesNotMatch(a.qemu.consoleTail(), /probed again/);
      assert.match((await a.exec({ argv: ["cat", "/proc/cmdline"] })).stdout.toString(), /sm\.template=1/);
      // Loopback came up in the template (IFF_UP), and works.
      assert.equal(Number((await a.exec({ argv: ["cat", "/sys/class/net/lo/flags"] })).stdout.toString().trim()) & 1, 1);
      assert.equal((await a.exec({ argv: ["ping", "-c", "1", "-W", "5", "127.0.0.1"] })).exitCode, 0);
      await a.writeFile("/tmp/only-a", Buffer.from("a"));
      assert.equal((await b.exec({ argv: ["test", "-e", "/tmp/only-a"] })).exitCode, 1, "VMs of one template share no files");
      const ids = await Promise.all([a, b].map(async (v) => (await v.exec({ argv: ["cat", "/proc/sys/kernel/random/boot_id"] })).stdout.toString()));
      assert.notEqual(ids[0], ids[1]);
    } finally {
      await a.destroy();
      await b.destroy();
    }
  });

  it("a template line without the root's size (an older host's) has the guest probe the disk again", async () => {
    process.env.SUPERMACHINE_TEMPLATE_ROOTSIZE = "0";
    try {
      starts.length = 0;
      const vm = await bootDefault({ cacheDir, hostname: "probed" });
      try {
        assert.equal(starts[0]?.template, true);
        // No partition: the whole disk, probed again, has the image's size and is the root.
        const r = await vm.exec({ argv: ["sh", "-c", "cat /sys/block/vda/size; test -e /sys/block/vda/vda1 && echo partition; ls /bin/busybox; hostname"] });
        assert.equal(r.exitCode, 0, r.stderr.toString());
        const [sectors, next] = r.stdout.toString().split("\n");
        assert.equal(Number(sectors) * 512, (await stat(vm.launch.rootfsImage!)).size, r.stdout.toString());
        assert.equal(next, "/bin/busybox", r.stdout.toString());
        assert.match(r.stdout.toString(), /probed\n$/);
      } finally {
        await vm.destroy();
      }
    } finally {
      delete process.env.SUPERMACHINE_TEMPLATE_ROOTSIZE;
    }
  });

  it("a template whose state file was changed is rebuilt, not used", async () => {
    const root = join(cacheDir, "boot-templates");
    const [key] = (await readdir(root)).filter((n) => /^[0-9a-f]{64}$/.test(n));
    await writeFile(join(root, key!, "state"), "not a migration stream");
    starts.length = 0;
    const vm = await bootDefault({ cacheDir });
    try {
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      assert.equal(starts[0]?.template, true, "booted from the rebuilt template");
    } finally {
      await vm.destroy();
    }
  });

  it("a bake records the template's blocks beside it; later template VMs are pretranslated from them and run as before", async (t) => {
    if (!tcg) return t.skip("KVM: the guest's code runs on the CPU, nothing is translated");
    const image = await Image.build({ ref: await defaultImageRef(), cacheDir, snapshotsDir: join(cacheDir, "snapshots"), warmupTag: `tpl-hints-${randomBytes(3).toString("hex")}` });
    try {
      const root = join(cacheDir, "boot-templates");
      const [key] = (await readdir(root)).filter((n) => /^[0-9a-f]{64}$/.test(n));
      const file = join(root, key!, TB_HINTS_FILE);
      assert.equal((await lstat(file)).mode & 0o777, 0o600);
      assert.ok(checkTbHints(await readFile(file)) > 1000);
      const vm = await bootDefault({ cacheDir });
      try {
        assert.equal(await vm._pretranslated, true, "pretranslated from the template's list");
        const r = await vm.exec({ argv: ["sh", "-c", "seq 1 3000 | md5sum"] });
        assert.equal(r.stdout.toString(), `${createHash("md5").update(Array.from({ length: 3000 }, (_, i) => `${i + 1}\n`).join("")).digest("hex")}  -\n`);
        assert.equal(await vm._recordTbHints(), 0, "a pretranslated VM does not record");
      } finally {
        await vm.destroy();
      }
    } finally {
      await image.close();
    }
  });

  it("bootTemplate: false boots cold; a non-boolean is refused", async () => {
    starts.length = 0;
    const vm = await bootDefault({ cacheDir, bootTemplate: false });
    try {
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      assert.deepEqual(starts.map((s) => [s.how, s.template === true]), [["boot", false]]);
    } finally {
      await vm.destroy();
    }
    await assert.rejects(bootDefault({ cacheDir, bootTemplate: "no" as unknown as boolean }), (e: unknown) => e instanceof TypeError && /bootTemplate/.test((e as Error).message));
  });

  it("a template's guest zeroes its free memory before it is saved: its RAM holds less data than one built without", async (t) => {
    const root = join(cacheDir, "boot-templates");
    const before = new Set((await readdir(root)).filter((n) => /^[0-9a-f]{64}$/.test(n)));
    process.env.SUPERMACHINE_TEMPLATE_ZERO = "0";
    let unzeroed: string | undefined;
    try {
      const vm = await bootDefault({ cacheDir });
      try {
        assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
        unzeroed = (await readdir(root)).find((n) => /^[0-9a-f]{64}$/.test(n) && !before.has(n));
        assert.ok(unzeroed, "a template of its own (the setting is part of the key)");
        assert.match((await vm.exec({ argv: ["cat", "/proc/cmdline"] })).stdout.toString(), /sm\.zerofree=0/);
      } finally {
        await vm.destroy();
      }
    } finally {
      delete process.env.SUPERMACHINE_TEMPLATE_ZERO;
    }
    const zeroed = [...before][0]!;
    /** Bytes in 4 KiB blocks that are not all zeros. */
    const data = async (key: string) => {
      const b = await readFile(join(root, key, "ram"));
      const zero = Buffer.alloc(4096);
      let n = 0;
      for (let o = 0; o < b.length; o += 4096) if (!b.subarray(o, o + 4096).equals(zero)) n += 4096;
      return n;
    };
    const [z, u] = [await data(zeroed), await data(unzeroed!)];
    t.diagnostic(`RAM data: zeroed ${z >> 20} MiB, not ${u >> 20} MiB`);
    assert.ok(z + (8 << 20) < u, `zeroed ${z} bytes vs ${u}`);
    await rm(join(root, unzeroed!), { recursive: true, force: true });
  });

  it("SUPERMACHINE_BOOT_TEMPLATE=0 boots cold", async () => {
    process.env.SUPERMACHINE_BOOT_TEMPLATE = "0";
    starts.length = 0;
    const vm = await bootDefault({ cacheDir });
    try {
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      assert.deepEqual(starts.map((s) => [s.how, s.template === true]), [["boot", false]]);
      assert.doesNotMatch((await vm.exec({ argv: ["cat", "/proc/cmdline"] })).stdout.toString(), /sm\.template/);
    } finally {
      await vm.destroy();
      delete process.env.SUPERMACHINE_BOOT_TEMPLATE;
    }
  });
});
