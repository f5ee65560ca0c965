/**
 * The network stack against a scripted guest (raw frames on a real unix
 * socket) and real upstream servers on loopback. No VM: this is the state
 * machine and the policy plumbing; test/net/vm-network.test.ts runs real VMs.
 */

import assert from "node:assert/strict";
import { after, test } from "node:test";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NetworkStack, GUEST_NETWORK, type NetworkDeniedEvent } from "../../src/net/stack.js";
import { compilePolicy } from "../../src/net/policy.js";
import { ARP_REPLY } from "../../src/net/wire/arp.js";
import { ipToString } from "../../src/net/wire/ipv4.js";
import { ACK, FIN, PSH, RST, SYN, seqAdd } from "../../src/net/wire/tcp.js";
import { TYPE_A, encodeName, parseResponse, RCODE_NXDOMAIN } from "../../src/net/wire/dns.js";
import { FakeGuest, type Received } from "./fake-guest.js";

const dir = mkdtempSync(join(tmpdir(), "sm-net-"));
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;

async function setup(o: ConstructorParameters<typeof NetworkStack>[0] = {}): Promise<{ stack: NetworkStack; guest: FakeGuest; denied: NetworkDeniedEvent[] }> {
  const stack = await NetworkStack.listen(join(dir, `n${n++}.sock`), o);
  const denied: NetworkDeniedEvent[] = [];
  stack.on("denied", (e: NetworkDeniedEvent) => denied.push(e));
  const guest = await FakeGuest.connect(join(dir, `n${n - 1}.sock`));
  return { stack, guest, denied };
}

async function echoServer(): Promise<{ server: Server; port: number; conns: Socket[] }> {
  const conns: Socket[] = [];
  const server = createServer({ allowHalfOpen: true }, (s) => {
    conns.push(s);
    s.on("data", (d) => s.write(d));
    s.on("end", () => s.end());
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { server, port: (server.address() as { port: number }).port, conns };
}

function dnsQuery(id: number, name: string, type = TYPE_A): Buffer {
  const h = Buffer.alloc(12);
  h.writeUInt16BE(id, 0);
  h.writeUInt16BE(0x0100, 2);
  h.writeUInt16BE(1, 4);
  const t = Buffer.alloc(4);
  t.writeUInt16BE(type, 0);
  t.writeUInt16BE(1, 2);
  return Buffer.concat([h, encodeName(name), t]);
}

async function resolve(guest: FakeGuest, name: string, id: number): Promise<ReturnType<typeof parseResponse>> {
  guest.udp(GUEST_NETWORK.dns, 30000 + id, 53, dnsQuery(id, name));
  const r = await guest.next((x) => x.kind === "udp" && x.udp.dstPort === 30000 + id);
  return parseResponse((r as Extract<Received, { kind: "udp" }>).udp.payload);
}

const isTcp = (port: number) => (r: Received) => r.kind === "tcp" && r.tcp.dstPort === port;
type TcpR = Extract<Received, { kind: "tcp" }>;

/** A guest-side TCP client: handshake, send, receive. */
async function handshake(guest: FakeGuest, dst: string, dstPort: number, srcPort: number): Promise<{ seq: number; ack: number; synAck: TcpR }> {
  guest.tcp(dst, { srcPort, dstPort, seq: 1000, ack: 0, flags: SYN, mss: 1460, ws: 7, window: 512 });
  const synAck = (await guest.next(isTcp(srcPort))) as TcpR;
  return { seq: 1001, ack: seqAdd(synAck.tcp.seq, 1), synAck };
}

test("ARP: every address but the guest's answers with the gateway's MAC", async () => {
  const { stack, guest } = await setup();
  try {
    guest.arpRequest(GUEST_NETWORK.gateway);
    const r = await guest.next((x) => x.kind === "arp");
    assert.equal(r.kind, "arp");
    if (r.kind !== "arp") return;
    assert.equal(r.arp.op, ARP_REPLY);
    assert.equal(ipToString(r.arp.senderIp), GUEST_NETWORK.gateway);
    assert.equal([...r.arp.senderMac].map((b) => b.toString(16).padStart(2, "0")).join(":"), GUEST_NETWORK.gatewayMac);
    guest.arpRequest(GUEST_NETWORK.address); // duplicate address detection: no answer
    guest.arpRequest("198.19.0.77");
    const r2 = await guest.next((x) => x.kind === "arp");
    assert.equal(r2.kind === "arp" && ipToString(r2.arp.senderIp), "198.19.0.77");
  } finally {
    guest.close();
    stack.close();
  }
});

test("ping to the gateway is answered; to anything else, unreachable at once", async () => {
  const { stack, guest, denied } = await setup();
  try {
    guest.ping(GUEST_NETWORK.gateway, 7, 1, Buffer.from("payload"));
    const r = await guest.next((x) => x.kind === "icmp");
    assert.ok(r.kind === "icmp" && r.icmp.type === 0 && r.icmp.payload.toString() === "payload");
    guest.ping("192.0.2.1", 7, 2, Buffer.from("x"));
    const u = await guest.next((x) => x.kind === "icmp");
    assert.ok(u.kind === "icmp" && u.icmp.type === 3 && u.icmp.code === 13);
    assert.equal(denied[0]?.protocol, "icmp");
  } finally {
    guest.close();
    stack.close();
  }
});

test("TCP through the stack to a loopback server: handshake, data both ways, half-close, clean end", async () => {
  const { server, port } = await echoServer();
  const { stack, guest } = await setup({ policy: compilePolicy({ allow: ["127.0.0.1"] }) });
  try {
    const { seq, ack, synAck } = await handshake(guest, "127.0.0.1", port, 40001);
    assert.equal(synAck.tcp.flags, SYN | ACK);
    assert.equal(synAck.tcp.ack, 1001);
    assert.ok(synAck.tcp.mss! <= 1460 && synAck.tcp.windowScale !== undefined);
    guest.tcp("127.0.0.1", { srcPort: 40001, dstPort: port, seq, ack, flags: ACK | PSH, payload: Buffer.from("hello"), window: 512 });
    // The echo comes back as data; our data is acknowledged.
    let got = "";
    let nextAck = ack;
    while (got.length < 5) {
      const r = (await guest.next(isTcp(40001))) as TcpR;
      if (r.tcp.payload.length) {
        assert.equal(r.tcp.seq, nextAck);
        got += r.tcp.payload.toString();
        nextAck = seqAdd(nextAck, r.tcp.payload.length);
      }
    }
    assert.equal(got, "hello");
    guest.tcp("127.0.0.1", { srcPort: 40001, dstPort: port, seq: seq + 5, ack: nextAck, flags: ACK | FIN, window: 512 });
    // The server ends its side after ours: a FIN comes back.
    const fin = (await guest.next((r) => isTcp(40001)(r) && ((r as TcpR).tcp.flags & FIN) !== 0)) as TcpR;
    assert.equal(fin.tcp.ack, seq + 6, "our FIN is acknowledged");
    guest.tcp("127.0.0.1", { srcPort: 40001, dstPort: port, seq: seq + 6, ack: seqAdd(fin.tcp.seq, 1), flags: ACK, window: 512 });
    await waitUntil(() => stack.stats().activeConnections === 0);
    const st = stack.stats();
    assert.equal(st.bytesOut, 5);
    assert.equal(st.bytesIn, 5);
    assert.equal(st.connectionsAllowed, 1);
  } finally {
    guest.close();
    stack.close();
    server.close();
  }
});

test("the guest's window is respected and reopening it resumes the transfer", async () => {
  const big = Buffer.alloc(200_000, 9);
  const server = createServer((s) => s.end(big));
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  const { stack, guest } = await setup({ policy: compilePolicy({ allow: ["127.0.0.1"] }) });
  try {
    // Window 1000 bytes, unscaled (no window scale option).
    guest.tcp("127.0.0.1", { srcPort: 40002, dstPort: port, seq: 1, ack: 0, flags: SYN, mss: 1460, window: 1000 });
    const synAck = (await guest.next(isTcp(40002))) as TcpR;
    let ack = seqAdd(synAck.tcp.seq, 1);
    guest.tcp("127.0.0.1", { srcPort: 40002, dstPort: port, seq: 2, ack, flags: ACK, window: 1000 });
    let received = 0;
    let inWindow = 0;
    let windows = 0;
    for (;;) {
      const r = (await guest.next(isTcp(40002))) as TcpR;
      inWindow += r.tcp.payload.length;
      assert.ok(inWindow <= 1000, `sent ${inWindow} bytes into a 1000-byte window`);
      received += r.tcp.payload.length;
      if (r.tcp.flags & FIN) break;
      if (inWindow === 1000) {
        if (windows++ < 5) {
          // Nothing more may come until we acknowledge.
          await new Promise((res) => setTimeout(res, 100));
          assert.equal(guest.drain().filter((x) => isTcp(40002)(x) && (x as TcpR).tcp.payload.length > 0).length, 0);
        }
        ack = seqAdd(ack, inWindow);
        inWindow = 0;
        guest.tcp("127.0.0.1", { srcPort: 40002, dstPort: port, seq: 2, ack, flags: ACK, window: 1000 });
      }
    }
    assert.equal(received, big.length);
  } finally {
    guest.close();
    stack.close();
    server.close();
  }
});

test("a denied connection is refused at once and the server never sees it", async () => {
  const { server, port, conns } = await echoServer();
  const { stack, guest, denied } = await setup({ policy: compilePolicy(true) }); // default: loopback denied
  try {
    const t0 = Date.now();
    guest.tcp("127.0.0.1", { srcPort: 40003, dstPort: port, seq: 5, ack: 0, flags: SYN, mss: 1460 });
    const r = (await guest.next(isTcp(40003))) as TcpR;
    assert.equal(r.tcp.flags, RST | ACK);
    assert.equal(r.tcp.ack, 6);
    assert.ok(Date.now() - t0 < 2000);
    assert.match(denied[0]!.reason, /loopback/);
    assert.equal(denied[0]!.port, port);
    await new Promise((res) => setTimeout(res, 100));
    assert.equal(conns.length, 0);
    assert.equal(stack.stats().connectionsDenied, 1);
  } finally {
    guest.close();
    stack.close();
    server.close();
  }
});

test("a port with no listener is reset; a segment of an unknown connection is reset", async () => {
  const probe = createServer();
  await new Promise<void>((r) => probe.listen(0, "127.0.0.1", r));
  const port = (probe.address() as { port: number }).port;
  await new Promise((r) => probe.close(r));
  const { stack, guest } = await setup({ policy: compilePolicy({ allow: ["127.0.0.0/8"] }) });
  try {
    guest.tcp("127.0.0.1", { srcPort: 40005, dstPort: port, seq: 5, ack: 0, flags: SYN, mss: 1460 });
    assert.equal(((await guest.next(isTcp(40005))) as TcpR).tcp.flags, RST | ACK);
    // A connection from before a snapshot restore: the new stack resets it.
    guest.tcp("203.0.113.5", { srcPort: 40006, dstPort: 443, seq: 77, ack: 99, flags: ACK | PSH, payload: Buffer.from("x") });
    const r = (await guest.next(isTcp(40006))) as TcpR;
    assert.equal(r.tcp.flags, RST);
    assert.equal(r.tcp.seq, 99);
  } finally {
    guest.close();
    stack.close();
  }
});

test("DNS: allowed names get a synthetic address that connects to the real one; denied names get NXDOMAIN without a lookup", async () => {
  const { server, port, conns } = await echoServer();
  const lookups: string[] = [];
  const { stack, guest, denied } = await setup({
    policy: compilePolicy({ allow: ["svc.test", "*.ok.test"], hosts: { "svc.test": "127.0.0.1" } }),
    lookup: async (name) => {
      lookups.push(name);
      if (name === "gone.ok.test") throw Object.assign(new Error("nope"), { code: "ENOTFOUND" });
      return ["127.0.0.1"];
    },
  });
  try {
    const a = await resolve(guest, "svc.test", 1);
    assert.equal(a.rcode, 0);
    assert.match(a.addresses[0]!, /^198\.18\./);
    assert.deepEqual(lookups, [], "a hosts entry needs no lookup");
    const d = await resolve(guest, "exfiltrate-secret.evil.test", 2);
    assert.equal(d.rcode, RCODE_NXDOMAIN);
    assert.deepEqual(lookups, [], "a denied name is never looked up");
    assert.equal(denied[0]!.protocol, "dns");
    assert.equal((await resolve(guest, "gone.ok.test", 3)).rcode, RCODE_NXDOMAIN);
    const w = await resolve(guest, "a.ok.test", 4);
    assert.equal(w.rcode, 0);
    assert.deepEqual(lookups, ["gone.ok.test", "a.ok.test"]);
    // Connecting to the synthetic address reaches the hosts entry's address.
    const { seq, ack } = await handshake(guest, a.addresses[0]!, port, 40007);
    guest.tcp(a.addresses[0]!, { srcPort: 40007, dstPort: port, seq, ack, flags: ACK | PSH, payload: Buffer.from("x"), window: 512 });
    const echo = (await guest.next((r) => isTcp(40007)(r) && (r as TcpR).tcp.payload.length > 0)) as TcpR;
    assert.equal(echo.tcp.payload.toString(), "x");
    assert.equal(conns.length, 1);
    // a.ok.test resolved to loopback through the resolver (not hosts): refused (rebinding).
    guest.tcp(w.addresses[0]!, { srcPort: 40008, dstPort: port, seq: 1, ack: 0, flags: SYN, mss: 1460 });
    assert.equal(((await guest.next(isTcp(40008))) as TcpR).tcp.flags & RST, RST);
    assert.match(denied.at(-1)!.reason, /loopback/);
    // An address our DNS never gave out.
    guest.tcp("198.18.200.1", { srcPort: 40009, dstPort: 80, seq: 1, ack: 0, flags: SYN, mss: 1460 });
    assert.equal(((await guest.next(isTcp(40009))) as TcpR).tcp.flags & RST, RST);
    assert.equal(stack.stats().dnsDenied, 1);
  } finally {
    guest.close();
    stack.close();
    server.close();
  }
});

test("setPolicy: new connections follow it and open ones it denies are reset", async () => {
  const { server, port } = await echoServer();
  const { stack, guest } = await setup({ policy: compilePolicy({ allow: ["127.0.0.1"] }) });
  try {
    await handshake(guest, "127.0.0.1", port, 40010);
    await waitUntil(() => stack.stats().activeConnections === 1);
    stack.setPolicy(false);
    const r = (await guest.next((x) => isTcp(40010)(x) && ((x as TcpR).tcp.flags & RST) !== 0)) as TcpR;
    assert.ok(r);
    guest.tcp("127.0.0.1", { srcPort: 40011, dstPort: port, seq: 1, ack: 0, flags: SYN, mss: 1460 });
    assert.equal(((await guest.next(isTcp(40011))) as TcpR).tcp.flags & RST, RST);
    assert.equal((await resolve(guest, "anything.test", 9)).rcode, RCODE_NXDOMAIN);
    stack.setPolicy({ allow: ["127.0.0.1"] });
    const { synAck } = await handshake(guest, "127.0.0.1", port, 40012);
    assert.equal(synAck.tcp.flags, SYN | ACK);
  } finally {
    guest.close();
    stack.close();
    server.close();
  }
});

test("a flooding guest: SYN floods hit the connection cap, garbage frames are dropped, an impossible frame length closes only the link", async () => {
  const { server, port } = await echoServer();
  const { stack, guest, denied } = await setup({ policy: compilePolicy({ allow: ["127.0.0.1"] }), maxFlows: 50, maxConnecting: 20 });
  try {
    const heap0 = process.memoryUsage().heapUsed;
    for (let i = 0; i < 2000; i++) guest.tcp("127.0.0.1", { srcPort: 1024 + i, dstPort: port, seq: i, ack: 0, flags: SYN, mss: 1460 });
    for (let i = 0; i < 5000; i++) guest.sendRaw(Buffer.from(Array.from({ length: 14 + (i % 200) }, (_, k) => (i * 31 + k * 7) & 255)));
    await waitUntil(() => stack.stats().connectionsDenied > 0 && stack.stats().activeConnections <= 50);
    assert.ok(stack.stats().activeConnections <= 50);
    assert.ok(denied.some((d) => /too many connections/.test(d.reason)));
    assert.ok(process.memoryUsage().heapUsed - heap0 < 64 << 20);
    // Still serving.
    guest.arpRequest(GUEST_NETWORK.gateway);
    await guest.next((x) => x.kind === "arp");
    const huge = Buffer.alloc(4);
    huge.writeUInt32BE(1 << 30);
    guest.socket.write(huge);
    await waitUntil(() => guest.socket.destroyed || guest.socket.readableEnded);
    assert.equal(stack.stats().activeConnections, 0);
  } finally {
    guest.close();
    stack.close();
    server.close();
  }
});

async function waitUntil(cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 20));
  }
}

test("handOver() for a reused VM: a new stack takes the link muted; the old one's connections end, its listeners, counters, names and late DNS answers stay behind", async () => {
  const { server, port, conns } = await echoServer();
  let release!: (a: string[]) => void;
  const slow = new Promise<string[]>((r) => (release = r));
  const { stack, guest, denied } = await setup({
    policy: compilePolicy({ allow: ["127.0.0.1", "slow.test", "fast.test"] }),
    lookup: (name) => (name === "slow.test" ? slow : Promise.resolve(["127.0.0.1"])),
  });
  let next: NetworkStack | undefined;
  try {
    await handshake(guest, "127.0.0.1", port, 40101);
    await waitUntil(() => conns.length === 1);
    // A name the holder resolved: its synthetic address leads upstream until the hand-over.
    const fast = await resolve(guest, "fast.test", 7);
    assert.equal(fast.addresses.length, 1);
    const fastAddr = fast.addresses[0]!;
    // A lookup still in flight when the VM changes hands.
    guest.udp(GUEST_NETWORK.dns, 30008, 53, dnsQuery(8, "slow.test"));
    await waitUntil(() => stack.stats().dnsQueries === 2);
    assert.equal(stack.stats().activeConnections, 1);

    next = stack.handOver();
    assert.ok(next && next !== stack);
    const nextDenied: NetworkDeniedEvent[] = [];
    next.on("denied", (e: NetworkDeniedEvent) => nextDenied.push(e));
    // The old holder's upstream connection is closed; its counters stay with its object.
    await waitUntil(() => conns[0]!.destroyed || conns[0]!.readableEnded);
    assert.equal(stack.stats().dnsQueries, 2);
    assert.equal(next.stats().dnsQueries, 0);
    // Muted: a SYN gets no answer, ARP neither; the late answer is not sent.
    guest.drain();
    guest.arpRequest(GUEST_NETWORK.gateway);
    guest.tcp("127.0.0.1", { srcPort: 40102, dstPort: port, seq: 1, ack: 0, flags: SYN, mss: 1460 });
    release(["127.0.0.1"]);
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(guest.drain(), []);
    assert.equal(conns.length, 1);

    next.unmute();
    // The late answer for the previous holder's query never comes.
    await assert.rejects(guest.next((x) => x.kind === "udp" && x.udp.dstPort === 30008, 300));
    // The previous holder's synthetic address means nothing now: refused, and
    // the denial goes to the new stack's listeners, not the old one's.
    const deniedBefore = denied.length;
    guest.tcp(fastAddr, { srcPort: 40103, dstPort: port, seq: 1, ack: 0, flags: SYN, mss: 1460 });
    const rst = (await guest.next(isTcp(40103))) as TcpR;
    assert.ok(rst.tcp.flags & RST);
    assert.equal(nextDenied.length, 1);
    assert.equal(denied.length, deniedBefore);
    // The next guest's traffic flows on the same link.
    const { synAck } = await handshake(guest, "127.0.0.1", port, 40104);
    assert.equal(synAck.tcp.flags, SYN | ACK);
    await waitUntil(() => conns.length === 2);
    assert.equal(next.stats().activeConnections, 1);
  } finally {
    guest.close();
    next?.close();
    stack.close();
    server.close();
  }
});
