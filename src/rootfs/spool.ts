/**
 * The spool: one append-only host file holding the contents of every regular
 * file read from image layers, so the tree can reference them without
 * keeping them in memory and without ever creating a layer's paths on the
 * host. Each file's bytes start on a 4096-byte boundary (the erofs block
 * size), so the image writer reads whole, aligned blocks.
 */

import { open, rm, type FileHandle } from "node:fs/promises";
import { DiskFullError, ImageError } from "../errors.js";
import type { ContentRef } from "./tree.js";

/** Alignment of each file's first byte in the spool. */
export const SPOOL_ALIGN = 4096;
/** Padding between files (put() copies it: one shared buffer of zeros). */
const ZERO_PAD = Buffer.alloc(SPOOL_ALIGN);
const BUFFER_BYTES = 1 << 20;
/**
 * Written bytes after which the spool asks the kernel to write them to disk
 * (an fdatasync on the thread pool, not awaited). The spool usually becomes
 * the image, which is fsynced before it is renamed into the cache; without
 * this the whole image was written back by that fsync (≈ 0.12 s for a
 * 160 MB image here), after the last layer, on the way to the first boot.
 */
const WRITEBACK_BYTES = 16 << 20;

/** Turns ENOSPC/EDQUOT into {@link DiskFullError}, anything else into ImageError. */
export function ioError(what: string, path: string, err: unknown): Error {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === "ENOSPC" || code === "EDQUOT") return new DiskFullError(`No space left while ${what} ${path}: free disk space (or quota) and retry`, path, { cause: err });
  if (err instanceof Error && "code" in err && typeof (err as { code: unknown }).code === "string" && (err as { code: string }).code.startsWith("ERR_SM_")) return err;
  return new ImageError(`I/O error while ${what} ${path}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
}

/** An append-only content store backed by one host file. */
export class Spool {
  private buf = Buffer.alloc(BUFFER_BYTES);
  private used = 0;
  /** File offset of buf[0]. */
  private bufStart = 0;
  private closed = false;
  /** File offset up to which a writeback was started. */
  private writebackFrom = 0;
  private writeback: Promise<void> | undefined;
  private writebackError: unknown;

  private constructor(readonly path: string, private readonly fh: FileHandle) {}

  /**
   * Creates (or truncates) the spool file at `path`. `reserve` bytes at its
   * start stay a hole, never handed out (block 0 of an erofs image written
   * in place: writeErofsInPlace in erofs.ts).
   */
  static async create(path: string, options: { reserve?: number } = {}): Promise<Spool> {
    const reserve = options.reserve ?? 0;
    if (!Number.isInteger(reserve) || reserve < 0 || reserve % SPOOL_ALIGN !== 0) throw new RangeError(`spool reserve must be a multiple of ${SPOOL_ALIGN}, got ${reserve}`);
    let fh: FileHandle;
    try {
      fh = await open(path, "w+", 0o600);
    } catch (err) {
      throw ioError("creating the spool file", path, err);
    }
    const s = new Spool(path, fh);
    s.bufStart = reserve;
    return s;
  }

  /** Bytes written so far, including alignment padding. */
  get size(): number {
    return this.bufStart + this.used;
  }

  /**
   * Appends one file's contents, streamed from `chunks`, which must yield
   * exactly `size` bytes. Returns where they are; null for an empty file.
   * The bytes are readable from `path` once {@link flush} has run.
   */
  async append(chunks: AsyncIterable<Buffer>, size: number): Promise<ContentRef | null> {
    if (this.closed) throw new ImageError(`Spool ${this.path} is closed`);
    if (size === 0) {
      for await (const c of chunks) if (c.length > 0) throw new ImageError("spool: more bytes than announced");
      return null;
    }
    const pad = (SPOOL_ALIGN - (this.size % SPOOL_ALIGN)) % SPOOL_ALIGN;
    if (pad > 0) await this.put(ZERO_PAD.subarray(0, pad));
    const offset = this.size;
    let got = 0;
    for await (const c of chunks) {
      got += c.length;
      if (got > size) throw new ImageError(`spool: file body longer than its announced ${size} bytes`);
      await this.put(c);
    }
    if (got !== size) throw new ImageError(`spool: file body is ${got} bytes, ${size} announced`);
    return { path: this.path, offset, size };
  }

  private async put(c: Buffer): Promise<void> {
    if (this.used + c.length <= this.buf.length) {
      c.copy(this.buf, this.used);
      this.used += c.length;
      return;
    }
    await this.flush();
    if (c.length >= this.buf.length) {
      await this.writeAt(c, this.bufStart);
      this.bufStart += c.length;
    } else {
      c.copy(this.buf, 0);
      this.used = c.length;
    }
  }

  private async writeAt(data: Buffer, pos: number): Promise<void> {
    let done = 0;
    try {
      while (done < data.length) {
        const { bytesWritten } = await this.fh.write(data, done, data.length - done, pos + done);
        done += bytesWritten;
      }
    } catch (err) {
      throw ioError("writing the spool file", this.path, err);
    }
  }

  /** Writes buffered bytes to the file. */
  async flush(): Promise<void> {
    if (this.used === 0) return;
    await this.writeAt(this.buf.subarray(0, this.used), this.bufStart);
    this.bufStart += this.used;
    this.used = 0;
    this.startWriteback();
  }

  /**
   * Starts writing the file's dirty pages to disk once WRITEBACK_BYTES more
   * were written, one at a time, so that the final fsync finds little left.
   * Its error is kept for close(): the image's fsync runs on another
   * descriptor, opened later, and would not see it.
   */
  private startWriteback(): void {
    if (this.writeback || this.writebackError || this.bufStart - this.writebackFrom < WRITEBACK_BYTES) return;
    this.writebackFrom = this.bufStart;
    this.writeback = this.fh.datasync().then(
      () => void (this.writeback = undefined),
      (e: unknown) => {
        this.writeback = undefined;
        this.writebackError = e;
      },
    );
  }

  /**
   * Flushes and closes the file (idempotent). References stay valid. Throws
   * what an early writeback (startWriteback) met.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.flush();
    } finally {
      this.closed = true;
      this.buf = Buffer.alloc(0);
      await this.writeback;
      await this.fh.close();
    }
    if (this.writebackError !== undefined) throw ioError("writing the spool file", this.path, this.writebackError);
  }

  /** Closes and deletes the spool file. */
  async remove(): Promise<void> {
    try {
      await this.close();
    } finally {
      await rm(this.path, { force: true });
    }
  }
}
