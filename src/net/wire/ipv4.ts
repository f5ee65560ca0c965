/** IPv4 headers (RFC 791): parse with validation, emit with checksum. */

import { checksum } from "./checksum.js";

export const IPV4_HEADER = 20;
export const PROTO_ICMP = 1;
export const PROTO_TCP = 6;
export const PROTO_UDP = 17;

export interface Ipv4Packet {
  headerLength: number;
  totalLength: number;
  id: number;
  /** More-fragments flag set or a fragment offset: we do not reassemble. */
  fragment: boolean;
  ttl: number;
  protocol: number;
  src: Uint8Array;
  dst: Uint8Array;
  /** The transport payload, cut to totalLength. */
  payload: Buffer;
}

/** Parses an IPv4 packet; undefined when malformed (the caller drops it). */
export function parseIpv4(p: Buffer): Ipv4Packet | undefined {
  if (p.length < IPV4_HEADER) return undefined;
  const vihl = p[0]!;
  if (vihl >> 4 !== 4) return undefined;
  const headerLength = (vihl & 0x0f) * 4;
  if (headerLength < IPV4_HEADER || headerLength > p.length) return undefined;
  const totalLength = p.readUInt16BE(2);
  if (totalLength < headerLength || totalLength > p.length) return undefined;
  const flagsFrag = p.readUInt16BE(6);
  return {
    headerLength,
    totalLength,
    id: p.readUInt16BE(4),
    fragment: (flagsFrag & 0x2000) !== 0 || (flagsFrag & 0x1fff) !== 0,
    ttl: p[8]!,
    protocol: p[9]!,
    src: p.subarray(12, 16),
    dst: p.subarray(16, 20),
    payload: p.subarray(headerLength, totalLength),
  };
}

let nextId = 1;

/** Writes a 20-byte IPv4 header (DF set) at `off`; `payloadLength` follows it. */
export function writeIpv4(buf: Buffer, off: number, src: Uint8Array, dst: Uint8Array, protocol: number, payloadLength: number, ttl = 64): void {
  buf[off] = 0x45;
  buf[off + 1] = 0;
  buf.writeUInt16BE(IPV4_HEADER + payloadLength, off + 2);
  buf.writeUInt16BE(nextId, off + 4);
  nextId = (nextId + 1) & 0xffff;
  buf.writeUInt16BE(0x4000, off + 6);
  buf[off + 8] = ttl;
  buf[off + 9] = protocol;
  buf.writeUInt16BE(0, off + 10);
  buf.set(src, off + 12);
  buf.set(dst, off + 16);
  buf.writeUInt16BE(checksum(buf, off, off + IPV4_HEADER), off + 10);
}

/** "a.b.c.d" → 4 bytes; undefined when not a dotted quad. */
export function parseIpv4Address(s: string): Buffer | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(s);
  if (!m) return undefined;
  const b = [m[1], m[2], m[3], m[4]].map((x) => Number(x));
  if (b.some((x) => x > 255)) return undefined;
  if (m.slice(1).some((x) => x!.length > 1 && x!.startsWith("0"))) return undefined;
  return Buffer.from(b);
}

export function ipToString(a: Uint8Array): string {
  return `${a[0]}.${a[1]}.${a[2]}.${a[3]}`;
}

/** 4 bytes → unsigned 32-bit number. */
export function ipToNumber(a: Uint8Array): number {
  return ((a[0]! << 24) | (a[1]! << 16) | (a[2]! << 8) | a[3]!) >>> 0;
}

export function numberToIp(n: number): Buffer {
  return Buffer.from([(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255]);
}
