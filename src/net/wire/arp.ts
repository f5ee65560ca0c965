/** ARP for IPv4 over Ethernet (RFC 826): 28-byte packets. */

export const ARP_LEN = 28;
export const ARP_REQUEST = 1;
export const ARP_REPLY = 2;

export interface ArpPacket {
  op: number;
  senderMac: Uint8Array;
  senderIp: Uint8Array;
  targetMac: Uint8Array;
  targetIp: Uint8Array;
}

/** Parses an Ethernet/IPv4 ARP packet; undefined for anything else. */
export function parseArp(p: Buffer): ArpPacket | undefined {
  if (p.length < ARP_LEN) return undefined;
  // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4
  if (p.readUInt16BE(0) !== 1 || p.readUInt16BE(2) !== 0x0800 || p[4] !== 6 || p[5] !== 4) return undefined;
  return {
    op: p.readUInt16BE(6),
    senderMac: p.subarray(8, 14),
    senderIp: p.subarray(14, 18),
    targetMac: p.subarray(18, 24),
    targetIp: p.subarray(24, 28),
  };
}

export function writeArp(buf: Buffer, off: number, a: ArpPacket): void {
  buf.writeUInt16BE(1, off);
  buf.writeUInt16BE(0x0800, off + 2);
  buf[off + 4] = 6;
  buf[off + 5] = 4;
  buf.writeUInt16BE(a.op, off + 6);
  buf.set(a.senderMac, off + 8);
  buf.set(a.senderIp, off + 14);
  buf.set(a.targetMac, off + 18);
  buf.set(a.targetIp, off + 24);
}
