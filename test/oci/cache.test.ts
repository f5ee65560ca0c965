/**
 * The blob cache: verify-while-streaming, atomic publication, in-process
 * sharing, the cross-process lock (waiting, stale locks by dead pid and by
 * age), ENOSPC on a tiny tmpfs, the reference records, default directory.
 */

import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, readFile, stat, utimes, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { after, describe, test } from "node:test";
import { promisify } from "node:util";
import { DigestMismatchError, DiskFullError } from "../../src/errors.js";
import { BlobCache, defaultCacheDir, digestOf } from "../../src/oci/index.js";
import { acquireLock } from "../../src/oci/lock.js";
import { blobDirEntries, removeDir, tempDir } from "../fixtures/oci/util.js";

const execFileP = promisify(execFile);
const dirs: string[] = [];
after(async () => {
  for (const d of dirs) await removeDir(d);
});
async function cacheDir(): Promise<string> {
  const d = await tempDir("blobcache");
  dirs.push(d);
  return d;
}

const opener = (bytes: Buffer, chunk = 1000) => async (offset: number) => {
  const parts: Buffer[] = [];
  for (let i = offset; i < bytes.length; i += chunk) parts.push(bytes.subarray(i, Math.min(bytes.length, i + chunk)));
  return { stream: Readable.from(parts), start: offset };
};

describe("blob cache", () => {
  test("ingest verifies, publishes under blobs/sha256/<hex>, and reports progress", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    const data = randomBytes(100_000);
    const digest = digestOf(data);
    const progress: number[] = [];
    const r = await cache.ingest(digest, opener(data), { size: data.length, onProgress: (n) => progress.push(n) });
    assert.equal(r.outcome, "downloaded");
    assert.equal(r.path, join(dir, "blobs", "sha256", digest.slice(7)));
    assert.deepEqual(await readFile(r.path), data);
    assert.equal(progress.at(-1), data.length);
    assert.equal(await cache.has(digest, data.length), true);
    assert.equal((await cache.ingest(digest, opener(data), { size: data.length })).outcome, "cached");
    assert.deepEqual(await blobDirEntries(dir), [digest.slice(7)]);
  });

  test("a download of several write batches, broken once, resumes right after the bytes it received", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    const data = randomBytes(3 * 1024 * 1024 + 777);
    const breakAt = 2 * 1024 * 1024 + 64 * 1024 + 5;
    const offsets: number[] = [];
    let broke = false;
    const open = async (offset: number) => {
      offsets.push(offset);
      const parts: Buffer[] = [];
      for (let i = offset; i < data.length; i += 65_536) parts.push(data.subarray(i, Math.min(data.length, i + 65_536)));
      if (broke) return { stream: Readable.from(parts), start: offset };
      broke = true;
      // The first attempt delivers up to breakAt (mid-chunk), then the connection breaks.
      async function* cut() {
        let sent = offset;
        for (const p of parts) {
          if (sent + p.length > breakAt) {
            yield p.subarray(0, breakAt - sent);
            throw Object.assign(new Error("connection reset"), { code: "ECONNRESET" });
          }
          sent += p.length;
          yield p;
        }
      }
      return { stream: Readable.from(cut()), start: offset };
    };
    const progress: number[] = [];
    const r = await cache.ingest(digestOf(data), open, { size: data.length, retries: 1, retryBaseMs: 1, isRetryable: () => true, onProgress: (n) => progress.push(n) });
    assert.equal(r.outcome, "downloaded");
    assert.deepEqual(offsets, [0, breakAt]);
    assert.ok((await readFile(r.path)).equals(data), "the blob is byte-exact");
    assert.equal(progress.at(-1), data.length);
    assert.ok(progress.every((n, i) => i === 0 || n >= progress[i - 1]!), `progress never goes back: ${progress}`);
  });

  test("a digest mismatch or a wrong size discards the bytes and leaves nothing", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    const data = randomBytes(50_000);
    const claimed = digestOf(Buffer.from("something else"));
    await assert.rejects(cache.ingest(claimed, opener(data), { size: data.length }), (err: unknown) => {
      assert.ok(err instanceof DigestMismatchError);
      assert.equal(err.expected, claimed);
      assert.equal(err.actual, digestOf(data));
      return true;
    });
    await assert.rejects(cache.ingest(digestOf(data), opener(data), { size: data.length - 1 }), DigestMismatchError);
    await assert.rejects(cache.ingest(digestOf(data), opener(data), { size: data.length + 1 }), DigestMismatchError);
    assert.deepEqual(await blobDirEntries(dir), []);
  });

  test("readSmall re-verifies and drops a corrupted file", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    const doc = Buffer.from('{"hello":"world"}');
    const digest = await cache.putBytes(doc);
    assert.deepEqual(await cache.readSmall(digest, 1024), doc);
    await writeFile(cache.blobPath(digest), '{"hello":"wOrld"}');
    assert.equal(await cache.readSmall(digest, 1024), undefined);
    assert.equal(await cache.has(digest), false);
  });

  test("concurrent ingests of one blob in one process share one download", async () => {
    const cache = new BlobCache(await cacheDir());
    const data = randomBytes(200_000);
    let opens = 0;
    const open = async (offset: number) => {
      opens++;
      return opener(data)(offset);
    };
    const results = await Promise.all(Array.from({ length: 5 }, () => cache.ingest(digestOf(data), open, { size: data.length })));
    assert.equal(opens, 1);
    assert.deepEqual(results.map((r) => r.outcome).sort(), ["downloaded", "peer", "peer", "peer", "peer"]);
  });

  test("a live lock makes ingest wait; it proceeds when the lock goes", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    const data = randomBytes(10_000);
    const digest = digestOf(data);
    await mkdir(join(dir, "blobs", "sha256"), { recursive: true });
    const lock = await acquireLock(`${cache.blobPath(digest)}.lock`);
    assert.ok(lock);
    const started = Date.now();
    const p = cache.ingest(digest, opener(data), { size: data.length });
    setTimeout(() => void lock.release(), 300);
    const r = await p;
    assert.ok(Date.now() - started >= 250, "waited for the lock");
    assert.equal(r.outcome, "downloaded");
  });

  test("a lock whose owner finished the blob: the waiter takes the blob, downloads nothing", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    const data = randomBytes(10_000);
    const digest = digestOf(data);
    await mkdir(join(dir, "blobs", "sha256"), { recursive: true });
    const lock = await acquireLock(`${cache.blobPath(digest)}.lock`);
    let opens = 0;
    const p = cache.ingest(digest, async (o) => {
      opens++;
      return opener(data)(o);
    });
    setTimeout(() => {
      void (async () => {
        await writeFile(cache.blobPath(digest), data);
        await lock!.release();
      })();
    }, 200);
    const r = await p;
    assert.equal(r.outcome, "peer");
    assert.equal(opens, 0);
  });

  test("stale locks are broken: dead owner pid, and an old lock that stopped beating", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    await mkdir(join(dir, "blobs", "sha256"), { recursive: true });
    const dead = spawnSync(process.execPath, ["-e", "process.pid"]).pid!;
    const data1 = randomBytes(1000);
    await writeFile(`${cache.blobPath(digestOf(data1))}.lock`, JSON.stringify({ pid: dead, host: hostname(), nonce: "x", created: Date.now() }));
    let started = Date.now();
    assert.equal((await cache.ingest(digestOf(data1), opener(data1))).outcome, "downloaded");
    assert.ok(Date.now() - started < 2000, "a dead owner's lock is broken at once");
    // pid 1 is alive but (here) never our lock owner: only age makes this lock stale.
    const lockPath = join(dir, "old.lock");
    await writeFile(lockPath, JSON.stringify({ pid: 1, host: hostname(), nonce: "y", created: 0 }));
    const old = new Date(Date.now() - 10_000);
    await utimes(lockPath, old, old);
    started = Date.now();
    const held = await acquireLock(lockPath, { staleMs: 5000 });
    assert.ok(held);
    assert.ok(Date.now() - started < 2000);
    await held.release();
    await assert.rejects(stat(lockPath), { code: "ENOENT" });
  });

  test("ENOSPC: DiskFullError naming the path, nothing partial kept (tiny tmpfs)", async (t) => {
    const mnt = await cacheDir();
    const mounted = spawnSync("mount", ["-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt]);
    if (mounted.status !== 0) {
      t.skip(`cannot mount a tmpfs here (needs root): ${mounted.stderr?.toString().trim()}`);
      return;
    }
    try {
      const cache = new BlobCache(mnt);
      const data = randomBytes(1024 * 1024);
      await assert.rejects(cache.ingest(digestOf(data), opener(data, 64 * 1024), { size: data.length }), (err: unknown) => {
        assert.ok(err instanceof DiskFullError, String(err));
        assert.equal(err.code, "ERR_SM_DISK_FULL");
        assert.equal(err.path, cache.blobPath(digestOf(data)));
        assert.match(err.message, /SUPERMACHINE_CACHE_DIR/);
        return true;
      });
      assert.deepEqual(await blobDirEntries(mnt), []);
      // The cache still works for what fits.
      const small = randomBytes(1000);
      assert.equal((await cache.ingest(digestOf(small), opener(small))).outcome, "downloaded");
    } finally {
      await execFileP("umount", [mnt]);
    }
  });

  test("reference records round-trip and ignore foreign content", async () => {
    const dir = await cacheDir();
    const cache = new BlobCache(dir);
    const d = digestOf(Buffer.from("m"));
    assert.equal(await cache.readRef("registry:a/b:c"), undefined);
    await cache.writeRef("registry:a/b:c", d, "application/vnd.oci.image.index.v1+json");
    const rec = await cache.readRef("registry:a/b:c");
    assert.equal(rec?.digest, d);
    assert.equal(rec?.mediaType, "application/vnd.oci.image.index.v1+json");
    assert.equal(await cache.readRef("registry:a/b:d"), undefined);
  });

  test("defaultCacheDir: SUPERMACHINE_CACHE_DIR, then XDG_CACHE_HOME, then ~/.cache", () => {
    assert.equal(defaultCacheDir({ SUPERMACHINE_CACHE_DIR: "/c", XDG_CACHE_HOME: "/x", HOME: "/h" }), "/c");
    assert.equal(defaultCacheDir({ XDG_CACHE_HOME: "/x", HOME: "/h" }), "/x/supermachine");
    assert.equal(defaultCacheDir({ HOME: "/h" }), "/h/.cache/supermachine");
  });
});
