/**
 * Volumes and the disk-backed writable layer (docs/volumes.md) on real VMs:
 * what warmup writes is in every restored VM, a VM's writes are its own
 * (restoreOnRelease), df shows the size, a full volume is ENOSPC in the
 * guest and nothing more on the host, Vm.snapshot keeps volumes, the bake's
 * handoff VM never writes into the baked images, a 256 MiB VM writes 1 GiB
 * with diskMib, and nothing is left behind. Plus the option errors, which
 * boot nothing.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync, statSync } from "node:fs";
import { mkdtemp, readFile, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { QemuError, SnapshotError } from "../../src/errors.js";
import { flattenOverlay, makeExt4, makeOverlay } from "../../src/volumes/disks.js";
import { Image, type BuildOptions } from "../../src/image/image.js";
import { sha256File } from "../../src/snapshot/files.js";
import { readManifest } from "../../src/snapshot/manifest.js";
import { liveQemuPids, qemuStartCount } from "../../src/vmm/qemu.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs } from "../helpers.js";

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;

async function sh(vm: Vm, script: string, timeoutMs = 300_000): Promise<{ stdout: string; stderr: string; exitCode: number }> {
  try {
    const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs });
    return { stdout: r.stdout.toString(), stderr: r.stderr.toString(), exitCode: r.exitCode };
  } catch (e) {
    // Say which VM, and what its console said.
    await new Promise((r) => setTimeout(r, 500));
    throw new Error(`VM ${vm.id} (${vm.status}): ${(e as Error).message}\n--- console ---\n${vm.consoleTail(4000)}`, { cause: e });
  }
}

/** This process's VM runtime directories (they hold the overlays). */
function runtimeDirs(): string[] {
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  const parent = join(process.env.SUPERMACHINE_RUNTIME_DIR ?? tmpdir(), `supermachine-${uid}`);
  if (!existsSync(parent)) return [];
  return readdirSync(parent)
    .filter((n) => n.startsWith(`${process.pid}-`))
    .map((n) => join(parent, n));
}

function overlaysLeft(): string[] {
  return runtimeDirs().flatMap((d) => (existsSync(d) ? readdirSync(d).filter((f) => f.endsWith(".qcow2") || f.endsWith(".empty")).map((f) => join(d, f)) : []));
}

describe("volumes and diskMib: option errors, before anything boots", () => {
  let snapshotsDir: string;
  let ref: string;
  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-volopts-"));
    ref = `dir:${await defaultRootfs()}`;
  });
  after(() => rm(snapshotsDir, { recursive: true, force: true }));

  const cases: [string, Partial<BuildOptions>, RegExp][] = [
    ["duplicate names", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/a" }, { name: "a", sizeMib: 16, mountPoint: "/b" }] }, /volumes\[1\]\.name/],
    ["duplicate mount points", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/a" }, { name: "b", sizeMib: 16, mountPoint: "/a/" }] }, /volumes\[1\]\.mountPoint/],
    ["a relative mount point", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "work/cache" }] }, /volumes\[0\]\.mountPoint/],
    ["a mount point with '..'", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/work/../etc" }] }, /volumes\[0\]\.mountPoint/],
    ["a mount point with a space", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/my dir" }] }, /volumes\[0\]\.mountPoint/],
    ["a mount point under /proc", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/proc/x" }] }, /volumes\[0\]\.mountPoint/],
    ["the root as mount point", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/" }] }, /volumes\[0\]\.mountPoint/],
    ["a fractional size", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/a" }, { name: "b", sizeMib: 16.5, mountPoint: "/b" }] }, /volumes\[1\]\.sizeMib/],
    ["a volume smaller than ext4 needs", { volumes: [{ name: "a", sizeMib: 16, mountPoint: "/a" }, { name: "b", sizeMib: 2, mountPoint: "/b" }] }, /volumes\[1\]\.sizeMib.*at least 8/],
    ["a volume over 1 TiB", { volumes: [{ name: "a", sizeMib: 2 ** 21, mountPoint: "/a" }] }, /volumes\[0\]\.sizeMib/],
    ["a name that is a path", { volumes: [{ name: "../x", sizeMib: 16, mountPoint: "/a" }] }, /volumes\[0\]\.name/],
    ["too many volumes", { volumes: Array.from({ length: 9 }, (_, i) => ({ name: `v${i}`, sizeMib: 16, mountPoint: `/v${i}` })) }, /volumes/],
    ["volumes not an array", { volumes: { name: "a" } as never }, /volumes/],
    ["a diskMib too small", { diskMib: 10 }, /diskMib/],
    ["a non-integer diskMib", { diskMib: "2048" as never }, /diskMib/],
  ];
  for (const [what, o, re] of cases) {
    it(`refuses ${what}`, async () => {
      const starts = qemuStartCount();
      await assert.rejects(Image.build({ ref, snapshotsDir, ...o }), (e: unknown) => {
        assert.ok(e instanceof TypeError, String(e));
        assert.match((e as Error).message, re);
        return true;
      });
      assert.equal(qemuStartCount(), starts, "nothing booted");
      assert.deepEqual(readdirSync(snapshotsDir), [], "nothing written");
    });
  }
});

describe("disk images on the host", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-voldisk-"));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it("an empty ext4 image is sparse; an untouched overlay flattens to the same bytes", async () => {
    const base = join(dir, "base.img");
    await makeExt4(base, 16, "t");
    const st = statSync(base);
    assert.equal(st.size, 16 * MiB);
    assert.ok(st.blocks * 512 < 4 * MiB, `${st.blocks * 512} bytes allocated`);
    const ovl = join(dir, "a.qcow2");
    await makeOverlay(ovl, base);
    await flattenOverlay(ovl, base, join(dir, "flat.img"));
    assert.equal(await sha256File(join(dir, "flat.img")), await sha256File(base));
    // A second overlay of the same image (the template path) is the same file.
    await makeOverlay(join(dir, "b.qcow2"), base);
    assert.deepEqual(await readFile(join(dir, "b.qcow2")), await readFile(ovl));
  });

  it("an overlay whose header names another backing file, or an external data file, is refused before qemu-img reads it", async () => {
    const base = join(dir, "base2.img");
    await makeExt4(base, 16, "t");
    const ovl = join(dir, "evil.qcow2");
    await makeOverlay(ovl, base);
    const good = await readFile(ovl);
    const off = Number(good.readBigUInt64BE(8));
    const len = good.readUInt32BE(16);
    const target = "/etc/hostname";
    const evil = Buffer.from(good);
    evil.fill(0, off, off + len);
    evil.write(target, off);
    evil.writeUInt32BE(target.length, 16);
    await writeFile(ovl, evil);
    await assert.rejects(flattenOverlay(ovl, base, join(dir, "out1.img")), (e: unknown) => e instanceof QemuError && /another backing file/.test(e.message));
    assert.equal(existsSync(join(dir, "out1.img")), false);
    const dataFile = Buffer.from(good);
    dataFile.writeBigUInt64BE(4n, 72);
    await writeFile(ovl, dataFile);
    await assert.rejects(flattenOverlay(ovl, base, join(dir, "out2.img")), (e: unknown) => e instanceof QemuError && /incompatible features 0x4/.test(e.message));
    assert.equal(existsSync(join(dir, "out2.img")), false);
  });
});

describe("volumes and diskMib on real VMs", { timeout: 4 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;
  let handoff: Vm | undefined;
  let payloadSum: string;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-vol-"));
    image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir,
      memoryMib: 256,
      diskMib: 2048,
      volumes: [
        { name: "cache", sizeMib: 64, mountPoint: "/work/cache" },
        { name: "small", sizeMib: 16, mountPoint: "/small" },
      ],
      warmupTag: `vol-${randomBytes(3).toString("hex")}`,
      warmup: async (vm) => {
        const r = await sh(vm, "echo baked > /work/cache/baked.txt && head -c 1048576 /dev/urandom > /work/cache/payload && sha256sum /work/cache/payload && echo root-baked > /root/baked.txt && sync");
        assert.equal(r.exitCode, 0, r.stderr);
        payloadSum = r.stdout.split(" ")[0]!;
      },
    });
    assert.equal(image.baked, true);
    handoff = await image.takeHandoff();
  });

  after(async () => {
    await handoff?.destroy();
    await image?.close();
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("the snapshot holds one raw image per disk, private and checksummed", async () => {
    const disks = image.manifest.disks ?? [];
    assert.deepEqual(
      disks.map((d) => [d.role, d.name, d.sizeMib, d.mountPoint]),
      [
        ["disk", "disk", 2048, null],
        ["volume", "cache", 64, "/work/cache"],
        ["volume", "small", 16, "/small"],
      ],
    );
    for (const [f, d] of [["disk.img", disks[0]!], ["vol-cache.img", disks[1]!], ["vol-small.img", disks[2]!]] as const) {
      const st = statSync(join(image.snapshotPath, f));
      assert.equal(st.size, d.sizeMib * MiB, `${f} is its size`);
      assert.equal(st.mode & 0o777, 0o600, `${f} is 0600`);
      assert.ok(st.blocks * 512 < st.size / 2, `${f} is sparse (${st.blocks * 512} bytes allocated)`);
    }
    await readManifest(image.snapshotPath, "full");
  });

  it("the handoff VM's writes after the bake never reach the baked images", async () => {
    assert.ok(handoff, "the bake VM was handed off");
    const r = await sh(handoff, "echo after > /work/cache/after.txt && rm /work/cache/baked.txt && dd if=/dev/zero of=/small/z bs=1M count=4 2>/dev/null && echo x > /root/after.txt && sync && ls /work/cache");
    assert.equal(r.exitCode, 0, r.stderr);
    assert.doesNotMatch(r.stdout, /baked\.txt/);
    for (const d of image.manifest.disks ?? []) {
      const f = join(image.snapshotPath, d.role === "disk" ? "disk.img" : `vol-${d.name}.img`);
      assert.equal(await sha256File(f), d.sha256, `${f} is unchanged`);
    }
    // And a VM restored now sees the bake, not the handoff's writes.
    const vm = await image.restore();
    try {
      const s = await sh(vm, "cat /work/cache/baked.txt /root/baked.txt; ls /work/cache /small /root");
      assert.equal(s.exitCode, 0, s.stderr);
      assert.match(s.stdout, /^baked\nroot-baked\n/);
      assert.doesNotMatch(s.stdout, /after\.txt|\bz\b/);
    } finally {
      await vm.destroy();
    }
    await handoff.destroy();
    handoff = undefined;
  });

  it("every restored VM has the volume warmup filled; one VM's writes are absent from the next (restoreOnRelease)", async () => {
    const pool = await image.pool({ min: 0, max: 1 });
    try {
      for (let round = 0; round < 2; round++) {
        const vm = await pool.acquire();
        try {
          const r = await sh(vm, "cat /work/cache/baked.txt; sha256sum /work/cache/payload; ls /work/cache /small; cat /root/mine 2>/dev/null; echo mine > /work/cache/mine; echo mine > /small/mine; echo mine > /root/mine; sync");
          assert.equal(r.exitCode, 0, r.stderr);
          assert.match(r.stdout, /^baked\n/);
          assert.ok(r.stdout.includes(payloadSum), "the payload written by warmup is intact");
          assert.doesNotMatch(r.stdout, /mine/, `round ${round}: nothing of the previous VM`);
        } finally {
          await vm.release();
        }
      }
    } finally {
      await pool.shutdown();
    }
  });

  it("df in the guest shows each volume's size (less ext4's overhead)", async () => {
    const vm = await image.restore();
    try {
      const r = await sh(vm, "df -k /work/cache /small /");
      assert.equal(r.exitCode, 0, r.stderr);
      const sizeKib = (mount: string) => {
        const line = r.stdout.split("\n").find((l) => l.trim().endsWith(` ${mount}`));
        assert.ok(line, `df lists ${mount}:\n${r.stdout}`);
        return Number(line.trim().split(/\s+/)[1]);
      };
      for (const [mount, mib] of [["/work/cache", 64], ["/small", 16], ["/", 2048]] as const) {
        const kib = sizeKib(mount);
        assert.ok(kib <= mib * 1024 && kib >= mib * 1024 * 0.7, `${mount}: ${kib} KiB for ${mib} MiB`);
      }
    } finally {
      await vm.destroy();
    }
  });

  it("a full volume is ENOSPC in the guest, and its host overlay stays within the volume's size", async () => {
    const vm = await image.restore();
    try {
      const r = await sh(vm, "dd if=/dev/zero of=/small/fill bs=1M count=64; echo rc=$?; sync");
      assert.match(r.stdout + r.stderr, /No space left on device/);
      assert.match(r.stdout, /rc=[1-9]/);
      const overlay = join(vm.runtimeDir, "vol-small.img.qcow2");
      const size = statSync(overlay).size;
      // qcow2 metadata (header, L1/L2, refcounts) is the only extra.
      assert.ok(size <= 16 * MiB + 2 * MiB, `overlay is ${size} bytes for a 16 MiB volume`);
      const ok = await sh(vm, "rm /small/fill && echo fine > /small/after && cat /small/after");
      assert.equal(ok.stdout, "fine\n", "the VM keeps working");
    } finally {
      await vm.destroy();
    }
  });

  it("with diskMib 2048 a 256 MiB VM writes 1 GiB under /root and keeps working; the next VM does not see it", async () => {
    const vm = await image.restore();
    try {
      const r = await sh(vm, "dd if=/dev/zero of=/root/big bs=1M count=1024 2>&1 && sync && ls -l /root/big && free -m", 600_000);
      assert.equal(r.exitCode, 0, r.stdout + r.stderr);
      assert.match(r.stdout, / 1073741824 /);
      const again = await sh(vm, "echo alive; stat -c %s /root/big");
      assert.equal(again.stdout, "alive\n1073741824\n");
    } finally {
      await vm.destroy();
    }
    const next = await image.restore();
    try {
      const r = await sh(next, "ls /root");
      assert.doesNotMatch(r.stdout, /big/);
      assert.match(r.stdout, /baked\.txt/);
    } finally {
      await next.destroy();
    }
  });

  it("Vm.snapshot includes the volumes and the writable layer", async () => {
    const vm = await image.restore();
    const dest = join(snapshotsDir, "from-vm");
    let snap: Image | undefined;
    try {
      const w = await sh(vm, "echo snap > /work/cache/snap.txt && echo snaproot > /root/snap.txt && sync");
      assert.equal(w.exitCode, 0, w.stderr);
      snap = await vm.snapshot(dest);
      assert.deepEqual((snap.manifest.disks ?? []).map((d) => d.name), ["disk", "cache", "small"]);
      // The VM runs on after its snapshot, writing to its own overlay.
      await sh(vm, "echo later > /work/cache/later.txt && sync");
    } finally {
      await vm.destroy();
    }
    const loaded = await Image.fromSnapshot(dest);
    const clone = await loaded.restore();
    try {
      const r = await sh(clone, "cat /work/cache/snap.txt /root/snap.txt /work/cache/baked.txt; ls /work/cache");
      assert.equal(r.exitCode, 0, r.stderr);
      assert.match(r.stdout, /^snap\nsnaproot\nbaked\n/);
      assert.doesNotMatch(r.stdout, /later/);
    } finally {
      await clone.destroy();
      await loaded.close();
      await snap?.close();
    }
  });

  it("a snapshot whose volume image is missing, cut short or changed is refused", async () => {
    const copy = join(snapshotsDir, "copy");
    await execFileP("cp", ["-a", "--sparse=always", image.snapshotPath, copy]);
    // A manifest whose volume name would make a path elsewhere.
    const mpath = join(copy, "manifest.json");
    const good = await readFile(mpath, "utf8");
    const bad = JSON.parse(good) as { disks: { name: string }[] };
    bad.disks[1]!.name = "../../etc/passwd";
    await writeFile(mpath, JSON.stringify(bad));
    await assert.rejects(readManifest(copy, "quick"), (e: unknown) => e instanceof SnapshotError && /bad disks\[1\] name/.test(e.message));
    await writeFile(mpath, good);
    const vol = join(copy, "vol-small.img");
    const orig = await readFile(vol);
    // Changed: the full check notices (the quick check of a cache hit does not read volumes).
    const changed = Buffer.from(orig);
    changed[1024 * 1024] = changed[1024 * 1024]! ^ 1;
    await writeFile(vol, changed);
    await assert.rejects(readManifest(copy, "full"), (e: unknown) => e instanceof SnapshotError && /vol-small\.img does not match its checksum/.test(e.message));
    await truncate(vol, 8 * MiB);
    await assert.rejects(readManifest(copy, "quick"), (e: unknown) => e instanceof SnapshotError && /vol-small\.img is 8388608 bytes/.test(e.message));
    await rm(vol);
    await assert.rejects(readManifest(copy, "quick"), (e: unknown) => e instanceof SnapshotError && /vol-small\.img file is missing/.test(e.message));
    await rm(copy, { recursive: true, force: true });
  });

  it("leaves no QEMU and no overlay behind", async () => {
    await image.close();
    assert.deepEqual(liveQemuPids(), []);
    assert.deepEqual(overlaysLeft(), []);
  });
});
