/**
 * Host side of the stream ring (docs/protocol.md, "Stream ring").
 *
 * The agent's virtio-serial port hands the guest one page per read, so bulk
 * host → guest bytes (stdin, file uploads, TCP uploads) cost the guest an
 * interrupt and a read every 4 KiB. Payloads of {@link RING_MIN_REGION_BYTES}
 * to {@link RING_MAX_REGION_BYTES} (pieces of large writes: stdin, file and
 * TCP uploads) are instead written into the backing file
 * of a small read-only virtio-blk disk, and a `DATA_REF` frame names the
 * region; the agent reads it with one request. The agent acknowledges every
 * `DATA_REF` once, in order (`RING_ACK`), and only then is its region written
 * again. When the ring is full the bytes go as `DATA` frames: never a wait.
 */

import { closeSync, ftruncateSync, openSync, truncateSync, writeSync } from "node:fs";
import { join } from "node:path";
import type { QemuDisk } from "../volumes/disks.js";

/** Size of each VM's ring file (sparse: pages are used only when written). */
export const RING_BYTES = 2 << 20;
/**
 * What goes through the ring: payloads of at least this size (a large write
 * cut into pieces); anything smaller goes as DATA frames. Under TCG a disk
 * request costs the guest about as much as 32 page-sized port reads
 * (measured: 64 and 128 KiB payloads were as fast or faster as frames,
 * 256 KiB ones 20–40 % faster through the ring; docs/performance.md).
 */
export const RING_MIN_REGION_BYTES = 256 * 1024;
/**
 * The largest region: a piece of a large write up to this size goes as one
 * region (the agent reads up to MAX_PAYLOAD at once). Each region costs the
 * guest a blocking read, and under TCG the task switches around it (each a
 * full flush of QEMU's software TLB) cost more than the bytes: in the guest,
 * a region read and written to a loopback socket moved 230 MiB/s with
 * 256 KiB regions, 300 with 512 KiB and 380 with 1 MiB.
 */
export const RING_MAX_REGION_BYTES = 1 << 20;
/** The disk's serial, which the agent looks for. */
export const RING_SERIAL = "sm-ring";
/** Regions start at multiples of this (the agent reads them with O_DIRECT). */
const ALIGN = 4096;

/** Creates a VM's (empty, sparse) ring file. */
export function createRingFile(path: string): void {
  const fd = openSync(path, "wx", 0o600);
  try {
    ftruncateSync(fd, RING_BYTES);
  } finally {
    closeSync(fd);
  }
}

/**
 * Empties a ring file in place (it becomes holes: reads give zeros), so
 * that what one holder of a reused QEMU sent never reaches the next guest.
 */
export function clearRingFile(path: string): void {
  truncateSync(path, 0);
  truncateSync(path, RING_BYTES);
}

/** A VM's stream ring: an empty file in its runtime dir, attached read-only. */
export function ringDisk(dir: string): QemuDisk {
  const file = join(dir, "ring");
  createRingFile(file);
  return { serial: RING_SERIAL, file, format: "raw", readOnly: true, backing: [] };
}

export class StreamRing {
  private fd: number | undefined;
  private readonly size: number;
  /** Offset of the next region. */
  private head = 0;
  /** Bytes held by unacknowledged regions (with the tail a wrap skipped). */
  private used = 0;
  /** Each unacknowledged region's share of `used`, oldest first (at most size / 4 KiB of them). */
  private readonly regions: number[] = [];

  private constructor(fd: number, size: number) {
    this.fd = fd;
    this.size = size;
  }

  /** Opens a ring file made by {@link createRingFile}. */
  static open(path: string, size = RING_BYTES): StreamRing {
    return new StreamRing(openSync(path, "r+"), size);
  }

  /** Regions written and not acknowledged yet. */
  get pending(): number {
    return this.regions.length;
  }

  /**
   * Writes `bytes` into a free region and returns its offset, or undefined
   * when the ring is full, closed, or the write failed (the caller sends a
   * DATA frame instead).
   */
  place(bytes: Uint8Array): number | undefined {
    if (this.fd === undefined || bytes.length === 0 || bytes.length > this.size) return undefined;
    const need = Math.ceil(bytes.length / ALIGN) * ALIGN;
    let start = this.head;
    let skip = 0;
    if (start + need > this.size) {
      skip = this.size - start;
      start = 0;
    }
    if (this.used + skip + need > this.size) return undefined;
    try {
      let done = 0;
      while (done < bytes.length) done += writeSync(this.fd, bytes, done, bytes.length - done, start + done);
    } catch {
      // No space left for the file (its filesystem is full): frames from now on.
      this.close();
      return undefined;
    }
    this.regions.push(skip + need);
    this.used += skip + need;
    this.head = (start + need) % this.size;
    return start;
  }

  /** The agent read the `n` oldest regions. Returns a violation, or undefined. */
  ack(n: number): string | undefined {
    if (!Number.isInteger(n) || n < 1 || n > this.pending) return `RING_ACK of ${n} regions, ${this.pending} outstanding`;
    for (const r of this.regions.splice(0, n)) this.used -= r;
    // Empty: start over at the front (fewer wraps).
    if (this.regions.length === 0) this.head = 0;
    return undefined;
  }

  close(): void {
    if (this.fd === undefined) return;
    const fd = this.fd;
    this.fd = undefined;
    try {
      closeSync(fd);
    } catch {
      /* already gone */
    }
  }
}
