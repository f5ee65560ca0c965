/**
 * A scripted guest for the network stack's unit tests: it speaks raw
 * Ethernet frames on the stack's link (length-prefixed, as QEMU's
 * -netdev stream does) and parses what comes back.
 */

import { connect, type Socket } from "node:net";
import { FrameReader } from "../../src/net/link.js";
import { GUEST_NETWORK } from "../../src/net/stack.js";
import { ARP_LEN, ARP_REQUEST, parseArp, writeArp, type ArpPacket } from "../../src/net/wire/arp.js";
import { ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HEADER, parseEthernet, parseMac, writeEthernet, BROADCAST_MAC } from "../../src/net/wire/ethernet.js";
import { IPV4_HEADER, PROTO_TCP, PROTO_UDP, PROTO_ICMP, parseIpv4, parseIpv4Address, writeIpv4, type Ipv4Packet } from "../../src/net/wire/ipv4.js";
import { parseTcp, tcpHeaderLength, writeTcp, type TcpSegment } from "../../src/net/wire/tcp.js";
import { UDP_HEADER, parseUdp, writeUdp, type UdpDatagram } from "../../src/net/wire/udp.js";
import { parseIcmp, writeIcmp, type IcmpMessage } from "../../src/net/wire/icmp.js";

export type Received =
  | { kind: "arp"; arp: ArpPacket }
  | { kind: "tcp"; ip: Ipv4Packet; tcp: TcpSegment }
  | { kind: "udp"; ip: Ipv4Packet; udp: UdpDatagram }
  | { kind: "icmp"; ip: Ipv4Packet; icmp: IcmpMessage };

export const GUEST_IP = parseIpv4Address(GUEST_NETWORK.address)!;
const GUEST_MAC = parseMac(GUEST_NETWORK.guestMac);
const GW_MAC = parseMac(GUEST_NETWORK.gatewayMac);

export class FakeGuest {
  readonly socket: Socket;
  private reader = new FrameReader();
  private queue: Received[] = [];
  private waiters: { pred: (r: Received) => boolean; resolve: (r: Received) => void }[] = [];

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on("data", (c: Buffer) =>
      this.reader.push(c, (f) => {
        const r = FakeGuest.decode(Buffer.from(f));
        if (!r) return;
        const i = this.waiters.findIndex((w) => w.pred(r));
        if (i >= 0) this.waiters.splice(i, 1)[0]!.resolve(r);
        else this.queue.push(r);
      }),
    );
  }

  static async connect(path: string): Promise<FakeGuest> {
    const s = connect(path);
    await new Promise<void>((res, rej) => {
      s.once("connect", res);
      s.once("error", rej);
    });
    return new FakeGuest(s);
  }

  static decode(f: Buffer): Received | undefined {
    const eth = parseEthernet(f);
    if (!eth) return undefined;
    if (eth.ethertype === ETHERTYPE_ARP) {
      const arp = parseArp(eth.payload);
      return arp ? { kind: "arp", arp } : undefined;
    }
    const ip = parseIpv4(eth.payload);
    if (!ip) return undefined;
    if (ip.protocol === PROTO_TCP) return { kind: "tcp", ip, tcp: parseTcp(ip.payload)! };
    if (ip.protocol === PROTO_UDP) return { kind: "udp", ip, udp: parseUdp(ip.payload)! };
    if (ip.protocol === PROTO_ICMP) return { kind: "icmp", ip, icmp: parseIcmp(ip.payload)! };
    return undefined;
  }

  /** The next frame matching `pred` (already received or to come). */
  next(pred: (r: Received) => boolean = () => true, timeoutMs = 5000): Promise<Received> {
    const i = this.queue.findIndex(pred);
    if (i >= 0) return Promise.resolve(this.queue.splice(i, 1)[0]!);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve: (r: Received) => (clearTimeout(t), resolve(r)) };
      const t = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`no matching frame within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  /** Frames received so far that nobody waited for. */
  drain(): Received[] {
    const q = this.queue;
    this.queue = [];
    return q;
  }

  sendRaw(frame: Buffer): void {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(frame.length);
    this.socket.write(Buffer.concat([len, frame]));
  }

  arpRequest(target: string): void {
    const f = Buffer.alloc(ETH_HEADER + ARP_LEN);
    writeEthernet(f, 0, BROADCAST_MAC, GUEST_MAC, ETHERTYPE_ARP);
    writeArp(f, ETH_HEADER, { op: ARP_REQUEST, senderMac: GUEST_MAC, senderIp: GUEST_IP, targetMac: Buffer.alloc(6), targetIp: parseIpv4Address(target)! });
    this.sendRaw(f);
  }

  tcp(dst: string, s: { srcPort: number; dstPort: number; seq: number; ack: number; flags: number; window?: number; payload?: Buffer; mss?: number; ws?: number }): void {
    const payload = s.payload ?? Buffer.alloc(0);
    const syn = s.mss !== undefined;
    const hl = tcpHeaderLength(syn);
    const f = Buffer.alloc(ETH_HEADER + IPV4_HEADER + hl + payload.length);
    writeEthernet(f, 0, GW_MAC, GUEST_MAC, ETHERTYPE_IPV4);
    payload.copy(f, ETH_HEADER + IPV4_HEADER + hl);
    const d = parseIpv4Address(dst)!;
    writeTcp(
      f,
      ETH_HEADER + IPV4_HEADER,
      { srcPort: s.srcPort, dstPort: s.dstPort, seq: s.seq, ack: s.ack, flags: s.flags, window: s.window ?? 65535, ...(syn ? { synOptions: { mss: s.mss!, ...(s.ws !== undefined ? { windowScale: s.ws } : {}) } } : {}) },
      GUEST_IP,
      d,
      payload.length,
    );
    writeIpv4(f, ETH_HEADER, GUEST_IP, d, PROTO_TCP, hl + payload.length);
    this.sendRaw(f);
  }

  udp(dst: string, srcPort: number, dstPort: number, payload: Buffer): void {
    const f = Buffer.alloc(ETH_HEADER + IPV4_HEADER + UDP_HEADER + payload.length);
    writeEthernet(f, 0, GW_MAC, GUEST_MAC, ETHERTYPE_IPV4);
    payload.copy(f, ETH_HEADER + IPV4_HEADER + UDP_HEADER);
    const d = parseIpv4Address(dst)!;
    writeUdp(f, ETH_HEADER + IPV4_HEADER, srcPort, dstPort, GUEST_IP, d, payload.length);
    writeIpv4(f, ETH_HEADER, GUEST_IP, d, PROTO_UDP, UDP_HEADER + payload.length);
    this.sendRaw(f);
  }

  ping(dst: string, id: number, seq: number, body: Buffer): void {
    const f = Buffer.alloc(ETH_HEADER + IPV4_HEADER + 8 + body.length);
    writeEthernet(f, 0, GW_MAC, GUEST_MAC, ETHERTYPE_IPV4);
    body.copy(f, ETH_HEADER + IPV4_HEADER + 8);
    const rest = Buffer.alloc(4);
    rest.writeUInt16BE(id, 0);
    rest.writeUInt16BE(seq, 2);
    writeIcmp(f, ETH_HEADER + IPV4_HEADER, 8, 0, rest, body.length);
    const d = parseIpv4Address(dst)!;
    writeIpv4(f, ETH_HEADER, GUEST_IP, d, PROTO_ICMP, 8 + body.length);
    this.sendRaw(f);
  }

  close(): void {
    this.socket.destroy();
  }
}
