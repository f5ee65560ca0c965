/**
 * Live host directories in real VMs (real QEMU, kernel, agent; the default
 * busybox image, which has no virtio-fs device: the agent performs the
 * seed's `mount -t virtiofs`). Run in a network namespace
 * (SUPERMACHINE_TEST_NETNS=1 unshare --net ...), see docs/mounts.md.
 *
 * One VM carries most mounts (one per policy, readOnly, the race); a second
 * shares the workspace; an Image.build with a mount made by warmup checks
 * snapshots. Every VM is destroyed in `after`/`finally`.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { mkdir, mkdtemp, readFile, readlink, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import type { Vm } from "../../src/vm/vm.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, bootDefault, defaultRootfs, pidsMatching } from "../helpers.js";

async function sh(vm: Vm, script: string, timeoutMs = 60_000): Promise<{ code: number; out: string; err: string }> {
  const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

function hostMountsOf(id: string): string[] {
  return readFileSync("/proc/mounts", "utf8")
    .split("\n")
    .filter((l) => l.includes(id));
}

describe("mounts in real VMs", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let root: string;
  let ws: string;
  let deny: string;
  let follow: string;
  let ro: string;
  let race: string;
  let outside: string;
  let marker: string;
  const MARKER = `MARKER-${randomBytes(8).toString("hex")}`;
  let raceBin: string;
  let vm: Vm | undefined;
  let vm2: Vm | undefined;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), "sm-vmmounts-"));
    [ws, deny, follow, ro, race, outside] = ["ws", "deny", "follow", "ro", "race", "outside"].map((d) => join(root, d)) as [string, string, string, string, string, string];
    for (const d of [ws, deny, follow, ro, race, outside]) await mkdir(d);
    marker = join(outside, "marker");
    await writeFile(marker, MARKER);
    await writeFile(join(ws, "hello.txt"), "hello from the host\n");
    await writeFile(join(ro, "keep.txt"), "read only\n");
    // Host symlinks to a file outside each mount.
    for (const d of [ws, deny, follow]) await symlink(marker, join(d, "escape"));
    // The hostile guest's program (std-only Rust, static).
    raceBin = join(root, "racer-bin");
    execFileSync("rustc", ["-O", "-C", "strip=symbols", "-C", "panic=abort", "-C", "target-feature=+crt-static", "--target", /host: (\S+)/.exec(execFileSync("rustc", ["-vV"], { encoding: "utf8" }))![1]!, join(REPO_ROOT, "test", "fixtures", "mounts", "race.rs"), "-o", raceBin], { stdio: "inherit" });
    vm = await bootDefault({
      mounts: [
        { hostPath: ws, guestTag: "workspace" },
        { hostPath: deny, guestTag: "deny", symlinks: "deny", guestPath: "/mnt/deny" },
        { hostPath: follow, guestTag: "follow", symlinks: "follow", guestPath: "/mnt/follow" },
        { hostPath: ro, guestTag: "ro", readOnly: true, guestPath: "/mnt/ro" },
        { hostPath: race, guestTag: "race", guestPath: "/mnt/race" },
      ],
    });
  });

  after(async () => {
    const ids = [vm?.id, vm2?.id].filter((x): x is string => !!x);
    await vm?.destroy();
    await vm2?.destroy();
    for (const id of ids) assert.deepEqual(pidsMatching(new RegExp(`sm-${id}`)), [], `QEMU of ${id} is gone`);
    await rm(root, { recursive: true, force: true });
  });

  it("Pattern 5: mount -t virtiofs through exec, read, write back, host edits seen within 1 s", async () => {
    const m = await vm!.exec({ argv: ["mount", "-t", "virtiofs", "workspace", "/workspace"] });
    assert.equal(m.exitCode, 0, m.stderr.toString());
    const again = await vm!.exec({ argv: ["/bin/mount", "-t", "virtiofs", "workspace", "/workspace"] });
    assert.equal(again.exitCode, 0, "mounting the same tag on the same place again is a no-op");
    const elsewhere = await vm!.exec({ argv: ["mount", "-t", "virtiofs", "workspace", "/elsewhere"] });
    assert.equal(elsewhere.exitCode, 32);
    assert.match(elsewhere.stderr.toString(), /already mounted on \/workspace/);
    const r = await vm!.exec({ argv: ["cat", "/workspace/hello.txt"] });
    assert.equal(r.stdout.toString(), "hello from the host\n");
    const w = await sh(vm!, "echo written by the guest > /workspace/from-guest.txt && mkdir -p /workspace/made/deep && echo x > /workspace/made/deep/f");
    assert.equal(w.code, 0, w.err);
    assert.equal(await readFile(join(ws, "from-guest.txt"), "utf8"), "written by the guest\n");
    assert.equal(await readFile(join(ws, "made", "deep", "f"), "utf8"), "x\n");
    // Same length, so only invalidation (not a size change) can reveal it.
    await writeFile(join(ws, "edit.txt"), "version-1\n");
    assert.equal((await sh(vm!, "cat /workspace/edit.txt")).out, "version-1\n");
    await writeFile(join(ws, "edit.txt"), "version-2\n");
    await writeFile(join(ws, "new-on-host.txt"), "new\n");
    await new Promise((res) => setTimeout(res, 1000));
    const seen = await sh(vm!, "cat /workspace/edit.txt /workspace/new-on-host.txt");
    assert.equal(seen.out, "version-2\nnew\n", "host edits are visible in the guest after 1 s");
    const mounts = await sh(vm!, "grep ' /workspace ' /proc/mounts");
    assert.match(mounts.out, /^workspace \/workspace fuse rw,nosuid,nodev/);
  });

  it("exec with its working directory, program or PATH on a mount runs (the agent never blocks on its own mount); readFile there is refused clearly", async () => {
    await writeFile(join(ws, "tool.sh"), "#!/bin/sh\necho tool ran in $(pwd)\n", { mode: 0o755 });
    const cwd = await vm!.exec({ argv: ["cat", "hello.txt"], cwd: "/workspace", timeoutMs: 60_000 });
    assert.equal(cwd.stdout.toString(), "hello from the host\n", cwd.stderr.toString());
    const prog = await vm!.exec({ argv: ["/workspace/tool.sh"], cwd: "/workspace", timeoutMs: 60_000 });
    assert.equal(prog.stdout.toString(), "tool ran in /workspace\n", prog.stderr.toString());
    const viaPath = await vm!.exec({ argv: ["tool.sh"], env: { PATH: "/workspace:/bin" }, timeoutMs: 60_000 });
    assert.equal(viaPath.stdout.toString(), "tool ran in /\n", viaPath.stderr.toString());
    const missing = await vm!.exec({ argv: ["true"], cwd: "/workspace/no-such-dir", timeoutMs: 60_000 });
    assert.equal(missing.exitCode, 126);
    assert.match(missing.stderr.toString(), /working directory \/workspace\/no-such-dir/);
    await assert.rejects(vm!.readFile("/workspace/hello.txt"), /host directory mount/);
  });

  it("mount of an unknown tag exits 32 and names the configured tags; sh -c mount is not intercepted", async () => {
    const r = await vm!.exec({ argv: ["mount", "-t", "virtiofs", "nope", "/nope"] });
    assert.equal(r.exitCode, 32);
    assert.match(r.stderr.toString(), /no mount with tag nope .*workspace/);
    const s = await sh(vm!, "mount -t virtiofs workspace /elsewhere");
    assert.notEqual(s.code, 0, "a shell's own mount binary has no virtio-fs device to mount");
  });

  it("npm-style workspaces: relative symlinks between members work under opaque", async () => {
    await mkdir(join(ws, "proj", "packages", "a"), { recursive: true });
    await mkdir(join(ws, "proj", "node_modules"), { recursive: true });
    await writeFile(join(ws, "proj", "packages", "a", "index.js"), "module.exports = 'a';\n");
    await symlink("../packages/a", join(ws, "proj", "node_modules", "a"));
    const r = await sh(vm!, "cat /workspace/proj/node_modules/a/index.js && mkdir -p /workspace/proj/packages/b && ln -s ../packages/b /workspace/proj/node_modules/b && echo b > /workspace/proj/node_modules/b/x && readlink /workspace/proj/node_modules/a");
    assert.equal(r.code, 0, r.err);
    assert.equal(r.out, "module.exports = 'a';\n../packages/a\n");
    assert.equal(await readlink(join(ws, "proj", "node_modules", "b")), "../packages/b");
    assert.equal(await readFile(join(ws, "proj", "packages", "b", "x"), "utf8"), "b\n");
  });

  it("deny: creating a symlink is EPERM", async () => {
    const r = await sh(vm!, "ln -s target /mnt/deny/link");
    assert.notEqual(r.code, 0);
    assert.match(r.err, /Operation not permitted/);
    assert.equal(existsSync(join(deny, "link")), false);
  });

  it("opaque: a guest-made symlink's target is stored verbatim on the host", async () => {
    const target = "../../../etc/shadow-not-resolved";
    const r = await sh(vm!, `ln -s '${target}' /workspace/verbatim && readlink /workspace/verbatim`);
    assert.equal(r.code, 0, r.err);
    assert.equal(r.out, `${target}\n`);
    assert.equal(await readlink(join(ws, "verbatim")), target);
  });

  it("a host symlink to a file outside the mount: unreadable under deny and opaque, readable under follow", async () => {
    const d = await sh(vm!, "cat /mnt/deny/escape");
    assert.notEqual(d.code, 0);
    assert.ok(!d.out.includes(MARKER));
    const o = await sh(vm!, "readlink /workspace/escape; cat /workspace/escape");
    assert.equal(o.out.split("\n")[0], marker, "opaque shows the target");
    assert.ok(!o.out.includes(MARKER), "opaque never reads through it");
    const f = await sh(vm!, "cat /mnt/follow/escape");
    assert.equal(f.code, 0, f.err);
    assert.equal(f.out, MARKER);
  });

  it("readOnly mounts refuse writes", async () => {
    const r = await sh(vm!, "cat /mnt/ro/keep.txt; echo x > /mnt/ro/new.txt; echo $?; echo y >> /mnt/ro/keep.txt; echo $?; rm /mnt/ro/keep.txt; echo $?");
    const lines = r.out.split("\n");
    assert.equal(lines[0], "read only");
    assert.deepEqual(lines.slice(1, 4).map((x) => x !== "0"), [true, true, true], r.out);
    assert.match(r.err, /Read-only file system/);
    assert.equal(existsSync(join(ro, "new.txt")), false);
    assert.equal(await readFile(join(ro, "keep.txt"), "utf8"), "read only\n");
  });

  it("a hostile guest racing symlink swaps (a directory renamed to a symlink to /) never reaches outside hostPath", async (t) => {
    // Inside the mount, d<marker path> exists with other content, so reads
    // succeed while d is the directory and the race is real.
    await mkdir(join(race, "d", outside), { recursive: true });
    await writeFile(join(race, "d", marker), "inside\n");
    await vm!.writeFile("/root/race", await readFile(raceBin));
    assert.equal((await vm!.exec({ argv: ["chmod", "755", "/root/race"] })).exitCode, 0);
    // The racer lowers its own priority: the agent must keep answering.
    const r = await vm!.exec({ argv: ["/root/race", "/mnt/race", marker, join(outside, "pwned"), "120", "2000"], timeoutMs: 300_000 });
    const out = r.stdout.toString();
    assert.equal(r.exitCode, 0, r.stderr.toString());
    assert.ok(!out.includes(MARKER), "no byte of the marker outside hostPath was read");
    assert.deepEqual(readdirSync(outside).sort(), ["marker"], "nothing was written outside hostPath");
    assert.equal(readFileSync(marker, "utf8"), MARKER);
    const m = /swaps=(\d+) reads=(\d+) hits=(\d+) creates=(\d+)/.exec(out);
    assert.ok(m, out.slice(-500));
    t.diagnostic(m[0]);
    const [swaps, reads, hits] = [Number(m[1]), Number(m[2]), Number(m[3])];
    assert.ok(swaps > 0 && swaps + reads >= 2000, `the race ran thousands of times (${m[0]})`);
    assert.ok(hits > 0, `reads under the real directory succeeded, so the race was live (${m[0]})`);
    assert.ok(existsSync(join(race, "d", outside, "pwned")) || existsSync(join(race, "d.real", outside, "pwned")), "creates landed inside the mount");
  });

  it("two VMs share one mount and see each other's writes", async () => {
    vm2 = await bootDefault({ mounts: [{ hostPath: ws, guestTag: "shared", guestPath: "/ws" }] });
    const a = await sh(vm!, "echo from-vm1 > /workspace/shared-1.txt");
    assert.equal(a.code, 0, a.err);
    const b = await sh(vm2, "cat /ws/shared-1.txt && echo from-vm2 > /ws/shared-2.txt");
    assert.equal(b.out, "from-vm1\n", b.err);
    await new Promise((res) => setTimeout(res, 1000));
    const c = await sh(vm!, "cat /workspace/shared-2.txt");
    assert.equal(c.out, "from-vm2\n", c.err);
  });

  it("a host that never answers: the agent answers EIO after its 30 s deadline, the guest does not hang", async () => {
    // A MOUNT stream whose requests nobody answers (not even INIT).
    const silent = vm!.conn.mount("silent", "/mnt/silent", false);
    let requests = 0;
    silent.onRequest = () => requests++;
    assert.equal(await silent.registered, "/mnt/silent");
    const t0 = Date.now();
    const r = await sh(vm!, "cat /mnt/silent/anything; echo status=$?", 120_000);
    assert.match(r.out, /status=[1-9]/);
    assert.ok(Date.now() - t0 >= 29_000, "the guest waited for the agent's deadline");
    assert.ok(requests >= 1, "the request reached the host");
    await silent.detach(30_000);
  });

  it("no FUSE mount of the VMs is left on the host", () => {
    // The guest's mounts live in the guest kernel; the host only serves them.
    for (const v of [vm, vm2]) if (v) assert.deepEqual(hostMountsOf(v.id), []);
  });
});

describe("mounts and snapshots", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let root: string;
  let snapshotsDir: string;
  let src: string;
  let image: Image | undefined;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), "sm-snapmounts-"));
    snapshotsDir = join(root, "snapshots");
    src = join(root, "src");
    await mkdir(src);
    await writeFile(join(src, "state.txt"), "bake-time\n");
  });

  after(async () => {
    await image?.close();
    await rm(root, { recursive: true, force: true });
  });

  it("a mount made by warmup is mounted again, at the same place, with live host content, in the handoff and every restored VM", async () => {
    const warmupTag = `m-${randomBytes(3).toString("hex")}`;
    const ref = `dir:${await defaultRootfs()}`;
    image = await Image.build({
      ref,
      snapshotsDir,
      warmupTag,
      mounts: [
        { hostPath: src, guestTag: "src" },
        { hostPath: src, guestTag: "auto", guestPath: "/auto", readOnly: true },
      ],
      warmup: async (w) => {
        const m = await w.exec({ argv: ["mount", "-t", "virtiofs", "src", "/src"] });
        assert.equal(m.exitCode, 0, m.stderr.toString());
        const r = await w.exec({ argv: ["sh", "-c", "cat /src/state.txt /auto/state.txt > /root/seen-at-bake"] });
        assert.equal(r.exitCode, 0);
      },
    });
    assert.deepEqual(
      image.manifest.mounts?.map((m) => [m.guestTag, m.guestPath]),
      [
        ["src", "/src"],
        ["auto", "/auto"],
      ],
    );
    assert.ok(!JSON.stringify(image.manifest.inputs).includes(src), "hostPath is not part of the cache key");
    await writeFile(join(src, "state.txt"), "after-bake\n");
    const handoff = await image.takeHandoff();
    assert.ok(handoff, "the bake VM is handed off");
    try {
      const h = await sh(handoff, "cat /src/state.txt");
      assert.equal(h.out, "after-bake\n", h.err);
    } finally {
      await handoff.destroy();
    }
    const restored = await image.restore();
    try {
      // The seed's own mount command, run again after restore, finds it in place.
      assert.equal((await restored.exec({ argv: ["mount", "-t", "virtiofs", "src", "/src"] })).exitCode, 0);
      const r = await sh(restored, "cat /root/seen-at-bake; cat /src/state.txt /auto/state.txt; grep -c ' fuse ' /proc/mounts; echo new > /src/from-restore");
      assert.equal(r.out, "bake-time\nbake-time\nafter-bake\nafter-bake\n2\n", r.err);
      assert.equal(await readFile(join(src, "from-restore"), "utf8"), "new\n");
      // Vm.snapshot detaches and re-attaches too; Image.fromSnapshot mounts the manifest's host path.
      const snap = await restored.snapshot(join(root, "vm-snapshot"));
      assert.deepEqual(snap.manifest.mounts?.map((m) => [m.guestTag, m.guestPath, m.hostPath]), [
        ["src", "/src", src],
        ["auto", "/auto", src],
      ]);
      assert.equal((await sh(restored, "cat /src/state.txt")).out, "after-bake\n", "the snapshotted VM has its mount back");
      await writeFile(join(src, "state.txt"), "after-vm-snapshot\n");
      const loaded = await Image.fromSnapshot(join(root, "vm-snapshot"));
      const fromSnap = await loaded.restore();
      try {
        assert.equal((await sh(fromSnap, "cat /src/state.txt /auto/state.txt")).out, "after-vm-snapshot\nafter-vm-snapshot\n");
      } finally {
        await fromSnap.destroy();
        await loaded.close();
      }
    } finally {
      await restored.destroy();
    }
    // A moved checkout: the same snapshot (no bake), mounted from the new place.
    const moved = join(root, "moved");
    await mkdir(moved);
    await writeFile(join(moved, "state.txt"), "moved\n");
    const again = await Image.build({
      ref,
      snapshotsDir,
      warmupTag,
      mounts: [
        { hostPath: moved, guestTag: "src" },
        { hostPath: moved, guestTag: "auto", guestPath: "/auto", readOnly: true },
      ],
    });
    assert.equal(again.baked, false);
    const pool = await again.pool({ min: 0, max: 1 });
    try {
      const p = await pool.acquire();
      try {
        assert.equal((await sh(p, "cat /src/state.txt")).out, "moved\n");
      } finally {
        await p.release();
      }
    } finally {
      await pool.shutdown();
      await again.close();
    }
  });
});
