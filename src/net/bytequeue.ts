/** A growable FIFO of bytes in one contiguous buffer (no per-chunk objects). */
export class ByteQueue {
  private buf: Buffer;
  private start = 0;
  private end = 0;

  constructor(initial = 16 * 1024) {
    this.buf = Buffer.allocUnsafe(initial);
  }

  get length(): number {
    return this.end - this.start;
  }

  push(b: Uint8Array): void {
    if (this.end + b.length > this.buf.length) {
      const len = this.length;
      if (len + b.length <= this.buf.length / 2) {
        this.buf.copy(this.buf, 0, this.start, this.end);
      } else {
        let cap = this.buf.length * 2;
        while (cap < len + b.length) cap *= 2;
        const n = Buffer.allocUnsafe(cap);
        this.buf.copy(n, 0, this.start, this.end);
        this.buf = n;
      }
      this.start = 0;
      this.end = len;
    }
    this.buf.set(b, this.end);
    this.end += b.length;
  }

  /** Copies `len` bytes starting `offset` bytes into the queue to `target[at..]`. */
  copyOut(target: Buffer, at: number, offset: number, len: number): void {
    this.buf.copy(target, at, this.start + offset, this.start + offset + len);
  }

  /** Drops `n` bytes from the front. */
  drop(n: number): void {
    this.start += Math.min(n, this.length);
    if (this.start === this.end) {
      this.start = 0;
      this.end = 0;
      // Give back a buffer a burst made large.
      if (this.buf.length > 1 << 20) this.buf = Buffer.allocUnsafe(16 * 1024);
    }
  }

  clear(): void {
    this.start = 0;
    this.end = 0;
  }
}
