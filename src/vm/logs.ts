/**
 * The host side of a VM's log stream (`vm.logs()`): output of guest
 * processes that no exec or spawn reads any more — a server a warmup
 * started with `vm.spawn` and left running when the image was baked (in
 * every clone its host-side ExecChild is gone), or a background child of a
 * finished exec.
 *
 * The agent sends it on the LOGS stream (docs/protocol.md); the host keeps
 * the newest chunks in one ring per VM, bounded in bytes (each chunk costs
 * its data plus a fixed overhead, so a guest sending one-byte chunks cannot
 * make the host hold more than the budget in objects). Each reader has its
 * own cursor; a reader that falls behind the ring loses the oldest chunks and
 * is told how many bytes it lost (`droppedBytes` of its next entry).
 */

import { Readable } from "node:stream";
import type { LogStream, OutputChannel } from "../agent-client/connection.js";

/** One chunk of a detached guest process's output, or of the guest console. */
export interface LogEntry {
  /** The pid (in the guest) of the process its exec or spawn started, or the workload's; 0 for the console. */
  readonly pid: number;
  /** "console": what the guest kernel's serial console printed (only with `console: true`). */
  readonly stream: "stdout" | "stderr" | "console";
  readonly data: Buffer;
  /**
   * Bytes lost just before this entry: dropped by the agent (its buffer of
   * 256 KiB was full while no host read) or by this reader falling behind
   * the host's ring.
   */
  readonly droppedBytes: number;
}

/** Options of `vm.logs()`. */
export interface LogsOptions {
  /**
   * Also the guest's serial console (kernel messages: an OOM kill, a
   * panic; whatever a process writes to /dev/console), as entries of
   * stream "console" and pid 0, from the first `vm.logs({ console: true })`
   * on (earlier console output: `vm.consoleTail()`).
   * @default false
   */
  readonly console?: boolean;
}

/** Host memory for a VM's log entries. */
export const LOG_BUFFER_BYTES = 1024 * 1024;
/** What one entry costs beyond its data (object, Buffer header). */
const ENTRY_OVERHEAD_BYTES = 128;

interface Stored {
  readonly seq: number;
  /** Process output bytes (and agent drops) before this entry since the ring started. */
  readonly offset: number;
  /** Console bytes before this entry since the ring started. */
  readonly consoleOffset: number;
  readonly pid: number;
  /** 1 stdout, 2 stderr, 0 the console. */
  readonly channel: OutputChannel | 0;
  readonly data: Buffer;
  readonly agentDropped: number;
}

/** The per-VM ring of log entries and its readers. */
export class LogRing {
  private entries: Stored[] = [];
  private head = 0;
  private costBytes = 0;
  private nextSeq = 0;
  private totalBytes = 0;
  private consoleBytes = 0;
  private consolePending: Buffer[] = [];
  private consolePendingBytes = 0;
  private consoleTimer: NodeJS.Timeout | undefined;
  private ended = false;
  private readonly readers = new Set<LogReader>();
  /** Readers waiting in a read (someone consumes them): they hold the event loop. */
  private waiting = 0;

  constructor(
    private readonly stream: LogStream,
    readonly maxBytes: number = LOG_BUFFER_BYTES,
  ) {
    stream.onLog = (pid, channel, data, dropped) => this.push(pid, channel, data, dropped);
    stream.onEnd = () => this.end();
  }

  /** Whether the ring has ended (the VM ended or the stream was refused). */
  get done(): boolean {
    return this.ended;
  }

  /** Bytes of data held now (for tests and stats). */
  get heldBytes(): number {
    let n = 0;
    for (let i = this.head; i < this.entries.length; i++) n += this.entries[i]!.data.length;
    return n;
  }

  /**
   * @internal A chunk of the guest console. A serial console arrives a few
   * bytes at a time: chunks are gathered into lines (up to 4 KiB, or what
   * came within 50 ms) so that one entry is not one byte.
   */
  _pushConsole(chunk: Buffer): void {
    if (this.ended) return;
    this.consolePending.push(Buffer.from(chunk));
    this.consolePendingBytes += chunk.length;
    if (chunk.includes(0x0a) || this.consolePendingBytes >= 4096) this.flushConsole();
    else if (!this.consoleTimer) {
      this.consoleTimer = setTimeout(() => this.flushConsole(), 50);
      this.consoleTimer.unref();
    }
  }

  private flushConsole(): void {
    if (this.consoleTimer) clearTimeout(this.consoleTimer);
    this.consoleTimer = undefined;
    if (this.consolePendingBytes === 0) return;
    const all = Buffer.concat(this.consolePending, this.consolePendingBytes);
    this.consolePending = [];
    this.consolePendingBytes = 0;
    this.push(0, 0, all, 0);
  }

  private push(pid: number, channel: OutputChannel | 0, view: Buffer, agentDropped: number): void {
    if (this.ended || view.length === 0) return;
    this.totalBytes += agentDropped;
    const e: Stored = { seq: this.nextSeq++, offset: this.totalBytes, consoleOffset: this.consoleBytes, pid, channel, data: Buffer.from(view), agentDropped };
    if (channel === 0) this.consoleBytes += view.length;
    else this.totalBytes += view.length;
    this.entries.push(e);
    this.costBytes += e.data.length + ENTRY_OVERHEAD_BYTES;
    while (this.costBytes > this.maxBytes && this.head < this.entries.length) {
      this.costBytes -= this.entries[this.head]!.data.length + ENTRY_OVERHEAD_BYTES;
      this.entries[this.head] = undefined as unknown as Stored;
      this.head++;
    }
    if (this.head > 1024 && this.head * 2 > this.entries.length) {
      this.entries = this.entries.slice(this.head);
      this.head = 0;
    }
    for (const r of this.readers) r._wake();
  }

  /** @internal The entry at `seq` or the first after it still held. */
  _at(seq: number): Stored | undefined {
    const first = this.entries[this.head];
    if (first === undefined) return undefined;
    const i = this.head + Math.max(0, seq - first.seq);
    return this.entries[i];
  }

  /** A new reader from the oldest entry still held. */
  reader(console = false): LogReader {
    const first = this.entries[this.head];
    const r = new LogReader(
      this,
      console,
      first ? first.seq : this.nextSeq,
      first ? first.offset - first.agentDropped : this.totalBytes,
      first ? first.consoleOffset : this.consoleBytes,
    );
    if (!this.ended) this.readers.add(r);
    return r;
  }

  /** @internal */
  _forget(r: LogReader): void {
    this.readers.delete(r);
  }

  /** @internal A reader starts (+1) or stops (-1) waiting for entries. */
  _waiting(delta: 1 | -1): void {
    const before = this.waiting;
    this.waiting = Math.max(0, this.waiting + delta);
    if (before === 0 && this.waiting > 0) this.stream.conn._hold(1);
    else if (before > 0 && this.waiting === 0) this.stream.conn._hold(-1);
  }

  /** Ends every reader, after the entries it has not read yet. */
  end(): void {
    if (this.ended) return;
    this.flushConsole();
    this.ended = true;
    for (const r of this.readers) r._wake();
    this.readers.clear();
  }

  /** Closes the guest's log stream (the agent keeps what comes next for a later one) and ends the readers. */
  close(): void {
    this.stream.close();
    this.end();
  }
}

/**
 * A Readable (object mode) of {@link LogEntry}: `for await (const e of vm.logs())`.
 * It ends when the VM ends (released, closed, destroyed or dead) or changes
 * hands in a pool, after the entries it had not read yet. Like a read of a
 * spawned process, it holds the event loop only while a consumer waits for
 * its next entry (`for await`, a `'data'` listener); an unread or paused
 * reader does not. `destroy()` it to stop reading early.
 */
export class LogReader extends Readable {
  private waiting = false;
  /** Process output lost before console entries this reader skipped. */
  private lostBefore = 0;

  /** @internal */
  constructor(
    private readonly ring: LogRing,
    private readonly console: boolean,
    private seq: number,
    private offset: number,
    private consoleOffset: number,
  ) {
    // No read-ahead: _read runs only when a consumer asks, so "waiting"
    // means someone waits (and holds the event loop), never a prefetch.
    super({ objectMode: true, highWaterMark: 0 });
  }

  override _read(): void {
    this.setWaiting(false);
    for (;;) {
      const e = this.ring._at(this.seq);
      if (e === undefined) {
        if (this.ring.done) this.push(null);
        else this.setWaiting(true);
        return;
      }
      // Bytes evicted from the ring between this reader's position and e.
      const lost = this.lostBefore + Math.max(0, e.offset - e.agentDropped - this.offset);
      const lostConsole = this.console ? Math.max(0, e.consoleOffset - this.consoleOffset) : 0;
      this.seq = e.seq + 1;
      this.offset = e.channel === 0 ? e.offset : e.offset + e.data.length;
      this.consoleOffset = e.channel === 0 ? e.consoleOffset + e.data.length : e.consoleOffset;
      if (e.channel === 0 && !this.console) {
        this.lostBefore = lost + e.agentDropped;
        continue;
      }
      this.lostBefore = 0;
      const entry: LogEntry = {
        pid: e.pid,
        stream: e.channel === 0 ? "console" : e.channel === 1 ? "stdout" : "stderr",
        data: e.data,
        droppedBytes: e.agentDropped + lost + lostConsole,
      };
      if (!this.push(entry)) return;
    }
  }

  /** @internal New entries, or the end. */
  _wake(): void {
    if (this.waiting) this._read();
  }

  /** A consumer waits for entries: hold the event loop as a read of a spawned process does. */
  private setWaiting(w: boolean): void {
    if (w === this.waiting) return;
    this.waiting = w;
    this.ring._waiting(w ? 1 : -1);
  }

  override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
    this.setWaiting(false);
    this.ring._forget(this);
    cb(err);
  }
}
