/** Ethernet II frames: 14-byte header (no VLAN tags, no FCS: virtio-net strips it). */

export const ETH_HEADER = 14;
export const ETHERTYPE_IPV4 = 0x0800;
export const ETHERTYPE_ARP = 0x0806;

export interface EthernetFrame {
  dst: Uint8Array;
  src: Uint8Array;
  ethertype: number;
  payload: Buffer;
}

/** Parses an Ethernet II frame; undefined when too short. */
export function parseEthernet(f: Buffer): EthernetFrame | undefined {
  if (f.length < ETH_HEADER) return undefined;
  return { dst: f.subarray(0, 6), src: f.subarray(6, 12), ethertype: f.readUInt16BE(12), payload: f.subarray(ETH_HEADER) };
}

/** Writes an Ethernet header at `off` of `buf`. */
export function writeEthernet(buf: Buffer, off: number, dst: Uint8Array, src: Uint8Array, ethertype: number): void {
  buf.set(dst, off);
  buf.set(src, off + 6);
  buf.writeUInt16BE(ethertype, off + 12);
}

export function macToString(m: Uint8Array): string {
  return [...m].map((b) => b.toString(16).padStart(2, "0")).join(":");
}

export function parseMac(s: string): Buffer {
  const parts = s.split(":");
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{2}$/.test(p))) throw new TypeError(`not a MAC address: ${s}`);
  return Buffer.from(parts.map((p) => parseInt(p, 16)));
}

export const BROADCAST_MAC = Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
