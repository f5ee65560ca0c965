/**
 * The host side of the log stream against a fake (hostile) agent on a unix
 * socket: LOG frames with bad fields are protocol errors; a flood of one-byte chunks keeps the host's ring within its
 * budget, and every reader learns how much it lost; readers end with the
 * connection.
 */

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import type { Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { AgentConnection } from "../../src/agent-client/connection.js";
import { ProtocolError } from "../../src/errors.js";
import { RecordBuilder, encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { INITIAL_WINDOW, MsgType, Tag } from "../../src/protocol/constants.js";
import { type LogEntry, LogRing } from "../../src/vm/logs.js";
import { listenFakeAgent } from "../agent-client/fake-agent.js";

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "sm-logs-host-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
/** A fake agent that runs `answer` with the LOGS stream id once the host opens it. */
async function withAgent(answer: (sock: Socket, stream: number, next: () => Promise<Frame>) => Promise<void> | void): Promise<{ conn: AgentConnection; fatal: Promise<Error>; server: Server }> {
  const path = join(dir, `a${n++}.sock`);
  const server = await listenFakeAgent(path, async (sock, next) => {
    for (;;) {
      const f = await next();
      if (f.type === MsgType.LOGS) {
        await answer(sock, f.stream, next);
        return;
      }
    }
  });
  const conn = await AgentConnection.connect(path, { timeoutMs: 5000 });
  const fatal = new Promise<Error>((r) => (conn.onFatal = r));
  return { conn, fatal, server };
}

function log(stream: number, pid: number, channel: number, data: Buffer, dropped?: number): Buffer {
  const r = new RecordBuilder().u32(Tag.LOG.pid, pid).u32(Tag.LOG.channel, channel).bytes(Tag.LOG.data, data);
  if (dropped !== undefined) r.u64(Tag.LOG.dropped, BigInt(dropped));
  return encodeFrame(MsgType.LOG, 0, stream, r.build());
}

describe("log stream: hostile guest", () => {
  it("LOG on channel 0, or without data, is a protocol error", async () => {
    for (const bad of [
      (s: number) => log(s, 1, 0, Buffer.from("x")),
      (s: number) => encodeFrame(MsgType.LOG, 0, s, new RecordBuilder().u32(Tag.LOG.pid, 1).u32(Tag.LOG.channel, 1).build()),
    ]) {
      const { conn, fatal, server } = await withAgent((sock, stream) => void sock.write(bad(stream)));
      try {
        const ring = new LogRing(conn.logs());
        assert.ok((await fatal) instanceof ProtocolError);
        assert.ok(ring.done, "the ring ended with the connection");
      } finally {
        conn.destroy(new Error("done"));
        server.close();
      }
    }
  });

  it("a flood of one-byte chunks stays within the ring's budget; data plus droppedBytes add up; readers end with the connection", async () => {
    const total = 200_000;
    const { conn, server } = await withAgent(async (sock, stream, next) => {
      // Honour the window: count the host's credit.
      let credit = INITIAL_WINDOW;
      let sent = 0;
      const one = Buffer.from("z");
      const pending = (async () => {
        for (;;) {
          const f = await next().catch(() => undefined);
          if (!f) return;
          if (f.type === MsgType.WINDOW && f.stream === stream) credit += f.payload.readUInt32LE(0);
        }
      })();
      while (sent < total) {
        if (credit === 0) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        const batch: Buffer[] = [];
        while (credit > 0 && sent < total && batch.length < 1000) {
          batch.push(log(stream, 42, 1 + (sent % 2), one, sent === 1000 ? 5 : undefined));
          credit--;
          sent++;
        }
        await new Promise<void>((r) => sock.write(Buffer.concat(batch), () => r()));
      }
      sock.write(log(stream, 42, 2, Buffer.from("end")));
      void pending;
    });
    try {
      const ring = new LogRing(conn.logs(), 64 * 1024);
      const reader = ring.reader();
      let data = 0;
      let dropped = 0;
      let maxHeld = 0;
      // Read slowly at first: let the ring overflow.
      await new Promise((r) => setTimeout(r, 500));
      for await (const item of reader.iterator({ destroyOnReturn: false })) {
        const e = item as LogEntry;
        maxHeld = Math.max(maxHeld, ring.heldBytes);
        assert.equal(e.pid, 42);
        dropped += e.droppedBytes;
        if (e.data.toString() === "end") break;
        data += e.data.length;
      }
      assert.equal(data + dropped, total + 5, "every byte is delivered or counted (5: the agent's own drop report)");
      assert.ok(dropped > 0, "the reader fell behind and was told");
      // 64 KiB at 1 + 128 bytes an entry: at most 508 entries (the last one, "end", has 3 bytes).
      assert.ok(maxHeld <= 510, `the ring held ${maxHeld} bytes in one-byte entries, over its budget`);
      conn.destroy(new Error("done"));
      const rest: unknown[] = [];
      for await (const e of reader) rest.push(e);
      assert.ok(reader.readableEnded, "the reader ends with the connection");
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });
});
