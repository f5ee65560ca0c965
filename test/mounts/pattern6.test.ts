/**
 * The seed's Pattern 6 as it writes it, on real VMs (busybox image): a
 * volume at /work/node_modules, then the source mounted at /work over it by
 * warmup's `mount -t virtiofs src /work`. The volume must stay visible on
 * top of the mount (the agent binds it back, docs/mounts.md), its contents
 * are baked with the snapshot and never reach the host tree, and every
 * restored VM gets both again: live source, baked node_modules. Also the
 * `guestPath` form of the same layout, and a read-only mount that has no
 * room for the volume (exit 32, said on stderr). Run in a network namespace
 * (scripts/test.mjs).
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault, defaultRootfs, pidsMatching } from "../helpers.js";

async function sh(vm: Vm, script: string, timeoutMs = 120_000): Promise<{ code: number; out: string; err: string }> {
  const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

/** The type of the file system a guest process sees at `path` (statfs magic; mounts hidden below others do not count). */
async function fsTypeAt(vm: Vm, path: string): Promise<string> {
  const r = await sh(vm, `stat -f -c %t ${path}`);
  assert.equal(r.code, 0, r.err);
  const magic = r.out.trim();
  return ({ ef53: "ext4", "65735546": "fuse", "1021994": "tmpfs" } as Record<string, string>)[magic] ?? `magic ${magic}`;
}

describe("Pattern 6: a volume below a mount", { timeout: 4 * VM_TEST_TIMEOUT }, () => {
  let root: string;
  let src: string;
  let image: Image | undefined;
  const vms: Vm[] = [];

  before(async () => {
    root = await mkdtemp(join(tmpdir(), "sm-pattern6-"));
    src = join(root, "my-app");
    await mkdir(src);
    await writeFile(join(src, "package.json"), '{"name":"my-app","version":"1.0.0"}\n');
    await writeFile(join(src, "index.js"), "v1\n");
  });

  after(async () => {
    for (const v of vms) await v.destroy().catch(() => undefined);
    await image?.close();
    for (const v of vms) assert.deepEqual(pidsMatching(new RegExp(`sm-${v.id}`)), [], `QEMU of ${v.id} is gone`);
    await rm(root, { recursive: true, force: true });
  });

  it("warmup's mount over /work keeps the volume at /work/node_modules; installs land on the volume, baked; the host tree gets only the empty mount point", async () => {
    image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir: join(root, "snapshots"),
      warmupTag: `p6-${randomBytes(3).toString("hex")}`,
      mounts: [{ hostPath: src, guestTag: "src", symlinks: "opaque" }],
      volumes: [{ name: "node_modules", sizeMib: 64, mountPoint: "/work/node_modules" }],
      warmup: async (vm) => {
        const m = await vm.exec({ argv: ["mount", "-t", "virtiofs", "src", "/work"] });
        assert.equal(m.exitCode, 0, m.stderr.toString());
        assert.equal(await fsTypeAt(vm, "/work"), "fuse");
        assert.equal(await fsTypeAt(vm, "/work/node_modules"), "ext4", "the volume is on top of the mount");
        // The seed's own line (argv, no shell: its glob matches nothing; it must not break anything).
        await vm.exec({ argv: ["cp", "-r", "/work/package*.json", "/work/node_modules/.."] });
        // What an `npm install` does: read the manifest from the mount, write the tree to the volume.
        const r = await sh(vm, "cd /work && mkdir -p node_modules/left-pad && cp package.json node_modules/left-pad/ && echo installed > node_modules/.installed && sync && cat node_modules/.installed && df -k node_modules | tail -1");
        assert.equal(r.code, 0, r.err);
        assert.match(r.out, /^installed\n/);
      },
    });
    assert.equal(image.baked, true);
    // On the host: the mount point the agent created, and nothing of the volume.
    assert.ok(existsSync(join(src, "node_modules")), "the mount point exists in the host tree");
    assert.deepEqual(readdirSync(join(src, "node_modules")), [], "what warmup installed stayed on the volume");
    const h = await image.takeHandoff();
    if (h) vms.push(h);
  });

  it("every restored VM has the baked node_modules on top of the live source; its own writes stay its own", async () => {
    assert.ok(image, "built");
    await writeFile(join(src, "index.js"), "v2\n");
    const pool = await image.pool({ min: 0, max: 1 });
    try {
      for (let round = 0; round < 2; round++) {
        const vm = await pool.acquire();
        try {
          assert.equal(await fsTypeAt(vm, "/work/node_modules"), "ext4");
          const r = await sh(vm, "cat /work/index.js /work/node_modules/.installed; ls /work/node_modules; cat /work/node_modules/mine 2>/dev/null; echo mine > /work/node_modules/mine; echo guest > /work/from-guest-" + round);
          assert.equal(r.code, 0, r.err);
          assert.equal(r.out, "v2\ninstalled\nleft-pad\nlost+found\n", `round ${round}: live source, baked volume, nothing of the previous VM`);
          assert.equal(await readFile(join(src, `from-guest-${round}`), "utf8"), "guest\n", "writes to the source reach the host");
          assert.deepEqual(readdirSync(join(src, "node_modules")), [], "the volume's writes never reach the host");
        } finally {
          await vm.release();
        }
      }
    } finally {
      await pool.shutdown();
    }
  });

  it("Vm.snapshot of such a VM keeps both, and the VM goes on with both", async () => {
    assert.ok(image, "built");
    const vm = await image.restore();
    vms.push(vm);
    assert.equal((await sh(vm, "echo snap > /work/node_modules/snap.txt && sync")).code, 0);
    const snap = await vm.snapshot(join(root, "vm-snapshot"));
    assert.equal(await fsTypeAt(vm, "/work/node_modules"), "ext4", "back on top after the snapshot");
    assert.equal((await sh(vm, "cat /work/node_modules/snap.txt /work/index.js")).out, "snap\nv2\n");
    assert.ok(snap.manifest.disks?.some((d) => d.name === "node_modules"), "the snapshot has the volume");
    const loaded = await Image.fromSnapshot(join(root, "vm-snapshot"));
    try {
      const again = await loaded.restore();
      vms.push(again);
      const r = await sh(again, "cat /work/node_modules/snap.txt /work/node_modules/.installed /work/index.js");
      assert.equal(r.out, "snap\ninstalled\nv2\n", r.err);
    } finally {
      await loaded.close();
    }
  });

  it("with guestPath the same layout is mounted before the VM is handed over, in the bake and in restores", async () => {
    const auto = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir: join(root, "snapshots"),
      warmupTag: `p6auto-${randomBytes(3).toString("hex")}`,
      mounts: [{ hostPath: src, guestTag: "src", guestPath: "/work" }],
      volumes: [{ name: "deps", sizeMib: 16, mountPoint: "/work/deps" }],
      warmup: async (vm) => {
        assert.equal(await fsTypeAt(vm, "/work/deps"), "ext4");
        const r = await sh(vm, "echo dep > /work/deps/dep.txt && sync");
        assert.equal(r.code, 0, r.err);
      },
    });
    try {
      const h = await auto.takeHandoff();
      if (h) vms.push(h);
      const vm = await auto.restore();
      vms.push(vm);
      const r = await sh(vm, "cat /work/deps/dep.txt /work/index.js");
      assert.equal(r.out, "dep\nv2\n", r.err);
      assert.deepEqual(readdirSync(join(src, "deps")), []);
    } finally {
      await auto.close();
    }
  });

  it("a read-only mount with no directory for what lies below says why and exits 32; the mount itself stays", async () => {
    const ro = join(root, "ro");
    await mkdir(ro);
    await writeFile(join(ro, "a.txt"), "ro\n");
    const vm = await bootDefault({
      mounts: [
        { hostPath: ro, guestTag: "ro", readOnly: true },
        { hostPath: src, guestTag: "other" },
      ],
    });
    vms.push(vm);
    const t = await sh(vm, "mkdir -p /srv/cache && mount -t tmpfs tmpfs /srv/cache && echo t > /srv/cache/t");
    assert.equal(t.code, 0, t.err);
    const m = await vm.exec({ argv: ["mount", "-t", "virtiofs", "ro", "/srv"] });
    assert.equal(m.exitCode, 32, "the read-only mount has no cache directory for the tmpfs");
    assert.match(m.stderr.toString(), /mount: \/srv: .*\/srv\/cache/);
    assert.equal((await sh(vm, "cat /srv/a.txt")).out, "ro\n", "the mount itself is in place");
    // A mount inside another mount of the VM is refused (the agent serves both).
    const inner = await vm.exec({ argv: ["mount", "-t", "virtiofs", "other", "/srv/inner"] });
    assert.equal(inner.exitCode, 32);
    assert.match(inner.stderr.toString(), /inside another mount/);
  });
});
