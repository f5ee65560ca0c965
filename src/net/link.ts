/**
 * The link to QEMU's `-netdev stream` backend: a unix socket carrying
 * Ethernet frames, each preceded by its length as a 32-bit big-endian
 * integer. The reader holds at most one partial frame and rejects a length
 * above the limit before allocating for it.
 */

/** Largest frame accepted from the guest: a 65535-byte IP packet + Ethernet header, with room. */
export const MAX_FRAME = 65_535 + 14 + 64;

export class FrameReader {
  private parts: Buffer[] = [];
  private bytes = 0;

  /**
   * Feeds bytes; calls `onFrame` for every complete frame. Returns false when
   * the stream announced a frame over {@link MAX_FRAME} (the link is broken).
   */
  push(chunk: Buffer, onFrame: (frame: Buffer) => void): boolean {
    if (this.bytes === 0 && this.parts.length === 0) {
      // Fast path: frames straight out of the chunk.
      let off = 0;
      while (chunk.length - off >= 4) {
        const len = chunk.readUInt32BE(off);
        if (len > MAX_FRAME) return false;
        if (chunk.length - off - 4 < len) break;
        onFrame(chunk.subarray(off + 4, off + 4 + len));
        off += 4 + len;
      }
      if (off < chunk.length) {
        this.parts.push(chunk.subarray(off));
        this.bytes = chunk.length - off;
      }
      return true;
    }
    this.parts.push(chunk);
    this.bytes += chunk.length;
    for (;;) {
      if (this.bytes < 4) return true;
      const head = this.peek(4);
      const len = head.readUInt32BE(0);
      if (len > MAX_FRAME) return false;
      if (this.bytes < 4 + len) return true;
      const all = this.take(4 + len);
      onFrame(all.subarray(4));
      if (this.bytes === 0) return true;
      if (this.parts.length === 1) {
        // Continue on the fast path with what is left.
        const rest = this.parts[0]!;
        this.parts = [];
        this.bytes = 0;
        return this.push(rest, onFrame);
      }
    }
  }

  /** The first `n` bytes (n ≤ 4 here), copying at most n bytes. */
  private peek(n: number): Buffer {
    if (this.parts[0]!.length >= n) return this.parts[0]!;
    const out = Buffer.alloc(n);
    let got = 0;
    for (const p of this.parts) {
      const k = Math.min(p.length, n - got);
      p.copy(out, got, 0, k);
      got += k;
      if (got === n) break;
    }
    return out;
  }

  private take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let got = 0;
    while (got < n) {
      const p = this.parts[0]!;
      const k = Math.min(p.length, n - got);
      p.copy(out, got, 0, k);
      got += k;
      if (k === p.length) this.parts.shift();
      else this.parts[0] = p.subarray(k);
    }
    this.bytes -= n;
    return out;
  }
}
