/**
 * Guest assets: module load order from the cached Debian kernel, the
 * initramfs layout, and the kernel command line.
 */

import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { _forgetBootAssets, bootAssets, defaultAslr, kernelCmdline, locateAgent, wakeupPreemption } from "../../src/guest/assets.js";
import { MissingAssetError } from "../../src/errors.js";
import { buildCpio, S_IFREG } from "../../src/guest/cpio.js";
import { isStaticElf } from "../../src/guest/default-image.js";
import { fetchDebianKernel, locateKernel } from "../../src/guest/kernel.js";
import { GUEST_MODULES } from "../../src/guest/modules.js";
import { defaultCacheDir } from "../../src/paths.js";

/** Minimal newc reader for the test. */
function readCpio(b: Buffer): Map<string, { mode: number; data: Buffer; rdev: [number, number] }> {
  const out = new Map<string, { mode: number; data: Buffer; rdev: [number, number] }>();
  let off = 0;
  const pad = (n: number) => (n + 3) & ~3;
  for (;;) {
    assert.equal(b.toString("latin1", off, off + 6), "070701");
    const f = (i: number) => parseInt(b.toString("latin1", off + 6 + i * 8, off + 14 + i * 8), 16);
    const mode = f(1);
    const size = f(6);
    const namesize = f(11);
    const name = b.toString("utf8", off + 110, off + 110 + namesize - 1);
    const dataOff = pad(off + 110 + namesize);
    if (name === "TRAILER!!!") return out;
    out.set(name, { mode, data: b.subarray(dataOff, dataOff + size), rdev: [f(9), f(10)] });
    off = pad(dataOff + size);
  }
}

describe("guest assets", () => {
  it("modules are listed in dependency order (virtio_ring before virtio before virtio_mmio ...)", () => {
    const k = locateKernel(defaultCacheDir());
    const order = readFileSync(join(k.modulesDir!, "order"), "utf8").trim().split("\n");
    const at = (m: string) => {
      const i = order.indexOf(`${m}.ko`);
      assert.ok(i >= 0, `${m} missing from ${order.join(",")}`);
      return i;
    };
    assert.ok(at("virtio_ring") < at("virtio"));
    assert.ok(at("virtio") < at("virtio_mmio"));
    assert.ok(at("virtio_mmio") < at("virtio_console") || at("virtio") < at("virtio_console"));
    assert.ok(at("virtio") < at("virtio_blk"));
    // erofs needs libcrc32c, whose soft dependency is the crc32c algorithm.
    assert.ok(at("crc32c_generic") < at("libcrc32c"));
    assert.ok(at("libcrc32c") < at("erofs"));
    at("overlay");
    // The NIC's driver, after what its .modinfo names.
    assert.ok(at("failover") < at("net_failover"));
    assert.ok(at("net_failover") < at("virtio_net"));
    assert.ok(at("virtio") < at("virtio_net"));
    // Volumes and diskMib: ext4 after what it needs.
    assert.ok(at("jbd2") < at("ext4"));
    assert.ok(at("mbcache") < at("ext4"));
  });

  it("a 'current' moved to another module set (another copy of the library) does not change the kernel used", () => {
    const root = mkdtempSync(join(tmpdir(), "sm-kcache-"));
    try {
      const make = (name: string, wanted: string) => {
        mkdirSync(join(root, "kernel", name, "modules"), { recursive: true });
        writeFileSync(join(root, "kernel", name, "modules", "wanted"), `${wanted}\n`);
        writeFileSync(join(root, "kernel", name, "vmlinux"), "");
        writeFileSync(join(root, "kernel", name, "complete"), "");
      };
      make("6.1+mours", GUEST_MODULES.join(","));
      make("6.1+mother", "virtio_mmio,virtio_blk");
      writeFileSync(join(root, "kernel", "current"), "6.1+mother\n");
      assert.equal(locateKernel(root).id, "debian:6.1+mours");
      writeFileSync(join(root, "kernel", "current"), "6.1+mours\n");
      assert.equal(locateKernel(root).id, "debian:6.1+mours");
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it("the kernel cache records the module set it was made for (an older set is fetched again)", async () => {
    const k = locateKernel(defaultCacheDir());
    assert.equal(readFileSync(join(k.modulesDir!, "wanted"), "utf8").trim(), GUEST_MODULES.join(","));
    // The current cache is up to date: no fetch.
    assert.equal((await fetchDebianKernel(defaultCacheDir())).fetched, false);
  });

  it("the initramfs has the agent as /init, a console and the modules", async () => {
    const a = await bootAssets();
    const files = readCpio(readFileSync(a.initrd));
    const init = files.get("init")!;
    assert.equal(init.mode, S_IFREG | 0o755);
    assert.ok(isStaticElf(init.data), "the agent must be a static binary");
    assert.deepEqual(files.get("dev/console")!.rdev, [5, 1]);
    const order = files.get("lib/modules/order")!.data.toString().trim().split("\n");
    for (const m of order) assert.ok(files.has(`lib/modules/${m}`), `${m} listed but not packed`);
    // Same inputs, same archive: the cache key is stable.
    assert.equal((await bootAssets()).initrd, a.initrd);
  });

  it("the initramfs index: a later process finds the archive by its inputs' identity, and a changed agent or a bad entry is a miss", async () => {
    const k = locateKernel(defaultCacheDir());
    const cacheDir = mkdtempSync(join(tmpdir(), "sm-assets-index-"));
    try {
      const agentPath = join(cacheDir, "agent");
      copyFileSync(locateAgent(), agentPath);
      const o = { cacheDir, agentPath, kernel: k.kernel, ...(k.modulesDir ? { modulesDir: k.modulesDir } : {}) };
      const a = await bootAssets(o);
      const indexDir = join(cacheDir, "initramfs", "index");
      const entries = readdirSync(indexDir);
      assert.equal(entries.length, 1);
      const entry = join(indexDir, entries[0]!);
      const [hash, size] = readFileSync(entry, "latin1").trim().split(" ");
      assert.equal(Number(size), statSync(a.initrd).size);
      assert.ok(a.initrd.endsWith(`${hash!.slice(0, 32)}.cpio`));
      // Another process (the memo forgotten) takes the entry's archive without building one:
      // an entry pointing at another archive of that size proves it.
      const other = "f".repeat(64);
      copyFileSync(a.initrd, join(cacheDir, "initramfs", `${other.slice(0, 32)}.cpio`));
      writeFileSync(entry, `${other} ${size}\n`);
      _forgetBootAssets();
      const b = await bootAssets(o);
      assert.equal(b.initrd, join(cacheDir, "initramfs", `${other.slice(0, 32)}.cpio`));
      assert.notEqual(b.id, a.id, "the id follows the archive's hash");
      // The agent rewritten (same bytes, new ctime): a miss, built again, the entry rewritten.
      writeFileSync(agentPath, readFileSync(agentPath));
      _forgetBootAssets();
      const c = await bootAssets(o);
      assert.equal(c.initrd, a.initrd);
      assert.equal(c.id, a.id);
      // Entries that do not hold: a line that does not parse, an archive of another size, a missing archive.
      const fresh = readdirSync(indexDir).map((f) => join(indexDir, f));
      for (const bad of ["garbage\n", `${other} ${Number(size) + 1}\n`, `${"e".repeat(64)} ${size}\n`]) {
        for (const f of fresh) writeFileSync(f, bad);
        _forgetBootAssets();
        const d = await bootAssets(o);
        assert.equal(d.initrd, a.initrd, `entry ${JSON.stringify(bad)}`);
        assert.equal(d.id, a.id);
      }
    } finally {
      _forgetBootAssets();
      rmSync(cacheDir, { recursive: true, force: true });
    }
  });

  it("cpio entries are 4-byte aligned and terminated", () => {
    const b = buildCpio([{ name: "a", mode: S_IFREG | 0o644, data: Buffer.from("xyz") }]);
    const files = readCpio(b);
    assert.deepEqual(files.get("a")!.data, Buffer.from("xyz"));
    assert.equal(b.length % 4, 0);
  });

  it("the kernel command line: console, panic ends QEMU, TCG-only clock flags", () => {
    const t = kernelCmdline({ accel: "tcg", hostname: "h1", hasRootfs: true }).split(" ");
    for (const w of ["console=ttyS0", "panic=-1", "tsc=reliable", "sm.root=/dev/vda", "sm.hostname=h1"]) assert.ok(t.includes(w), w);
    const k = kernelCmdline({ accel: "kvm", hasRootfs: false }).split(" ");
    assert.ok(!k.includes("tsc=reliable"));
    assert.ok(k.includes("sm.root=none"));
    // Guest ASLR: only a false turns it off; the default follows the accelerator.
    assert.ok(!t.some((w) => w.startsWith("sm.aslr")));
    assert.ok(kernelCmdline({ accel: "tcg", hasRootfs: true, aslr: false }).split(" ").includes("sm.aslr=0"));
    assert.ok(!kernelCmdline({ accel: "tcg", hasRootfs: true, aslr: true }).includes("sm.aslr"));
    assert.deepEqual([defaultAslr("tcg"), defaultAslr("kvm")], [false, true]);
    // Wakeup preemption: off under TCG only, unless SUPERMACHINE_WAKEUP_PREEMPTION=1.
    assert.ok(t.includes("sm.wakeup_preempt=0"));
    assert.ok(!k.some((w) => w.startsWith("sm.wakeup_preempt")));
    const saved = process.env.SUPERMACHINE_WAKEUP_PREEMPTION;
    process.env.SUPERMACHINE_WAKEUP_PREEMPTION = "1";
    try {
      assert.ok(!kernelCmdline({ accel: "tcg", hasRootfs: true }).includes("sm.wakeup_preempt"));
      assert.deepEqual([wakeupPreemption("tcg"), wakeupPreemption("kvm")], [true, true]);
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_WAKEUP_PREEMPTION;
      else process.env.SUPERMACHINE_WAKEUP_PREEMPTION = saved;
    }
    assert.deepEqual([wakeupPreemption("tcg"), wakeupPreemption("kvm")], [false, true]);
  });

  it("a dynamically linked agent is refused with the fix named, before any VM boots", async () => {
    // /bin/sh on the host names a program interpreter, as a cargo build without crt-static does.
    await assert.rejects(bootAssets({ agentPath: "/bin/sh" }), (e: Error) => e instanceof MissingAssetError && e.asset === "agent" && /not a static ELF/.test(e.message) && /crt-static/.test(e.message));
  });
});
