/** ICMP (RFC 792): echo and destination unreachable. */

import { checksum } from "./checksum.js";

export const ICMP_ECHO_REPLY = 0;
export const ICMP_DEST_UNREACHABLE = 3;
export const ICMP_ECHO_REQUEST = 8;
/** Destination unreachable codes. */
export const UNREACH_PORT = 3;
export const UNREACH_ADMIN_PROHIBITED = 13;

export interface IcmpMessage {
  type: number;
  code: number;
  /** Bytes 4..8 (identifier + sequence for echo). */
  rest: Buffer;
  payload: Buffer;
}

export function parseIcmp(p: Buffer): IcmpMessage | undefined {
  if (p.length < 8) return undefined;
  return { type: p[0]!, code: p[1]!, rest: p.subarray(4, 8), payload: p.subarray(8) };
}

/** Writes an ICMP message at `off` (8-byte header; the body must already follow it). */
export function writeIcmp(buf: Buffer, off: number, type: number, code: number, rest: Uint8Array, bodyLength: number): void {
  buf[off] = type;
  buf[off + 1] = code;
  buf.writeUInt16BE(0, off + 2);
  buf.set(rest.subarray(0, 4), off + 4);
  buf.writeUInt16BE(checksum(buf, off, off + 8 + bodyLength), off + 2);
}
