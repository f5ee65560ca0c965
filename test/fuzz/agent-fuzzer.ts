/**
 * Fuzzer of the host end of the agent protocol: the codec (FrameReader,
 * RecordReader) and the connection (AgentConnection with exec, spawn, file
 * and TCP streams open) fed random and mutated frames seeded from the golden
 * fixtures in protocol/fixtures/. Deterministic for a seed (mulberry32).
 *
 * What counts as a failure: an exception escaping the host code, a
 * connection ended by anything but a typed ProtocolError/ResourceLimitError
 * (or a ProtocolError that wraps a host TypeError/RangeError: a bug hidden
 * as a violation), an unhandled rejection, one input taking more than a
 * second (a hang), more open streams than the cap, or retained heap growing
 * past the stated bound.
 *
 * `npm run fuzz` runs it at full size (test/fuzz/main.ts); the tests run a
 * short version (fuzz.test.ts).
 */

import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { Duplex } from "node:stream";
import { fileURLToPath } from "node:url";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import type { Socket } from "node:net";
import { AgentConnection, type ExecStream, type TcpStream } from "../../src/agent-client/connection.js";
import { ProtocolError, ResourceLimitError } from "../../src/errors.js";
import { DecodeError, FrameReader, RecordBuilder, RecordReader, encodeFrame } from "../../src/protocol/codec.js";
import { MAX_PAYLOAD, MsgType, Tag } from "../../src/protocol/constants.js";
import { collectOutput } from "../../src/vm/exec-collect.js";
import { ExecChild } from "../../src/vm/exec-child.js";

export const FIXTURES_DIR = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "protocol", "fixtures");

export interface FuzzOptions {
  /** PRNG seed (uint32). */
  readonly seed: number;
  /** Inputs to run. */
  readonly inputs: number;
  /** Stop early (reported) after this long. */
  readonly timeBudgetMs: number;
  /** Retained heap growth (V8 heap + ArrayBuffers after GC) allowed. @default 64 MiB */
  readonly heapBoundBytes?: number;
  /** Progress lines. */
  readonly log?: (line: string) => void;
}

export interface FuzzReport {
  seed: number;
  inputs: number;
  codecInputs: number;
  connectionInputs: number;
  /** Frames decoded by the codec target. */
  framesDecoded: number;
  /** Connections ended by a typed ProtocolError (expected: most mutations are violations). */
  protocolErrors: number;
  /** Connections ended by ResourceLimitError. */
  limitErrors: number;
  sessions: number;
  maxHeapGrowthBytes: number;
  elapsedMs: number;
  stoppedByTime: boolean;
  failures: string[];
}

/** mulberry32: small, fast, good enough to drive a fuzzer; the seed makes a run repeatable. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The frame bytes (`hex` lines) of every fixture, valid and `bad-` ones. */
export function fixtureSeeds(dir = FIXTURES_DIR): Buffer[] {
  const out: Buffer[] = [];
  for (const name of readdirSync(dir).sort()) {
    if (!name.endsWith(".frame")) continue;
    const hex = readFileSync(join(dir, name), "utf8")
      .split("\n")
      .map((l) => l.replace(/#.*/, "").trim())
      .filter((l) => l.startsWith("hex "))
      .map((l) => l.slice(4).replace(/\s+/g, ""))
      .join("");
    if (hex) out.push(Buffer.from(hex, "hex"));
  }
  return out;
}

const INTERESTING_U32 = [0, 1, 2, 7, 8, 9, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff, MAX_PAYLOAD, MAX_PAYLOAD + 8, MAX_PAYLOAD + 9];
const AGENT_TYPES = [MsgType.HELLO_ACK, MsgType.PONG, MsgType.STARTED, MsgType.EXIT, MsgType.DATA, MsgType.EOF, MsgType.WINDOW, MsgType.RESET, MsgType.OK, MsgType.ERROR];

class Gen {
  constructor(readonly rnd: () => number) {}
  int(n: number): number {
    return Math.floor(this.rnd() * n);
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)]!;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
  u32(): number {
    return this.rnd() < 0.5 ? this.pick(INTERESTING_U32) : this.int(0x100000000);
  }
}

function u32le(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
}

/** A plausible agent frame for one of the open streams (or the session). */
function plausible(g: Gen, maxStream: number): Buffer {
  const stream = g.rnd() < 0.05 ? 0 : g.rnd() < 0.05 ? maxStream + 1 + g.int(3) : 1 + g.int(maxStream);
  const ch = g.rnd() < 0.8 ? 1 + g.int(2) : g.int(4);
  switch (g.int(11)) {
    case 0:
    case 1:
    case 2:
      return encodeFrame(MsgType.DATA, ch, stream, g.bytes(g.rnd() < 0.7 ? g.int(8) : g.int(4096)));
    case 3:
      return encodeFrame(MsgType.EOF, ch, stream);
    case 4:
      return encodeFrame(MsgType.WINDOW, g.rnd() < 0.8 ? 0 : ch, stream, u32le(g.u32()));
    case 5: {
      const r = new RecordBuilder().i32(Tag.EXIT.exit_code, g.rnd() < 0.7 ? g.int(256) : g.u32() | 0);
      if (g.rnd() < 0.3) r.u32(Tag.EXIT.signal, g.int(70));
      if (g.rnd() < 0.3) r.bool(Tag.EXIT.timed_out, g.rnd() < 0.5);
      if (g.rnd() < 0.3) r.u64(Tag.EXIT.peak_rss_kib, BigInt(g.u32()) * BigInt(g.u32()));
      return encodeFrame(MsgType.EXIT, 0, stream, r.build());
    }
    case 6:
      return encodeFrame(MsgType.STARTED, 0, stream, g.rnd() < 0.8 ? new RecordBuilder().u32(Tag.STARTED.pid, g.u32()).build() : g.bytes(g.int(12)));
    case 7:
      return encodeFrame(MsgType.OK, 0, stream, g.rnd() < 0.5 ? new RecordBuilder().u64(1, BigInt(g.int(5000))).build() : Buffer.alloc(0));
    case 8:
      return encodeFrame(MsgType.ERROR, 0, stream, new RecordBuilder().u32(Tag.ERROR.code, g.int(12)).bytes(Tag.ERROR.message, g.bytes(g.int(64))).build());
    case 9:
      return encodeFrame(MsgType.RESET, 0, stream);
    default:
      return encodeFrame(g.pick(AGENT_TYPES), g.int(256), stream, g.bytes(g.int(32)));
  }
}

/** One mutation of `seed`. */
function mutate(g: Gen, seed: Buffer, maxStream: number): Buffer {
  const b = Buffer.from(seed);
  switch (g.int(10)) {
    case 0: // bit flips
      for (let i = 0, k = 1 + g.int(4); i < k && b.length; i++) b[g.int(b.length)]! ^= 1 << g.int(8);
      return b;
    case 1: // interesting bytes
      for (let i = 0, k = 1 + g.int(3); i < k && b.length; i++) b[g.int(b.length)] = g.pick([0, 1, 0x7f, 0x80, 0xff]);
      return b;
    case 2: // length field
      if (b.length >= 4) b.writeUInt32LE(g.rnd() < 0.5 ? g.pick(INTERESTING_U32) : Math.max(0, b.length - 4 + g.int(5) - 2), 0);
      return b;
    case 3: // type
      if (b.length >= 5) b[4] = g.rnd() < 0.7 ? g.pick(AGENT_TYPES) : g.int(256);
      return b;
    case 4: // stream id
      if (b.length >= 12) b.writeUInt32LE(g.rnd() < 0.8 ? g.int(maxStream + 3) : g.u32(), 8);
      return b;
    case 5: // an interesting u32 somewhere in the payload (field lengths, WINDOW increments)
      if (b.length >= 16) b.writeUInt32LE(g.pick(INTERESTING_U32), 12 + g.int(b.length - 15));
      return b;
    case 6: // truncate
      return b.subarray(0, g.int(b.length + 1));
    case 7: // extend
      return Buffer.concat([b, g.bytes(g.int(16))]);
    case 8: // flags / reserved
      if (b.length >= 8) {
        if (g.rnd() < 0.7) b[5] = g.int(4);
        else b.writeUInt16LE(g.int(3), 6);
      }
      return b;
    default:
      return g.bytes(g.int(48));
  }
}

/** A host connection over an in-memory duplex, with one stream of each kind open (ids 1..STREAMS). */
const STREAMS = 6;

class Session {
  readonly conn: AgentConnection;
  private readonly sock: Duplex;
  readonly pending: Promise<unknown>[] = [];
  constructor(g: Gen) {
    this.sock = new Duplex({
      read() {},
      write(_chunk, _enc, cb) {
        cb();
      },
    });
    this.conn = AgentConnection._overStream(this.sock as unknown as Socket, { limits: { maxStreams: 64 }, deadlines: { requestMs: 0, fileMs: 0, startedMs: 0, connectMs: 0, pingMs: 0 } });
    const c = this.conn;
    const keep = (p: Promise<unknown>) => this.pending.push(p.catch(() => undefined));
    const e1: ExecStream = c.exec({ argv: [Buffer.from("x")] });
    collectOutput(e1, 64 * 1024);
    keep(e1.exit);
    const e2: ExecStream = c.exec({ argv: [Buffer.from("y")], stdin: true, reportStarted: true });
    const child = new ExecChild(e2, 1);
    keep(child.wait());
    keep(child.readStdout(16));
    keep(e2.writeStdin(g.bytes(g.int(8192))));
    keep(c.request(MsgType.CONFIGURE));
    keep(c.readFile(Buffer.from("/f"), 4096));
    keep(c.writeFile(Buffer.from("/w"), g.bytes(g.int(4096)), 0o644, true));
    const t: TcpStream = c.tcpConnect(80);
    t.onData = (chunk) => t.ack(chunk.length);
    keep(t.ended);
    keep(t.write(g.bytes(g.int(2048))));
    keep(c.ping());
  }
  feed(g: Gen, bytes: Buffer): void {
    // Random chunking: whole, in pieces, or byte by byte.
    const mode = g.int(4);
    if (mode === 0 || bytes.length < 2) this.conn._receive(bytes);
    else if (mode === 3 && bytes.length < 64) for (let i = 0; i < bytes.length; i++) this.conn._receive(bytes.subarray(i, i + 1));
    else {
      let off = 0;
      while (off < bytes.length) {
        const n = 1 + g.int(bytes.length - off);
        this.conn._receive(bytes.subarray(off, off + n));
        off += n;
      }
    }
  }
  end(): void {
    this.conn.destroy(new Error("session over"));
  }
}

function codecInput(g: Gen, bytes: Buffer, report: FuzzReport): void {
  const rd = new FrameReader();
  try {
    let off = 0;
    while (off < bytes.length) {
      const n = 1 + g.int(bytes.length - off);
      for (const f of rd.push(bytes.subarray(off, off + n))) {
        report.framesDecoded++;
        try {
          const r = new RecordReader(f.payload);
          for (let i = 0; i < 4; i++) {
            const tag = g.int(10);
            r.bytes(tag);
            r.all(tag, 8);
            r.str(tag, 64);
            try {
              r.u32(tag);
            } catch (e) {
              if (!(e instanceof DecodeError)) throw e;
            }
            try {
              r.i32(tag);
            } catch (e) {
              if (!(e instanceof DecodeError)) throw e;
            }
            try {
              r.u64(tag);
            } catch (e) {
              if (!(e instanceof DecodeError)) throw e;
            }
            try {
              r.bool(tag);
            } catch (e) {
              if (!(e instanceof DecodeError)) throw e;
            }
          }
        } catch (e) {
          if (!(e instanceof DecodeError)) throw e;
        }
      }
      off += n;
    }
    if (rd.pending > 12 + MAX_PAYLOAD) throw new Error(`FrameReader holds ${rd.pending} bytes`);
  } catch (e) {
    if (!(e instanceof DecodeError)) throw e;
  }
}

let gcFn: (() => void) | undefined;
function retained(): number {
  if (!gcFn) {
    setFlagsFromString("--expose-gc");
    gcFn = runInNewContext("gc") as () => void;
  }
  gcFn();
  gcFn();
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

/** Runs the fuzzer; never throws for a finding: failures are in the report. */
export async function runFuzz(o: FuzzOptions): Promise<FuzzReport> {
  const g = new Gen(prng(o.seed));
  const seeds = fixtureSeeds();
  if (seeds.length === 0) throw new Error(`no fixtures in ${FIXTURES_DIR}`);
  const heapBound = o.heapBoundBytes ?? 64 << 20;
  const report: FuzzReport = {
    seed: o.seed,
    inputs: 0,
    codecInputs: 0,
    connectionInputs: 0,
    framesDecoded: 0,
    protocolErrors: 0,
    limitErrors: 0,
    sessions: 0,
    maxHeapGrowthBytes: 0,
    elapsedMs: 0,
    stoppedByTime: false,
    failures: [],
  };
  const fail = (what: string, input?: Buffer) => {
    if (report.failures.length < 20) report.failures.push(`input ${report.inputs}: ${what}${input ? ` (input ${input.subarray(0, 96).toString("hex")})` : ""}`);
  };
  const onUnhandled = (e: unknown) => fail(`unhandled rejection: ${String(e)}`);
  const onUncaught = (e: unknown) => fail(`uncaught exception: ${String(e)}`);
  process.on("unhandledRejection", onUnhandled);
  process.on("uncaughtException", onUncaught);
  const t0 = Date.now();
  const base = retained();
  let session: Session | undefined;
  let sessionInputs = 0;
  const closeSession = () => {
    if (!session) return;
    const reason = session.conn.closeReason;
    if (reason) {
      if (reason instanceof ResourceLimitError) report.limitErrors++;
      else if (reason instanceof ProtocolError) {
        report.protocolErrors++;
        if (/bad frame: (TypeError|RangeError|ReferenceError)/.test(reason.message)) fail(`host bug reported as a violation: ${reason.message}`);
      } else if (reason.message !== "session over") fail(`connection ended by an untyped error: ${String(reason)}`);
    }
    session.end();
    session = undefined;
  };
  try {
    for (let i = 0; i < o.inputs; i++) {
      if (report.failures.length >= 20) break;
      if ((i & 1023) === 0) {
        if (Date.now() - t0 > o.timeBudgetMs) {
          report.stoppedByTime = true;
          break;
        }
        // Let queued ticks run: credit flushes, promise settlements.
        await new Promise((r) => setImmediate(r));
      }
      if (i > 0 && i % 50_000 === 0) {
        const grown = retained() - base;
        report.maxHeapGrowthBytes = Math.max(report.maxHeapGrowthBytes, grown);
        if (grown > heapBound) fail(`retained heap grew by ${grown} bytes (bound ${heapBound})`);
        o.log?.(`${i} inputs, ${((Date.now() - t0) / 1000).toFixed(1)} s, heap +${(grown / (1 << 20)).toFixed(1)} MiB, ${report.protocolErrors} protocol errors`);
      }
      report.inputs++;
      const started = Date.now();
      const bytes =
        g.rnd() < 0.3
          ? Buffer.concat(Array.from({ length: 1 + g.int(3) }, () => mutate(g, g.rnd() < 0.5 ? g.pick(seeds) : plausible(g, STREAMS), STREAMS)))
          : g.rnd() < 0.6
            ? plausible(g, STREAMS)
            : mutate(g, g.pick(seeds), STREAMS);
      try {
        if (g.rnd() < 0.35) {
          report.codecInputs++;
          codecInput(g, bytes, report);
        } else {
          report.connectionInputs++;
          if (!session || session.conn.closed || sessionInputs > 300) {
            closeSession();
            session = new Session(g);
            report.sessions++;
            sessionInputs = 0;
          }
          sessionInputs++;
          session.feed(g, bytes);
          if (session.conn.openStreams > session.conn.limits.maxStreams) fail(`${session.conn.openStreams} streams open`, bytes);
          if (session.conn.closed) closeSession();
        }
      } catch (e) {
        fail(`exception escaped: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`, bytes);
      }
      const took = Date.now() - started;
      if (took > 1000) fail(`one input took ${took} ms`, bytes);
    }
    closeSession();
    await new Promise((r) => setImmediate(r));
    const grown = retained() - base;
    report.maxHeapGrowthBytes = Math.max(report.maxHeapGrowthBytes, grown);
    if (grown > heapBound) fail(`retained heap grew by ${grown} bytes (bound ${heapBound})`);
  } finally {
    process.off("unhandledRejection", onUnhandled);
    process.off("uncaughtException", onUncaught);
    report.elapsedMs = Date.now() - t0;
  }
  return report;
}
