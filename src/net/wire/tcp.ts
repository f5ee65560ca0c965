/** TCP segments (RFC 9293): header parse/emit, the options we use, sequence arithmetic. */

import { finish, pseudoHeaderSum, sumWords } from "./checksum.js";
import { PROTO_TCP } from "./ipv4.js";

export const TCP_HEADER = 20;
export const FIN = 0x01;
export const SYN = 0x02;
export const RST = 0x04;
export const PSH = 0x08;
export const ACK = 0x10;
export const URG = 0x20;

export interface TcpSegment {
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  flags: number;
  window: number;
  /** MSS option (SYN only). */
  mss?: number;
  /** Window scale shift option (SYN only), clamped to 14. */
  windowScale?: number;
  payload: Buffer;
}

/** Parses a TCP segment; undefined when malformed. The checksum is not verified (the link is a local socket). */
export function parseTcp(p: Buffer): TcpSegment | undefined {
  if (p.length < TCP_HEADER) return undefined;
  const dataOffset = (p[12]! >> 4) * 4;
  if (dataOffset < TCP_HEADER || dataOffset > p.length) return undefined;
  const seg: TcpSegment = {
    srcPort: p.readUInt16BE(0),
    dstPort: p.readUInt16BE(2),
    seq: p.readUInt32BE(4),
    ack: p.readUInt32BE(8),
    flags: p[13]! & 0x3f,
    window: p.readUInt16BE(14),
    payload: p.subarray(dataOffset),
  };
  // Options: bounded by the header; malformed lengths end the scan.
  let i = TCP_HEADER;
  while (i < dataOffset) {
    const kind = p[i]!;
    if (kind === 0) break;
    if (kind === 1) {
      i++;
      continue;
    }
    if (i + 1 >= dataOffset) break;
    const len = p[i + 1]!;
    if (len < 2 || i + len > dataOffset) break;
    if (kind === 2 && len === 4) seg.mss = p.readUInt16BE(i + 2);
    else if (kind === 3 && len === 3) seg.windowScale = Math.min(14, p[i + 2]!);
    i += len;
  }
  return seg;
}

/** Header length of a segment we emit: 20, or 28 with MSS + window scale on a SYN. */
export function tcpHeaderLength(withSynOptions: boolean): number {
  return withSynOptions ? TCP_HEADER + 8 : TCP_HEADER;
}

export interface TcpEmit extends Pick<TcpSegment, "srcPort" | "dstPort" | "seq" | "ack" | "flags" | "window"> {
  /** On a SYN: announce this MSS and (when set) this window scale. */
  synOptions?: { mss: number; windowScale?: number };
}

/**
 * Writes a TCP header at `off`; the payload (`payloadLength` bytes) must
 * already sit right after the header. Computes the checksum over both.
 */
export function writeTcp(buf: Buffer, off: number, s: TcpEmit, src: Uint8Array, dst: Uint8Array, payloadLength: number): number {
  const hl = tcpHeaderLength(s.synOptions !== undefined);
  buf.writeUInt16BE(s.srcPort, off);
  buf.writeUInt16BE(s.dstPort, off + 2);
  buf.writeUInt32BE(s.seq >>> 0, off + 4);
  buf.writeUInt32BE(s.ack >>> 0, off + 8);
  buf[off + 12] = (hl / 4) << 4;
  buf[off + 13] = s.flags;
  buf.writeUInt16BE(Math.max(0, Math.min(0xffff, s.window)), off + 14);
  buf.writeUInt32BE(0, off + 16); // checksum + urgent pointer
  if (s.synOptions) {
    buf[off + 20] = 2;
    buf[off + 21] = 4;
    buf.writeUInt16BE(s.synOptions.mss, off + 22);
    if (s.synOptions.windowScale !== undefined) {
      buf[off + 24] = 1; // NOP
      buf[off + 25] = 3;
      buf[off + 26] = 3;
      buf[off + 27] = s.synOptions.windowScale;
    } else {
      buf.writeUInt32BE(0x01010101, off + 24); // NOPs
    }
  }
  const len = hl + payloadLength;
  const sum = sumWords(buf, off, off + len, pseudoHeaderSum(src, dst, PROTO_TCP, len));
  buf.writeUInt16BE(finish(sum), off + 16);
  return hl;
}

/** a < b in sequence space. */
export function seqLt(a: number, b: number): boolean {
  return ((a - b) | 0) < 0;
}
export function seqLe(a: number, b: number): boolean {
  return ((a - b) | 0) <= 0;
}
/** b - a in sequence space (a ≤ b assumed). */
export function seqDiff(b: number, a: number): number {
  return (b - a) | 0;
}
export function seqAdd(a: number, n: number): number {
  return (a + n) >>> 0;
}
