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

/** One chunk of a detached guest process's output. */
export interface LogEntry {
  /** The pid (in the guest) of the process its exec or spawn started. */
  readonly pid: number;
  readonly stream: "stdout" | "stderr";
  readonly data: Buffer;
  /**
   * Bytes lost just before this entry: dropped by the agent (its buffer of
   * 256 KiB was full while no host read) or by this reader falling behind
   * the host's ring.
   */
  readonly droppedBytes: number;
}

/** Host memory for a VM's log entries. */
export const LOG_BUFFER_BYTES = 1024 * 1024;
/** What one entry costs beyond its data (object, Buffer header). */
const ENTRY_OVERHEAD_BYTES = 128;

interface Stored {
  readonly seq: number;
  /** Data bytes (and agent drops) before this entry since the ring started. */
  readonly offset: number;
  readonly pid: number;
  readonly channel: OutputChannel;
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

  private push(pid: number, channel: OutputChannel, view: Buffer, agentDropped: number): void {
    if (this.ended) return;
    this.totalBytes += agentDropped;
    const e: Stored = { seq: this.nextSeq++, offset: this.totalBytes, pid, channel, data: Buffer.from(view), agentDropped };
    this.totalBytes += view.length;
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

  /** @internal Total data bytes before `seq` (for a reader that fell behind). */
  get _totalBytes(): number {
    return this.totalBytes;
  }

  /** A new reader from the oldest entry still held. */
  reader(): LogReader {
    const first = this.entries[this.head];
    const r = new LogReader(this, first ? first.seq : this.nextSeq, first ? first.offset - first.agentDropped : this.totalBytes);
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

  /** @internal */
  constructor(
    private readonly ring: LogRing,
    private seq: number,
    private offset: number,
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
      const lost = e.offset - e.agentDropped - this.offset;
      const entry: LogEntry = {
        pid: e.pid,
        stream: e.channel === 1 ? "stdout" : "stderr",
        data: e.data,
        droppedBytes: e.agentDropped + Math.max(0, lost),
      };
      this.seq = e.seq + 1;
      this.offset = e.offset + e.data.length;
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
