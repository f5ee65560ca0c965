/**
 * Frame and record codec (docs/protocol.md). Pure functions over Buffers;
 * the incremental {@link FrameReader} treats its input as hostile: a length
 * over the limit is rejected from the 4 length bytes, before any allocation.
 */

import { HEADER_LEN, MAX_PAYLOAD } from "./constants.js";

export interface Frame {
  type: number;
  flags: number;
  stream: number;
  payload: Buffer;
}

export type DecodeErrorKind =
  | "length-too-small"
  | "length-too-large"
  | "reserved-nonzero"
  | "field-overrun"
  | "field-size";

/** A rule of the frame format was broken. */
export class DecodeError extends Error {
  readonly kind: DecodeErrorKind;
  constructor(kind: DecodeErrorKind, message: string) {
    super(message);
    this.kind = kind;
    this.name = "DecodeError";
  }
}

export function encodeFrame(type: number, flags: number, stream: number, payload: Uint8Array = EMPTY): Buffer {
  if (payload.length > MAX_PAYLOAD) throw new RangeError(`payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD}`);
  const out = Buffer.allocUnsafe(HEADER_LEN + payload.length);
  out.writeUInt32LE(8 + payload.length, 0);
  out[4] = type;
  out[5] = flags;
  out.writeUInt16LE(0, 6);
  out.writeUInt32LE(stream >>> 0, 8);
  out.set(payload, HEADER_LEN);
  return out;
}

const EMPTY = Buffer.alloc(0);

/**
 * Parses one frame at the start of `buf`. Returns undefined when more bytes
 * are needed. The payload is a view into `buf` (no copy).
 */
export function parseFrame(buf: Buffer): { frame: Frame; used: number } | undefined {
  if (buf.length < 4) return undefined;
  const len = buf.readUInt32LE(0);
  if (len < 8) throw new DecodeError("length-too-small", `frame length ${len} below minimum 8`);
  if (len > 8 + MAX_PAYLOAD) throw new DecodeError("length-too-large", `frame length ${len} above maximum ${8 + MAX_PAYLOAD}`);
  const total = 4 + len;
  if (buf.length < total) return undefined;
  const reserved = buf.readUInt16LE(6);
  if (reserved !== 0) throw new DecodeError("reserved-nonzero", `reserved header field is ${reserved}, must be 0`);
  return {
    frame: { type: buf[4]!, flags: buf[5]!, stream: buf.readUInt32LE(8), payload: buf.subarray(HEADER_LEN, total) },
    used: total,
  };
}

/**
 * Incremental frame parser for a byte stream. Linear in the bytes pushed,
 * whatever the chunking (a guest trickling one byte at a time costs no more
 * than a big write), and it holds at most one incomplete frame
 * (≤ 12 + MAX_PAYLOAD bytes), allocated once its length is known and valid.
 */
export class FrameReader {
  private head = Buffer.alloc(4);
  private headLen = 0;
  private body: Buffer | undefined;
  private bodyLen = 0;

  /** Feeds bytes; returns the complete frames. Throws DecodeError on a bad frame. */
  push(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    let off = 0;
    while (off < chunk.length) {
      if (!this.body) {
        if (this.headLen === 0) {
          // Fast path: whole frames straight from the chunk, no copy.
          const r = parseFrame(chunk.subarray(off));
          if (r) {
            frames.push(r.frame);
            off += r.used;
            continue;
          }
        }
        const take = Math.min(4 - this.headLen, chunk.length - off);
        chunk.copy(this.head, this.headLen, off, off + take);
        this.headLen += take;
        off += take;
        if (this.headLen < 4) break;
        const len = this.head.readUInt32LE(0);
        if (len < 8) throw new DecodeError("length-too-small", `frame length ${len} below minimum 8`);
        if (len > 8 + MAX_PAYLOAD) throw new DecodeError("length-too-large", `frame length ${len} above maximum ${8 + MAX_PAYLOAD}`);
        this.body = Buffer.allocUnsafe(4 + len);
        this.head.copy(this.body, 0);
        this.bodyLen = 4;
      }
      const take = Math.min(this.body.length - this.bodyLen, chunk.length - off);
      chunk.copy(this.body, this.bodyLen, off, off + take);
      this.bodyLen += take;
      off += take;
      if (this.bodyLen === this.body.length) {
        const r = parseFrame(this.body);
        this.body = undefined;
        this.bodyLen = 0;
        this.headLen = 0;
        if (r) frames.push(r.frame);
      }
    }
    return frames;
  }

  /** Bytes held for an incomplete frame. */
  get pending(): number {
    return this.body ? this.bodyLen : this.headLen;
  }
}

// ---------------------------------------------------------------- records

export type Field = [tag: number, value: Buffer];

/** Splits a record payload into fields; throws DecodeError on an overrun. */
export function decodeFields(payload: Buffer): Field[] {
  const out: Field[] = [];
  let off = 0;
  while (off < payload.length) {
    const tag = payload[off]!;
    if (payload.length - off < 5) throw new DecodeError("field-overrun", `field ${tag} header cut short`);
    const vlen = payload.readUInt32LE(off + 1);
    if (payload.length - off - 5 < vlen) throw new DecodeError("field-overrun", `field ${tag} runs past the end of the payload`);
    out.push([tag, payload.subarray(off + 5, off + 5 + vlen)]);
    off += 5 + vlen;
  }
  return out;
}

/**
 * Typed, validated access to a decoded record. Unknown tags are ignored.
 * The payload is checked for overruns once, without allocating per field (a
 * 1 MiB record of empty fields must not cost 200 000 objects); accessors scan
 * it again, so a record costs O(1) heap whatever its field count.
 */
export class RecordReader {
  private readonly payload: Buffer;
  constructor(payload: Buffer) {
    this.payload = payload;
    let off = 0;
    while (off < payload.length) {
      const tag = payload[off]!;
      if (payload.length - off < 5) throw new DecodeError("field-overrun", `field ${tag} header cut short`);
      const vlen = payload.readUInt32LE(off + 1);
      if (payload.length - off - 5 < vlen) throw new DecodeError("field-overrun", `field ${tag} runs past the end of the payload`);
      off += 5 + vlen;
    }
  }
  /** Every field (allocates one entry per field: for tests and tools). */
  get fields(): Field[] {
    return decodeFields(this.payload);
  }
  /** Values of `tag` in order, at most `max` of them. */
  all(tag: number, max = Infinity): Buffer[] {
    const out: Buffer[] = [];
    const p = this.payload;
    for (let off = 0; off < p.length && out.length < max; ) {
      const vlen = p.readUInt32LE(off + 1);
      if (p[off] === tag) out.push(p.subarray(off + 5, off + 5 + vlen));
      off += 5 + vlen;
    }
    return out;
  }
  /** The last value of `tag` (a repeated scalar: the last one wins). */
  bytes(tag: number): Buffer | undefined {
    const p = this.payload;
    let at = -1;
    let len = 0;
    for (let off = 0; off < p.length; ) {
      const vlen = p.readUInt32LE(off + 1);
      if (p[off] === tag) {
        at = off + 5;
        len = vlen;
      }
      off += 5 + vlen;
    }
    return at < 0 ? undefined : p.subarray(at, at + len);
  }
  str(tag: number, maxBytes = 4096): string | undefined {
    const b = this.bytes(tag);
    if (b === undefined) return undefined;
    return b.subarray(0, maxBytes).toString("utf8");
  }
  u32(tag: number): number | undefined {
    const b = this.bytes(tag);
    if (b === undefined) return undefined;
    if (b.length !== 4) throw new DecodeError("field-size", `field ${tag} has ${b.length} bytes, expected 4`);
    return b.readUInt32LE(0);
  }
  i32(tag: number): number | undefined {
    const b = this.bytes(tag);
    if (b === undefined) return undefined;
    if (b.length !== 4) throw new DecodeError("field-size", `field ${tag} has ${b.length} bytes, expected 4`);
    return b.readInt32LE(0);
  }
  u64(tag: number): bigint | undefined {
    const b = this.bytes(tag);
    if (b === undefined) return undefined;
    if (b.length !== 8) throw new DecodeError("field-size", `field ${tag} has ${b.length} bytes, expected 8`);
    return b.readBigUInt64LE(0);
  }
  bool(tag: number): boolean | undefined {
    const b = this.bytes(tag);
    if (b === undefined) return undefined;
    if (b.length !== 1 || b[0]! > 1) throw new DecodeError("field-size", `field ${tag} is not a bool`);
    return b[0] === 1;
  }
}

/** Builds a record payload. */
export class RecordBuilder {
  private parts: Buffer[] = [];
  private size = 0;

  bytes(tag: number, value: Uint8Array | string): this {
    const v = typeof value === "string" ? Buffer.from(value, "utf8") : value;
    const head = Buffer.allocUnsafe(5);
    head[0] = tag;
    head.writeUInt32LE(v.length, 1);
    this.parts.push(head, Buffer.from(v.buffer, v.byteOffset, v.byteLength));
    this.size += 5 + v.length;
    return this;
  }
  u32(tag: number, v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32LE(v >>> 0, 0);
    return this.bytes(tag, b);
  }
  i32(tag: number, v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeInt32LE(v | 0, 0);
    return this.bytes(tag, b);
  }
  u64(tag: number, v: bigint | number): this {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64LE(BigInt(v), 0);
    return this.bytes(tag, b);
  }
  bool(tag: number, v: boolean): this {
    return this.bytes(tag, Buffer.from([v ? 1 : 0]));
  }
  get length(): number {
    return this.size;
  }
  build(): Buffer {
    return Buffer.concat(this.parts, this.size);
  }
}
