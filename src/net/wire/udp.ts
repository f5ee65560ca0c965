/** UDP datagrams (RFC 768). */

import { finish, pseudoHeaderSum, sumWords } from "./checksum.js";
import { PROTO_UDP } from "./ipv4.js";

export const UDP_HEADER = 8;

export interface UdpDatagram {
  srcPort: number;
  dstPort: number;
  payload: Buffer;
}

export function parseUdp(p: Buffer): UdpDatagram | undefined {
  if (p.length < UDP_HEADER) return undefined;
  const len = p.readUInt16BE(4);
  if (len < UDP_HEADER || len > p.length) return undefined;
  return { srcPort: p.readUInt16BE(0), dstPort: p.readUInt16BE(2), payload: p.subarray(UDP_HEADER, len) };
}

/** Writes a UDP header at `off`; the payload must already follow it. */
export function writeUdp(buf: Buffer, off: number, srcPort: number, dstPort: number, src: Uint8Array, dst: Uint8Array, payloadLength: number): void {
  const len = UDP_HEADER + payloadLength;
  buf.writeUInt16BE(srcPort, off);
  buf.writeUInt16BE(dstPort, off + 2);
  buf.writeUInt16BE(len, off + 4);
  buf.writeUInt16BE(0, off + 6);
  const c = finish(sumWords(buf, off, off + len, pseudoHeaderSum(src, dst, PROTO_UDP, len)));
  buf.writeUInt16BE(c === 0 ? 0xffff : c, off + 6);
}
