/**
 * The host treats the guest as hostile. A fake agent on a unix socket (a
 * unit test may fake the socket) sends malformed, oversized and out-of-rule
 * frames: each must produce a typed ProtocolError, never a host crash or an
 * unbounded buffer.
 */

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { AgentConnection } from "../../src/agent-client/connection.js";
import { ProtocolError, TimeoutError } from "../../src/errors.js";
import { FrameReader, RecordBuilder, encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { listenFakeAgent } from "./fake-agent.js";
import { INITIAL_WINDOW, MAGIC, MAX_PAYLOAD, MsgType, Tag } from "../../src/protocol/constants.js";

type Script = (sock: Socket, frames: AsyncGenerator<Frame>) => Promise<void>;

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "sm-conn-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
/** A fake agent: answers HELLO, then runs `script`. */
async function fakeAgent(script: Script): Promise<{ path: string; server: Server }> {
  const path = join(dir, `a${n++}.sock`);
  const server = await listenFakeAgent(path, (sock, next) =>
    script(
      sock,
      (async function* (): AsyncGenerator<Frame> {
        for (;;) yield await next();
      })(),
    ),
  );
  return { path, server };
}

async function connectTo(script: Script): Promise<{ conn: AgentConnection; fatal: Promise<Error>; server: Server }> {
  const { path, server } = await fakeAgent(script);
  const conn = await AgentConnection.connect(path, { timeoutMs: 5000 });
  const fatal = new Promise<Error>((r) => (conn.onFatal = r));
  return { conn, fatal, server };
}

/** The host's exec request and the guest's hostile answer to it. */
async function violationOf(answer: (sock: Socket, execStream: number) => void): Promise<Error> {
  const { conn, fatal, server } = await connectTo(async (sock, frames) => {
    for (;;) {
      const f = (await frames.next()).value as Frame;
      if (f.type === MsgType.EXEC) {
        answer(sock, f.stream);
        return;
      }
    }
  });
  try {
    const s = conn.exec({ argv: [Buffer.from("true")] });
    const [err, exitErr] = await Promise.all([fatal, s.exit.then(() => undefined, (e: unknown) => e)]);
    assert.ok(err instanceof ProtocolError, `expected ProtocolError, got ${String(err)}`);
    assert.ok(exitErr instanceof ProtocolError, "the pending exec must fail with the same typed error");
    assert.ok(conn.closed);
    return err;
  } finally {
    server.close();
  }
}

describe("agent connection: hostile guest", () => {
  it("handshake: a correct fake agent is accepted", async () => {
    const { conn, server } = await connectTo(async () => undefined);
    assert.equal(conn.info?.agentVersion, "fake");
    conn.destroy(new Error("done"));
    server.close();
  });

  it("bytes a previous session left before the HELLO_ACK are skipped", async () => {
    const path = join(dir, "stale.sock");
    const server = createServer((sock) => {
      sock.once("data", () => {
        const ack = new RecordBuilder().bytes(Tag.HELLO_ACK.magic, MAGIC).u32(Tag.HELLO_ACK.version, 1).bytes(Tag.HELLO_ACK.agent_version, "fake");
        // The tail of an old frame, then a whole old frame, then the answer,
        // delivered in awkward pieces.
        const all = Buffer.concat([Buffer.from("tail of old output"), encodeFrame(MsgType.DATA, 1, 5, Buffer.from("old")), encodeFrame(MsgType.HELLO_ACK, 0, 0, ack.build())]);
        for (let i = 0; i < all.length; i += 7) sock.write(all.subarray(i, i + 7));
      });
    });
    await new Promise<void>((r) => server.listen(path, r));
    try {
      const conn = await AgentConnection.connect(path, { timeoutMs: 5000 });
      assert.equal(conn.info?.agentVersion, "fake");
      conn.destroy(new Error("done"));
    } finally {
      server.close();
    }
  });

  it("oversized frame length", async () => {
    const e = await violationOf((sock) => {
      const h = Buffer.alloc(4);
      h.writeUInt32LE(8 + MAX_PAYLOAD + 1);
      sock.write(h);
    });
    assert.match(e.message, /above maximum/);
  });

  it("length below the header size", async () => {
    const e = await violationOf((sock) => sock.write(Buffer.from([3, 0, 0, 0, 1, 0, 0])));
    assert.match(e.message, /below minimum/);
  });

  it("non-zero reserved bytes", async () => {
    const e = await violationOf((sock) => {
      const f = encodeFrame(MsgType.PONG, 0, 0);
      f.writeUInt16LE(7, 6);
      sock.write(f);
    });
    assert.match(e.message, /reserved/);
  });

  it("a message type the agent may not send", async () => {
    const e = await violationOf((sock, id) => sock.write(encodeFrame(MsgType.EXEC, 0, id)));
    assert.match(e.message, /not allowed/);
  });

  it("a stream the host never opened", async () => {
    const e = await violationOf((sock, id) => sock.write(encodeFrame(MsgType.DATA, 1, id + 100, Buffer.from("x"))));
    assert.match(e.message, /never opened/);
  });

  it("data beyond the flow-control window", async () => {
    const e = await violationOf((sock, id) => {
      const chunk = Buffer.alloc(128 * 1024);
      for (let i = 0; i < INITIAL_WINDOW / chunk.length + 1; i++) sock.write(encodeFrame(MsgType.DATA, 1, id, chunk));
    });
    assert.match(e.message, /window/);
  });

  it("data on a channel an exec does not have", async () => {
    const e = await violationOf((sock, id) => sock.write(encodeFrame(MsgType.DATA, 0, id, Buffer.from("x"))));
    assert.match(e.message, /channel 0/);
  });

  it("a truncated record field", async () => {
    const e = await violationOf((sock, id) => sock.write(encodeFrame(MsgType.EXIT, 0, id, Buffer.from([1, 9, 0, 0, 0, 1]))));
    assert.match(e.message, /runs past|cut short/);
  });

  it("an exit code out of range", async () => {
    const e = await violationOf((sock, id) => sock.write(encodeFrame(MsgType.EXIT, 0, id, new RecordBuilder().i32(Tag.EXIT.exit_code, 999).build())));
    assert.match(e.message, /exit_code 999/);
  });

  it("a PONG that answers no PING", async () => {
    const e = await violationOf((sock) => sock.write(encodeFrame(MsgType.PONG, 0, 0, Buffer.from("nope"))));
    assert.match(e.message, /PONG/);
  });

  it("a file read returning more than asked", async () => {
    const { conn, fatal, server } = await connectTo(async (sock, frames) => {
      const f = (await frames.next()).value as Frame;
      sock.write(encodeFrame(MsgType.DATA, 1, f.stream, Buffer.alloc(20)));
    });
    try {
      const read = conn.readFile(Buffer.from("/x"), 10).catch((e: unknown) => e);
      assert.ok((await fatal) instanceof ProtocolError);
      assert.ok((await read) instanceof ProtocolError);
    } finally {
      server.close();
    }
  });

  it("garbage instead of a HELLO_ACK times out with a typed error, not a crash", async () => {
    const path = join(dir, "garbage.sock");
    const server = createServer((sock) => sock.on("data", () => undefined));
    await new Promise<void>((r) => server.listen(path, r));
    try {
      await assert.rejects(AgentConnection.connect(path, { timeoutMs: 300 }), TimeoutError);
    } finally {
      server.close();
    }
  });
});

describe("agent connection: flow control", () => {
  it("collects output only as it is acknowledged, crediting it in batches of a quarter window", async () => {
    const grants: number[] = [];
    const { conn, server } = await connectTo(async (sock, frames) => {
      const f = (await frames.next()).value as Frame;
      // Fill the window exactly, then wait for credit before sending more.
      sock.write(encodeFrame(MsgType.DATA, 1, f.stream, Buffer.alloc(INITIAL_WINDOW, 1)));
      for (;;) {
        const g = (await frames.next()).value as Frame;
        if (g.type === MsgType.WINDOW && g.flags === 1) {
          grants.push(g.payload.readUInt32LE(0));
          break;
        }
      }
      sock.write(encodeFrame(MsgType.DATA, 1, f.stream, Buffer.alloc(1000, 2)));
      sock.write(encodeFrame(MsgType.EOF, 1, f.stream));
      sock.write(encodeFrame(MsgType.EOF, 2, f.stream));
      sock.write(encodeFrame(MsgType.EXIT, 0, f.stream, new RecordBuilder().i32(Tag.EXIT.exit_code, 0).build()));
    });
    try {
      const s = conn.exec({ argv: [Buffer.from("x")] });
      let got = 0;
      let acked = 0;
      s.onData = (ch, chunk) => {
        got += chunk.length;
        // Acknowledge 64 KiB at a time, each on a later turn of the event loop.
        let left = chunk.length;
        const step = (): void => {
          const k = Math.min(64 * 1024, left);
          left -= k;
          acked += k;
          s.ack(ch, k);
          if (left > 0) setTimeout(step, 2);
        };
        setTimeout(step, 2);
      };
      const exit = await s.exit;
      assert.equal(exit.exitCode, 0);
      assert.equal(got, INITIAL_WINDOW + 1000);
      // Credit went back once a quarter of the window was consumed, not per ack.
      assert.deepEqual(grants, [INITIAL_WINDOW / 4]);
      assert.ok(acked >= INITIAL_WINDOW / 4);
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  it("a short output costs the guest no WINDOW frame", async () => {
    const types: number[] = [];
    let sawSecond!: () => void;
    const second = new Promise<void>((r) => (sawSecond = r));
    let outputTaken!: () => void;
    const taken = new Promise<void>((r) => (outputTaken = r));
    const { conn, server } = await connectTo(async (sock, frames) => {
      for (let execs = 0; ; ) {
        const f = (await frames.next()).value as Frame;
        if (f.type !== MsgType.EXEC) {
          types.push(f.type);
          continue;
        }
        // The second EXEC is sent after the first exec's output was taken:
        // every frame the host sent about that output came before it.
        if (++execs === 2) return sawSecond();
        sock.write(encodeFrame(MsgType.DATA, 1, f.stream, Buffer.from("hi\n")));
        sock.write(encodeFrame(MsgType.DATA, 2, f.stream, Buffer.from("warn\n")));
        // The exit comes later, as a process's does: the host has had its
        // turns to credit the output before the stream ends.
        await taken;
        sock.write(encodeFrame(MsgType.EOF, 1, f.stream));
        sock.write(encodeFrame(MsgType.EOF, 2, f.stream));
        sock.write(encodeFrame(MsgType.EXIT, 0, f.stream, new RecordBuilder().i32(Tag.EXIT.exit_code, 0).build()));
      }
    });
    try {
      const s = conn.exec({ argv: [Buffer.from("echo")] });
      const out: Buffer[] = [];
      s.onData = (ch, chunk) => {
        out.push(Buffer.from(chunk));
        s.ack(ch, chunk.length);
        if (Buffer.concat(out).length === 8) setTimeout(outputTaken, 20);
      };
      assert.equal((await s.exit).exitCode, 0);
      assert.equal(Buffer.concat(out).toString(), "hi\nwarn\n");
      await new Promise((r) => setImmediate(r));
      conn.exec({ argv: [Buffer.from("true")] }).exit.catch(() => undefined);
      await second;
      assert.deepEqual(types.filter((t) => t === MsgType.WINDOW), []);
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  it("stdin writes wait for the guest's window", async () => {
    let received = 0;
    const { conn, server } = await connectTo(async (sock, frames) => {
      const f = (await frames.next()).value as Frame;
      for (;;) {
        const g = (await frames.next()).value as Frame;
        if (g.type === MsgType.DATA) received += g.payload.length;
        if (received >= INITIAL_WINDOW) break;
      }
      // Nothing more may arrive until we grant more.
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(received, INITIAL_WINDOW);
      sock.write(encodeFrame(MsgType.WINDOW, 0, f.stream, Buffer.from(new Uint32Array([INITIAL_WINDOW]).buffer)));
      for (;;) {
        const g = (await frames.next()).value as Frame;
        if (g.type === MsgType.DATA) received += g.payload.length;
        if (g.type === MsgType.EOF) break;
      }
      sock.write(encodeFrame(MsgType.EXIT, 0, f.stream, new RecordBuilder().i32(Tag.EXIT.exit_code, 0).build()));
    });
    try {
      const s = conn.exec({ argv: [Buffer.from("cat")], stdin: true });
      let resolved = false;
      const w = s.writeStdin(Buffer.alloc(INITIAL_WINDOW + 5000)).then(() => (resolved = true));
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(resolved, false, "writeStdin resolved before the guest granted room");
      await w;
      await s.closeStdin();
      await s.exit;
      assert.equal(received, INITIAL_WINDOW + 5000);
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  it("an ERROR reply becomes a typed AgentError with the message", async () => {
    const { conn, server } = await connectTo(async (sock, frames) => {
      const f = (await frames.next()).value as Frame;
      sock.write(encodeFrame(MsgType.ERROR, 0, f.stream, new RecordBuilder().u32(Tag.ERROR.code, 2).bytes(Tag.ERROR.message, "no such thing").build()));
    });
    try {
      await assert.rejects(conn.request(MsgType.WORKLOAD_SIGNAL), (e: unknown) => {
        return e instanceof Error && e.name === "AgentError" && /no such thing/.test(e.message) && (e as { agentCode?: number }).agentCode === 2;
      });
      assert.equal(conn.closed, false, "an ERROR reply does not kill the connection");
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });
});

describe("agent connection: guest text in host errors", () => {
  it("an ERROR message with terminal escapes reaches the host error without them", async () => {
    const { conn, server } = await connectTo(async (sock, frames) => {
      const f = (await frames.next()).value as Frame;
      const msg = "bad\x1b[2J\x1b]0;owned\x07 thing\r\nline two\u202e";
      sock.write(encodeFrame(MsgType.ERROR, 0, f.stream, new RecordBuilder().u32(Tag.ERROR.code, 5).bytes(Tag.ERROR.message, msg).build()));
    });
    try {
      await assert.rejects(conn.request(MsgType.WORKLOAD_SIGNAL), (e: unknown) => {
        assert.ok(e instanceof Error);
        assert.doesNotMatch(e.message, /[\x00-\x08\x0b-\x1f\x7f\u202e]/);
        // Escape sequences go whole (src/guest-text.ts); the text around them stays.
        assert.match(e.message, /bad thing\nline two/);
        return true;
      });
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });
});
