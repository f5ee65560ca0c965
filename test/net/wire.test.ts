import assert from "node:assert/strict";
import { test } from "node:test";
import { checksum } from "../../src/net/wire/checksum.js";
import { parseIpv4, writeIpv4, parseIpv4Address, ipToString, PROTO_TCP } from "../../src/net/wire/ipv4.js";
import { parseTcp, writeTcp, SYN, ACK, seqLt, seqAdd, seqDiff } from "../../src/net/wire/tcp.js";
import { parseUdp, writeUdp } from "../../src/net/wire/udp.js";
import { parseArp } from "../../src/net/wire/arp.js";
import { buildResponse, parseQuery, parseResponse, readName, encodeName, DnsParseError, TYPE_A, RCODE_NXDOMAIN } from "../../src/net/wire/dns.js";
import { FrameReader, MAX_FRAME } from "../../src/net/link.js";
import { ByteQueue } from "../../src/net/bytequeue.js";

// A real IPv4 header (from RFC 1071 examples / Wikipedia's worked example).
const IP_HDR = Buffer.from("450000730000400040110000c0a80001c0a800c7", "hex");

test("the Internet checksum of a recorded IPv4 header", () => {
  assert.equal(checksum(IP_HDR), 0xb861);
  const h = Buffer.from(IP_HDR);
  h.writeUInt16BE(0xb861, 10);
  assert.equal(checksum(h), 0);
  // Odd lengths pad with a zero byte.
  assert.equal(checksum(Buffer.from([0x01])), ~0x0100 & 0xffff);
});

test("IPv4 emit then parse round-trips; malformed headers are refused", () => {
  const buf = Buffer.alloc(20 + 4);
  writeIpv4(buf, 0, parseIpv4Address("198.19.0.1")!, parseIpv4Address("198.19.0.2")!, PROTO_TCP, 4);
  assert.equal(checksum(buf, 0, 20), 0);
  const p = parseIpv4(buf)!;
  assert.equal(ipToString(p.src), "198.19.0.1");
  assert.equal(ipToString(p.dst), "198.19.0.2");
  assert.equal(p.payload.length, 4);
  assert.equal(p.fragment, false);
  assert.equal(parseIpv4(buf.subarray(0, 19)), undefined);
  const bad = Buffer.from(buf);
  bad[0] = 0x46; // IHL 24 > what the length says is fine, but version/len checks below
  bad.writeUInt16BE(10, 2); // total length shorter than the header
  assert.equal(parseIpv4(bad), undefined);
  const v6 = Buffer.from(buf);
  v6[0] = 0x65;
  assert.equal(parseIpv4(v6), undefined);
  const frag = Buffer.from(buf);
  frag.writeUInt16BE(0x2000, 6);
  assert.equal(parseIpv4(frag)!.fragment, true);
  for (const s of ["256.1.1.1", "1.2.3", "01.2.3.4", "a.b.c.d", "1.2.3.4.5"]) assert.equal(parseIpv4Address(s), undefined, s);
});

test("TCP: options parsed, checksum verifies, malformed option lengths do not loop", () => {
  const src = parseIpv4Address("198.19.0.2")!;
  const dst = parseIpv4Address("203.0.113.5")!;
  const buf = Buffer.alloc(28 + 3);
  buf.write("abc", 28);
  writeTcp(buf, 0, { srcPort: 40000, dstPort: 443, seq: 0xfffffff0, ack: 5, flags: SYN | ACK, window: 1000, synOptions: { mss: 65480, windowScale: 7 } }, src, dst, 3);
  const s = parseTcp(buf)!;
  assert.deepEqual([s.srcPort, s.dstPort, s.seq, s.ack, s.flags, s.window, s.mss, s.windowScale], [40000, 443, 0xfffffff0, 5, SYN | ACK, 1000, 65480, 7]);
  assert.equal(s.payload.toString(), "abc");
  // Verify the checksum with the pseudo-header the way a receiver does.
  const pseudo = Buffer.concat([src, dst, Buffer.from([0, 6, 0, buf.length])]);
  assert.equal(checksum(Buffer.concat([pseudo, buf])), 0);
  const weird = Buffer.from(buf);
  weird[20] = 5; // SACK with length 0
  weird[21] = 0;
  assert.ok(parseTcp(weird));
  const short = Buffer.from(buf);
  short[12] = 0x30; // data offset 12 < 20
  assert.equal(parseTcp(short), undefined);
  assert.ok(seqLt(0xfffffff0, 5));
  assert.equal(seqAdd(0xffffffff, 2), 1);
  assert.equal(seqDiff(5, 0xfffffff0), 21);
});

test("UDP and ARP parse what was emitted; short packets are refused", () => {
  const src = parseIpv4Address("198.19.0.2")!;
  const dst = parseIpv4Address("198.19.0.1")!;
  const b = Buffer.alloc(8 + 2);
  b.write("hi", 8);
  writeUdp(b, 0, 5353, 53, src, dst, 2);
  const d = parseUdp(b)!;
  assert.deepEqual([d.srcPort, d.dstPort, d.payload.toString()], [5353, 53, "hi"]);
  const bad = Buffer.from(b);
  bad.writeUInt16BE(100, 4);
  assert.equal(parseUdp(bad), undefined);
  assert.equal(parseArp(Buffer.alloc(27)), undefined);
  assert.equal(parseArp(Buffer.alloc(28)), undefined); // htype 0
});

// A query for example.com A, as `dig` sends it (recorded).
const QUERY = Buffer.from("abcd01200001000000000001076578616d706c6503636f6d00000100010000291000000000000000", "hex");

test("DNS: a recorded query parses; the response carries the answer", () => {
  const q = parseQuery(QUERY);
  assert.equal(q.id, 0xabcd);
  assert.deepEqual(q.question, { name: "example.com", type: TYPE_A, class: 1 });
  const r = buildResponse(q, 0, [parseIpv4Address("198.18.0.7")!], 30);
  assert.deepEqual(parseResponse(r), { id: 0xabcd, rcode: 0, addresses: ["198.18.0.7"] });
  assert.equal(r.readUInt16BE(2) & 0x0100, 0x0100, "RD echoed");
  assert.equal(parseResponse(buildResponse(q, RCODE_NXDOMAIN)).rcode, RCODE_NXDOMAIN);
});

test("DNS: hostile names are refused, not looped on", () => {
  const loop = Buffer.concat([QUERY.subarray(0, 12), Buffer.from([0xc0, 12, 0, 1, 0, 1])]);
  assert.throws(() => parseQuery(loop), DnsParseError);
  const forward = Buffer.concat([QUERY.subarray(0, 12), Buffer.from([0xc0, 20, 0, 1, 0, 1, 0, 0])]);
  assert.throws(() => parseQuery(forward), DnsParseError);
  const longLabel = Buffer.concat([QUERY.subarray(0, 12), Buffer.from([64]), Buffer.alloc(64, 97), Buffer.from([0, 0, 1, 0, 1])]);
  assert.throws(() => parseQuery(longLabel), DnsParseError);
  const parts: Buffer[] = [QUERY.subarray(0, 12)];
  for (let i = 0; i < 50; i++) parts.push(Buffer.from([9]), Buffer.alloc(9, 97));
  parts.push(Buffer.from([0, 0, 1, 0, 1]));
  assert.throws(() => parseQuery(Buffer.concat(parts)), /too long/);
  assert.throws(() => parseQuery(QUERY.subarray(0, 20)), DnsParseError);
  const answer = Buffer.from(QUERY);
  answer[2] = answer[2]! | 0x80;
  assert.throws(() => parseQuery(answer), /not a query/);
  // A backwards pointer is fine.
  const msg = Buffer.concat([Buffer.alloc(12), encodeName("a.example"), Buffer.from([1, 98, 0xc0, 14])]);
  assert.equal(readName(msg, 23).name, "b.example");
});

test("FrameReader: frames split anywhere come out whole; an oversized length is refused before allocating", () => {
  const frames = [Buffer.alloc(60, 1), Buffer.alloc(1500, 2), Buffer.alloc(65000, 3), Buffer.alloc(14, 4)];
  const wire = Buffer.concat(frames.flatMap((f) => [Buffer.from([0, 0, f.length >> 8, f.length & 255].map((x, i) => (i < 2 ? (f.length >>> (24 - 8 * i)) & 255 : x))), f]));
  for (const step of [1, 3, 7, 1000, wire.length]) {
    const r = new FrameReader();
    const got: Buffer[] = [];
    for (let i = 0; i < wire.length; i += step) assert.equal(r.push(wire.subarray(i, i + step), (f) => got.push(Buffer.from(f))), true);
    assert.deepEqual(got.map((g) => [g.length, g[0]]), frames.map((f) => [f.length, f[0]]), `step ${step}`);
  }
  const huge = Buffer.alloc(4);
  huge.writeUInt32BE(MAX_FRAME + 1);
  assert.equal(new FrameReader().push(huge, () => assert.fail("no frame")), false);
});

test("ByteQueue keeps order across growth, compaction and drops", () => {
  const q = new ByteQueue(8);
  const all: number[] = [];
  let n = 0;
  for (let i = 0; i < 200; i++) {
    const chunk = Buffer.from(Array.from({ length: (i % 13) + 1 }, () => n++ & 255));
    q.push(chunk);
    all.push(...chunk);
    if (i % 3 === 0) {
      const k = Math.min(q.length, 5);
      q.drop(k);
      all.splice(0, k);
    }
  }
  const out = Buffer.alloc(q.length);
  q.copyOut(out, 0, 0, q.length);
  assert.deepEqual([...out], all);
});
