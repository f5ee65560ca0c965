/**
 * DNS messages (RFC 1035), only what a stub resolver's query needs: one
 * question in, A records (or an error code) out. Names are bounded (255
 * bytes, 63 per label); compression pointers are followed only backwards
 * and at most 16 times, so a hostile query cannot loop.
 */

export const TYPE_A = 1;
export const TYPE_AAAA = 28;
export const CLASS_IN = 1;

export const RCODE_NOERROR = 0;
export const RCODE_FORMERR = 1;
export const RCODE_SERVFAIL = 2;
export const RCODE_NXDOMAIN = 3;
export const RCODE_NOTIMP = 4;
export const RCODE_REFUSED = 5;

export interface DnsQuestion {
  /** Lowercase, no trailing dot. */
  name: string;
  type: number;
  class: number;
}

export interface DnsQuery {
  id: number;
  /** The raw flags word of the query (RD is echoed back). */
  flags: number;
  opcode: number;
  question: DnsQuestion;
  /** The question section's bytes, echoed in the answer. */
  questionBytes: Buffer;
}

export class DnsParseError extends Error {}

/** Reads a (possibly compressed) name at `off`; returns the name and the offset after it. */
export function readName(msg: Buffer, off: number): { name: string; end: number } {
  const labels: string[] = [];
  let total = 0;
  let end = -1;
  let jumps = 0;
  let i = off;
  for (;;) {
    if (i >= msg.length) throw new DnsParseError("name runs past the message");
    const len = msg[i]!;
    if (len === 0) {
      if (end < 0) end = i + 1;
      break;
    }
    if ((len & 0xc0) === 0xc0) {
      if (i + 1 >= msg.length) throw new DnsParseError("truncated pointer");
      const ptr = ((len & 0x3f) << 8) | msg[i + 1]!;
      if (ptr >= i || ++jumps > 16) throw new DnsParseError("bad compression pointer");
      if (end < 0) end = i + 2;
      i = ptr;
      continue;
    }
    if (len > 63) throw new DnsParseError("label too long");
    if (i + 1 + len > msg.length) throw new DnsParseError("label runs past the message");
    total += len + 1;
    if (total > 255) throw new DnsParseError("name too long");
    labels.push(msg.toString("latin1", i + 1, i + 1 + len).toLowerCase());
    i += 1 + len;
  }
  return { name: labels.join("."), end };
}

/** Parses a standard query with exactly one question. */
export function parseQuery(msg: Buffer): DnsQuery {
  if (msg.length < 12) throw new DnsParseError("shorter than a header");
  const flags = msg.readUInt16BE(2);
  if (flags & 0x8000) throw new DnsParseError("not a query");
  if (msg.readUInt16BE(4) !== 1) throw new DnsParseError("not exactly one question");
  const { name, end } = readName(msg, 12);
  if (end + 4 > msg.length) throw new DnsParseError("truncated question");
  return {
    id: msg.readUInt16BE(0),
    flags,
    opcode: (flags >> 11) & 0xf,
    question: { name, type: msg.readUInt16BE(end), class: msg.readUInt16BE(end + 2) },
    // Re-encoded without compression (the question may have pointed into the header region).
    questionBytes: Buffer.concat([encodeName(name), msg.subarray(end, end + 4)]),
  };
}

/** Encodes a name as uncompressed labels. */
export function encodeName(name: string): Buffer {
  const parts: Buffer[] = [];
  for (const label of name === "" ? [] : name.split(".")) {
    const b = Buffer.from(label, "latin1");
    parts.push(Buffer.from([b.length]), b);
  }
  parts.push(Buffer.from([0]));
  return Buffer.concat(parts);
}

/**
 * A response to `q`: `rcode`, and A records (4-byte addresses) with `ttl`.
 * The answer names point at the question (offset 12).
 */
export function buildResponse(q: { id: number; flags: number; questionBytes: Buffer }, rcode: number, addresses: readonly Uint8Array[] = [], ttl = 60): Buffer {
  const head = Buffer.alloc(12);
  head.writeUInt16BE(q.id, 0);
  // QR=1, opcode copied, AA=0, TC=0, RD copied, RA=1, rcode
  head.writeUInt16BE(0x8000 | (q.flags & 0x7900) | 0x0080 | (rcode & 0xf), 2);
  head.writeUInt16BE(q.questionBytes.length ? 1 : 0, 4);
  head.writeUInt16BE(addresses.length, 6);
  const answers = addresses.map((a) => {
    const rr = Buffer.alloc(16);
    rr.writeUInt16BE(0xc00c, 0);
    rr.writeUInt16BE(TYPE_A, 2);
    rr.writeUInt16BE(CLASS_IN, 4);
    rr.writeUInt32BE(ttl, 6);
    rr.writeUInt16BE(4, 10);
    rr.set(a.subarray(0, 4), 12);
    return rr;
  });
  return Buffer.concat([head, q.questionBytes, ...answers]);
}

/** Parses the A records of a response (for tests and tools). */
export function parseResponse(msg: Buffer): { id: number; rcode: number; addresses: string[] } {
  if (msg.length < 12) throw new DnsParseError("shorter than a header");
  const qd = msg.readUInt16BE(4);
  const an = msg.readUInt16BE(6);
  let off = 12;
  for (let i = 0; i < qd; i++) off = readName(msg, off).end + 4;
  const addresses: string[] = [];
  for (let i = 0; i < an; i++) {
    off = readName(msg, off).end;
    if (off + 10 > msg.length) throw new DnsParseError("truncated record");
    const type = msg.readUInt16BE(off);
    const rdlen = msg.readUInt16BE(off + 8);
    off += 10;
    if (off + rdlen > msg.length) throw new DnsParseError("truncated rdata");
    if (type === TYPE_A && rdlen === 4) addresses.push(`${msg[off]}.${msg[off + 1]}.${msg[off + 2]}.${msg[off + 3]}`);
    off += rdlen;
  }
  return { id: msg.readUInt16BE(0), rcode: msg.readUInt16BE(2) & 0xf, addresses };
}
