/**
 * Host codec against the golden fixtures shared with the agent
 * (agent/src/proto.rs reads the same files), plus the incremental reader.
 */

import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { DecodeError, FrameReader, RecordBuilder, RecordReader, decodeFields, encodeFrame, parseFrame, type Frame } from "../../src/protocol/codec.js";
import { MAX_PAYLOAD, MsgType, Tag, type MsgTypeName } from "../../src/protocol/constants.js";
import { encodeNetConfig } from "../../src/protocol/net-config.js";
import { REPO_ROOT } from "../helpers.js";

interface Fixture {
  name: string;
  type: number;
  flags: number;
  stream: number;
  payload: Buffer;
  hex: Buffer;
  error?: string;
  fields: { tag: number; kind: string; value: string }[];
}

function unhex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ""), "hex");
}

function encodeValue(kind: string, v: string): Buffer {
  switch (kind) {
    case "bytes":
      return unhex(v);
    case "str":
      return Buffer.from(v, "utf8");
    case "u32": {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(Number(v));
      return b;
    }
    case "i32": {
      const b = Buffer.alloc(4);
      b.writeInt32LE(Number(v));
      return b;
    }
    case "u64": {
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(BigInt(v));
      return b;
    }
    case "bool":
      return Buffer.from([v === "true" ? 1 : 0]);
    default:
      throw new Error(`unknown kind ${kind}`);
  }
}

const TAGS_BY_TYPE: Partial<Record<MsgTypeName, Record<string, number>>> = {
  HELLO: Tag.HELLO,
  HELLO_ACK: Tag.HELLO_ACK,
  CONFIGURE: Tag.CONFIGURE,
  EXEC: Tag.EXEC,
  STARTED: Tag.STARTED,
  EXIT: Tag.EXIT,
  SIGNAL: Tag.SIGNAL,
  RESIZE: Tag.RESIZE,
  WRITE_FILE: Tag.WRITE_FILE,
  READ_FILE: Tag.READ_FILE,
  TCP_CONNECT: Tag.TCP_CONNECT,
  WORKLOAD_START: Tag.WORKLOAD_START,
  WORKLOAD_SIGNAL: Tag.WORKLOAD_SIGNAL,
  WAIT_LISTEN: Tag.WAIT_LISTEN,
  MOUNT: Tag.MOUNT,
  MOUNTED: Tag.MOUNTED,
  LOG: Tag.LOG,
  ERROR: Tag.ERROR,
  OK: Tag.READ_FILE_OK,
};

function loadFixtures(): Fixture[] {
  const dir = join(REPO_ROOT, "protocol", "fixtures");
  const out: Fixture[] = [];
  for (const file of readdirSync(dir).filter((f) => f.endsWith(".frame")).sort()) {
    const f: Fixture = { name: file, type: 0, flags: 0, stream: 0, payload: Buffer.alloc(0), hex: Buffer.alloc(0), fields: [] };
    let typeName: MsgTypeName | undefined;
    for (const raw of readFileSync(join(dir, file), "utf8").split("\n")) {
      const line = raw.split("#")[0]!.trim();
      if (!line) continue;
      const sp = line.indexOf(" ");
      const key = sp < 0 ? line : line.slice(0, sp);
      const rest = sp < 0 ? "" : line.slice(sp + 1).trim();
      switch (key) {
        case "type":
          typeName = rest as MsgTypeName;
          assert.ok(rest in MsgType, `${file}: unknown type ${rest}`);
          f.type = MsgType[typeName];
          break;
        case "flags":
          f.flags = Number(rest);
          break;
        case "stream":
          f.stream = Number(rest);
          break;
        case "raw":
          f.payload = Buffer.concat([f.payload, unhex(rest)]);
          break;
        case "field": {
          const [name, kind, ...v] = rest.split(" ");
          const tags = TAGS_BY_TYPE[typeName!];
          const tag = tags?.[name!];
          assert.ok(tag !== undefined, `${file}: unknown field ${name} of ${typeName}`);
          const value = encodeValue(kind!, v.join(" "));
          const head = Buffer.alloc(5);
          head[0] = tag;
          head.writeUInt32LE(value.length, 1);
          f.payload = Buffer.concat([f.payload, head, value]);
          f.fields.push({ tag, kind: kind!, value: v.join(" ") });
          break;
        }
        case "hex":
          f.hex = Buffer.concat([f.hex, unhex(rest)]);
          break;
        case "error":
          f.error = rest;
          break;
        default:
          throw new Error(`${file}: unknown line ${line}`);
      }
    }
    out.push(f);
  }
  return out;
}

describe("protocol codec: golden fixtures", () => {
  const fixtures = loadFixtures();

  it("has the shared fixtures", () => {
    assert.ok(fixtures.length >= 30, `found ${fixtures.length}`);
    assert.ok(fixtures.some((f) => f.error), "no bad-frame fixtures");
  });

  for (const f of fixtures) {
    it(`${f.name}`, () => {
      if (f.error) {
        let got = "accepted";
        try {
          const r = parseFrame(f.hex);
          if (r) decodeFields(r.frame.payload);
        } catch (e) {
          assert.ok(e instanceof DecodeError);
          got = e.kind;
        }
        assert.equal(got, f.error);
        // The incremental reader rejects it too, whatever the chunking.
        assert.throws(() => {
          const rd = new FrameReader();
          for (const b of f.hex) rd.push(Buffer.from([b])).forEach((fr) => decodeFields(fr.payload));
        }, DecodeError);
        return;
      }
      assert.deepEqual(encodeFrame(f.type, f.flags, f.stream, f.payload), f.hex, "encoding differs from the fixture");
      const r = parseFrame(f.hex);
      assert.ok(r);
      assert.equal(r.used, f.hex.length);
      assert.equal(r.frame.type, f.type);
      assert.equal(r.frame.flags, f.flags);
      assert.equal(r.frame.stream, f.stream);
      assert.deepEqual(r.frame.payload, f.payload);
      if (f.fields.length) {
        const rec = new RecordReader(r.frame.payload);
        assert.equal(rec.fields.length, f.fields.length);
        f.fields.forEach((fd, i) => {
          assert.equal(rec.fields[i]![0], fd.tag);
          assert.deepEqual(rec.fields[i]![1], encodeValue(fd.kind, fd.value));
        });
      }
    });
  }
});

describe("protocol codec: builders and readers", () => {
  it("RecordBuilder produces the EXEC fixture's payload", () => {
    const fx = loadFixtures().find((f) => f.name === "exec.frame")!;
    const b = new RecordBuilder();
    for (const a of ["printf", "%s|", "a b", `"q'uote"`]) b.bytes(Tag.EXEC.argv, a);
    b.bytes(Tag.EXEC.argv, Buffer.from("fffe80c3", "hex"));
    b.bytes(Tag.EXEC.env, "X=1").bytes(Tag.EXEC.cwd, "/tmp").u64(Tag.EXEC.timeout_ms, 60000);
    b.bytes(Tag.EXEC.chain, "echo").bytes(Tag.EXEC.chain, "ok");
    assert.deepEqual(encodeFrame(MsgType.EXEC, 0, 7, b.build()), fx.hex);
  });

  it("encodeNetConfig produces the configure-net fixture's payload", () => {
    const fx = loadFixtures().find((f) => f.name === "configure-net.frame")!;
    const net = {
      address: "198.19.0.2",
      prefixLength: 24,
      gateway: "198.19.0.1",
      mtu: 1500,
      resolvConf: "nameserver 198.19.0.1\n",
      hosts: "198.19.0.1\tgateway.internal\n",
    };
    assert.deepEqual(encodeFrame(MsgType.CONFIGURE, 0, 3, encodeNetConfig(new RecordBuilder(), net).build()), fx.hex);
  });

  it("encodeNetConfig rejects bad network settings, naming the field", () => {
    const ok = { address: "198.19.0.2", prefixLength: 24, gateway: "198.19.0.1", mtu: 1500, resolvConf: "", hosts: "" };
    const bad: [Partial<typeof ok>, RegExp][] = [
      [{ address: "198.19.0" }, /net\.address/],
      [{ address: "198.19.0.256" }, /net\.address/],
      [{ address: "01.2.3.4" }, /net\.address/],
      [{ prefixLength: 33 }, /net\.prefixLength/],
      [{ gateway: "198.19.1.1" }, /net\.gateway: expected an address inside 198\.19\.0\.2\/24/],
      [{ mtu: 67 }, /net\.mtu/],
      [{ mtu: 65536 }, /net\.mtu/],
      [{ resolvConf: "x".repeat(4097) }, /net\.resolvConf: expected at most 4096 bytes/],
      [{ hosts: "a\0b" }, /net\.hosts/],
    ];
    for (const [change, re] of bad) {
      assert.throws(() => encodeNetConfig(new RecordBuilder(), { ...ok, ...change }), (e: unknown) => e instanceof TypeError && re.test(e.message), JSON.stringify(change));
    }
    assert.ok(encodeNetConfig(new RecordBuilder(), { ...ok, prefixLength: 0, gateway: "10.0.0.1" }).length > 0);
  });

  it("typed readers reject wrong sizes", () => {
    const p = new RecordBuilder().bytes(1, Buffer.alloc(3)).bytes(2, Buffer.from([2])).build();
    const r = new RecordReader(p);
    assert.throws(() => r.u32(1), (e: unknown) => e instanceof DecodeError && e.kind === "field-size");
    assert.throws(() => r.bool(2), (e: unknown) => e instanceof DecodeError && e.kind === "field-size");
    assert.equal(r.u32(9), undefined);
  });

  it("FrameReader reassembles frames split at every byte", () => {
    const frames = [encodeFrame(MsgType.PING, 0, 0, Buffer.from("12345678")), encodeFrame(MsgType.DATA, 1, 9, Buffer.alloc(70_000, 7)), encodeFrame(MsgType.EOF, 2, 9)];
    const all = Buffer.concat(frames);
    for (const step of [1, 3, 4096, 65536, all.length]) {
      const rd = new FrameReader();
      const got = [];
      for (let i = 0; i < all.length; i += step) got.push(...rd.push(all.subarray(i, i + step)));
      assert.equal(got.length, 3, `step ${step}`);
      assert.equal(got[1]!.payload.length, 70_000);
      assert.equal(got[2]!.flags, 2);
      assert.equal(rd.pending, 0);
    }
  });

  // Regression: the first reader re-concatenated its buffered chunks on every
  // push, so a guest trickling bytes made the host do quadratic work.
  it("FrameReader stays linear when a maximal frame trickles in one byte at a time", { timeout: 120_000 }, () => {
    const frame = encodeFrame(MsgType.DATA, 1, 3, Buffer.alloc(MAX_PAYLOAD, 9));
    const rd = new FrameReader();
    let got: Frame[] = [];
    for (let i = 0; i < frame.length; i++) got = got.concat(rd.push(frame.subarray(i, i + 1)));
    assert.equal(got.length, 1);
    assert.equal(got[0]!.payload.length, MAX_PAYLOAD);
    assert.equal(rd.pending, 0);
  });

  it("FrameReader rejects an oversized length before buffering the body", () => {
    const rd = new FrameReader();
    const head = Buffer.alloc(4);
    head.writeUInt32LE(8 + MAX_PAYLOAD + 1);
    assert.throws(() => rd.push(head), (e: unknown) => e instanceof DecodeError && e.kind === "length-too-large");
  });

  it("encodeFrame refuses payloads over the limit", () => {
    assert.throws(() => encodeFrame(MsgType.DATA, 1, 1, Buffer.alloc(MAX_PAYLOAD + 1)), RangeError);
  });
});
