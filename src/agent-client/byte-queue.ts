/**
 * A FIFO of bytes in one contiguous, growing buffer. Guest output is stored
 * here instead of in arrays of Buffers: the guest chooses its frame sizes,
 * and a million 1-byte frames kept as a million Buffers would cost about a
 * hundred times their payload in heap. Here they cost their bytes (at most
 * twice, while the buffer grows by doubling).
 */

const MIN_CAPACITY = 4096;

export class ByteQueue {
  private buf: Buffer = Buffer.alloc(0);
  private start = 0;
  private end = 0;

  /** Bytes queued. */
  get length(): number {
    return this.end - this.start;
  }

  /** Bytes allocated (for tests and budgets). */
  get capacity(): number {
    return this.buf.length;
  }

  /** Copies `bytes` in (the caller may reuse or drop its view afterwards). */
  push(bytes: Uint8Array): void {
    const n = bytes.length;
    if (n === 0) return;
    if (this.buf.length - this.end < n) this.makeRoom(n);
    this.buf.set(bytes, this.end);
    this.end += n;
  }

  private makeRoom(n: number): void {
    const live = this.end - this.start;
    // Compact in place when the free head makes enough room and the buffer
    // is not mostly empty (else shrink by reallocating).
    if (this.buf.length - live >= n && live + n >= this.buf.length / 4) {
      this.buf.copy(this.buf, 0, this.start, this.end);
    } else {
      let cap = Math.max(MIN_CAPACITY, this.buf.length);
      while (cap < live + n) cap *= 2;
      while (cap > MIN_CAPACITY && cap / 4 >= live + n) cap /= 2;
      const next = Buffer.allocUnsafe(cap);
      this.buf.copy(next, 0, this.start, this.end);
      this.buf = next;
    }
    this.start = 0;
    this.end = live;
  }

  /** Removes and returns up to `max` bytes (a copy: the queue keeps its buffer). */
  shift(max = Infinity): Buffer {
    const n = Math.min(max, this.length);
    const out = Buffer.allocUnsafe(n);
    this.buf.copy(out, 0, this.start, this.start + n);
    this.start += n;
    if (this.start === this.end) this.reset();
    return out;
  }

  /** Removes and returns everything, then frees the buffer. */
  takeAll(): Buffer {
    const out = this.shift();
    this.buf = Buffer.alloc(0);
    return out;
  }

  private reset(): void {
    this.start = 0;
    this.end = 0;
    // Do not pin a large buffer once drained.
    if (this.buf.length > 64 * 1024) this.buf = Buffer.alloc(0);
  }
}

/** Chunks under this size are copied into a shared buffer (ChunkQueue). */
const SMALL_CHUNK = 16 * 1024;
const SMALL_BUFFER = 64 * 1024;

/**
 * A FIFO of Buffers the holder owns (a host socket's reads: each a buffer of
 * its own), kept by reference: a large chunk is not copied in, and a take
 * that a single chunk covers is not copied out. Chunks under 16 KiB are
 * copied into a shared 64 KiB buffer, so a trickle of tiny reads costs its
 * bytes and not an object each.
 */
export class ChunkQueue {
  private items: Buffer[] = [];
  private bytes = 0;
  /** Where small chunks are copied; the last item is a view of it. */
  private small: Buffer | undefined;
  private smallLen = 0;

  /** Bytes queued. */
  get length(): number {
    return this.bytes;
  }

  /** Queues `chunk`, which the caller gives up (it must not change afterwards). */
  push(chunk: Buffer): void {
    const n = chunk.length;
    if (n === 0) return;
    this.bytes += n;
    if (n >= SMALL_CHUNK) {
      this.items.push(chunk);
      this.small = undefined;
      return;
    }
    if (!this.small || this.small.length - this.smallLen < n) {
      this.small = Buffer.allocUnsafe(SMALL_BUFFER);
      this.smallLen = 0;
      this.items.push(this.small.subarray(0, 0));
    }
    chunk.copy(this.small, this.smallLen);
    this.smallLen += n;
    this.items[this.items.length - 1] = this.small.subarray(0, this.smallLen);
  }

  /** Removes and returns up to `max` bytes: a view when one chunk holds them, else a copy. */
  take(max = Infinity): Buffer {
    const n = Math.min(max, this.bytes);
    // Small chunks start a new shared buffer from here on: the bytes taken stay as they are.
    this.small = undefined;
    if (n === 0) return Buffer.alloc(0);
    this.bytes -= n;
    const first = this.items[0]!;
    if (first.length >= n) {
      if (first.length === n) this.items.shift();
      else this.items[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const it = this.items[0]!;
      const k = Math.min(it.length, n - off);
      it.copy(out, off, 0, k);
      off += k;
      if (k === it.length) this.items.shift();
      else this.items[0] = it.subarray(k);
    }
    return out;
  }

  /** Drops everything. */
  clear(): void {
    this.items = [];
    this.bytes = 0;
    this.small = undefined;
  }
}
