/**
 * Host limits (docs/protocol.md, "Host limits"): whatever a hostile guest
 * sends, the host's memory per VM stays within a budget and every request
 * ends within its deadline. The guest is a real process on a real unix
 * socket (hostile-guest.ts, so its own allocations are not counted); each
 * test states the heap growth it allows, measured after a full GC as
 * V8 heap + ArrayBuffer memory of this (the host) process.
 */

import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { after, before, describe, it } from "node:test";
import { AgentConnection, DEFAULT_AGENT_LIMITS, type AgentDeadlines, type AgentLimits } from "../../src/agent-client/connection.js";
import { ProtocolError, ResourceLimitError, TimeoutError } from "../../src/errors.js";
import { FrameReader, RecordBuilder, encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { DATA_CHUNK, INITIAL_WINDOW, MAGIC, MAX_PAYLOAD, MsgType, Tag } from "../../src/protocol/constants.js";
import { ExecChild } from "../../src/vm/exec-child.js";
import { collectOutput } from "../../src/vm/exec-collect.js";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;
const MiB = 1 << 20;

/** V8 heap + ArrayBuffers after a full collection. */
function retained(): number {
  gc();
  gc();
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

function growthBelow(base: number, boundBytes: number, what: string): void {
  const grown = retained() - base;
  assert.ok(grown < boundBytes, `${what}: host heap grew by ${(grown / MiB).toFixed(1)} MiB, the bound is ${boundBytes / MiB} MiB`);
}

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "sm-limits-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

const guestScript = join(dirname(fileURLToPath(import.meta.url)), "hostile-guest.js");
let n = 0;

interface Guest {
  path: string;
  child: ChildProcess;
  /** Resolves with the first line (from now on or already seen) matching `re`. */
  line(re: RegExp): Promise<string>;
}

async function startGuest(scenario: string, ...args: string[]): Promise<Guest> {
  const path = join(dir, `g${n++}.sock`);
  const child = spawn(process.execPath, [guestScript, path, scenario, ...args], { stdio: ["ignore", "pipe", "inherit"] });
  const lines: string[] = [];
  let waiters: (() => void)[] = [];
  let buf = "";
  child.stdout!.setEncoding("utf8");
  child.stdout!.on("data", (s: string) => {
    buf += s;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
    const w = waiters;
    waiters = [];
    for (const f of w) f();
  });
  const line = async (re: RegExp): Promise<string> => {
    for (;;) {
      const hit = lines.find((l) => re.test(l));
      if (hit !== undefined) return hit;
      const err = lines.find((l) => l.startsWith("error"));
      if (err) throw new Error(`hostile guest: ${err}`);
      if (child.exitCode !== null) throw new Error(`hostile guest exited (${child.exitCode}) before printing ${re}`);
      await new Promise<void>((r) => {
        waiters.push(r);
        setTimeout(r, 200);
      });
    }
  };
  await line(/^listening/);
  return { path, child, line };
}

function stopGuest(g: Guest): void {
  if (g.child.exitCode === null) g.child.kill("SIGKILL");
}

async function connect(g: Guest, limits?: Partial<AgentLimits>, deadlines?: Partial<AgentDeadlines>): Promise<{ conn: AgentConnection; fatal: Promise<Error> }> {
  const conn = await AgentConnection.connect(g.path, { timeoutMs: 10_000, ...(limits ? { limits } : {}), ...(deadlines ? { deadlines } : {}) });
  const fatal = new Promise<Error>((r) => (conn.onFatal = r));
  return { conn, fatal };
}

const argv = [Buffer.from("x")];

describe("host limits: a hostile guest cannot grow host memory", () => {
  it("a guest that never reads its port: WINDOW credit is held, not queued; requests past the write budget end the VM with ResourceLimitError", { timeout: 120_000 }, async () => {
    const streams = 200;
    const frames = 2_000_000;
    const g = await startGuest("noread", String(streams), String(frames));
    const maxWriteBufferBytes = 4 * MiB;
    const { conn, fatal } = await connect(g, { maxWriteBufferBytes });
    try {
      const base = retained();
      let got = 0;
      let maxQueued = 0;
      const execs = Array.from({ length: streams }, () => {
        const s = conn.exec({ argv });
        const c = collectOutput(s, 1 << 30);
        const onData = s.onData;
        s.onData = (ch, chunk) => {
          onData(ch, chunk);
          got += chunk.length;
          maxQueued = Math.max(maxQueued, conn.queuedBytes);
        };
        return { s, c };
      });
      await g.line(/^flooded/);
      const until = Date.now() + 60_000;
      while (got < frames && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
      assert.ok(got >= frames, `received ${got} of ${frames} bytes`);
      maxQueued = Math.max(maxQueued, conn.queuedBytes);
      // Held credit: a high-water mark plus one coalesced flush (≤ one
      // 16-byte WINDOW per stream and channel).
      const queueBound = DEFAULT_AGENT_LIMITS.sendHighWaterBytes + streams * 2 * 16 + 64 * 1024;
      assert.ok(maxQueued <= queueBound, `${maxQueued} bytes queued for a guest that does not read (bound ${queueBound})`);
      assert.equal(conn.closed, false, `legal traffic must not end the VM: ${String(conn.closeReason)}`);
      growthBelow(base, 16 * MiB, `${frames} one-byte frames to a guest that does not read`);

      // Requests keep coming while the guest reads nothing: past the write
      // budget the VM ends with a typed error, and everything pending fails.
      const pad = new RecordBuilder().bytes(99, Buffer.alloc(256 * 1024));
      const pending: Promise<unknown>[] = [];
      for (let i = 0; i < 100 && !conn.closed; i++) pending.push(conn.request(MsgType.WORKLOAD_SIGNAL, pad).catch((e: unknown) => e));
      const err = await fatal;
      assert.ok(err instanceof ResourceLimitError, `expected ResourceLimitError, got ${String(err)}`);
      assert.equal(err.resource, "writeBuffer");
      assert.equal(err.limit, maxWriteBufferBytes);
      assert.match(err.message, /stopped reading/);
      for (const e of await Promise.all(pending)) assert.ok(e instanceof ResourceLimitError);
      for (const { s } of execs) await assert.rejects(s.exit, ResourceLimitError);
      assert.equal(conn.openStreams, 0);
      // The socket's queued writes are freed once its handle has closed.
      await new Promise((r) => setTimeout(r, 100));
      growthBelow(base, 16 * MiB, "after the write budget was hit");
    } finally {
      conn.destroy(new Error("test over"));
      stopGuest(g);
    }
  });

  it("a million 1-byte DATA frames cost their bytes, not a Buffer each (spawn queue, Readable, exec collection)", { timeout: 120_000 }, async () => {
    const count = 1_000_000;
    const g = await startGuest("tiny", String(count));
    const { conn } = await connect(g);
    try {
      let base = retained();
      // spawn(): nobody reads until the process has exited; everything waits
      // in the ExecChild's queue (one window).
      const child = new ExecChild(conn.exec({ argv }), 0);
      await child.wait();
      growthBelow(base, 8 * MiB, "a million 1-byte frames queued for readStdout()");
      let total = 0;
      for (;;) {
        const b = await child.readStdout(MiB);
        if (b.length === 0) break;
        assert.ok(b.every((c) => c === 0x78));
        total += b.length;
      }
      assert.equal(total, count);

      // The same through the Node Readable: coalesced chunks, not a million.
      base = retained();
      const child2 = new ExecChild(conn.exec({ argv }), 0);
      let chunks = 0;
      let bytes = 0;
      const ended = new Promise<void>((r) => child2.stdout.on("end", r));
      await child2.wait();
      growthBelow(base, 8 * MiB, "a million 1-byte frames queued for a Readable");
      child2.stdout.on("data", (b: Buffer) => {
        chunks++;
        bytes += b.length;
      });
      await ended;
      assert.equal(bytes, count);
      assert.ok(chunks < count / 100, `${chunks} Readable chunks for ${count} bytes`);

      // exec(): collected into one growing buffer.
      base = retained();
      const s = conn.exec({ argv });
      const c = collectOutput(s, 16 * MiB);
      const exit = await s.exit;
      assert.equal(exit.exitCode, 0);
      growthBelow(base, 8 * MiB, "a million 1-byte frames collected by exec()");
      const out = c.stdout();
      assert.equal(out.length, count);
      assert.equal(c.overLimit, false);
      assert.equal(conn.closed, false);
    } finally {
      conn.destroy(new Error("test over"));
      stopGuest(g);
    }
  });

  it("a guest that grants itself a 2 GiB window gets at most maxSendWindowBytes; a cumulative overflow is a ProtocolError", { timeout: 60_000 }, async () => {
    const g = await startGuest("grant", "600");
    const { conn, fatal } = await connect(g);
    try {
      const big = Buffer.alloc(64 * MiB, 7);
      const base = retained();
      const s = conn.exec({ argv, stdin: true });
      const w = s.writeStdin(big).then(
        () => "resolved",
        (e: unknown) => e,
      );
      await g.line(/^paused/);
      await new Promise((r) => setTimeout(r, 300));
      const queueBound = DEFAULT_AGENT_LIMITS.sendHighWaterBytes + DATA_CHUNK + 64 * 1024;
      assert.ok(conn.queuedBytes <= queueBound, `${conn.queuedBytes} bytes queued for a guest that does not read (bound ${queueBound})`);
      growthBelow(base, 8 * MiB, "stdin to a guest that granted 2 GiB and does not read");
      const received = Number((await g.line(/^received /)).split(" ")[1]);
      // The host may have used the initial window before the grant arrived;
      // after it, never more than maxSendWindowBytes of credit.
      const cap = INITIAL_WINDOW + DEFAULT_AGENT_LIMITS.maxSendWindowBytes;
      assert.ok(received >= DEFAULT_AGENT_LIMITS.maxSendWindowBytes && received <= cap, `the host sent ${received} bytes against a 2 GiB grant (cap ${cap})`);
      const err = await fatal;
      assert.ok(err instanceof ProtocolError, `expected ProtocolError, got ${String(err)}`);
      assert.match(err.message, /window overflow/);
      assert.ok((await w) instanceof ProtocolError, "the stdin write must fail with the connection");
    } finally {
      conn.destroy(new Error("test over"));
      stopGuest(g);
    }
  });

  it("thousands of streams opened and answered leave nothing behind; past maxStreams a request is refused with ResourceLimitError", { timeout: 120_000 }, async () => {
    const g = await startGuest("streams");
    const { conn } = await connect(g);
    try {
      const base = retained();
      for (let wave = 0; wave < 10; wave++) {
        await Promise.all(Array.from({ length: 1000 }, () => conn.request(MsgType.WORKLOAD_SIGNAL)));
      }
      assert.equal(conn.openStreams, 0);
      assert.equal(conn.closed, false, "late frames for finished streams are dropped, not violations");
      growthBelow(base, 8 * MiB, "10 000 streams");
    } finally {
      conn.destroy(new Error("test over"));
      stopGuest(g);
    }
    const g2 = await startGuest("streams");
    const { conn: c2 } = await connect(g2, { maxStreams: 8 });
    try {
      const first = Array.from({ length: 8 }, () => c2.request(MsgType.WORKLOAD_SIGNAL));
      assert.throws(
        () => c2.request(MsgType.WORKLOAD_SIGNAL),
        (e: unknown) => e instanceof ResourceLimitError && e.resource === "streams" && e.limit === 8 && /wait for some to finish/.test(e.message),
      );
      await Promise.all(first);
      await c2.request(MsgType.WORKLOAD_SIGNAL);
      assert.equal(c2.closed, false, "refusing a request does not end the VM");
    } finally {
      c2.destroy(new Error("test over"));
      stopGuest(g2);
    }
  });
});

// ------------------------------------------------------------ deadlines

/** An in-process agent that answers HELLO and then nothing, recording what it gets. */
async function silentAgent(onFrame: (f: Frame, sock: Socket) => void = () => undefined): Promise<{ path: string; server: Server; got: Frame[] }> {
  const path = join(dir, `s${n++}.sock`);
  const got: Frame[] = [];
  const server = createServer((sock) => {
    const rd = new FrameReader();
    sock.on("error", () => undefined);
    sock.on("data", (b) => {
      for (const f of rd.push(b)) {
        if (f.type === MsgType.HELLO) {
          const ack = new RecordBuilder().bytes(Tag.HELLO_ACK.magic, MAGIC).u32(Tag.HELLO_ACK.version, 1).bytes(Tag.HELLO_ACK.agent_version, "silent").u32(Tag.HELLO_ACK.max_payload, MAX_PAYLOAD);
          sock.write(encodeFrame(MsgType.HELLO_ACK, 0, 0, ack.build()));
          continue;
        }
        got.push({ ...f, payload: Buffer.from(f.payload.subarray(0, 64)) });
        onFrame(f, sock);
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  return { path, server, got };
}

describe("host limits: every request has a deadline", () => {
  it("a guest that answers nothing: each request type rejects with TimeoutError within its deadline, and its stream is cancelled", { timeout: 60_000 }, async () => {
    const { path, server, got } = await silentAgent();
    const ms = 300;
    // TCP_CONNECT's deadline is its own (connectMs), longer than a spawn's.
    const conn = await AgentConnection.connect(path, { timeoutMs: 5000, deadlines: { requestMs: ms, fileMs: ms, startedMs: ms, connectMs: 2 * ms, pingMs: ms } });
    try {
      const base = retained();
      const cases: [string, number, () => Promise<unknown>][] = [
        ["CONFIGURE", ms, () => conn.request(MsgType.CONFIGURE)],
        ["WORKLOAD_START", ms, () => conn.request(MsgType.WORKLOAD_START, new RecordBuilder().bytes(Tag.WORKLOAD_START.argv, "sleep"))],
        ["WORKLOAD_SIGNAL", ms, () => conn.request(MsgType.WORKLOAD_SIGNAL, new RecordBuilder().u32(Tag.WORKLOAD_SIGNAL.signum, 15))],
        ["SNAPSHOT_PREPARE", ms, () => conn.request(MsgType.SNAPSHOT_PREPARE)],
        ["WAIT_LISTEN", 100 + ms, () => conn.waitListen(8080, 100)],
        ["READ_FILE", ms, () => conn.readFile(Buffer.from("/etc/hostname"), 4096)],
        ["WRITE_FILE", ms, () => conn.writeFile(Buffer.from("/tmp/x"), Buffer.from("hello"), 0o644, true)],
        ["spawn's STARTED", ms, () => conn.exec({ argv, stdin: true, reportStarted: true }).started],
        ["TCP_CONNECT's STARTED", 2 * ms, () => conn.tcpConnect(80).connected],
        ["PING", ms, () => conn.ping()],
      ];
      for (const [name, deadline, start] of cases) {
        const t0 = Date.now();
        const e = await start().then(
          () => new Error(`${name} resolved`),
          (err: unknown) => err,
        );
        const took = Date.now() - t0;
        assert.ok(e instanceof TimeoutError, `${name}: expected TimeoutError, got ${String(e)}`);
        assert.equal(e.timeoutMs, deadline, name);
        assert.ok(took >= deadline - 20 && took < deadline + 2000, `${name}: rejected after ${took} ms, deadline ${deadline} ms`);
        assert.equal(conn.closed, false, `${name}: a timeout does not end the connection`);
      }
      assert.equal(conn.openStreams, 0, "timed-out streams are forgotten");
      await new Promise((r) => setTimeout(r, 50));
      const opened = got.filter((f) => f.stream !== 0 && f.type !== MsgType.CANCEL && f.type !== MsgType.DATA && f.type !== MsgType.EOF);
      const cancelled = new Set(got.filter((f) => f.type === MsgType.CANCEL).map((f) => f.stream));
      assert.equal(opened.length, cases.length - 1);
      for (const f of opened) assert.ok(cancelled.has(f.stream), `stream ${f.stream} (type ${f.type}) was not cancelled`);
      growthBelow(base, 8 * MiB, "ten timed-out requests");
    } finally {
      conn.destroy(new Error("test over"));
      server.close();
    }
  });

  it("liveness: a guest that floods output but never answers PING is declared dead", { timeout: 30_000 }, async () => {
    let sent = 0;
    const credit = new Map<number, number>();
    const chunk = Buffer.alloc(64 * 1024, 1);
    const { path, server } = await silentAgent((f, sock) => {
      if (f.type === MsgType.EXEC) {
        credit.set(f.stream, MiB);
        const pump = () => {
          let c = credit.get(f.stream) ?? 0;
          while (c >= chunk.length && !sock.destroyed) {
            sock.write(encodeFrame(MsgType.DATA, 1, f.stream, chunk));
            c -= chunk.length;
            sent += chunk.length;
          }
          credit.set(f.stream, c);
        };
        (sock as Socket & { pump?: () => void }).pump = pump;
        pump();
      } else if (f.type === MsgType.WINDOW && f.flags === 1) {
        credit.set(f.stream, (credit.get(f.stream) ?? 0) + f.payload.readUInt32LE(0));
        (sock as Socket & { pump?: () => void }).pump?.();
      }
      // PING: no answer, ever.
    });
    const conn = await AgentConnection.connect(path, { timeoutMs: 5000 });
    try {
      const s = conn.exec({ argv });
      collectOutput(s, 2 ** 40);
      const t0 = Date.now();
      const dead = await new Promise<Error>((r) => conn.startLiveness(400, r));
      const took = Date.now() - t0;
      assert.match(dead.message, /stopped answering/);
      assert.ok(took < 5000, `declared dead after ${took} ms (liveness timeout 400 ms)`);
      assert.ok(sent > 4 * MiB, `the guest was flooding (${sent} bytes) while it ignored pings`);
    } finally {
      conn.destroy(new Error("test over"));
      server.close();
    }
  });
});
