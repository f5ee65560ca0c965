/**
 * Image.build, snapshots and restores on real VMs (the default busybox
 * image as `dir:`): the snapshot cache, warmup state, clones' uniqueness,
 * listenerRequired, Vm.snapshot, corrupt snapshots, concurrent bakers.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync, statSync } from "node:fs";
import { mkdtemp, open, rm, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { SnapshotError, TimeoutError } from "../../src/errors.js";
import { Image } from "../../src/image/image.js";
import { SNAPSHOT_VERSION } from "../../src/snapshot/manifest.js";
import { qemuStartCount } from "../../src/vmm/qemu.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, defaultRootfs } from "../helpers.js";

const execFileP = promisify(execFile);

function httpGet(addr: string, path = "/"): Promise<{ status: number; body: string }> {
  const [host, port] = addr.split(":");
  return new Promise((resolve, reject) => {
    const req = request({ host, port: Number(port), path, timeout: 60_000 }, (res) => {
      let body = "";
      res.on("data", (c: Buffer) => (body += c.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.end();
  });
}

/** Snapshot directories are 0700 and their files 0600. */
function assertPrivateSnapshot(dir: string): void {
  assert.equal(statSync(dir).mode & 0o777, 0o700, `${dir} is 0700`);
  for (const f of ["manifest.json", "ram", "state", "rootfs.erofs"]) assert.equal(statSync(join(dir, f)).mode & 0o777, 0o600, `${f} is 0600`);
}

describe("Image.build and restores", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let ref: string;
  let extra: string;
  let image: Image;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-build-"));
    ref = `dir:${await defaultRootfs()}`;
    extra = join(snapshotsDir, "app.toml");
    await writeFile(extra, "answer = 42\n");
    image = await Image.build({
      ref,
      snapshotsDir,
      extraFiles: [{ hostPath: extra, guestPath: "/etc/app.toml" }],
      warmupTag: `v1-${randomBytes(3).toString("hex")}`,
      warmup: async (vm) => {
        const r = await vm.exec({ argv: ["sh", "-c", "echo warmed > /root/warm.txt; head -c 16 /dev/urandom > /root/seed"] });
        assert.equal(r.exitCode, 0);
      },
    });
  });

  after(async () => {
    await image?.close();
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("bakes once: the second build with the same options boots nothing", async () => {
    assert.equal(image.baked, true);
    assert.equal(image.memoryMib, 256);
    await image.saved();
    assertPrivateSnapshot(image.snapshotPath);
    assert.equal(image.vcpus, 1);
    const starts = qemuStartCount();
    const again = await Image.build({ ref, snapshotsDir, extraFiles: [{ hostPath: extra, guestPath: "/etc/app.toml" }], warmupTag: image.manifest.inputs.warmupTag as string });
    assert.equal(again.baked, false);
    assert.equal(again.snapshotPath, image.snapshotPath);
    assert.equal(qemuStartCount(), starts, "a cache hit must not start QEMU");
  });

  it("changing an extraFiles file's content or the warmupTag re-bakes", async () => {
    const tag = image.manifest.inputs.warmupTag as string;
    const other = join(snapshotsDir, "other.toml");
    await writeFile(other, "answer = 42\n");
    const same = await Image.build({ ref, snapshotsDir, extraFiles: [{ hostPath: other, guestPath: "/etc/app.toml" }], warmupTag: tag });
    assert.equal(same.baked, false, "same content under another host path is the same snapshot");
    await writeFile(other, "answer = 43\n");
    const changed = await Image.build({ ref, snapshotsDir, extraFiles: [{ hostPath: other, guestPath: "/etc/app.toml" }], warmupTag: tag });
    assert.equal(changed.baked, true);
    assert.notEqual(changed.snapshotPath, image.snapshotPath);
    await changed.close();
    const retag = await Image.build({ ref, snapshotsDir, extraFiles: [{ hostPath: extra, guestPath: "/etc/app.toml" }], warmupTag: `${tag}-2` });
    assert.equal(retag.baked, true);
    await retag.close();
  });

  it("warmup's file and the extra file are in every acquired VM; restoreOnRelease decides about later writes", async () => {
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      for (let i = 0; i < 3; i++) {
        const vm = await pool.acquire();
        const r = await vm.exec({ argv: ["sh", "-c", "cat /root/warm.txt /etc/app.toml; test -e /tmp/dirty && echo DIRTY; echo x > /tmp/dirty"] });
        assert.equal(r.stdout.toString(), "warmed\nanswer = 42\n", `acquire ${i}`);
        await vm.release();
      }
    } finally {
      await pool.shutdown();
    }
    const reuse = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      const a = await reuse.acquire();
      await a.exec({ argv: ["sh", "-c", "echo kept > /tmp/dirty"] });
      await a.release();
      const b = await reuse.acquire();
      assert.equal((await b.exec({ argv: ["cat", "/tmp/dirty"] })).stdout.toString(), "kept\n");
      await b.release();
    } finally {
      await reuse.shutdown();
    }
  });

  it("every restored VM is unique: random bytes, boot_id, hostname, machine-id; clock within 2 s of the host", async () => {
    const pool = await image.pool({ min: 2, max: 2 });
    try {
      const [a, b] = [await pool.acquire(), await pool.acquire()];
      const probe = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/boot_id; hostname; cat /etc/machine-id; date +%s; od -An -tx1 /root/seed | tr -d ' \\n'; echo; cat /etc/hostname; grep 127.0.1.1 /etc/hosts";
      const [ra, rb] = await Promise.all([a.exec({ argv: ["sh", "-c", probe] }), b.exec({ argv: ["sh", "-c", probe] })]);
      const now = Date.now() / 1000;
      const [urA, bootA, hostA, midA, clockA, seedA, hostFileA, hostsA] = ra.stdout.toString().trim().split("\n");
      const [urB, bootB, hostB, midB, clockB, seedB, hostFileB, hostsB] = rb.stdout.toString().trim().split("\n");
      assert.notEqual(urA, urB, "/dev/urandom must differ between clones");
      assert.match(bootA!, /^[0-9a-f-]{36}$/);
      assert.notEqual(bootA, bootB);
      assert.notEqual(hostA, hostB);
      assert.notEqual(midA, midB);
      // /etc/hostname and /etc/hosts name each clone's own hostname.
      assert.deepEqual([hostFileA, hostsA, hostFileB, hostsB], [hostA, `127.0.1.1\t${hostA}`, hostB, `127.0.1.1\t${hostB}`]);
      assert.ok(Math.abs(Number(clockA) - now) <= 2 && Math.abs(Number(clockB) - now) <= 2, `clocks ${clockA} ${clockB} vs host ${now}`);
      // What warmup wrote is, by design, the same in every clone.
      assert.equal(seedA, seedB);
      await a.release();
      await b.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("Vm.snapshot: a new file in a restored VM survives into Image.fromSnapshot", async () => {
    const pool = await image.pool({ min: 1, max: 1 });
    const dest = join(snapshotsDir, "mid-flight");
    try {
      const vm = await pool.acquire();
      await vm.exec({ argv: ["sh", "-c", "echo mid-flight > /root/new.txt; sleep 1000 & echo $! > /root/sleeper.pid"] });
      const snap = await vm.snapshot(dest);
      assert.equal(snap.snapshotPath, dest);
      assertPrivateSnapshot(dest);
      // The VM keeps running afterwards.
      assert.equal((await vm.exec({ argv: ["cat", "/root/new.txt"] })).stdout.toString(), "mid-flight\n");
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    const loaded = await Image.fromSnapshot(dest);
    const p2 = await loaded.pool({ min: 1, max: 1 });
    try {
      const vm = await p2.acquire();
      const r = await vm.exec({ argv: ["sh", "-c", "cat /root/new.txt /root/warm.txt; kill -0 $(cat /root/sleeper.pid) && echo process-alive"] });
      assert.equal(r.stdout.toString(), "mid-flight\nwarmed\nprocess-alive\n");
      await vm.release();
    } finally {
      await p2.shutdown();
    }
  });

  it("a corrupted snapshot manifest or RAM file is refused by fromSnapshot", async () => {
    const pool = await image.pool({ min: 1, max: 1 });
    const a = join(snapshotsDir, "to-corrupt-ram");
    const b = join(snapshotsDir, "to-corrupt-manifest");
    try {
      const vm = await pool.acquire();
      await vm.snapshot(a);
      await vm.snapshot(b);
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    const f = await open(join(a, "ram"), "r+");
    const buf = Buffer.alloc(1);
    await f.read(buf, 0, 1, 1 << 20);
    buf[0] = buf[0]! ^ 0x5a;
    await f.write(buf, 0, 1, 1 << 20);
    await f.close();
    await assert.rejects(Image.fromSnapshot(a), (e: unknown) => e instanceof SnapshotError && /ram does not match/.test(e.message));
    await writeFile(join(b, "manifest.json"), JSON.stringify({ format: "supermachine-snapshot", version: SNAPSHOT_VERSION }));
    await assert.rejects(Image.fromSnapshot(b), (e: unknown) => e instanceof SnapshotError && /bad key/.test(e.message));
  });

  it("listenerRequired: a baked busybox httpd answers at once after restore", async () => {
    const web = await Image.build({
      ref,
      snapshotsDir,
      cmd: ["sh", "-c", "mkdir -p /www && echo 'hello from httpd' > /www/index.html && exec httpd -f -p 8080 -h /www"],
      guestPort: 8080,
      listenerRequired: true,
    });
    await web.close();
    const pool = await web.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      // No waiting: the listener is part of the snapshot.
      const inside = await vm.exec({ argv: ["wget", "-qO-", "http://127.0.0.1:8080/"] });
      assert.equal(inside.stdout.toString(), "hello from httpd\n", inside.stderr.toString());
      const fwd = await vm.exposeTcp(0, 8080);
      const r = await httpGet(fwd.localAddr);
      assert.equal(r.status, 200);
      assert.equal(r.body, "hello from httpd\n");
      await vm.workloadSignal(15);
      await vm.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("listenerRequired with nothing listening is a TimeoutError naming the fix, and leaves no snapshot", async () => {
    await assert.rejects(
      Image.build({ ref, snapshotsDir, name: "never-listens", cmd: ["sleep", "1000"], guestPort: 9999, listenerRequired: true, listenerTimeoutMs: 2000 }),
      (e: unknown) => e instanceof TimeoutError && /guestPort|listenerTimeoutMs/.test(e.message),
    );
    assert.equal(existsSync(join(snapshotsDir, "never-listens")), false);
    assert.deepEqual(readdirSync(snapshotsDir).filter((f) => f.includes("never-listens") && !f.endsWith(".lock")), []);
  });

  it("Image.build returns before its snapshot is on disk: saved() resolves once it is; fromSnapshot and a build of the same key in this process wait for it", async () => {
    const name = `early-${randomBytes(3).toString("hex")}`;
    const warmupTag = `early-${randomBytes(3).toString("hex")}`;
    const fresh = await Image.build({ ref, snapshotsDir, name, warmupTag });
    try {
      assert.equal(fresh.baked, true);
      const dir = fresh.snapshotPath;
      // The RAM digest alone takes tens of ms: the build's Image is back first.
      assert.equal(existsSync(join(dir, "manifest.json")), false, "the snapshot is published behind the Image");
      const [loaded, again] = await Promise.all([Image.fromSnapshot(dir), Image.build({ ref, snapshotsDir, name, warmupTag })]);
      try {
        assert.equal(again.baked, false, "the same key in this process is a cache hit, not a second bake");
        assert.equal(loaded.manifest.key, fresh.manifest.key);
        assert.deepEqual(loaded.manifest.files, fresh.manifest.files);
      } finally {
        await loaded.close();
        await again.close();
      }
      await fresh.saved();
      assertPrivateSnapshot(dir);
      assert.deepEqual(readdirSync(snapshotsDir).filter((f) => f.startsWith(`.${name}.tmp-`)), [], "no stage left");
    } finally {
      await fresh.close();
    }
  });

  it("a failing warmup leaves no entry that looks valid; the next build bakes", async () => {
    const name = "warmup-fails";
    await assert.rejects(
      Image.build({ ref, snapshotsDir, name, warmupTag: "boom", warmup: async () => Promise.reject(new Error("warmup exploded")) }),
      /warmup exploded/,
    );
    assert.equal(existsSync(join(snapshotsDir, name)), false);
    const ok = await Image.build({ ref, snapshotsDir, name, warmupTag: "boom" });
    assert.equal(ok.baked, true);
    await ok.close();
  });

  it("the bake's own VM, handed out first, can be snapshotted (its disk moved with the stage)", async () => {
    const fresh = await Image.build({ ref, snapshotsDir, name: "handoff-snap", warmupTag: `handoff-${randomBytes(3).toString("hex")}` });
    assert.equal(fresh.baked, true);
    const pool = await fresh.pool({ min: 1, max: 1 });
    const dest = join(snapshotsDir, "from-handoff");
    try {
      const vm = await pool.acquire();
      await vm.snapshot(dest);
      await vm.release();
    } finally {
      await pool.shutdown();
      await fresh.close();
    }
    assertPrivateSnapshot(dest);
    assert.equal((await Image.fromSnapshot(dest)).snapshotPath, dest);
  });

  it("two processes baking the same key at once produce one snapshot and both succeed", async () => {
    const script = join(snapshotsDir, "bake.mjs");
    const tag = `concurrent-${randomBytes(3).toString("hex")}`;
    await writeFile(
      script,
      `import { Image } from ${JSON.stringify(join(REPO_ROOT, "dist", "src", "index.js"))};
       const img = await Image.build({ ref: ${JSON.stringify(ref)}, snapshotsDir: ${JSON.stringify(snapshotsDir)}, warmupTag: ${JSON.stringify(tag)} });
       await img.close();
       console.log(JSON.stringify({ path: img.snapshotPath, baked: img.baked }));`,
    );
    const [a, b] = await Promise.all([execFileP(process.execPath, [script]), execFileP(process.execPath, [script])]);
    const ra = JSON.parse(a.stdout) as { path: string; baked: boolean };
    const rb = JSON.parse(b.stdout) as { path: string; baked: boolean };
    assert.equal(ra.path, rb.path);
    assert.equal([ra.baked, rb.baked].filter(Boolean).length, 1, "exactly one of them baked");
    const leftovers = readdirSync(snapshotsDir).filter((f) => f.includes(".tmp-") || f.includes(".old-"));
    assert.deepEqual(leftovers, []);
  });
});
