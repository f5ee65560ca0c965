/**
 * The host side of the stream ring (src/agent-client/ring.ts): regions are
 * written where the file says, never over an unacknowledged one, wrap to
 * the front, and a full or closed ring declines (the caller sends frames).
 * A guest's RING_ACK that acknowledges more than is outstanding is refused;
 * over a fake agent, a large stdin write becomes DATA_REF frames whose
 * regions hold its bytes, and a bad RING_ACK ends the connection.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { connect, type Server, type Socket } from "node:net";
import { AgentConnection } from "../../src/agent-client/connection.js";
import { RING_BYTES, RING_MAX_REGION_BYTES, RING_MIN_REGION_BYTES, StreamRing, createRingFile } from "../../src/agent-client/ring.js";
import { ProtocolError } from "../../src/errors.js";
import { encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { MsgType } from "../../src/protocol/constants.js";
import { TcpForwarder } from "../../src/vm/tcp-forwarder.js";
import { listenFakeAgent } from "./fake-agent.js";

describe("StreamRing", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-ring-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("creates a sparse file of RING_BYTES, and refuses to reuse an existing path", async () => {
    const f = join(dir, "a");
    createRingFile(f);
    const st = await stat(f);
    assert.equal(st.size, RING_BYTES);
    assert.ok(st.blocks * 512 < RING_BYTES, "sparse");
    assert.throws(() => createRingFile(f), /EEXIST/);
  });

  it("places regions at 4 KiB boundaries with the bytes in the file, wraps, and waits for acks when full", async () => {
    const f = join(dir, "b");
    createRingFile(f);
    const size = 64 * 1024;
    const r = StreamRing.open(f, size);
    const a = randomBytes(20_000); // 5 pages
    const b = randomBytes(30_000); // 8 pages
    assert.equal(r.place(a), 0);
    assert.equal(r.place(b), 20_480);
    const file = await readFile(f);
    assert.deepEqual(file.subarray(0, a.length), a);
    assert.deepEqual(file.subarray(20_480, 20_480 + b.length), b);
    assert.equal(r.pending, 2);
    // 13 of 16 pages used: 4 more pages do not fit, even after a wrap.
    assert.equal(r.place(randomBytes(16_384)), undefined, "full: declined");
    assert.equal(r.ack(1), undefined);
    // Pages 5..12 still held: 3 pages at the end are skipped, the region goes to 0.
    const c = randomBytes(16_384);
    assert.equal(r.place(c), 0, "wraps to the front");
    assert.deepEqual((await readFile(f)).subarray(0, c.length), c);
    // One page is free between the new region and the held one.
    assert.equal(r.place(randomBytes(8192)), undefined, "the held region is never overwritten");
    assert.equal(r.place(randomBytes(4096)), 16_384);
    assert.equal(r.ack(3), undefined);
    assert.equal(r.pending, 0);
    assert.equal(r.place(randomBytes(4096)), 0, "empty: back to the front");
    r.close();
    assert.equal(r.place(randomBytes(4096)), undefined, "closed: declined");
  });

  it("refuses acknowledgements of regions never placed", () => {
    const f = join(dir, "c");
    createRingFile(f);
    const r = StreamRing.open(f);
    assert.match(r.ack(1) ?? "", /RING_ACK of 1 regions, 0 outstanding/);
    assert.notEqual(r.place(randomBytes(RING_BYTES / 4)), undefined);
    for (const bad of [0, -1, 2, 1.5, 2 ** 32 - 1]) assert.match(r.ack(bad) ?? "", /RING_ACK/, String(bad));
    assert.equal(r.ack(1), undefined);
    r.close();
  });

  it("declines payloads larger than the ring", () => {
    const f = join(dir, "d");
    createRingFile(f);
    const r = StreamRing.open(f, 8192);
    assert.equal(r.place(randomBytes(8193)), undefined);
    assert.equal(r.place(Buffer.alloc(0)), undefined);
    assert.equal(r.place(randomBytes(8192)), 0);
    r.close();
  });
});

describe("stream ring over a fake agent", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-ring-conn-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  /** The bytes a DATA_REF payload (u64 offset, u32 length) names in the ring file, read now. */
  function ringBytes(ringFile: string, p: Buffer): Buffer {
    const off = Number(p.readBigUInt64LE(0));
    return readFileSync(ringFile).subarray(off, off + p.readUInt32LE(8));
  }

  /** A connection to a fake agent that hands every frame after HELLO to `onFrame`, with a ring attached. */
  async function ringConnection(name: string, onFrame: (sock: Socket, f: Frame) => void): Promise<{ conn: AgentConnection; ringFile: string; fatal: Promise<Error>; server: Server }> {
    const path = join(dir, `${name}.sock`);
    const server = await listenFakeAgent(path, async (sock, next) => {
      for (;;) onFrame(sock, await next());
    });
    const conn = await AgentConnection.connect(path, { timeoutMs: 5000 });
    const fatal = new Promise<Error>((r) => (conn.onFatal = r));
    const ringFile = join(dir, `${name}.ring`);
    createRingFile(ringFile);
    conn._attachRing(StreamRing.open(ringFile));
    return { conn, ringFile, fatal, server };
  }

  it("a large stdin write goes as DATA_REF regions holding its bytes (up to RING_MAX_REGION_BYTES each, none under RING_MIN_REGION_BYTES), small ones as DATA; acknowledged regions are reused", async () => {
    const got: { type: number; payload: Buffer }[] = [];
    const { conn, ringFile, server } = await ringConnection("ok", (sock, f) => {
      if (f.type === MsgType.EXEC) return;
      if (f.type === MsgType.DATA || f.type === MsgType.DATA_REF) {
        // A snapshot of the region's bytes as the guest would read them now.
        const region = f.type === MsgType.DATA_REF ? ringBytes(ringFile, f.payload) : undefined;
        got.push({ type: f.type, payload: region ?? Buffer.from(f.payload) });
        const n = f.type === MsgType.DATA_REF ? f.payload.readUInt32LE(8) : f.payload.length;
        if (f.type === MsgType.DATA_REF) sock.write(encodeFrame(MsgType.RING_ACK, 0, 0, Buffer.from([1, 0, 0, 0])));
        // The guest took the bytes: their credit comes back.
        const w = Buffer.alloc(4);
        w.writeUInt32LE(n);
        sock.write(encodeFrame(MsgType.WINDOW, 0, f.stream, w));
      }
    });
    try {
      const s = conn.exec({ argv: [Buffer.from("cat")], stdin: true });
      // One region of the largest size, one of the rest (over the least).
      const big = randomBytes(RING_MAX_REGION_BYTES + RING_MIN_REGION_BYTES + 1000);
      await s.writeStdin(big);
      // Under the least: frames.
      const under = randomBytes(RING_MIN_REGION_BYTES - 4096);
      await s.writeStdin(under);
      await s.writeStdin(Buffer.from("small"));
      await waitUntil(() => got.length >= 5);
      assert.deepEqual(got.map((g) => g.type), [MsgType.DATA_REF, MsgType.DATA_REF, MsgType.DATA, MsgType.DATA, MsgType.DATA]);
      assert.deepEqual(got[0]!.payload, big.subarray(0, RING_MAX_REGION_BYTES));
      assert.deepEqual(got[1]!.payload, big.subarray(RING_MAX_REGION_BYTES));
      assert.deepEqual(Buffer.concat([got[2]!.payload, got[3]!.payload]), under);
      assert.equal(got[4]!.payload.toString(), "small");
      await waitUntil(() => conn._ringStats!.pending === 0);
      assert.equal(conn._ringStats!.sent, 2);
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  /**
   * A fake agent's side of one TCP connection that grants 1 MiB more than
   * the initial window (2 MiB in all, as the real agent does) and credits
   * each region back in two halves, `ms` and 2 × `ms` later, as a guest
   * socket takes a region in parts (a DATA frame's in one piece, 2 × `ms`
   * later). Records each DATA_REF's and DATA frame's size.
   */
  function tcpGuest(ms: number): { onFrame: (sock: Socket, f: Frame) => void; refs: number[]; frames: number[]; eof: () => boolean; bytes: () => number } {
    const refs: number[] = [];
    const frames: number[] = [];
    let eof = false;
    const credit = (sock: Socket, stream: number, n: number) => {
      const w = Buffer.alloc(4);
      w.writeUInt32LE(n);
      if (!sock.destroyed) sock.write(encodeFrame(MsgType.WINDOW, 0, stream, w));
    };
    const onFrame = (sock: Socket, f: Frame) => {
      if (f.type === MsgType.TCP_CONNECT) {
        sock.write(encodeFrame(MsgType.STARTED, 0, f.stream, Buffer.alloc(0)));
        credit(sock, f.stream, 1 << 20);
      } else if (f.type === MsgType.DATA_REF) {
        const n = f.payload.readUInt32LE(8);
        refs.push(n);
        sock.write(encodeFrame(MsgType.RING_ACK, 0, 0, Buffer.from([1, 0, 0, 0])));
        setTimeout(() => credit(sock, f.stream, n >> 1), ms);
        setTimeout(() => credit(sock, f.stream, n - (n >> 1)), 2 * ms);
      } else if (f.type === MsgType.DATA) {
        const n = f.payload.length;
        frames.push(n);
        setTimeout(() => credit(sock, f.stream, n), 2 * ms);
      } else if (f.type === MsgType.EOF) eof = true;
    };
    const sum = (a: number[]) => a.reduce((x, y) => x + y, 0);
    return { onFrame, refs, frames, eof: () => eof, bytes: () => sum(refs) + sum(frames) };
  }

  it("with a window of two regions, a large TCP write waits for a whole region's credit instead of sending the half that came back", async () => {
    const g = tcpGuest(20);
    const { conn, server } = await ringConnection("tcp-whole", g.onFrame);
    try {
      const tcp = conn.tcpConnect(80);
      await tcp.connected;
      await tcp.write(randomBytes(4 * RING_MAX_REGION_BYTES));
      await waitUntil(() => g.bytes() === 4 * RING_MAX_REGION_BYTES);
      assert.deepEqual(g.refs, [1, 1, 1, 1].map(() => RING_MAX_REGION_BYTES));
      assert.deepEqual(g.frames, []);
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  it("a forwarder whose guest has a whole region in flight coalesces the socket's chunks into whole regions", async () => {
    // A guest slower than the client (here: 1 MiB per 200 ms), as under
    // emulation; a guest that keeps up gets each chunk at once.
    const g = tcpGuest(100);
    const { conn, server } = await ringConnection("tcp-fwd", g.onFrame);
    const fwd = await TcpForwarder.listen(() => conn, 0, 80);
    try {
      const body = randomBytes(8 * RING_MAX_REGION_BYTES);
      const c = connect(Number(fwd.localAddr.split(":")[1]), "127.0.0.1");
      c.on("error", () => undefined);
      c.end(body);
      await waitUntil(() => g.eof());
      assert.equal(g.bytes(), body.length);
      // Until a region's worth is in flight, chunks go at once (frames);
      // from then on only whole regions, the last one excepted.
      const framed = g.frames.reduce((x, y) => x + y, 0);
      assert.ok(framed <= RING_MAX_REGION_BYTES + 128 * 1024, `bytes sent as DATA frames: ${framed}`);
      assert.ok(g.refs.slice(0, -1).every((n) => n === RING_MAX_REGION_BYTES), `regions: ${g.refs.join(" ")}`);
      assert.ok(g.refs.length >= 6, `regions: ${g.refs.join(" ")}`);
      c.destroy();
    } finally {
      fwd.destroy();
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  it("a RING_ACK for a region never sent is a protocol violation", async () => {
    const { conn, fatal, server } = await ringConnection("bad", (sock, f) => {
      if (f.type === MsgType.EXEC) sock.write(encodeFrame(MsgType.RING_ACK, 0, 0, Buffer.from([5, 0, 0, 0])));
    });
    try {
      conn.exec({ argv: [Buffer.from("true")] }).exit.catch(() => undefined);
      const err = await fatal;
      assert.ok(err instanceof ProtocolError, String(err));
      assert.match(err.message, /RING_ACK of 5 regions, 0 outstanding/);
    } finally {
      server.close();
    }
  });

  it("a RING_ACK without a ring is a protocol violation", async () => {
    const path = join(dir, "none.sock");
    const server = await listenFakeAgent(path, async (sock, next) => {
      for (;;) if ((await next()).type === MsgType.EXEC) sock.write(encodeFrame(MsgType.RING_ACK, 0, 0, Buffer.from([1, 0, 0, 0])));
    });
    const conn = await AgentConnection.connect(path, { timeoutMs: 5000 });
    const fatal = new Promise<Error>((r) => (conn.onFatal = r));
    try {
      conn.exec({ argv: [Buffer.from("true")] }).exit.catch(() => undefined);
      const err = await fatal;
      assert.ok(err instanceof ProtocolError, String(err));
      assert.match(err.message, /RING_ACK without a stream ring/);
    } finally {
      server.close();
    }
  });
});

async function waitUntil(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(cond(), "condition not reached within 5 s");
}
