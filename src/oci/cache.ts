/**
 * The content-addressed blob cache and the reference cache.
 *
 *   <cacheDir>/blobs/sha256/<hex>      verified blobs (layers, configs, manifests)
 *   <cacheDir>/blobs/sha256/<hex>.lock  a download in progress (lock.ts)
 *   <cacheDir>/blobs/sha256/<hex>.<pid>.<rand>.tmp  its bytes, never read
 *   <cacheDir>/refs/<sha256 of key>.json  reference → manifest digest
 *
 * A blob is hashed while it streams in, written to a temp file in the same
 * directory, fsynced, and renamed into place only if its digest (and size)
 * match; the directory is fsynced after the rename. A file under its digest's
 * name is therefore always complete and verified. On any failure the temp
 * file is removed.
 *
 * Concurrency: in one process, callers asking for the same blob share one
 * promise. Across processes, a lock file per blob (see lock.ts) makes the
 * second process wait for the first and then find the blob in place.
 */

import { randomBytes } from "node:crypto";
import { constants as fsc } from "node:fs";
import { mkdir, open, readdir, readFile, rename, stat, unlink, type FileHandle } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { Readable } from "node:stream";
import { AbortError, DigestMismatchError, DiskFullError } from "../errors.js";
import { Digester, digestOf, parseDigest, type DigestAlgorithm } from "./digest.js";
import { backoffMs, delay } from "./http.js";
import { acquireLock } from "./lock.js";

import { defaultCacheDir } from "../paths.js";

export { defaultCacheDir };

/** Where a blob came from in {@link BlobCache.ingest}. */
export type IngestOutcome = "cached" | "downloaded" | "peer";

export interface IngestResult {
  readonly path: string;
  readonly digest: string;
  readonly size: number;
  readonly outcome: IngestOutcome;
}

/** Opens the blob's bytes from `offset`; `start` says where the stream really begins (offset or 0). */
export type BlobOpener = (offset: number) => Promise<{ stream: Readable; start: number }>;

export interface IngestOptions {
  /** Expected size in bytes, when known (it is checked). */
  readonly size?: number | undefined;
  readonly signal?: AbortSignal | undefined;
  /** Called with bytes received so far, at most every ~100 ms and at the end. */
  readonly onProgress?: ((bytesDone: number) => void) | undefined;
  /** How many times a broken transfer is resumed. @default 0 */
  readonly retries?: number;
  /** Is an error thrown by the stream worth resuming after? */
  readonly isRetryable?: ((err: unknown) => boolean) | undefined;
  /** Base backoff between resumes, ms. @default 200 */
  readonly retryBaseMs?: number;
  /** What the blob is, for messages: "layer 2 of docker.io/library/alpine:latest". */
  readonly what?: string;
  /** Called once when this call starts downloading the blob (not when it is cached or another caller fetches it). */
  readonly onLive?: ((live: LiveBlob) => void) | undefined;
}

/** Record of what a reference resolved to. */
export interface RefRecord {
  readonly key: string;
  readonly digest: string;
  readonly mediaType: string;
  readonly updatedAt: string;
}

const inflight = new Map<string, Promise<IngestResult>>();

function isDiskFull(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  return code === "ENOSPC" || code === "EDQUOT";
}

function diskFull(path: string, cacheDir: string, err: unknown): DiskFullError {
  return new DiskFullError(
    `No space left on the device while writing ${path}; nothing partial was kept. Free space, or point the cache elsewhere ` +
      `(cacheDir option or SUPERMACHINE_CACHE_DIR; now ${cacheDir})`,
    path,
    { cause: err },
  );
}

/** A download's bytes go to its file in writes of about this size. */
const WRITE_BATCH = 1 << 20;

/**
 * Writes `bufs` at `pos` in one writev (no copy into one buffer: that
 * allocation and copy per 1 MiB batch showed in the pull's profile); a short
 * write (rare on a regular file) writes the rest with writeAll.
 */
async function writevAll(fh: FileHandle, bufs: readonly Buffer[], total: number, pos: number): Promise<void> {
  const { bytesWritten } = await fh.writev(bufs, pos);
  if (bytesWritten < total) await writeAll(fh, Buffer.concat(bufs, total).subarray(bytesWritten), pos + bytesWritten);
}

/** Writes all of `buf` at file offset `pos` (positional: a restart from 0 after truncate(0) writes at 0). */
async function writeAll(fh: FileHandle, buf: Uint8Array, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off, pos + off);
    off += bytesWritten;
  }
}

/**
 * A blob while it downloads, for a reader that wants its bytes as they
 * arrive (a layer unpacked while it downloads: src/image/resolve.ts). The
 * bytes read before the download ends are NOT verified yet: the reader's
 * stream ends only once the whole blob matched its digest and sits under its
 * name, and errors if the download fails. What is read in between must be
 * treated as hostile input (layers are anyway) and nothing built from it
 * published before the end.
 */
export class LiveBlob {
  private written = 0;
  private outcome: { ok: true; path: string; size: number } | { ok: false; error: unknown } | undefined;
  private wakers: Array<() => void> = [];

  /** @param tmpPath the temp file the download writes (renamed to the blob's path when verified) */
  constructor(readonly tmpPath: string) {}

  /** @internal Bytes in the temp file so far (0 again when the source restarted). */
  grow(written: number): void {
    this.written = written;
    this.wake();
  }

  /** @internal The blob is verified and renamed to `path`. */
  finish(path: string, size: number): void {
    this.outcome ??= { ok: true, path, size };
    this.wake();
  }

  /** @internal The download failed; readers get `error`. */
  fail(error: unknown): void {
    this.outcome ??= { ok: false, error };
    this.wake();
  }

  /** Resolves when the download is over (either way); never rejects. */
  get settled(): Promise<void> {
    return (async () => {
      while (!this.outcome) await this.changed();
    })();
  }

  /** The verified blob's path once the download is over; rejects with its error if it failed. */
  async path(): Promise<string> {
    await this.settled;
    const o = this.outcome!;
    if (!o.ok) throw o.error;
    return o.path;
  }

  private wake(): void {
    const w = this.wakers;
    this.wakers = [];
    for (const f of w) f();
  }

  private changed(): Promise<void> {
    return this.outcome ? Promise.resolve() : new Promise((r) => this.wakers.push(r));
  }

  /**
   * The blob's bytes from the start, as they are written; ends when the
   * verified blob is complete, throws the download's error if it fails.
   */
  async *read(chunkSize = 256 * 1024): AsyncGenerator<Buffer> {
    let fh: FileHandle | undefined;
    try {
      try {
        fh = await open(this.tmpPath, "r");
      } catch (err) {
        // Renamed already (verified), or removed (failed).
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
        await this.settled;
        if (!this.outcome!.ok) throw this.outcome!.error;
        fh = await open(this.outcome!.path, "r");
      }
      let pos = 0;
      for (;;) {
        const o = this.outcome;
        if (o && !o.ok) throw o.error;
        const bound = o ? o.size : this.written;
        // While it downloads, read whole chunks: each read (and the
        // decompressor's step on it) costs a round trip to the thread pool.
        if (pos < bound && (o !== undefined || bound - pos >= chunkSize)) {
          const buf = Buffer.allocUnsafe(Math.min(chunkSize, bound - pos));
          const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
          if (bytesRead > 0) {
            pos += bytesRead;
            yield bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
            continue;
          }
          // Short: the source restarted from 0 and has not written this far again.
          if (o) throw new Error(`${o.path} is shorter than its verified size`);
        } else if (o && pos >= o.size) {
          return;
        }
        await this.changed();
      }
    } finally {
      await fh?.close();
    }
  }
}

async function fsyncDir(dir: string): Promise<void> {
  let fh: FileHandle | undefined;
  try {
    fh = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
    await fh.sync();
  } catch {
    // some filesystems refuse fsync on directories; the rename is still atomic
  } finally {
    await fh?.close();
  }
}

function abortIf(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AbortError("The operation was aborted (signal fired)", { cause: signal.reason });
}

/** A content-addressed store of verified blobs under one directory. */
export class BlobCache {
  readonly dir: string;

  constructor(dir: string = defaultCacheDir()) {
    this.dir = resolve(dir);
  }

  /** The path a blob has (or will have) in the cache. */
  blobPath(digest: string): string {
    const { algorithm, hex } = parseDigest(digest);
    return join(this.dir, "blobs", algorithm, hex);
  }

  /** Is the blob cached (and of `size`, when given)? */
  async has(digest: string, size?: number): Promise<boolean> {
    try {
      const st = await stat(this.blobPath(digest));
      return st.isFile() && (size === undefined || st.size === size);
    } catch {
      return false;
    }
  }

  /**
   * Reads a small cached blob (manifest, config) and re-verifies its digest;
   * a corrupt file is removed. Undefined when absent, corrupt or over `max`.
   */
  async readSmall(digest: string, max: number): Promise<Buffer | undefined> {
    const path = this.blobPath(digest);
    let bytes: Buffer;
    try {
      const st = await stat(path);
      if (!st.isFile() || st.size > max) return undefined;
      bytes = await readFile(path);
    } catch {
      return undefined;
    }
    if (digestOf(bytes, parseDigest(digest).algorithm) !== digest) {
      await unlink(path).catch(() => {});
      return undefined;
    }
    return bytes;
  }

  /** Stores bytes already in memory under their digest (verified when `digest` is given). */
  async putBytes(bytes: Buffer, digest?: string): Promise<string> {
    const algorithm: DigestAlgorithm = digest ? parseDigest(digest).algorithm : "sha256";
    const actual = digestOf(bytes, algorithm);
    if (digest && actual !== digest) {
      throw new DigestMismatchError(`Content hashes to ${actual}, not ${digest}; it was discarded`, digest, actual);
    }
    if (await this.has(actual, bytes.length)) return actual;
    await this.ingest(actual, async () => ({ stream: Readable.from([bytes]), start: 0 }), { size: bytes.length });
    return actual;
  }

  /**
   * Makes sure the blob `digest` is in the cache, fetching it with `openAt`
   * when it is not. See the module comment for the guarantees.
   */
  ingest(digest: string, openAt: BlobOpener, opts: IngestOptions = {}): Promise<IngestResult> {
    const path = this.blobPath(digest);
    const joined = inflight.get(path);
    if (joined) {
      return joined.then(
        (r): IngestResult => ({ ...r, outcome: r.outcome === "cached" ? "cached" : "peer" }),
        // Another caller's abort is not ours: try again on our own.
        (err: unknown) => (err instanceof AbortError && !opts.signal?.aborted ? this.ingest(digest, openAt, opts) : Promise.reject(err)),
      );
    }
    const p = this.ingestLocked(digest, path, openAt, opts);
    inflight.set(path, p);
    const forget = (): void => {
      if (inflight.get(path) === p) inflight.delete(path);
    };
    p.then(forget, forget);
    return p;
  }

  private async ingestLocked(digest: string, path: string, openAt: BlobOpener, opts: IngestOptions): Promise<IngestResult> {
    const size = opts.size;
    const done = (outcome: IngestOutcome, actualSize: number): IngestResult => ({ path, digest, size: actualSize, outcome });
    if (await this.has(digest, size)) return done("cached", size ?? (await stat(path)).size);
    const dir = dirname(path);
    try {
      await mkdir(dir, { recursive: true });
    } catch (err) {
      if (isDiskFull(err)) throw diskFull(dir, this.dir, err);
      throw err;
    }
    let sawPeer = false;
    const lock = await acquireLock(`${path}.lock`, {
      signal: opts.signal,
      until: () => this.has(digest, size),
      onWait: () => {
        sawPeer = true;
      },
    });
    if (!lock) return done("peer", size ?? (await stat(path)).size);
    try {
      if (await this.has(digest, size)) return done(sawPeer ? "peer" : "cached", size ?? (await stat(path)).size);
      await this.removeDeadTemps(dir, parseDigest(digest).hex);
      const written = await this.download(digest, path, openAt, opts);
      return done("downloaded", written);
    } finally {
      await lock.release();
    }
  }

  /** Removes temp files of this blob left by processes that died. */
  private async removeDeadTemps(dir: string, hex: string): Promise<void> {
    let names: string[];
    try {
      names = await readdir(dir);
    } catch {
      return;
    }
    for (const name of names) {
      if (!name.startsWith(`${hex}.`) || !name.endsWith(".tmp")) continue;
      const pid = Number(name.split(".")[1]);
      let alive = false;
      if (Number.isSafeInteger(pid) && pid > 0) {
        try {
          process.kill(pid, 0);
          alive = true;
        } catch (err) {
          alive = (err as NodeJS.ErrnoException).code === "EPERM";
        }
      }
      // We hold the blob's lock: a live process's temp is a leftover of an earlier attempt too.
      if (!alive || pid === process.pid) await unlink(join(dir, name)).catch(() => {});
    }
  }

  private async download(digest: string, path: string, openAt: BlobOpener, opts: IngestOptions): Promise<number> {
    const { algorithm, hex } = parseDigest(digest);
    const tmp = join(dirname(path), `${hex}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`);
    const what = opts.what ?? `blob ${digest}`;
    let fh: FileHandle | undefined;
    let live: LiveBlob | undefined;
    try {
      fh = await open(tmp, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o644);
      if (opts.onLive) {
        live = new LiveBlob(tmp);
        opts.onLive(live);
      }
      let digester = new Digester(algorithm);
      // Bytes in the file; those received after them wait in `pending` and
      // go in one write per WRITE_BATCH (a write per socket chunk cost the
      // main thread ≈ 0.1 s per 50 MB layer).
      let written = 0;
      const pending: Buffer[] = [];
      let pendingBytes = 0;
      const flushPending = async (): Promise<void> => {
        if (pendingBytes === 0) return;
        const n = pendingBytes;
        const bufs = pending.splice(0);
        pendingBytes = 0;
        await writevAll(fh!, bufs, n, written);
        written += n;
        live?.grow(written);
        report(false);
      };
      let lastReport = 0;
      const report = (force: boolean): void => {
        if (!opts.onProgress) return;
        const now = Date.now();
        if (force || now - lastReport >= 100) {
          lastReport = now;
          opts.onProgress(written);
        }
      };
      for (let attempt = 0; ; attempt++) {
        abortIf(opts.signal);
        try {
          const { stream, start } = await openAt(written);
          if (start !== written) {
            if (start !== 0) {
              stream.destroy();
              throw new Error(`source restarted at byte ${start}, expected ${written} or 0`);
            }
            await fh.truncate(0);
            digester = new Digester(algorithm);
            written = 0;
            live?.grow(0);
          }
          try {
            for await (const chunk of stream) {
              const b = chunk as Buffer;
              if (opts.size !== undefined && written + pendingBytes + b.length > opts.size) {
                throw new DigestMismatchError(
                  `${what} is longer than the ${opts.size} bytes its descriptor says; it was discarded`,
                  digest,
                  `more than ${opts.size} bytes`,
                );
              }
              digester.update(b);
              pending.push(b);
              pendingBytes += b.length;
              if (pendingBytes >= WRITE_BATCH) await flushPending();
            }
          } finally {
            stream.destroy();
          }
          await flushPending();
          break;
        } catch (err) {
          const retries = opts.retries ?? 0;
          if (err instanceof DigestMismatchError || err instanceof AbortError || isDiskFull(err)) throw err;
          if (attempt >= retries || !opts.isRetryable?.(err)) throw err;
          // What arrived before the break is good (it is in the digest): the resume starts after it.
          await flushPending();
          await delay(backoffMs(attempt, opts.retryBaseMs ?? 200), opts.signal);
        }
      }
      report(true);
      if (opts.size !== undefined && written !== opts.size) {
        throw new DigestMismatchError(`${what} is ${written} bytes, but its descriptor says ${opts.size}; it was discarded`, digest, `${written} bytes`);
      }
      const actual = digester.digest();
      if (actual !== digest) {
        throw new DigestMismatchError(`${what} hashes to ${actual}, not ${digest}; the bytes were discarded`, digest, actual);
      }
      await fh.sync();
      await fh.close();
      fh = undefined;
      await rename(tmp, path);
      await fsyncDir(dirname(path));
      live?.finish(path, written);
      return written;
    } catch (err) {
      await fh?.close().catch(() => {});
      await unlink(tmp).catch(() => {});
      const e = isDiskFull(err) ? diskFull(path, this.dir, err) : err;
      live?.fail(e);
      throw e;
    }
  }

  /**
   * Copies a stream whose digest is not known in advance into the cache
   * (docker-archive layers). Returns its sha256 digest.
   */
  async ingestUnknown(stream: Readable, opts: { signal?: AbortSignal | undefined; onProgress?: (n: number) => void } = {}): Promise<IngestResult> {
    const dir = join(this.dir, "blobs", "sha256");
    try {
      await mkdir(dir, { recursive: true });
    } catch (err) {
      if (isDiskFull(err)) throw diskFull(dir, this.dir, err);
      throw err;
    }
    const tmp = join(dir, `unknown.${process.pid}.${randomBytes(6).toString("hex")}.tmp`);
    let fh: FileHandle | undefined;
    try {
      fh = await open(tmp, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o644);
      const digester = new Digester("sha256");
      let last = 0;
      try {
        for await (const chunk of stream) {
          abortIf(opts.signal);
          const b = chunk as Buffer;
          await writeAll(fh, b, digester.bytes);
          digester.update(b);
          if (opts.onProgress && Date.now() - last >= 100) {
            last = Date.now();
            opts.onProgress(digester.bytes);
          }
        }
      } finally {
        stream.destroy();
      }
      const size = digester.bytes;
      const digest = digester.digest();
      opts.onProgress?.(size);
      const path = this.blobPath(digest);
      if (await this.has(digest, size)) {
        await fh.close();
        fh = undefined;
        await unlink(tmp).catch(() => {});
        return { path, digest, size, outcome: "cached" };
      }
      await fh.sync();
      await fh.close();
      fh = undefined;
      await rename(tmp, path);
      await fsyncDir(dir);
      return { path, digest, size, outcome: "downloaded" };
    } catch (err) {
      await fh?.close().catch(() => {});
      await unlink(tmp).catch(() => {});
      if (isDiskFull(err)) throw diskFull(tmp, this.dir, err);
      throw err;
    }
  }

  private refPath(key: string): string {
    return join(this.dir, "refs", `${digestOf(Buffer.from(key, "utf8")).slice(7)}.json`);
  }

  /** What `key` (e.g. "registry:docker.io/library/alpine:latest") resolved to last time. */
  async readRef(key: string): Promise<RefRecord | undefined> {
    let text: string;
    try {
      text = await readFile(this.refPath(key), "utf8");
    } catch {
      return undefined;
    }
    try {
      const j = JSON.parse(text) as Partial<RefRecord>;
      if (j.key !== key || typeof j.mediaType !== "string" || typeof j.updatedAt !== "string") return undefined;
      parseDigest(j.digest);
      return j as RefRecord;
    } catch {
      return undefined;
    }
  }

  /** Records what `key` resolved to (atomically replaced). */
  async writeRef(key: string, digest: string, mediaType: string): Promise<void> {
    const path = this.refPath(key);
    const record: RefRecord = { key, digest, mediaType, updatedAt: new Date().toISOString() };
    const tmp = `${path}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`;
    try {
      await mkdir(dirname(path), { recursive: true });
      let fh: FileHandle | undefined = await open(tmp, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o644);
      try {
        await writeAll(fh, Buffer.from(JSON.stringify(record)), 0);
        await fh.sync();
      } finally {
        await fh.close();
        fh = undefined;
      }
      await rename(tmp, path);
    } catch (err) {
      await unlink(tmp).catch(() => {});
      if (isDiskFull(err)) throw diskFull(path, this.dir, err);
      throw err;
    }
  }
}
