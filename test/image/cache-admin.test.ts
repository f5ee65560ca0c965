/**
 * Cache administration on fabricated cache entries (no VM): last use, sizes,
 * leases (a live process holds a snapshot; a dead one does not; a reused
 * pid does not), removal refused while in use, LRU pruning by age and by
 * size, and validation.
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync, existsSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { SnapshotError, ImageError } from "../../src/errors.js";
import { leaseSnapshot, listImages, listSnapshots, prune, removeImage, removeSnapshot } from "../../src/image/cache-admin.js";

const DAY = 86_400_000;
const root = mkdtempSync(join(tmpdir(), "sm-cache-admin-"));
after(() => rmSync(root, { recursive: true, force: true }));

function dirs(name: string) {
  const cacheDir = join(root, name, "cache");
  const snapshotsDir = join(root, name, "snapshots");
  mkdirSync(join(cacheDir, "rootfs"), { recursive: true });
  mkdirSync(join(cacheDir, "blobs", "sha256"), { recursive: true });
  mkdirSync(snapshotsDir, { recursive: true });
  return { cacheDir, snapshotsDir };
}

function fakeSnapshot(snapshotsDir: string, name: string, bytes: number, ageMs: number): void {
  const d = join(snapshotsDir, name);
  mkdirSync(d, { mode: 0o700 });
  writeFileSync(join(d, "ram"), Buffer.alloc(bytes, 1));
  const t = new Date(Date.now() - ageMs);
  utimesSync(d, t, t);
}

const hex = (c: string) => c.repeat(64);

function fakeImage(cacheDir: string, id: string, ref: string, blobs: { digest: string; size: number }[], ageMs: number): void {
  writeFileSync(join(cacheDir, "rootfs", `${id}.erofs`), Buffer.alloc(4096));
  for (const b of blobs) writeFileSync(join(cacheDir, "blobs", "sha256", b.digest.slice(7)), Buffer.alloc(b.size));
  const rec = join(cacheDir, "rootfs", `${id}.json`);
  writeFileSync(rec, JSON.stringify({ refs: [ref], digest: `sha256:${id}`, blobs }));
  const t = new Date(Date.now() - ageMs);
  utimesSync(rec, t, t);
}

describe("cache administration", () => {
  it("lists snapshots by last use; a lease of this process marks one in use; removal is refused until released", async () => {
    const d = dirs("lease");
    fakeSnapshot(d.snapshotsDir, "old", 8192, 10 * DAY);
    fakeSnapshot(d.snapshotsDir, "new", 8192, 0);
    const list = await listSnapshots(d);
    assert.deepEqual(list.map((s) => s.name), ["new", "old"]);
    assert.match(list[0]!.problem ?? "", /manifest/, "an unusable snapshot says why and is still listed");
    const lease = leaseSnapshot(join(d.snapshotsDir, "old"));
    const held = (await listSnapshots(d)).find((s) => s.name === "old")!;
    assert.deepEqual(held.inUse.map((l) => l.pid), [process.pid]);
    assert.ok(Date.now() - held.lastUsedAt.getTime() < DAY, "taking a lease is a use");
    await assert.rejects(removeSnapshot("old", d), (e: unknown) => e instanceof SnapshotError && /in use by process/.test(e.message));
    const dead = spawnSync("true").pid!;
    mkdirSync(join(d.snapshotsDir, `.x.tmp-${dead}-abcd`));
    mkdirSync(join(d.snapshotsDir, `.x.tmp-${process.pid}-abcd`));
    mkdirSync(join(d.snapshotsDir, ".x.removing-abcd"));
    const r = await prune({ ...d, all: true });
    assert.ok(!existsSync(join(d.snapshotsDir, `.x.tmp-${dead}-abcd`)), "a dead bake's stage goes");
    assert.ok(!existsSync(join(d.snapshotsDir, ".x.removing-abcd")));
    assert.ok(existsSync(join(d.snapshotsDir, `.x.tmp-${process.pid}-abcd`)), "a live bake's stage stays");
    assert.deepEqual(r.removed.map((e) => e.name), ["new"]);
    assert.deepEqual(r.keptInUse.map((e) => e.name), ["old"]);
    lease.release();
    lease.release();
    await removeSnapshot("old", d);
    assert.deepEqual(await listSnapshots(d), []);
    assert.ok(!existsSync(join(d.snapshotsDir, ".leases", "old")), "the lease directory goes with the snapshot");
  });

  it("a lease of a dead process, or of a reused pid, does not hold; another host's does", async () => {
    const d = dirs("stale");
    fakeSnapshot(d.snapshotsDir, "s", 4096, 0);
    const leases = join(d.snapshotsDir, ".leases", "s");
    mkdirSync(leases, { recursive: true });
    const dead = spawnSync("true").pid!;
    writeFileSync(join(leases, `${dead}.a`), JSON.stringify({ pid: dead, start: null, host: hostname(), since: Date.now() }));
    writeFileSync(join(leases, `${process.pid}.b`), JSON.stringify({ pid: process.pid, start: "1", host: hostname(), since: Date.now() }));
    assert.deepEqual((await listSnapshots(d))[0]!.inUse, []);
    assert.ok(!existsSync(join(leases, `${dead}.a`)), "stale leases are cleaned up");
    writeFileSync(join(leases, "1.c"), JSON.stringify({ pid: 1, start: null, host: "elsewhere", since: Date.now() }));
    assert.deepEqual((await listSnapshots(d))[0]!.inUse.map((l) => l.host), ["elsewhere"]);
  });

  it("images: size counts blobs only they use; removal keeps shared blobs; LRU prune by age and by size", async () => {
    const d = dirs("images");
    const shared = { digest: `sha256:${hex("a")}`, size: 10_000 };
    const onlyOld = { digest: `sha256:${hex("b")}`, size: 20_000 };
    const onlyNew = { digest: `sha256:${hex("c")}`, size: 30_000 };
    fakeImage(d.cacheDir, hex("1"), "reg.test/old:1", [shared, onlyOld], 30 * DAY);
    fakeImage(d.cacheDir, hex("2"), "reg.test/new:1", [shared, onlyNew], 0);
    fakeSnapshot(d.snapshotsDir, "mid", 8192, 5 * DAY);
    const imgs = await listImages(d);
    assert.deepEqual(imgs.map((i) => i.refs[0]), ["reg.test/new:1", "reg.test/old:1"]);
    assert.equal(imgs[1]!.sizeBytes, 4096 + 20_000);
    assert.equal(imgs[1]!.id, hex("1").slice(0, 12));
    const dry = await prune({ ...d, unusedForMs: 7 * DAY, dryRun: true });
    assert.deepEqual(dry.removed.map((e) => e.name), [hex("1").slice(0, 12)]);
    assert.equal((await listImages(d)).length, 2, "dry run removes nothing");
    const aged = await prune({ ...d, unusedForMs: 7 * DAY });
    assert.deepEqual(aged.removed.map((e) => e.kind), ["image"]);
    assert.ok(existsSync(join(d.cacheDir, "blobs", "sha256", hex("a"))), "a blob another image uses stays");
    assert.ok(!existsSync(join(d.cacheDir, "blobs", "sha256", hex("b"))));
    // Down to a size: the least recently used (the 5-day-old snapshot) goes first.
    const sized = await prune({ ...d, maxBytes: 4096 + 40_000 });
    assert.deepEqual(sized.removed.map((e) => e.name), ["mid"]);
    assert.equal((await listImages(d)).length, 1);
    await removeImage("reg.test/new:1", d);
    assert.deepEqual(await listImages(d), []);
    await assert.rejects(removeImage("reg.test/new:1", d), ImageError);
  });

  it("validates its options", async () => {
    await assert.rejects(prune({}), TypeError);
    await assert.rejects(prune({ maxBytes: -1 }), TypeError);
    await assert.rejects(removeSnapshot("../etc"), TypeError);
  });
});
