/**
 * The host end of the agent protocol (docs/protocol.md): one unix socket,
 * many multiplexed streams, credit-based flow control both ways.
 *
 * Everything read from the socket comes from the guest and is hostile. Each
 * frame is checked (type allowed for the stream, stream id ever opened, data
 * within the window we granted, sizes); any violation destroys the connection
 * with a ProtocolError, and the VM owning it is killed by its owner. No guest
 * input can make this class buffer more than what the host asked for: the
 * memory it holds per VM is bounded by {@link AgentLimits} (docs/protocol.md,
 * "Host limits"), and every request has a deadline ({@link AgentDeadlines}).
 */

import { randomBytes } from "node:crypto";
import { connect, type Socket } from "node:net";
import { deferred, type Deferred } from "../deferred.js";
import { AgentError, ClosedError, ProtocolError, ResourceLimitError, TimeoutError } from "../errors.js";
import { ByteQueue } from "./byte-queue.js";
import { RING_MAX_REGION_BYTES, RING_MIN_REGION_BYTES, type StreamRing } from "./ring.js";
import { guestText } from "../guest-text.js";
import { DecodeError, FrameReader, RecordBuilder, RecordReader, encodeFrame, type Frame } from "../protocol/codec.js";
import {
  Channel,
  DATA_CHUNK,
  FuseFlags,
  INITIAL_WINDOW,
  MAGIC,
  MAX_PAYLOAD,
  MsgType,
  PROTOCOL_VERSION,
  Tag,
  typeName,
  WireError,
} from "../protocol/constants.js";

export const HOST_VERSION = "0.1.0";

/**
 * The memory budget of one agent connection (docs/protocol.md, "Host
 * limits"). Guest output is bounded by the flow-control window the host
 * grants (INITIAL_WINDOW per channel, credited only as it is consumed); these
 * bound what the guest could otherwise make the host queue.
 */
export interface AgentLimits {
  /**
   * Host-opened streams (exec, spawn, file transfers, TCP connections,
   * requests) in flight at once; one more is refused with ResourceLimitError.
   * @default 1024
   */
  readonly maxStreams: number;
  /**
   * Unread bytes queued on the channel to the guest above which the host
   * holds flow-controlled data (stdin, file and TCP bytes) and coalesces its
   * WINDOW credits until the guest reads. @default 1048576 (1 MiB)
   */
  readonly sendHighWaterBytes: number;
  /**
   * Unread bytes queued on the channel to the guest at which the VM is ended
   * with ResourceLimitError (the guest stopped reading its port while
   * requests kept coming). @default 16777216 (16 MiB)
   */
  readonly maxWriteBufferBytes: number;
  /**
   * Credit the host uses on one channel, whatever the guest grants: a guest
   * that grants itself a 2 GiB window still gets at most this much
   * unacknowledged data from the host. @default 4194304 (4 MiB)
   */
  readonly maxSendWindowBytes: number;
}

export const DEFAULT_AGENT_LIMITS: AgentLimits = Object.freeze({
  maxStreams: 1024,
  sendHighWaterBytes: 1 << 20,
  maxWriteBufferBytes: 16 << 20,
  maxSendWindowBytes: 4 << 20,
});

/**
 * How long the host waits for the agent's answer to each kind of request
 * before it rejects with TimeoutError (and abandons the stream with CANCEL).
 * `SUPERMACHINE_REQUEST_TIMEOUT_MS` overrides requestMs, startedMs,
 * connectMs and pingMs, and sets fileMs to twice its value.
 */
export interface AgentDeadlines {
  /**
   * CONFIGURE, WORKLOAD_START, WORKLOAD_SIGNAL, SNAPSHOT_PREPARE and any other
   * request answered by OK/ERROR; WAIT_LISTEN gets its own timeout plus this.
   * @default 60000
   */
  readonly requestMs: number;
  /** READ_FILE and WRITE_FILE, from the request to the final OK. @default 120000 */
  readonly fileMs: number;
  /** STARTED of a spawned process. @default 60000 */
  readonly startedMs: number;
  /**
   * STARTED of a TCP_CONNECT: the guest kernel's connect, which waits out a
   * busy listener's full backlog with SYN retransmits (1, 3, 7 ... 63 s) and
   * gives up by itself after ≈ 127 s (Linux's default `tcp_syn_retries`).
   * Longer than that, so a connection through a forwarder fails when the
   * guest's own connect would, not before. @default 150000
   */
  readonly connectMs: number;
  /** An explicit ping() (liveness pings have their own timeout). @default 30000 */
  readonly pingMs: number;
}

/** The default deadlines, with SUPERMACHINE_REQUEST_TIMEOUT_MS applied. */
export function defaultDeadlines(): AgentDeadlines {
  const v = Number(process.env.SUPERMACHINE_REQUEST_TIMEOUT_MS);
  if (Number.isInteger(v) && v > 0) return { requestMs: v, fileMs: 2 * v, startedMs: v, connectMs: v, pingMs: v };
  return { requestMs: 60_000, fileMs: 120_000, startedMs: 60_000, connectMs: 150_000, pingMs: 30_000 };
}

const DEADLINE_HINT = "the guest agent is not answering (raise SUPERMACHINE_REQUEST_TIMEOUT_MS if the guest is only slow)";

export interface HelloInfo {
  protocolVersion: number;
  agentVersion: string;
  features: string[];
  maxPayload: number;
  bootError?: string;
}

export interface ExitInfo {
  exitCode: number;
  signal: number | null;
  timedOut: boolean;
  peakRssKib: number | null;
}


/** Bytes of one output channel, as the guest sent them. */
export type OutputChannel = typeof Channel.STDOUT | typeof Channel.STDERR;

abstract class StreamBase {
  done = false;
  /** A long-lived stream (a mount) that must not keep the event loop alive. */
  readonly background: boolean = false;
  private deadline: NodeJS.Timeout | undefined;
  constructor(
    readonly conn: AgentConnection,
    readonly id: number,
  ) {}
  /** Handles a frame from the guest; returns a violation message or undefined. */
  abstract onFrame(f: Frame): string | undefined;
  /** The connection died (or the stream was abandoned): reject what is pending. */
  abstract fail(err: Error): void;
  protected finish(): void {
    this.done = true;
    this.clearDeadline();
    this.conn._release(this.id);
  }

  /**
   * Rejects with TimeoutError and abandons the stream unless
   * {@link clearDeadline} runs within `ms`.
   */
  armDeadline(ms: number, what: string): void {
    this.clearDeadline();
    if (!(ms > 0) || !Number.isFinite(ms)) return;
    this.deadline = setTimeout(() => {
      this.deadline = undefined;
      this.abandon(new TimeoutError(`${what}: no answer within ${ms} ms; ${DEADLINE_HINT}`, ms));
    }, ms);
  }

  clearDeadline(): void {
    if (this.deadline) clearTimeout(this.deadline);
    this.deadline = undefined;
  }

  /**
   * Gives the stream up: asks the agent to cancel it, forgets it (late frames
   * for it are dropped) and fails what is pending with `err`.
   */
  abandon(err: Error): void {
    if (this.done) return;
    this.conn._send(MsgType.CANCEL, 0, this.id);
    this.finish();
    this.fail(err);
  }
}

/**
 * Flow-controlled sender on channel 0 (host → guest). `credit` is what the
 * host will still send unacknowledged: the guest's grants, clipped to
 * limits.maxSendWindowBytes; `outstanding` is the unclipped sum, only to
 * tell a cumulative overflow (a protocol error).
 */
class Sender {
  credit = INITIAL_WINDOW;
  private outstanding = INITIAL_WINDOW;
  /** Bytes sent and not credited back yet (credit + inFlight is the window the guest grants). */
  inFlight = 0;
  private waiters: (() => void)[] = [];
  private chain: Promise<void> = Promise.resolve();
  failed: Error | undefined;
  closed = false;

  constructor(
    private conn: AgentConnection,
    private id: number,
  ) {}

  grant(n: number): string | undefined {
    // Credits add up; more than 4 GiB outstanding is no window a guest could
    // mean. The host uses at most maxSendWindowBytes of it (doWrite).
    if (this.outstanding + n > 0xffffffff) return `window overflow (outstanding credit ${this.outstanding} + ${n} is over 4 GiB)`;
    this.outstanding += n;
    this.inFlight = Math.max(0, this.inFlight - n);
    this.credit = Math.min(this.credit + n, Math.max(INITIAL_WINDOW, this.conn.limits.maxSendWindowBytes));
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
    this.onGrant();
    return undefined;
  }

  /** Called after each grant from the guest. */
  onGrant: () => void = () => undefined;

  fail(e: Error): void {
    this.failed = e;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Queues bytes; resolves when the guest has room for all of them. */
  write(data: Uint8Array): Promise<void> {
    const next = this.chain.then(() => this.doWrite(data));
    this.chain = next.catch(() => undefined);
    return next;
  }

  end(): Promise<void> {
    const next = this.chain.then(() => {
      if (this.failed) throw this.failed;
      if (this.closed) return;
      this.closed = true;
      this.conn._send(MsgType.EOF, Channel.STDIN, this.id);
    });
    this.chain = next.catch(() => undefined);
    return next;
  }

  private async doWrite(data: Uint8Array): Promise<void> {
    let off = 0;
    while (off < data.length) {
      if (this.failed) throw this.failed;
      if (this.closed) throw new ClosedError("stdin was already closed");
      // With the stream ring, a large write waits for the credit of the
      // smallest region instead of trickling out in small frames (the window is at
      // least 1 MiB, so that credit always comes once the guest reads). When
      // the window holds two of the largest regions (the agent grants TCP
      // connections that), it waits for a whole one: one region is in flight
      // while the next waits, and none goes out in halves.
      const ringMin = this.conn._ringMin;
      const left = data.length - off;
      const twoRegions = ringMin > 0 && this.credit + this.inFlight >= 2 * this.conn._dataChunk;
      const need = twoRegions ? Math.min(left, this.conn._dataChunk) : left >= ringMin ? ringMin : 0;
      if (this.credit === 0 || (ringMin > 0 && need >= ringMin && this.credit < need)) {
        await new Promise<void>((r) => this.waiters.push(r));
        continue;
      }
      // The guest is not reading the channel: wait instead of queueing.
      if (!this.conn._writable()) {
        await this.conn._whenWritable();
        continue;
      }
      const n = Math.min(this.credit, this.conn._dataChunk, data.length - off);
      this.conn._sendData(Channel.STDIN, this.id, data.subarray(off, off + n));
      this.credit -= n;
      this.outstanding -= n;
      this.inFlight += n;
      off += n;
    }
    if (this.failed) throw this.failed;
  }
}

/**
 * Consumed bytes of one channel are credited back to the guest once they
 * reach this much (a quarter of the window): the guest always keeps at least
 * three quarters of its window, and a short output (most execs) costs the
 * guest no WINDOW frame, so no wakeup.
 */
const CREDIT_BATCH = INITIAL_WINDOW / 4;

/** Receiver accounting for one guest → host channel. */
class Receiver {
  /** Bytes the guest may still send (granted minus received). */
  allowed = INITIAL_WINDOW;
  eof = false;
  received = 0;
  /** Bytes credited back to the guest. */
  credited = 0;

  /** Credits up to `n` consumed bytes (never more than were received); returns the amount. */
  credit(n: number): number {
    const c = Math.min(n, this.received - this.credited);
    if (c <= 0) return 0;
    this.credited += c;
    this.allowed += c;
    return c;
  }

  take(n: number): string | undefined {
    if (this.eof) return "data after EOF";
    if (n > this.allowed) return `data beyond the flow-control window (${n} > ${this.allowed})`;
    this.allowed -= n;
    this.received += n;
    return undefined;
  }
}

export interface ExecRequest {
  argv: readonly Uint8Array[];
  env?: readonly Uint8Array[];
  cwd?: Uint8Array;
  timeoutMs?: number;
  tty?: { cols: number; rows: number };
  chain?: readonly Uint8Array[];
  stdin?: boolean;
  user?: string;
  reportStarted?: boolean;
  /** Own cgroup for the tree (exact kill, tree memory.peak). @default the agent's (true) */
  cgroup?: boolean;
}

/**
 * A process in the guest. Output arrives through `onData`; the consumer
 * credits what it has consumed with {@link ack} (collect mode acks at once).
 * The chunk given to `onData` is a view into the connection's read buffer,
 * valid only during the call: copy it (into one growing buffer, not an array
 * of chunks, see ByteQueue) to keep it.
 */
export class ExecStream extends StreamBase {
  readonly exit: Promise<ExitInfo>;
  readonly started: Promise<number>;
  onData: (ch: OutputChannel, chunk: Buffer) => void = () => undefined;
  onEof: (ch: OutputChannel) => void = () => undefined;
  private out = { 1: new Receiver(), 2: new Receiver() };
  private stdin: Sender;
  private readonly exitD = deferred<ExitInfo>();
  private readonly startedD = deferred<number>();
  private detachError: Error | undefined;

  constructor(conn: AgentConnection, id: number) {
    super(conn, id);
    this.stdin = new Sender(conn, id);
    this.exit = this.exitD.promise;
    this.started = this.startedD.promise;
  }

  onFrame(f: Frame): string | undefined {
    switch (f.type) {
      case MsgType.STARTED: {
        const r = new RecordReader(f.payload);
        const pid = r.u32(Tag.STARTED.pid);
        if (pid === undefined) return "STARTED without pid";
        this.clearDeadline();
        this.startedD.resolve(pid);
        return undefined;
      }
      case MsgType.DATA: {
        if (f.flags !== 1 && f.flags !== 2) return `DATA on channel ${f.flags} of an exec`;
        const ch = f.flags as OutputChannel;
        const bad = this.out[ch].take(f.payload.length);
        if (bad) return bad;
        // A view: the consumer copies what it keeps (no Buffer per frame).
        if (f.payload.length) this.onData(ch, f.payload);
        return undefined;
      }
      case MsgType.EOF: {
        if (f.flags !== 1 && f.flags !== 2) return `EOF on channel ${f.flags} of an exec`;
        const ch = f.flags as OutputChannel;
        if (this.out[ch].eof) return "EOF twice";
        this.out[ch].eof = true;
        this.onEof(ch);
        return undefined;
      }
      case MsgType.WINDOW: {
        if (f.flags !== 0 || f.payload.length !== 4) return "bad WINDOW";
        return this.stdin.grant(f.payload.readUInt32LE(0));
      }
      case MsgType.EXIT: {
        const r = new RecordReader(f.payload);
        const exitCode = r.i32(Tag.EXIT.exit_code);
        if (exitCode === undefined) return "EXIT without exit_code";
        if (exitCode < -1 || exitCode > 255) return `EXIT with exit_code ${exitCode}`;
        const signal = r.u32(Tag.EXIT.signal);
        if (signal !== undefined && signal > 64) return `EXIT with signal ${signal}`;
        const peak = r.u64(Tag.EXIT.peak_rss_kib);
        for (const ch of [1, 2] as const) {
          if (!this.out[ch].eof) {
            this.out[ch].eof = true;
            this.onEof(ch);
          }
        }
        this.finish();
        this.stdin.fail(new ClosedError("the process has exited"));
        this.startedD.reject(new ClosedError("the process exited before reporting its pid"));
        this.exitD.resolve({
          exitCode,
          signal: signal ?? null,
          timedOut: r.bool(Tag.EXIT.timed_out) ?? false,
          peakRssKib: peak === undefined ? null : Number(peak > 0xffffffffffffn ? 0xffffffffffffn : peak),
        });
        return undefined;
      }
      case MsgType.OK: {
        if (!this.detachError) return "OK on an exec stream that was not detached";
        for (const ch of [1, 2] as const) {
          if (!this.out[ch].eof) {
            this.out[ch].eof = true;
            this.onEof(ch);
          }
        }
        this.finish();
        this.fail(this.detachError);
        return undefined;
      }
      case MsgType.ERROR: {
        const e = agentErrorFrom(f.payload);
        this.finish();
        this.fail(e);
        return undefined;
      }
      default:
        return `${typeName(f.type) ?? f.type} on an exec stream`;
    }
  }

  fail(err: Error): void {
    this.stdin.fail(err);
    this.startedD.reject(err);
    this.exitD.reject(err);
  }

  /** Credits `n` consumed bytes of `ch` back to the guest (coalesced into WINDOW frames). */
  ack(ch: OutputChannel, n: number): void {
    if (this.done || n <= 0) return;
    this.conn._credit(this.id, ch, this.out[ch].credit(n));
  }

  /** Bytes received so far on a channel. */
  received(ch: OutputChannel): number {
    return this.out[ch].received;
  }

  writeStdin(data: Uint8Array): Promise<void> {
    if (this.done) return Promise.reject(new ClosedError("the process has exited"));
    return this.stdin.write(data);
  }

  closeStdin(): Promise<void> {
    if (this.done) return Promise.resolve();
    return this.stdin.end();
  }

  signal(signum: number): void {
    if (this.done) return;
    this.conn._send(MsgType.SIGNAL, 0, this.id, new RecordBuilder().u32(Tag.SIGNAL.signum, signum).build());
  }

  resize(cols: number, rows: number): void {
    if (this.done) return;
    this.conn._send(MsgType.RESIZE, 0, this.id, new RecordBuilder().u32(Tag.RESIZE.cols, cols).u32(Tag.RESIZE.rows, rows).build());
  }

  /**
   * DETACH: stops reading the process, which keeps running; its output goes
   * to the session's log stream from now on. The stream ends (with OK);
   * what is pending fails with `err`.
   */
  detach(err: Error): void {
    if (this.done) return;
    this.detachError = err;
    this.conn._send(MsgType.DETACH, 0, this.id);
  }

  /** Kills the process tree; the stream still ends with EXIT. */
  cancel(): void {
    if (this.done) return;
    this.conn._send(MsgType.CANCEL, 0, this.id);
  }
}

/**
 * A stream driven by a bring-your-own client through the exec proxy
 * (src/vm/exec-proxy.ts). Frames from the agent are handed to `forward` as
 * they are, after the checks the host owes the guest: frame types allowed on
 * a stream, and DATA within the windows the client granted (so what the
 * proxy buffers for its client is bounded by the client's own grants).
 */
export class RawStream extends StreamBase {
  /** Bytes the guest may still send on channels 1 and 2. */
  private allowed = [0, INITIAL_WINDOW, INITIAL_WINDOW];
  /** Bytes the client may still send on channel 0 (the agent's grants). */
  credit = INITIAL_WINDOW;

  constructor(
    conn: AgentConnection,
    id: number,
    private forward: (f: Frame) => void,
    private onEnd: (err?: Error) => void,
  ) {
    super(conn, id);
  }

  onFrame(f: Frame): string | undefined {
    switch (f.type) {
      case MsgType.STARTED:
        break;
      case MsgType.DATA: {
        if (f.flags !== 1 && f.flags !== 2) return `DATA on channel ${f.flags} from the agent`;
        if (f.payload.length > this.allowed[f.flags]!) return `data beyond the flow-control window (${f.payload.length} > ${this.allowed[f.flags]})`;
        this.allowed[f.flags]! -= f.payload.length;
        break;
      }
      case MsgType.EOF:
        if (f.flags !== 1 && f.flags !== 2) return `EOF on channel ${f.flags} from the agent`;
        break;
      case MsgType.WINDOW: {
        if (f.flags !== 0 || f.payload.length !== 4) return "bad WINDOW";
        const n = f.payload.readUInt32LE(0);
        if (this.credit + n > 0x7fffffff) return "window overflow";
        this.credit += n;
        break;
      }
      case MsgType.EXIT:
      case MsgType.OK:
      case MsgType.ERROR:
      case MsgType.RESET:
        this.finish();
        this.forward(f);
        this.onEnd();
        return undefined;
      default:
        return `${typeName(f.type) ?? f.type} on a stream`;
    }
    this.forward(f);
    return undefined;
  }

  fail(err: Error): void {
    this.onEnd(err);
  }

  /** The client consumed `n` bytes of channel `ch` (its WINDOW). False when the grant overflows. */
  grant(ch: 1 | 2, n: number): boolean {
    if (this.allowed[ch]! + n > 0x7fffffff) return false;
    this.allowed[ch]! += n;
    return true;
  }
}

/** A request answered by one OK (with a record) or ERROR. */
class RequestStream extends StreamBase {
  private readonly replyD = deferred<RecordReader>();
  readonly reply = this.replyD.promise;
  onFrame(f: Frame): string | undefined {
    if (f.type === MsgType.OK) {
      const r = new RecordReader(f.payload);
      this.finish();
      this.replyD.resolve(r);
      return undefined;
    }
    if (f.type === MsgType.ERROR) {
      this.finish();
      this.replyD.reject(agentErrorFrom(f.payload));
      return undefined;
    }
    return `${typeName(f.type) ?? f.type} on a request stream`;
  }
  fail(err: Error): void {
    this.replyD.reject(err);
  }
}

class WriteFileStream extends RequestStream {
  readonly sender: Sender;
  constructor(conn: AgentConnection, id: number) {
    super(conn, id);
    this.sender = new Sender(conn, id);
  }
  override onFrame(f: Frame): string | undefined {
    if (f.type === MsgType.WINDOW) {
      if (f.flags !== 0 || f.payload.length !== 4) return "bad WINDOW";
      return this.sender.grant(f.payload.readUInt32LE(0));
    }
    const r = super.onFrame(f);
    if (this.done) this.sender.fail(new ClosedError("the transfer has ended"));
    return r;
  }
  override fail(err: Error): void {
    this.sender.fail(err);
    super.fail(err);
  }
}

class ReadFileStream extends RequestStream {
  private recv = new Receiver();
  private data = new ByteQueue();
  constructor(
    conn: AgentConnection,
    id: number,
    private maxSize: number,
  ) {
    super(conn, id);
  }
  override onFrame(f: Frame): string | undefined {
    if (f.type === MsgType.DATA) {
      if (f.flags !== 1) return `DATA on channel ${f.flags} of a file read`;
      const bad = this.recv.take(f.payload.length);
      if (bad) return bad;
      if (this.recv.received > this.maxSize) return `file read returned more than the ${this.maxSize}-byte limit`;
      this.data.push(f.payload);
      this.conn._credit(this.id, 1, this.recv.credit(f.payload.length));
      return undefined;
    }
    if (f.type === MsgType.EOF) {
      if (f.flags !== 1 || this.recv.eof) return "bad EOF on a file read";
      this.recv.eof = true;
      return undefined;
    }
    if (f.type === MsgType.OK) {
      const size = new RecordReader(f.payload).u64(Tag.READ_FILE_OK.size);
      if (size === undefined || Number(size) !== this.recv.received || !this.recv.eof) return "file read OK does not match the data received";
    }
    return super.onFrame(f);
  }
  content(): Buffer {
    return this.data.takeAll();
  }
}

/** Longest guest path a MOUNTED frame may carry. */
const MAX_MOUNT_PATH = 4096;

/**
 * A MOUNT stream (docs/protocol.md, "Mounts"): one registered tag. The agent
 * reports where the tag is mounted (MOUNTED, each time it changes) and
 * forwards every FUSE request of that mount; the host answers with
 * {@link reply} and pushes notifications with {@link notify}. It does not
 * keep the event loop alive.
 */
export class MountStream extends StreamBase {
  override readonly background = true;
  /** The agent mounted the tag (a guest path) or it is not mounted (null). */
  onMounted: (guestPath: string | null) => void = () => undefined;
  /** A raw FUSE request (fuse_in_header + body). */
  onRequest: (request: Buffer) => void = () => undefined;
  /** Resolves with the first settled MOUNTED (the registration's answer), rejects with its ERROR. */
  readonly registered: Promise<string | null>;
  /** The path of the last MOUNTED (null: not mounted). */
  private mountedAt: string | null = null;
  /** Resolves when the agent ended the stream (OK after CANCEL), rejects with ERROR or a dead connection. */
  readonly ended: Promise<void>;
  private readonly registeredD = deferred<string | null>();
  private readonly endedD = deferred<void>();

  constructor(conn: AgentConnection, id: number) {
    super(conn, id);
    this.registered = this.registeredD.promise;
    this.ended = this.endedD.promise;
  }

  onFrame(f: Frame): string | undefined {
    switch (f.type) {
      case MsgType.MOUNTED: {
        const r = new RecordReader(f.payload);
        const p = r.bytes(Tag.MOUNTED.guest_path);
        if (p === undefined) return "MOUNTED without a guest_path";
        if (p.length > MAX_MOUNT_PATH || (p.length > 0 && p[0] !== 0x2f) || p.includes(0)) return "MOUNTED with a bad guest path";
        const path = p.length === 0 ? null : p.toString("utf8");
        // settling: mounted and served, the mounts below it still being placed.
        const settling = r.bool(Tag.MOUNTED.settling) ?? false;
        if (!settling) {
          this.clearDeadline();
          this.registeredD.resolve(path);
        }
        // The same path again is the end of settling, not a new connection.
        if (path === null || path !== this.mountedAt) {
          this.mountedAt = path;
          this.onMounted(path);
        }
        return undefined;
      }
      case MsgType.FUSE:
        if (f.flags !== 0) return `FUSE with flags ${f.flags} from the agent`;
        if (f.payload.length < 40) return "FUSE request shorter than its header";
        this.onRequest(f.payload);
        return undefined;
      case MsgType.OK:
        this.finish();
        this.registeredD.reject(new ClosedError("the mount was detached"));
        this.endedD.resolve();
        return undefined;
      case MsgType.ERROR: {
        const e = agentErrorFrom(f.payload);
        this.finish();
        this.registeredD.reject(e);
        this.endedD.reject(e);
        return undefined;
      }
      default:
        return `${typeName(f.type) ?? f.type} on a mount stream`;
    }
  }

  fail(err: Error): void {
    this.registeredD.reject(err);
    this.endedD.reject(err);
  }

  /** Sends the raw reply to a request. */
  reply(message: Uint8Array): void {
    if (!this.done) this.conn._send(MsgType.FUSE, FuseFlags.REPLY, this.id, message);
  }

  /** Sends a raw notification (fuse_out_header with unique 0). */
  notify(message: Uint8Array): void {
    if (!this.done) this.conn._send(MsgType.FUSE, FuseFlags.NOTIFY, this.id, message);
  }

  /** Asks the agent to unmount and forget the tag; resolves on its OK. */
  detach(timeoutMs: number): Promise<void> {
    if (this.done) return Promise.resolve();
    this.conn._send(MsgType.CANCEL, 0, this.id);
    this.armDeadline(timeoutMs, "MOUNT: detach");
    return this.ended;
  }
}

/**
 * The session's LOGS stream: output of guest processes no stream reads any
 * more (detached by a new session, or background children of a finished
 * exec), as LOG frames. The host stores every chunk at once (a bounded
 * ring, src/vm/logs.ts), so the window is credited back on receipt: the
 * window only paces an honest agent. Does not hold the event loop.
 */
export class LogStream extends StreamBase {
  override readonly background = true;
  /** One chunk; `data` is a view valid only during the call. */
  onLog: (pid: number, channel: OutputChannel, data: Buffer, droppedBytes: number) => void = () => undefined;
  /** The stream ended: `err` when the agent refused it or the connection died. */
  onEnd: (err?: Error) => void = () => undefined;
  private recv = new Receiver();

  onFrame(f: Frame): string | undefined {
    switch (f.type) {
      case MsgType.LOG: {
        if (f.flags !== 0) return `LOG with flags ${f.flags}`;
        const r = new RecordReader(f.payload);
        const pid = r.u32(Tag.LOG.pid);
        const channel = r.u32(Tag.LOG.channel);
        const data = r.bytes(Tag.LOG.data);
        const dropped = r.u64(Tag.LOG.dropped) ?? 0n;
        if (pid === undefined || data === undefined || (channel !== 1 && channel !== 2)) return "LOG without pid, data or a channel of 1 or 2";
        const bad = this.recv.take(data.length);
        if (bad) return bad;
        this.onLog(pid, channel, data, dropped > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(dropped));
        this.conn._credit(this.id, 1, this.recv.credit(data.length));
        return undefined;
      }
      case MsgType.OK:
        this.finish();
        this.onEnd();
        return undefined;
      case MsgType.ERROR: {
        const e = agentErrorFrom(f.payload);
        this.finish();
        this.fail(e);
        return undefined;
      }
      default:
        return `${typeName(f.type) ?? f.type} on a LOGS stream`;
    }
  }

  fail(err: Error): void {
    this.onEnd(err);
  }

  /** Closes the stream (the agent keeps buffering for a later one). */
  close(): void {
    if (this.done) return;
    this.conn._send(MsgType.CANCEL, 0, this.id);
  }
}

/**
 * A TCP connection to a port inside the guest. The chunk given to `onData`
 * is a frame's payload: a view of a buffer that nothing writes again (a
 * frame body of its own, or part of one read of the agent connection), so
 * it may be kept; a small one pins the whole read it came in (up to 64 KiB),
 * so copy small ones (the forwarder keeps only payloads of 32 KiB or more).
 */
export class TcpStream extends StreamBase {
  readonly connected: Promise<void>;
  /** Resolves when the stream has ended: "closed" (both sides done) or "reset". */
  readonly ended: Promise<"closed" | "reset">;
  onData: (chunk: Buffer) => void = () => undefined;
  onEof: () => void = () => undefined;
  private recv = new Receiver();
  readonly sender: Sender;
  private readonly connectedD = deferred<void>();
  private readonly endedD = deferred<"closed" | "reset">();

  constructor(conn: AgentConnection, id: number) {
    super(conn, id);
    this.sender = new Sender(conn, id);
    this.connected = this.connectedD.promise;
    this.ended = this.endedD.promise;
  }

  onFrame(f: Frame): string | undefined {
    switch (f.type) {
      case MsgType.STARTED:
        this.clearDeadline();
        this.connectedD.resolve();
        return undefined;
      case MsgType.DATA: {
        if (f.flags !== 1) return `DATA on channel ${f.flags} of a TCP stream`;
        const bad = this.recv.take(f.payload.length);
        if (bad) return bad;
        if (f.payload.length) this.onData(f.payload);
        return undefined;
      }
      case MsgType.EOF:
        if (f.flags !== 1 || this.recv.eof) return "bad EOF on a TCP stream";
        this.recv.eof = true;
        this.onEof();
        return undefined;
      case MsgType.WINDOW:
        if (f.flags !== 0 || f.payload.length !== 4) return "bad WINDOW";
        return this.sender.grant(f.payload.readUInt32LE(0));
      case MsgType.OK:
        this.finish();
        this.sender.fail(new ClosedError("the connection has ended"));
        this.connectedD.resolve();
        this.endedD.resolve("closed");
        return undefined;
      case MsgType.RESET:
        this.finish();
        this.sender.fail(new ClosedError("the connection was reset"));
        this.connectedD.reject(new AgentError(WireError.REFUSED, "connection reset"));
        this.endedD.resolve("reset");
        return undefined;
      case MsgType.ERROR: {
        const e = agentErrorFrom(f.payload);
        this.finish();
        this.fail(e);
        return undefined;
      }
      default:
        return `${typeName(f.type) ?? f.type} on a TCP stream`;
    }
  }

  fail(err: Error): void {
    this.sender.fail(err);
    this.connectedD.reject(err);
    this.endedD.reject(err);
  }

  /** Credits `n` consumed bytes back to the guest (coalesced into WINDOW frames). */
  ack(n: number): void {
    if (this.done || n <= 0) return;
    this.conn._credit(this.id, 1, this.recv.credit(n));
  }

  write(data: Uint8Array): Promise<void> {
    return this.sender.write(data);
  }

  end(): Promise<void> {
    return this.sender.end();
  }

  /** Aborts the connection (the guest socket is reset). */
  reset(): void {
    if (this.done) return;
    this.conn._send(MsgType.CANCEL, 0, this.id);
  }
}

function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32LE(n >>> 0, 0);
  return b;
}

function agentErrorFrom(payload: Buffer): AgentError {
  let code = 0;
  let message = "(no message)";
  try {
    const r = new RecordReader(payload);
    code = r.u32(Tag.ERROR.code) ?? 0;
    message = guestText(r.str(Tag.ERROR.message, 4096) ?? message);
  } catch {
    message = "(malformed error record)";
  }
  return new AgentError(code, guestText(message));
}

export interface ConnectOptions {
  /** Overall deadline for connecting and the handshake. */
  timeoutMs: number;
  signal?: AbortSignal;
  /** Aborted when the other end (QEMU) is gone: connecting stops (QemuProcess.exitSignal). */
  gone?: AbortSignal;
  /** Memory budget of the connection. @default DEFAULT_AGENT_LIMITS */
  limits?: Partial<AgentLimits>;
  /** Request deadlines. @default defaultDeadlines() */
  deadlines?: Partial<AgentDeadlines>;
}

/**
 * Connects to the agent's port socket, retrying while QEMU has not created
 * it yet (or not listened on it yet). Throws ClosedError once `gone` is
 * aborted (QEMU exited), TimeoutError after `timeoutMs`.
 */
export async function connectAgentSocket(path: string, o: { timeoutMs: number; gone?: AbortSignal; signal?: AbortSignal }): Promise<Socket> {
  const deadline = Date.now() + o.timeoutMs;
  for (;;) {
    if (o.signal?.aborted) throw o.signal.reason;
    if (o.gone?.aborted) throw new ClosedError("QEMU exited before the agent socket accepted a connection");
    if (Date.now() > deadline) throw new TimeoutError(`could not connect to the agent socket ${path} within ${o.timeoutMs} ms`, o.timeoutMs);
    try {
      return await new Promise<Socket>((resolve, reject) => {
        const s = connect(path);
        s.once("connect", () => {
          s.removeAllListeners("error");
          resolve(s);
        });
        s.once("error", reject);
      });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== "ENOENT" && code !== "ECONNREFUSED") throw e;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

/** PONGs of pings that timed out are remembered (not a violation when late), this many. */
const EXPIRED_PINGS = 64;

/**
 * The fixed start of a HELLO_ACK after its length: type, flags, reserved,
 * stream 0, then the magic field (the agent always writes it first).
 */
const HELLO_ACK_SIGNATURE = Buffer.concat([
  Buffer.from([MsgType.HELLO_ACK, 0, 0, 0, 0, 0, 0, 0, Tag.HELLO_ACK.magic]),
  Buffer.from([MAGIC.length, 0, 0, 0]),
  MAGIC,
]);
/** Stale bytes tolerated before the HELLO_ACK. */
const MAX_SKIP = 16 << 20;

const ALLOWED_FROM_AGENT = new Set<number>([
  MsgType.HELLO_ACK,
  MsgType.PONG,
  MsgType.STARTED,
  MsgType.EXIT,
  MsgType.DATA,
  MsgType.EOF,
  MsgType.WINDOW,
  MsgType.RESET,
  MsgType.OK,
  MsgType.ERROR,
  MsgType.MOUNTED,
  MsgType.FUSE,
  MsgType.LOG,
  MsgType.RING_ACK,
]);

export class AgentConnection {
  private sock: Socket;
  private reader = new FrameReader();
  private streams = new Map<number, StreamBase>();
  /** Open streams that do not hold the event loop (mounts). */
  private backgroundStreams = 0;
  private nextId = 1;
  private pings = new Map<string, () => void>();
  private hello: ((h: HelloInfo) => void) | undefined;
  private helloFail: ((e: Error) => void) | undefined;
  private corked = false;
  private error: Error | undefined;
  /** Until HELLO_ACK, bytes a previous session left in the channel are skipped. */
  private synced = false;
  private preSync: Buffer = Buffer.alloc(0);
  private skipped = 0;
  info: HelloInfo | undefined;
  /** Called once when the connection dies (protocol violation, socket closed, destroy). */
  onFatal: (err: Error) => void = () => undefined;
  private liveness: NodeJS.Timeout | undefined;
  private livenessPaused = 0;
  private probeSent: number | undefined;
  private expiredPings = new Set<string>();
  /** WINDOW credit not yet sent, by stream * 4 + channel (coalesced). */
  private credits = new Map<number, number>();
  private creditFlushPending = false;
  private drainWaiters: (() => void)[] = [];
  /** The memory budget in force. */
  readonly limits: AgentLimits;
  /** The request deadlines in force. */
  readonly deadlines: AgentDeadlines;
  /** Whether the socket holds the event loop (see updateRef). */
  private refed = true;
  /** Pings a caller waits for (liveness probes do not count). */
  private heldPings = 0;
  /** Callers waiting on a background stream (a log reader in a read). */
  private holds = 0;
  /** The stream ring, when the VM has one and the agent reads it (ring.ts). */
  private ring: StreamRing | undefined;
  /** @internal Largest payload a Sender puts in one DATA or DATA_REF frame. */
  get _dataChunk(): number {
    return this.ring ? Math.max(DATA_CHUNK, RING_MAX_REGION_BYTES) : DATA_CHUNK;
  }
  /** @internal The payload that goes through the stream ring (0: no ring). */
  get _ringMin(): number {
    return this.ring ? RING_MIN_REGION_BYTES : 0;
  }
  /** @internal DATA_REF frames sent, the bytes they named, and ring regions not acknowledged yet (for tests). */
  get _ringStats(): { sent: number; bytes: number; pending: number } | undefined {
    return this.ring ? { sent: this.ringSent, bytes: this.ringBytes, pending: this.ring.pending } : undefined;
  }
  private ringSent = 0;
  private ringBytes = 0;

  /**
   * @internal Bulk host → guest bytes go through the VM's stream ring from
   * now on (the agent said it reads one: feature "ring").
   */
  _attachRing(ring: StreamRing): void {
    this.ring?.close();
    this.ring = ring;
  }

  /** @internal Flow-controlled bytes for a stream: a DATA_REF into the ring when they are many and it has room, else a DATA frame. */
  _sendData(channel: number, stream: number, bytes: Uint8Array): void {
    if (this.ring && bytes.length >= RING_MIN_REGION_BYTES && !this.error) {
      const off = this.ring.place(bytes);
      if (off !== undefined) {
        const p = Buffer.allocUnsafe(12);
        p.writeBigUInt64LE(BigInt(off), 0);
        p.writeUInt32LE(bytes.length, 8);
        this._send(MsgType.DATA_REF, channel, stream, p);
        this.ringSent++;
        this.ringBytes += bytes.length;
        return;
      }
    }
    // Frames hold at most MAX_PAYLOAD: split what the ring did not take.
    for (let off = 0; off < bytes.length; off += DATA_CHUNK) this._send(MsgType.DATA, channel, stream, bytes.subarray(off, off + DATA_CHUNK));
  }

  /**
   * @internal A caller waits for a background stream's data (+1) or stopped
   * waiting (-1): while any does, the socket holds the event loop.
   */
  _hold(delta: 1 | -1): void {
    this.holds = Math.max(0, this.holds + delta);
    this.updateRef();
  }

  private constructor(sock: Socket, limits?: Partial<AgentLimits>, deadlines?: Partial<AgentDeadlines>) {
    this.sock = sock;
    this.limits = Object.freeze({ ...DEFAULT_AGENT_LIMITS, ...limits });
    this.deadlines = Object.freeze({ ...defaultDeadlines(), ...deadlines });
    sock.setNoDelay?.(true);
    sock.on("data", (chunk: Buffer) => this.onChunk(chunk));
    sock.on("drain", () => this.drained());
    sock.on("error", (e) => this.destroy(new ClosedError(`agent connection failed: ${e.message}`, { cause: e })));
    sock.on("close", () => this.destroy(new ClosedError("the agent connection closed")));
  }

  /**
   * Connects to the agent socket (retrying while QEMU creates it) and runs
   * the handshake.
   */
  static async connect(path: string, o: ConnectOptions): Promise<AgentConnection> {
    const deadline = Date.now() + o.timeoutMs;
    const sock = await connectAgentSocket(path, { timeoutMs: o.timeoutMs, ...(o.gone ? { gone: o.gone } : {}), ...(o.signal ? { signal: o.signal } : {}) });
    const conn = new AgentConnection(sock, o.limits, o.deadlines);
    try {
      await conn.handshake(Math.max(1, deadline - Date.now()), o.signal, o.gone);
    } catch (e) {
      conn.destroy(e as Error);
      throw e;
    }
    return conn;
  }

  /**
   * @internal A connection over an already connected duplex whose handshake
   * is taken as done (fuzzing and unit tests drive it without a guest).
   */
  static _overStream(sock: Socket, o: { limits?: Partial<AgentLimits>; deadlines?: Partial<AgentDeadlines> } = {}): AgentConnection {
    const conn = new AgentConnection(sock, o.limits, o.deadlines);
    conn.synced = true;
    conn.info = { protocolVersion: PROTOCOL_VERSION, agentVersion: "?", features: [], maxPayload: MAX_PAYLOAD };
    return conn;
  }

  /** @internal Feeds bytes as if read from the socket (fuzzing). */
  _receive(chunk: Buffer): void {
    this.onChunk(chunk);
  }

  /** Sends HELLO and waits for HELLO_ACK. */
  private handshake(timeoutMs: number, signal?: AbortSignal, gone?: AbortSignal): Promise<HelloInfo> {
    return new Promise<HelloInfo>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new TimeoutError(`the guest agent did not answer within ${timeoutMs} ms of boot (raise bootTimeoutMs)`, timeoutMs)),
        timeoutMs,
      );
      const cleanup = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        gone?.removeEventListener("abort", onGone);
      };
      const onAbort = () => {
        cleanup();
        reject(signal!.reason);
      };
      const onGone = () => {
        cleanup();
        reject(new ClosedError("QEMU exited during boot"));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      if (gone?.aborted) queueMicrotask(onGone);
      else gone?.addEventListener("abort", onGone, { once: true });
      this.hello = (h) => {
        cleanup();
        this.info = h;
        resolve(h);
      };
      this.helloFail = (e) => {
        cleanup();
        reject(e);
      };
      const rec = new RecordBuilder()
        .bytes(Tag.HELLO.magic, MAGIC)
        .u32(Tag.HELLO.min_version, PROTOCOL_VERSION)
        .u32(Tag.HELLO.max_version, PROTOCOL_VERSION)
        .bytes(Tag.HELLO.host_version, HOST_VERSION);
      this._send(MsgType.HELLO, 0, 0, rec.build());
    });
  }

  get closed(): boolean {
    return this.error !== undefined;
  }

  get closeReason(): Error | undefined {
    return this.error;
  }

  /**
   * Watches that the agent answers: every `timeoutMs / 2` a PING goes out
   * (whatever else the guest sends: a guest flooding output is not thereby
   * alive); no answer within `timeoutMs` means the agent stopped (hung
   * guest, paused QEMU, hostile agent) and `onDead` runs, so callers get a
   * typed error instead of a hang.
   */
  startLiveness(timeoutMs: number, onDead: (e: Error) => void): void {
    if (this.liveness) clearInterval(this.liveness);
    const interval = Math.max(50, Math.floor(timeoutMs / 2));
    this.liveness = setInterval(() => {
      if (this.error || this.livenessPaused > 0) return;
      const now = Date.now();
      if (this.probeSent !== undefined) {
        if (now - this.probeSent > timeoutMs) onDead(new Error(`the guest agent stopped answering (no reply to a ping within ${timeoutMs} ms)`));
        return;
      }
      this.probeSent = now;
      this.sendPing(false, 0).then(
        () => {
          if (this.probeSent === now) this.probeSent = undefined;
        },
        () => undefined,
      );
    }, interval);
    this.liveness.unref();
  }

  /** Suspends the liveness check (while the VM is deliberately paused or quiet). */
  pauseLiveness(): () => void {
    this.livenessPaused++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.livenessPaused--;
      this.probeSent = undefined;
    };
  }

  /**
   * The socket holds Node's event loop only while the host waits for the
   * guest: open streams (exec, spawn, files, TCP), pings a caller awaits, the
   * handshake, a caller waiting on a background stream ({@link _hold}). An
   * idle VM (in a pool, or stashed by a bake) then does not keep a script
   * from exiting.
   */
  private updateRef(): void {
    const busy = this.error === undefined && (this.streams.size > this.backgroundStreams || this.heldPings > 0 || this.holds > 0 || this.hello !== undefined);
    if (busy === this.refed) return;
    this.refed = busy;
    // (A plain Duplex, as the fuzzer's, has neither.)
    const s = this.sock as Partial<Socket>;
    if (busy) s.ref?.();
    else s.unref?.();
  }

  /** Destroys the connection and fails every open stream with `err`. */
  destroy(err: Error): void {
    if (this.error) return;
    this.error = err;
    if (this.liveness) clearInterval(this.liveness);
    this.sock.destroy();
    this.ring?.close();
    const streams = [...this.streams.values()];
    this.streams.clear();
    this.backgroundStreams = 0;
    for (const s of streams) {
      s.clearDeadline();
      s.fail(err);
    }
    for (const p of this.pings.values()) p();
    this.pings.clear();
    this.credits.clear();
    this.drained();
    this.helloFail?.(err);
    this.onFatal(err);
  }

  private violation(message: string): void {
    this.destroy(new ProtocolError(`protocol violation by the guest: ${message}; the VM was stopped`));
  }

  private onChunk(chunk: Buffer): void {
    if (this.error) return;
    if (!this.synced) {
      const buf = this.preSync.length ? Buffer.concat([this.preSync, chunk]) : chunk;
      const at = buf.indexOf(HELLO_ACK_SIGNATURE);
      if (at < 4) {
        // Keep only what could be the start of the signature.
        const keep = Math.min(buf.length, HELLO_ACK_SIGNATURE.length + 4);
        this.skipped += buf.length - keep;
        this.preSync = Buffer.from(buf.subarray(buf.length - keep));
        if (this.skipped > MAX_SKIP) this.violation(`no HELLO_ACK in the first ${MAX_SKIP} bytes`);
        return;
      }
      this.synced = true;
      this.skipped += at - 4;
      this.preSync = Buffer.alloc(0);
      chunk = buf.subarray(at - 4);
    }
    let frames: Frame[];
    try {
      frames = this.reader.push(chunk);
    } catch (e) {
      this.violation(e instanceof DecodeError ? e.message : String(e));
      return;
    }
    for (const f of frames) {
      if (this.error) return;
      try {
        const bad = this.dispatch(f);
        if (bad) {
          this.violation(`${bad} (stream ${f.stream}, ${typeName(f.type) ?? `type ${f.type}`})`);
          return;
        }
      } catch (e) {
        this.violation(e instanceof DecodeError ? e.message : `bad frame: ${String(e)}`);
        return;
      }
    }
  }

  private dispatch(f: Frame): string | undefined {
    if (!ALLOWED_FROM_AGENT.has(f.type)) return `message type ${f.type} is not allowed from the agent`;
    if (f.stream === 0) return this.session(f);
    if (f.stream >= this.nextId) return "frame for a stream the host never opened";
    const s = this.streams.get(f.stream);
    // A stream the host already finished: late frames (racing a CANCEL) drop.
    if (!s) return undefined;
    return s.onFrame(f);
  }

  private session(f: Frame): string | undefined {
    switch (f.type) {
      case MsgType.HELLO_ACK: {
        if (!this.hello) return "unexpected HELLO_ACK";
        const r = new RecordReader(f.payload);
        const magic = r.bytes(Tag.HELLO_ACK.magic);
        if (!magic || !magic.equals(MAGIC)) return "HELLO_ACK with a bad magic";
        const version = r.u32(Tag.HELLO_ACK.version);
        if (version !== PROTOCOL_VERSION) return `agent chose protocol version ${version}, host speaks ${PROTOCOL_VERSION}`;
        const maxPayload = r.u32(Tag.HELLO_ACK.max_payload) ?? MAX_PAYLOAD;
        const bootError = guestText(r.str(Tag.HELLO_ACK.boot_error, 4096) ?? "");
        const h: HelloInfo = {
          protocolVersion: version,
          agentVersion: (r.str(Tag.HELLO_ACK.agent_version, 64) ?? "?").replace(/[^\x20-\x7e]/g, "?"),
          features: r
            .all(Tag.HELLO_ACK.feature, 64)
            .map((b) => b.subarray(0, 64).toString("latin1")),
          maxPayload,
          ...(bootError ? { bootError } : {}),
        };
        const cb = this.hello;
        this.hello = undefined;
        this.helloFail = undefined;
        this.updateRef();
        cb(h);
        return undefined;
      }
      case MsgType.PONG: {
        const key = f.payload.toString("hex");
        const p = this.pings.get(key);
        if (!p) {
          // The answer to a ping that already timed out is late, not wrong.
          if (this.expiredPings.delete(key)) return undefined;
          return "PONG that answers no PING";
        }
        this.pings.delete(key);
        p();
        return undefined;
      }
      case MsgType.RING_ACK: {
        if (!this.ring) return "RING_ACK without a stream ring";
        if (f.payload.length !== 4) return `RING_ACK payload of ${f.payload.length} bytes`;
        return this.ring.ack(f.payload.readUInt32LE(0));
      }
      case MsgType.ERROR: {
        const e = agentErrorFrom(f.payload);
        if (this.helloFail) {
          const cb = this.helloFail;
          this.hello = undefined;
          this.helloFail = undefined;
          cb(new ProtocolError(`the agent refused the session: ${e.message}`));
          return undefined;
        }
        return `agent reported a session error: ${e.message}`;
      }
      default:
        return `${typeName(f.type)} on stream 0`;
    }
  }

  /** @internal Sends one frame (coalesced with others in the same tick). */
  _send(type: number, flags: number, stream: number, payload?: Uint8Array): void {
    if (this.error) return;
    if (!this.corked) {
      this.corked = true;
      this.sock.cork();
      process.nextTick(() => {
        this.corked = false;
        this.sock.uncork();
      });
    }
    this.sock.write(encodeFrame(type, flags, stream, payload));
    if (this.sock.writableLength > this.limits.maxWriteBufferBytes) {
      const max = this.limits.maxWriteBufferBytes;
      this.destroy(
        new ResourceLimitError(
          `the guest stopped reading its agent channel: ${this.sock.writableLength} bytes are queued for it, over the ${max}-byte budget per VM (docs/protocol.md, "Host limits"); the VM was stopped`,
          "writeBuffer",
          max,
        ),
      );
    }
  }

  /** @internal Whether flow-controlled data may be queued now (the guest reads its channel). */
  _writable(): boolean {
    return this.error !== undefined || this.sock.writableLength <= this.limits.sendHighWaterBytes || !this.sock.writableNeedDrain;
  }

  /** @internal Resolves when {@link _writable} (or the connection died). */
  _whenWritable(): Promise<void> {
    if (this._writable()) return Promise.resolve();
    return new Promise((r) => this.drainWaiters.push(r));
  }

  private drained(): void {
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
  }

  /**
   * @internal Credits `n` consumed bytes of a channel back to the guest. The
   * credit is coalesced per stream and channel and sent once per tick, and
   * held while the guest is not reading its channel: whatever the guest
   * sends, pending credit costs one map entry per channel, not a frame per
   * DATA frame.
   */
  _credit(stream: number, ch: number, n: number): void {
    if (this.error || n <= 0) return;
    const k = stream * 4 + ch;
    const pending = (this.credits.get(k) ?? 0) + n;
    this.credits.set(k, pending);
    if (pending >= CREDIT_BATCH) this.scheduleCredits();
  }

  private scheduleCredits(): void {
    if (this.creditFlushPending || this.error) return;
    this.creditFlushPending = true;
    const run = () => {
      this.creditFlushPending = false;
      this.flushCredits();
    };
    if (this._writable()) process.nextTick(run);
    else this.drainWaiters.push(run);
  }

  private flushCredits(): void {
    if (this.error || this.credits.size === 0) return;
    if (!this._writable()) {
      this.scheduleCredits();
      return;
    }
    const all = [...this.credits];
    this.credits.clear();
    for (const [k, n] of all) this._send(MsgType.WINDOW, k % 4, Math.floor(k / 4), u32(n));
  }

  /** @internal */
  _release(id: number): void {
    if (this.streams.get(id)?.background) this.backgroundStreams--;
    this.streams.delete(id);
    this.credits.delete(id * 4 + 1);
    this.credits.delete(id * 4 + 2);
    this.updateRef();
  }

  private open<T extends StreamBase>(make: (id: number) => T): T {
    if (this.error) throw this.error;
    if (this.nextId > 0xfffffff0) throw new ClosedError("stream ids exhausted on this connection");
    if (this.streams.size >= this.limits.maxStreams) {
      const max = this.limits.maxStreams;
      throw new ResourceLimitError(
        `${this.streams.size} operations are already in flight on this VM (exec, spawn, file transfers, TCP connections); the limit is ${max} per VM: wait for some to finish`,
        "streams",
        max,
      );
    }
    const id = this.nextId++;
    const s = make(id);
    this.streams.set(id, s);
    if (s.background) this.backgroundStreams++;
    this.updateRef();
    return s;
  }

  /**
   * Round trip through the agent; resolves with the time it took (ms).
   * Rejects with TimeoutError after `timeoutMs` (0 = no deadline).
   */
  ping(timeoutMs: number = this.deadlines.pingMs): Promise<number> {
    return this.sendPing(true, timeoutMs);
  }

  /** `hold`: the caller waits for the answer, so the event loop must too (liveness probes do not). */
  private sendPing(hold: boolean, timeoutMs: number): Promise<number> {
    if (this.error) return Promise.reject(this.error);
    const payload = randomBytes(8);
    const key = payload.toString("hex");
    const t0 = process.hrtime.bigint();
    if (hold) {
      this.heldPings++;
      this.updateRef();
    }
    return new Promise((resolve, reject) => {
      let held = hold;
      const release = () => {
        if (!held) return;
        held = false;
        this.heldPings--;
        this.updateRef();
      };
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              if (!this.pings.delete(key)) return;
              release();
              this.expiredPings.add(key);
              if (this.expiredPings.size > EXPIRED_PINGS) this.expiredPings.delete(this.expiredPings.values().next().value!);
              reject(new TimeoutError(`ping: no answer within ${timeoutMs} ms; ${DEADLINE_HINT}`, timeoutMs));
            }, timeoutMs)
          : undefined;
      this.pings.set(key, () => {
        if (timer) clearTimeout(timer);
        release();
        if (this.error) reject(this.error);
        else resolve(Number(process.hrtime.bigint() - t0) / 1e6);
      });
      this._send(MsgType.PING, 0, 0, payload);
    });
  }

  /**
   * Sends a request that is answered by OK or ERROR. It rejects with
   * TimeoutError (and the stream is cancelled) when no answer comes within
   * `timeoutMs` (0 = no deadline).
   */
  request(type: number, record: RecordBuilder = new RecordBuilder(), timeoutMs: number = this.deadlines.requestMs): Promise<RecordReader> {
    const s = this.open((id) => new RequestStream(this, id));
    s.armDeadline(timeoutMs, typeName(type) ?? `request type ${type}`);
    this._send(type, 0, s.id, record.build());
    return s.reply;
  }

  /**
   * WAIT_LISTEN: resolves once something in the guest listens on TCP
   * `port`. The agent gives up after `timeoutMs` (ERROR TIMEOUT); the host
   * gives up `deadlines.requestMs` later.
   */
  async waitListen(port: number, timeoutMs: number): Promise<void> {
    await this.request(
      MsgType.WAIT_LISTEN,
      new RecordBuilder().u32(Tag.WAIT_LISTEN.port, port).u64(Tag.WAIT_LISTEN.timeout_ms, timeoutMs),
      timeoutMs + this.deadlines.requestMs,
    );
  }

  exec(req: ExecRequest): ExecStream {
    const r = new RecordBuilder();
    for (const a of req.argv) r.bytes(Tag.EXEC.argv, a);
    for (const e of req.env ?? []) r.bytes(Tag.EXEC.env, e);
    if (req.cwd) r.bytes(Tag.EXEC.cwd, req.cwd);
    if (req.timeoutMs) r.u64(Tag.EXEC.timeout_ms, req.timeoutMs);
    if (req.tty) {
      r.bool(Tag.EXEC.tty, true).u32(Tag.EXEC.cols, req.tty.cols).u32(Tag.EXEC.rows, req.tty.rows);
    }
    for (const c of req.chain ?? []) r.bytes(Tag.EXEC.chain, c);
    if (req.stdin) r.bool(Tag.EXEC.stdin, true);
    if (req.user) r.bytes(Tag.EXEC.user, req.user);
    if (req.reportStarted) r.bool(Tag.EXEC.report_started, true);
    if (req.cgroup !== undefined) r.bool(Tag.EXEC.cgroup, req.cgroup);
    if (r.length > MAX_PAYLOAD) throw new RangeError(`the exec request is ${r.length} bytes, over the ${MAX_PAYLOAD}-byte frame limit (shorten argv/env)`);
    const s = this.open((id) => new ExecStream(this, id));
    if (req.reportStarted) s.armDeadline(this.deadlines.startedMs, "exec: STARTED");
    this._send(MsgType.EXEC, 0, s.id, r.build());
    return s;
  }

  async writeFile(path: Uint8Array, data: Uint8Array, mode: number, mkdirs: boolean): Promise<void> {
    const s = this.open((id) => new WriteFileStream(this, id));
    s.armDeadline(this.deadlines.fileMs, "WRITE_FILE");
    this._send(
      MsgType.WRITE_FILE,
      0,
      s.id,
      new RecordBuilder()
        .bytes(Tag.WRITE_FILE.path, path)
        .u32(Tag.WRITE_FILE.mode, mode)
        .u64(Tag.WRITE_FILE.size, data.length)
        .bool(Tag.WRITE_FILE.mkdirs, mkdirs)
        .build(),
    );
    const sent = s.sender.write(data).then(() => s.sender.end());
    // If the agent refuses early (too large, bad path), its ERROR ends the
    // stream and the sender stops; the reply carries the reason.
    sent.catch(() => undefined);
    await s.reply;
  }

  async readFile(path: Uint8Array, maxSize: number): Promise<Buffer> {
    const s = this.open((id) => new ReadFileStream(this, id, maxSize));
    s.armDeadline(this.deadlines.fileMs, "READ_FILE");
    this._send(MsgType.READ_FILE, 0, s.id, new RecordBuilder().bytes(Tag.READ_FILE.path, path).u64(Tag.READ_FILE.max_size, maxSize).build());
    await s.reply;
    return s.content();
  }

  /**
   * @internal Opens a stream for the exec proxy with the request a
   * bring-your-own client sent (type and payload as they are).
   */
  openRaw(type: number, payload: Uint8Array, forward: (f: Frame) => void, onEnd: (err?: Error) => void): RawStream {
    const s = this.open((id) => new RawStream(this, id, forward, onEnd));
    this._send(type, 0, s.id, payload);
    return s;
  }

  /**
   * MOUNT: registers `tag` in the agent (and mounts it on `guestPath` when
   * given). Await `registered` for the agent's answer.
   */
  mount(tag: string, guestPath: string | undefined, readOnly: boolean): MountStream {
    const r = new RecordBuilder().bytes(Tag.MOUNT.tag, tag);
    if (guestPath !== undefined) r.bytes(Tag.MOUNT.guest_path, Buffer.from(guestPath, "utf8"));
    r.bool(Tag.MOUNT.read_only, readOnly);
    const s = this.open((id) => new MountStream(this, id));
    s.armDeadline(this.deadlines.requestMs, "MOUNT");
    this._send(MsgType.MOUNT, 0, s.id, r.build());
    return s;
  }

  /** LOGS: opens the session's log stream (agent feature `logs`; one per session). */
  logs(): LogStream {
    const s = this.open((id) => new LogStream(this, id));
    this._send(MsgType.LOGS, 0, s.id);
    return s;
  }

  tcpConnect(port: number, addr?: string): TcpStream {
    const r = new RecordBuilder().u32(Tag.TCP_CONNECT.port, port);
    if (addr) r.bytes(Tag.TCP_CONNECT.addr, addr);
    const s = this.open((id) => new TcpStream(this, id));
    s.armDeadline(this.deadlines.connectMs, "TCP_CONNECT: STARTED");
    this._send(MsgType.TCP_CONNECT, 0, s.id, r.build());
    return s;
  }

  /** Bytes written to the channel that the guest has not read yet (for tests and stats). */
  get queuedBytes(): number {
    return this.sock.writableLength;
  }

  /** Number of open streams (for tests and stats). */
  get openStreams(): number {
    return this.streams.size;
  }
}
