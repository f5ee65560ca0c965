/**
 * The host side of one VM's network: a user-space IPv4 stack on the unix
 * socket of QEMU's `-netdev stream`. It answers ARP for every address but
 * the guest's (the gateway's MAC), terminates every TCP connection and
 * re-originates it with an ordinary Node socket after the policy check,
 * answers DNS on UDP port 53 itself (only for names the policy allows: a
 * disallowed name gets NXDOMAIN without any upstream query), answers pings
 * to the gateway, and refuses the rest at once (TCP RST, ICMP unreachable).
 *
 * Everything the guest sends is bounded: frames (FrameReader), flows
 * (maxFlows, maxConnecting), DNS lookups in flight, names (NameTable), and
 * per-flow buffers (tcp.ts).
 */

import { EventEmitter } from "node:events";
import { promises as dnsPromises } from "node:dns";
import { createServer, connect as netConnect, type Server, type Socket } from "node:net";
import { unlinkSync } from "node:fs";
import { FrameReader } from "./link.js";
import type { GuestNetConfig } from "../protocol/net-config.js";
import { NameTable, isSynthetic } from "./names.js";
import { compilePolicy, decideConnect, decideName, type CompiledPolicy, type NetworkOption } from "./policy.js";
import { TcpFlow, type FlowHost } from "./tcp.js";
import { ARP_LEN, ARP_REPLY, ARP_REQUEST, parseArp, writeArp } from "./wire/arp.js";
import { DnsParseError, RCODE_FORMERR, RCODE_NOERROR, RCODE_NXDOMAIN, RCODE_SERVFAIL, TYPE_A, buildResponse, parseQuery } from "./wire/dns.js";
import { ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HEADER, parseEthernet, parseMac, writeEthernet } from "./wire/ethernet.js";
import { ICMP_DEST_UNREACHABLE, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, UNREACH_ADMIN_PROHIBITED, parseIcmp, writeIcmp } from "./wire/icmp.js";
import { IPV4_HEADER, PROTO_ICMP, PROTO_TCP, PROTO_UDP, ipToNumber, ipToString, parseIpv4, parseIpv4Address, writeIpv4, type Ipv4Packet } from "./wire/ipv4.js";
import { ACK, RST, SYN, parseTcp, seqAdd, tcpHeaderLength, writeTcp, type TcpSegment } from "./wire/tcp.js";
import { UDP_HEADER, parseUdp, writeUdp } from "./wire/udp.js";

/** The guest side of every VM's network (each VM has its own stack, so all share it). */
export const GUEST_NETWORK = {
  address: "198.19.0.2",
  prefixLength: 24,
  gateway: "198.19.0.1",
  /** The guest's resolver: the gateway. */
  dns: "198.19.0.1",
  mtu: 65520,
  guestMac: "52:54:00:53:4d:02",
  gatewayMac: "52:54:00:53:4d:01",
} as const;

/** What the agent is told to configure in the guest (CONFIGURE tags 9-14). */
export function guestNetConfig(): GuestNetConfig {
  return {
    address: GUEST_NETWORK.address,
    prefixLength: GUEST_NETWORK.prefixLength,
    gateway: GUEST_NETWORK.gateway,
    mtu: GUEST_NETWORK.mtu,
    resolvConf: `nameserver ${GUEST_NETWORK.dns}\noptions attempts:2 timeout:2\n`,
    hosts: "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
  };
}

export interface NetworkStats {
  /** TCP connections the policy allowed (and the host then tried). */
  connectionsAllowed: number;
  /** TCP connections refused (policy, limits), UDP datagrams and pings refused. */
  connectionsDenied: number;
  /** Payload bytes from the guest to the outside. */
  bytesOut: number;
  /** Payload bytes from the outside to the guest. */
  bytesIn: number;
  dnsQueries: number;
  /** DNS queries answered NXDOMAIN because of the policy. */
  dnsDenied: number;
  /** TCP connections open now. */
  activeConnections: number;
}

/** Emitted (`"denied"`) for each connection, datagram or name the policy refused. */
export interface NetworkDeniedEvent {
  readonly protocol: "tcp" | "udp" | "dns" | "icmp";
  /** The name the guest resolved, when the destination came from our DNS. */
  readonly name?: string;
  readonly address?: string;
  readonly port?: number;
  readonly reason: string;
  readonly time: Date;
}

export interface NetworkStackOptions {
  policy?: CompiledPolicy;
  /** The host's resolver (getaddrinfo); injectable for tests. Returns IPv4 addresses. */
  lookup?: (name: string) => Promise<string[]>;
  /** Opens the upstream connection; injectable for tests. */
  connect?: (address: string, port: number) => Socket;
  /** @default 1024 */
  maxFlows?: number;
  /** Upstream connects in progress at once. @default 128 */
  maxConnecting?: number;
  /** @default 20000 */
  connectTimeoutMs?: number;
  mtu?: number;
}

const MAX_DNS_INFLIGHT = 64;
const DNS_TIMEOUT_MS = 5000;
const DNS_TTL = 30;
const MAX_ADDRESSES = 16;

async function defaultLookup(name: string): Promise<string[]> {
  const r = await dnsPromises.lookup(name, { all: true, family: 4 });
  return r.map((a) => a.address);
}

function defaultConnect(address: string, port: number): Socket {
  return netConnect({ host: address, port, allowHalfOpen: true, noDelay: true });
}

export class NetworkStack extends EventEmitter implements FlowHost {
  policy: CompiledPolicy;
  linkBlocked = false;
  private link: Socket | undefined;
  private server: Server | undefined;
  private socketPath: string | undefined;
  private reader = new FrameReader();
  private flows = new Map<string, TcpFlow>();
  private dirty = new Set<TcpFlow>();
  private connecting = 0;
  private dnsInflight = 0;
  private names = new NameTable();
  private closed = false;
  /** Set on a stack that took over a link (handOver) until unmute(): nothing goes in or out. */
  private muted = false;
  private readonly guestIp = parseIpv4Address(GUEST_NETWORK.address)!;
  private readonly gatewayIp = parseIpv4Address(GUEST_NETWORK.gateway)!;
  private readonly gatewayMac = parseMac(GUEST_NETWORK.gatewayMac);
  private guestMac = parseMac(GUEST_NETWORK.guestMac);
  private readonly lookupFn: (name: string) => Promise<string[]>;
  private readonly connectFn: (address: string, port: number) => Socket;
  private readonly maxFlows: number;
  private readonly maxConnecting: number;
  private readonly connectTimeoutMs: number;
  private readonly linkMss: number;
  private counters = { connectionsAllowed: 0, connectionsDenied: 0, bytesOut: 0, bytesIn: 0, dnsQueries: 0, dnsDenied: 0 };

  private readonly options: NetworkStackOptions;

  constructor(o: NetworkStackOptions = {}) {
    super();
    this.options = o;
    this.policy = o.policy ?? compilePolicy(true);
    this.lookupFn = o.lookup ?? defaultLookup;
    this.connectFn = o.connect ?? defaultConnect;
    this.maxFlows = o.maxFlows ?? 1024;
    this.maxConnecting = o.maxConnecting ?? 128;
    this.connectTimeoutMs = o.connectTimeoutMs ?? 20_000;
    this.linkMss = (o.mtu ?? GUEST_NETWORK.mtu) - IPV4_HEADER - 20;
  }

  /**
   * Listens on `socketPath` for QEMU's connection (QEMU connects at start).
   * One connection is served; later ones are refused. Nothing here holds
   * the event loop open.
   */
  static async listen(socketPath: string, o: NetworkStackOptions = {}): Promise<NetworkStack> {
    const stack = new NetworkStack(o);
    const server = createServer((s) => {
      if (stack.link || stack.closed) {
        s.destroy();
        return;
      }
      stack.attach(s);
    });
    stack.server = server;
    stack.socketPath = socketPath;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(socketPath, () => {
        server.off("error", reject);
        resolve();
      });
    });
    server.on("error", () => {
      /* a listening server has no more errors worth a crash */
    });
    server.unref();
    return stack;
  }

  /** Serves the guest on an already connected link (QEMU's socket, or a test's). */
  attach(link: Socket): void {
    this.link = link;
    link.unref();
    link.on("data", (chunk: Buffer) => {
      const ok = this.reader.push(chunk, (f) => this.frame(f));
      this.flushAcks();
      if (!ok) {
        // The guest (or QEMU) announced an impossible frame: the link is unusable.
        this.detach();
      }
    });
    link.on("drain", () => {
      this.linkBlocked = false;
      for (const f of this.flows.values()) {
        f.pump();
        if (this.linkBlocked) break;
      }
    });
    link.on("error", () => {
      /* 'close' follows */
    });
    link.on("close", () => this.detach());
  }

  private detach(): void {
    const l = this.link;
    this.link = undefined;
    l?.destroy();
    for (const f of [...this.flows.values()]) f.close(true);
    this.reader = new FrameReader();
  }

  /** Replaces the policy. New connections follow it; open ones it now denies are reset. */
  setPolicy(option: NetworkOption | CompiledPolicy): void {
    const p = isCompiled(option) ? option : compilePolicy(option);
    this.policy = p;
    for (const f of [...this.flows.values()]) {
      const d = decideConnect(p, { ...(f.target.name ? { name: f.target.name } : {}), ip: f.target.realIp, port: f.dstPort, ...(f.target.fromHosts ? { fromHosts: true } : {}) });
      if (!d.allow) {
        this.deny("tcp", d.reason, { ...(f.target.name ? { name: f.target.name } : {}), address: ipToString(f.target.realIp), port: f.dstPort });
        f.reset();
      }
    }
  }

  stats(): NetworkStats {
    return { ...this.counters, activeConnections: this.flows.size };
  }

  /**
   * @internal The VM changes hands in the same QEMU (Vm._recycle): a new
   * stack, with this one's options and policy, takes over the link from
   * QEMU, muted (no frame in or out) until {@link unmute}. This one ends as
   * if closed: its connections close, DNS answers still in flight are
   * dropped, its counters and "denied" listeners stay with it (the previous
   * holder's `vm.network`). Undefined, and nothing changed, when frames
   * written for the previous guest have not all reached the socket (they
   * would reach the next one: the caller ends the VM instead).
   */
  handOver(): NetworkStack | undefined {
    if (this.closed || (this.link && this.link.writableLength > 0)) return undefined;
    const next = new NetworkStack({ ...this.options, policy: this.policy });
    next.muted = true;
    next.reader = this.reader; // mid-frame bytes of the stream stay in step
    next.server = this.server;
    next.socketPath = this.socketPath;
    const link = this.link;
    this.link = undefined;
    this.server = undefined;
    this.socketPath = undefined;
    if (link) {
      for (const ev of ["data", "drain", "error", "close"]) link.removeAllListeners(ev);
      next.attach(link);
    }
    // QEMU never connects again: the old stack's handler (bound to it) goes.
    next.server?.removeAllListeners("connection").on("connection", (s: Socket) => s.destroy());
    this.close();
    return next;
  }

  /** @internal Lets frames flow on a stack that took over a link ({@link handOver}). */
  unmute(): void {
    this.muted = false;
  }

  /** Closes the link, every connection and the listener. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.detach();
    this.server?.close();
    if (this.socketPath) {
      try {
        unlinkSync(this.socketPath);
      } catch {
        /* gone with the runtime dir */
      }
    }
  }

  // ------------------------------------------------------------------ input

  private frame(f: Buffer): void {
    if (this.muted) return;
    const eth = parseEthernet(f);
    if (!eth) return;
    if ((eth.src[0]! & 1) === 0) this.guestMac = Buffer.from(eth.src);
    if (eth.ethertype === ETHERTYPE_ARP) this.arp(eth.payload);
    else if (eth.ethertype === ETHERTYPE_IPV4) {
      const ip = parseIpv4(eth.payload);
      if (!ip || ip.fragment) return;
      if (!this.guestIp.equals(ip.src)) return; // spoofed source: drop
      if (ip.protocol === PROTO_TCP) this.tcp(ip);
      else if (ip.protocol === PROTO_UDP) this.udp(ip);
      else if (ip.protocol === PROTO_ICMP) this.icmp(ip);
    }
  }

  private arp(p: Buffer): void {
    const a = parseArp(p);
    if (!a || a.op !== ARP_REQUEST) return;
    if (this.guestIp.equals(a.targetIp)) return; // duplicate address detection
    const buf = this.alloc(ARP_LEN, ETHERTYPE_ARP);
    writeArp(buf, 4 + ETH_HEADER, { op: ARP_REPLY, senderMac: this.gatewayMac, senderIp: a.targetIp, targetMac: a.senderMac, targetIp: a.senderIp });
    this.send(buf);
  }

  private tcp(ip: Ipv4Packet): void {
    const seg = parseTcp(ip.payload);
    if (!seg) return;
    const key = `${seg.srcPort}|${ipToNumber(ip.dst)}|${seg.dstPort}`;
    const flow = this.flows.get(key);
    if (flow) {
      flow.segment(seg);
      if (flow.ackPending) this.dirty.add(flow);
      return;
    }
    if ((seg.flags & (SYN | ACK | RST)) === SYN) this.open(key, ip, seg);
    else if (!(seg.flags & RST)) this.refuse(ip, seg); // e.g. a connection from before a snapshot restore
  }

  private open(key: string, ip: Ipv4Packet, seg: TcpSegment): void {
    const dst = ipToNumber(ip.dst);
    const address = ipToString(ip.dst);
    if (this.flows.size >= this.maxFlows || this.connecting >= this.maxConnecting) {
      this.refuse(ip, seg);
      this.deny("tcp", `too many connections (at most ${this.maxFlows} open and ${this.maxConnecting} connecting per VM)`, { address, port: seg.dstPort });
      return;
    }
    let name: string | undefined;
    let candidates: { ip: Buffer; fromHosts: boolean }[];
    if (isSynthetic(dst)) {
      const e = this.names.lookup(dst);
      if (!e) {
        this.refuse(ip, seg);
        this.deny("tcp", `${address} is not an address the VM's DNS gave out (the VM was restored, or the name was forgotten): resolve the name again`, { address, port: seg.dstPort });
        return;
      }
      name = e.name;
      const mapped = this.policy.hosts.get(e.name);
      candidates = mapped ? [{ ip: mapped, fromHosts: true }] : e.addresses.map((a) => ({ ip: a, fromHosts: e.fromHosts }));
    } else {
      candidates = [{ ip: Buffer.from(ip.dst), fromHosts: false }];
    }
    let firstReason = `${name ?? address} has no address`;
    let chosen: { ip: Buffer; fromHosts: boolean } | undefined;
    for (const c of candidates) {
      const d = decideConnect(this.policy, { ...(name ? { name } : {}), ip: c.ip, port: seg.dstPort, fromHosts: c.fromHosts });
      if (d.allow) {
        chosen = c;
        break;
      }
      if (c === candidates[0]) firstReason = d.reason;
    }
    if (!chosen) {
      this.refuse(ip, seg);
      this.deny("tcp", firstReason, { ...(name ? { name } : {}), address: candidates[0] ? ipToString(candidates[0].ip) : address, port: seg.dstPort });
      return;
    }
    this.counters.connectionsAllowed++;
    const flow = new TcpFlow(this, key, this.guestIp, seg.srcPort, Buffer.from(ip.dst), seg.dstPort, seg, this.linkMss, {
      ...(name ? { name } : {}),
      realIp: chosen.ip,
      ...(chosen.fromHosts ? { fromHosts: true } : {}),
    });
    this.flows.set(key, flow);
    this.connecting++;
    let socket: Socket;
    try {
      socket = this.connectFn(ipToString(chosen.ip), seg.dstPort);
    } catch {
      this.connecting--;
      this.flows.delete(key);
      this.refuse(ip, seg);
      return;
    }
    socket.unref();
    const timer = setTimeout(() => socket.destroy(), this.connectTimeoutMs);
    timer.unref();
    let settled = false;
    const settle = () => {
      if (settled) return false;
      settled = true;
      this.connecting--;
      clearTimeout(timer);
      return true;
    };
    socket.once("connect", () => {
      if (!settle()) return;
      if (flow.state === "closed") {
        socket.destroy();
        return;
      }
      socket.setKeepAlive(true, 30_000);
      flow.accept(socket);
    });
    socket.on("error", () => {
      /* handled on close */
    });
    socket.once("close", () => {
      if (!settle()) return;
      // Refused, unreachable or timed out before connecting: reset the guest's SYN.
      if (flow.state !== "closed") {
        this.refuse(ip, seg);
        flow.close(true);
      }
    });
  }

  /** RST for a segment that has no connection (RFC 9293 3.10.7.1). */
  private refuse(ip: Ipv4Packet, seg: TcpSegment): void {
    const len = seg.payload.length + (seg.flags & SYN ? 1 : 0) + (seg.flags & 1 ? 1 : 0);
    const [seq, ack, flags] = seg.flags & ACK ? [seg.ack, 0, RST] : [0, seqAdd(seg.seq, len), RST | ACK];
    this.sendTcp(ip.dst, seg.dstPort, seg.srcPort, flags, seq, ack, 0);
  }

  private udp(ip: Ipv4Packet): void {
    const d = parseUdp(ip.payload);
    if (!d) return;
    if (d.dstPort === 53) {
      void this.dns(Buffer.from(ip.dst), d.srcPort, Buffer.from(d.payload));
      return;
    }
    this.unreachable(ip);
    this.deny("udp", "UDP other than DNS is not forwarded", { address: ipToString(ip.dst), port: d.dstPort });
  }

  private icmp(ip: Ipv4Packet): void {
    const m = parseIcmp(ip.payload);
    if (!m || m.type !== ICMP_ECHO_REQUEST) return;
    if (!this.gatewayIp.equals(ip.dst)) {
      this.unreachable(ip);
      this.deny("icmp", "ICMP is answered for the gateway only", { address: ipToString(ip.dst) });
      return;
    }
    const body = m.payload.subarray(0, 1024);
    const buf = this.alloc(IPV4_HEADER + 8 + body.length, ETHERTYPE_IPV4);
    const off = 4 + ETH_HEADER + IPV4_HEADER;
    body.copy(buf, off + 8);
    writeIcmp(buf, off, ICMP_ECHO_REPLY, 0, m.rest, body.length);
    writeIpv4(buf, 4 + ETH_HEADER, this.gatewayIp, this.guestIp, PROTO_ICMP, 8 + body.length);
    this.send(buf);
  }

  /** ICMP destination unreachable (administratively prohibited) for a packet we refuse. */
  private unreachable(ip: Ipv4Packet): void {
    const quoted = ip.payload.subarray(0, 8);
    const body = IPV4_HEADER + quoted.length;
    const buf = this.alloc(IPV4_HEADER + 8 + body, ETHERTYPE_IPV4);
    const off = 4 + ETH_HEADER + IPV4_HEADER;
    // The offending header (rebuilt: we kept only the fields we parsed) and 8 bytes of its payload.
    writeIpv4(buf, off + 8, ip.src, ip.dst, ip.protocol, quoted.length, ip.ttl);
    quoted.copy(buf, off + 8 + IPV4_HEADER);
    writeIcmp(buf, off, ICMP_DEST_UNREACHABLE, UNREACH_ADMIN_PROHIBITED, Buffer.alloc(4), body);
    writeIpv4(buf, 4 + ETH_HEADER, this.gatewayIp, this.guestIp, PROTO_ICMP, 8 + body);
    this.send(buf);
  }

  // -------------------------------------------------------------------- DNS

  private async dns(server: Buffer, port: number, msg: Buffer): Promise<void> {
    this.counters.dnsQueries++;
    let q: ReturnType<typeof parseQuery>;
    try {
      q = parseQuery(msg);
    } catch (e) {
      if (e instanceof DnsParseError && msg.length >= 12) {
        this.sendUdp(server, 53, port, buildResponse({ id: msg.readUInt16BE(0), flags: msg.readUInt16BE(2) & 0x7fff, questionBytes: Buffer.alloc(0) }, RCODE_FORMERR));
      }
      return;
    }
    const answer = (rcode: number, addresses: Buffer[] = []) => this.sendUdp(server, 53, port, buildResponse(q, rcode, addresses, DNS_TTL));
    const name = q.question.name;
    if (q.opcode !== 0) return answer(4);
    const d = decideName(this.policy, name);
    if (!d.allow) {
      this.counters.dnsDenied++;
      this.deny("dns", d.reason, { name });
      return answer(RCODE_NXDOMAIN);
    }
    if (q.question.type !== TYPE_A) return answer(RCODE_NOERROR); // AAAA and the rest: no data (IPv4 only)
    const mapped = this.policy.hosts.get(name);
    if (mapped) {
      const e = this.names.assign(name, [mapped], true);
      return answer(RCODE_NOERROR, [NameTable.address(e)]);
    }
    if (this.dnsInflight >= MAX_DNS_INFLIGHT) return answer(RCODE_SERVFAIL);
    this.dnsInflight++;
    const policy = this.policy;
    let addresses: Buffer[];
    try {
      const found = await withTimeout(this.lookupFn(name), DNS_TIMEOUT_MS);
      addresses = found.map((a) => parseIpv4Address(a)).filter((a): a is Buffer => a !== undefined).slice(0, MAX_ADDRESSES);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      return answer(code === "ENOTFOUND" || code === "ENODATA" ? RCODE_NXDOMAIN : RCODE_SERVFAIL);
    } finally {
      this.dnsInflight--;
    }
    if (this.closed || policy !== this.policy) {
      // The policy changed while we looked the name up: decide again.
      if (!decideName(this.policy, name).allow) return answer(RCODE_NXDOMAIN);
    }
    if (addresses.length === 0) return answer(RCODE_NXDOMAIN);
    const e = this.names.assign(name, addresses, false);
    answer(RCODE_NOERROR, [NameTable.address(e)]);
  }

  // ----------------------------------------------------------------- output

  /** A frame buffer with the link's length prefix and our Ethernet header written. */
  private alloc(payloadLength: number, ethertype: number): Buffer {
    const buf = Buffer.allocUnsafe(4 + ETH_HEADER + payloadLength);
    buf.writeUInt32BE(ETH_HEADER + payloadLength, 0);
    writeEthernet(buf, 4, this.guestMac, this.gatewayMac, ethertype);
    return buf;
  }

  private send(buf: Buffer): void {
    const l = this.link;
    if (!l || l.destroyed || this.muted) return;
    if (!l.write(buf)) this.linkBlocked = true;
  }

  private sendTcp(src: Uint8Array, srcPort: number, dstPort: number, flags: number, seq: number, ack: number, window: number): void {
    const hl = tcpHeaderLength(false);
    const buf = this.alloc(IPV4_HEADER + hl, ETHERTYPE_IPV4);
    const off = 4 + ETH_HEADER;
    writeTcp(buf, off + IPV4_HEADER, { srcPort, dstPort, seq, ack, flags, window }, src, this.guestIp, 0);
    writeIpv4(buf, off, src, this.guestIp, PROTO_TCP, hl);
    this.send(buf);
  }

  private sendUdp(src: Uint8Array, srcPort: number, dstPort: number, payload: Buffer): void {
    if (this.closed) return;
    const buf = this.alloc(IPV4_HEADER + UDP_HEADER + payload.length, ETHERTYPE_IPV4);
    const off = 4 + ETH_HEADER;
    payload.copy(buf, off + IPV4_HEADER + UDP_HEADER);
    writeUdp(buf, off + IPV4_HEADER, srcPort, dstPort, src, this.guestIp, payload.length);
    writeIpv4(buf, off, src, this.guestIp, PROTO_UDP, UDP_HEADER + payload.length);
    this.send(buf);
  }

  // FlowHost
  emitSegment(flow: TcpFlow, flags: number, seq: number, ack: number, window: number, data?: { offset: number; length: number }, synOptions?: { mss: number; windowScale?: number }): void {
    const hl = tcpHeaderLength(synOptions !== undefined);
    const n = data?.length ?? 0;
    const buf = this.alloc(IPV4_HEADER + hl + n, ETHERTYPE_IPV4);
    const off = 4 + ETH_HEADER;
    if (data) flow.sendQueue.copyOut(buf, off + IPV4_HEADER + hl, data.offset, n);
    writeTcp(buf, off + IPV4_HEADER, { srcPort: flow.dstPort, dstPort: flow.guestPort, seq, ack, flags, window, ...(synOptions ? { synOptions } : {}) }, flow.dstIp, this.guestIp, n);
    writeIpv4(buf, off, flow.dstIp, this.guestIp, PROTO_TCP, hl + n);
    this.send(buf);
  }

  remove(flow: TcpFlow): void {
    if (this.flows.get(flow.key) === flow) this.flows.delete(flow.key);
    this.dirty.delete(flow);
  }

  countFromGuest(n: number): void {
    this.counters.bytesOut += n;
  }

  countToGuest(n: number): void {
    this.counters.bytesIn += n;
  }

  private flushAcks(): void {
    for (const f of this.dirty) f.flushAck();
    this.dirty.clear();
  }

  private deny(protocol: NetworkDeniedEvent["protocol"], reason: string, o: { name?: string; address?: string; port?: number }): void {
    if (protocol !== "dns") this.counters.connectionsDenied++;
    if (this.listenerCount("denied") > 0) this.emit("denied", { protocol, ...o, reason, time: new Date() } satisfies NetworkDeniedEvent);
  }
}

function isCompiled(o: unknown): o is CompiledPolicy {
  return typeof o === "object" && o !== null && "enabled" in o && "summary" in o;
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(Object.assign(new Error("lookup timed out"), { code: "ETIMEOUT" })), ms);
    t.unref();
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}
