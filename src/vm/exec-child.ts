/**
 * ExecChild: a streaming process in the guest (the seed's pull API plus Node
 * streams on top). Output is credited back to the guest only as the caller
 * consumes it, so a fast writer in the guest blocks on its pipe instead of
 * filling host memory: at most one flow-control window (1 MiB) per channel
 * is ever buffered here.
 */

import { Readable, Writable } from "node:stream";
import type { ExecStream, OutputChannel } from "../agent-client/connection.js";
import { ByteQueue } from "../agent-client/byte-queue.js";
import { ClosedError, invalidOption } from "../errors.js";
import { INITIAL_WINDOW } from "../protocol/constants.js";
import type { ExecWaitResult } from "./options.js";

export const DEFAULT_READ_BYTES = 64 * 1024;

/** Unread bytes a channel drained by wait() keeps for later reads (one window). */
export const DRAINED_KEEP_BYTES = INITIAL_WINDOW;

/**
 * Output of one channel not yet taken by the caller, in one growing buffer
 * (never an array of the guest's chunks: their sizes are the guest's choice).
 * Bytes are credited back to the guest only once the caller took them, so
 * the queue holds at most one window; a Node Readable gets coalesced chunks.
 */
class OutputQueue {
  private q = new ByteQueue();
  /** Queued bytes not yet credited to the guest. */
  private unackedQueued = 0;
  private eof = false;
  private error: Error | undefined;
  private waiters: (() => void)[] = [];
  private readable: Readable | undefined;
  /** The Readable asked for data and was not given any since. */
  private wanted = false;
  private flushScheduled = false;
  /** Someone reads this channel (readStdout, the Readable, for await). */
  private touched = false;
  /** wait() was called while nobody read: credit on arrival, keep a bounded head. */
  private draining = false;
  /** Bytes dropped while draining (beyond DRAINED_KEEP_BYTES unread). */
  discarded = 0;

  constructor(
    private stream: ExecStream,
    private ch: OutputChannel,
  ) {}

  /** `chunk` is a view valid during the call only: copied in. */
  push(chunk: Buffer): void {
    if (this.error) {
      // Nobody can read any more: credit so the guest is never blocked on us.
      this.stream.ack(this.ch, chunk.length);
      return;
    }
    if (this.draining) {
      this.stream.ack(this.ch, chunk.length);
      const room = Math.max(0, DRAINED_KEEP_BYTES - this.q.length);
      if (room < chunk.length) {
        this.discarded += chunk.length - room;
        if (room === 0) return;
        chunk = chunk.subarray(0, room);
      }
    } else {
      this.unackedQueued += chunk.length;
    }
    this.q.push(chunk);
    if (this.readable) this.scheduleFlush();
    else this.wake();
  }

  end(): void {
    this.eof = true;
    if (this.readable) this.scheduleFlush();
    this.wake();
  }

  /** The process's stream failed (the VM died, was destroyed or released): reads reject with `err`. */
  fail(err: Error): void {
    if (this.eof || this.error) return;
    this.error = err;
    if (this.unackedQueued) this.stream.ack(this.ch, this.unackedQueued);
    this.unackedQueued = 0;
    if (this.readable && !this.readable.destroyed) this.endReadable(this.readable, err);
    this.wake();
  }

  /**
   * Ends the Readable of a process whose VM went away: destroyed with the
   * error when someone listens for errors (`for await`, `pipeline`, an
   * 'error' handler), else ended after what was received, so that a bare
   * `child.stdout.pipe(dest)` does not crash the process with an unhandled
   * 'error' (wait() rejects with the error).
   */
  private endReadable(r: Readable, err: Error): void {
    if (r.listenerCount("error") > 0) {
      r.destroy(err);
      return;
    }
    if (this.q.length) r.push(this.q.takeAll());
    r.push(null);
  }

  /** wait() was called: a channel nobody reads stops holding the process back. */
  drainIfUnread(): void {
    if (this.touched || this.draining || this.eof || this.error) return;
    this.draining = true;
    if (this.unackedQueued) this.stream.ack(this.ch, this.unackedQueued);
    this.unackedQueued = 0;
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Takes up to `n` queued bytes' worth of credit owed to the guest. */
  private credit(n: number): void {
    const a = Math.min(n, this.unackedQueued);
    if (a <= 0) return;
    this.unackedQueued -= a;
    this.stream.ack(this.ch, a);
  }

  /** Up to `max` bytes; waits for data; a 0-length Buffer at EOF; rejects once the stream failed and the queue is empty. */
  async read(max: number): Promise<Buffer> {
    this.touched = true;
    while (this.q.length === 0 && !this.eof && !this.error) await new Promise<void>((r) => this.waiters.push(r));
    if (this.q.length === 0) {
      if (this.error) throw this.error;
      return Buffer.alloc(0);
    }
    const b = this.q.shift(max);
    this.credit(b.length);
    return b;
  }

  /** Hands everything queued to the Readable in one chunk, if it wants data. */
  private scheduleFlush(): void {
    if (this.flushScheduled || !this.wanted) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  private flush(): void {
    const r = this.readable;
    if (!r || !this.wanted || r.destroyed) return;
    if (this.q.length) {
      const b = this.q.shift();
      // Credited once the Readable has it: its buffer holds at most its
      // high-water mark plus one window.
      this.credit(b.length);
      this.wanted = r.push(b);
    }
    if (this.eof && this.q.length === 0) {
      this.wanted = false;
      r.push(null);
    }
  }

  asReadable(): Readable {
    if (this.readable) return this.readable;
    this.touched = true;
    const r = new Readable({
      highWaterMark: 256 * 1024,
      read: () => {
        this.wanted = true;
        if (this.q.length || this.eof) this.scheduleFlush();
      },
    });
    this.readable = r;
    if (this.error) this.endReadable(r, this.error);
    return r;
  }
}

/** A process started with `vm.spawn()`. */
export class ExecChild {
  /** Guest pid of the process. */
  get pid(): number {
    return this.pidValue;
  }
  private pidValue: number;
  private out: OutputQueue;
  private err: OutputQueue;
  private stdinStream: Writable | undefined;
  private result: Promise<ExecWaitResult>;
  private abandon!: (err: Error) => void;
  private ended = false;

  /** @internal */
  constructor(
    private stream: ExecStream,
    pid: number,
    /** Why the VM died, once it has (the connection's own error is a plain ClosedError). */
    deathError: () => Error | undefined = () => undefined,
  ) {
    this.pidValue = pid;
    this.out = new OutputQueue(stream, 1);
    this.err = new OutputQueue(stream, 2);
    stream.onData = (ch, chunk) => (ch === 1 ? this.out : this.err).push(chunk);
    stream.onEof = (ch) => (ch === 1 ? this.out : this.err).end();
    const abandoned = new Promise<never>((_, reject) => (this.abandon = reject));
    this.result = Promise.race([
      stream.exit.then(
        (e) => ({ exitCode: e.exitCode, timedOut: e.timedOut, peakRssKib: e.peakRssKib, signal: e.signal }),
        (e: unknown) => {
          throw (e instanceof ClosedError && deathError()) || e;
        },
      ),
      abandoned,
    ]);
    // The VM died, was destroyed or released: every read and wait settles with its error.
    this.result.then(
      () => (this.ended = true),
      (e: unknown) => {
        this.ended = true;
        const err = e instanceof Error ? e : new Error(String(e));
        this.out.fail(err);
        this.err.fail(err);
      },
    );
  }

  /** @internal Set once the guest reported the pid (STARTED). */
  _setPid(pid: number): void {
    this.pidValue = pid;
  }

  /**
   * @internal The VM this process runs in changes hands (released back to a
   * pool that keeps it): the process is killed, and its reads, writes and
   * wait() reject with `err`.
   */
  _end(err: Error): void {
    if (this.ended) return;
    this.stream.cancel();
    this.abandon(err);
  }

  /**
   * @internal The host stops reading the process, which keeps running (a
   * warmup's server in the VM handed out after a bake): its output goes to
   * `vm.logs()`; reads, writes and wait() reject with `err`.
   */
  _detach(err: Error): void {
    if (this.ended) return;
    this.stream.detach(err);
    this.abandon(err);
  }

  /** Settles when the process has exited or its stream failed (for the VM's bookkeeping). */
  get _settled(): Promise<unknown> {
    return this.result.catch(() => undefined);
  }

  /**
   * (extension) Output bytes dropped per channel: after `wait()`, a channel
   * that nobody had started reading is drained so the process can finish;
   * its first {@link DRAINED_KEEP_BYTES} unread bytes stay readable and the
   * rest is counted here.
   */
  get discardedBytes(): { stdout: number; stderr: number } {
    return { stdout: this.out.discarded, stderr: this.err.discarded };
  }

  /** Resolves when the guest has accepted the bytes (flow control). */
  writeStdin(bytes: Uint8Array): Promise<void> {
    if (!(bytes instanceof Uint8Array)) return Promise.reject(invalidOption("bytes", "a Buffer or Uint8Array", bytes));
    return this.stream.writeStdin(bytes);
  }

  closeStdin(): Promise<void> {
    return this.stream.closeStdin();
  }

  /**
   * Up to maxBytes of stdout (waits for some); a 0-length Buffer at EOF.
   * Rejects with the VM's error (GuestDiedError, ClosedError) once the VM
   * dies, is destroyed or released and no output is left to read.
   */
  readStdout(maxBytes = DEFAULT_READ_BYTES): Promise<Buffer> {
    return this.out.read(checkMax(maxBytes));
  }

  /** Up to maxBytes of stderr (waits for some); a 0-length Buffer at EOF. */
  readStderr(maxBytes = DEFAULT_READ_BYTES): Promise<Buffer> {
    return this.err.read(checkMax(maxBytes));
  }

  /** Sends a signal to the process group; harmless after exit. */
  async signal(signum: number): Promise<void> {
    if (!Number.isInteger(signum) || signum < 1 || signum > 64) throw invalidOption("signum", "a signal number 1..64", signum);
    this.stream.signal(signum);
  }

  /** Resizes the pty (SIGWINCH in the guest); a no-op without tty. */
  async resize(cols: number, rows: number): Promise<void> {
    if (!Number.isInteger(cols) || !Number.isInteger(rows) || cols < 1 || rows < 1 || cols > 65535 || rows > 65535) {
      throw invalidOption("resize", "cols and rows as integers in 1..65535", { cols, rows });
    }
    this.stream.resize(cols, rows);
  }

  /**
   * Resolves when the process has exited; rejects with the VM's error when
   * the VM dies, is destroyed or released first. It does not need the caller
   * to read: a channel (stdout, stderr) nobody has started reading is
   * drained from this call on, keeping its first 1 MiB of unread output
   * readable and discarding the rest ({@link discardedBytes}). A channel
   * being read stays flow-controlled: keep reading it (as you would a Node
   * child process's pipes), or every byte is not guaranteed to arrive.
   */
  wait(): Promise<ExecWaitResult> {
    this.out.drainIfUnread();
    this.err.drainIfUnread();
    return this.result;
  }

  /** stdout as a Node Readable (use it or readStdout, not both); destroyed with the VM's error when the VM goes. */
  get stdout(): Readable {
    return this.out.asReadable();
  }

  /** stderr as a Node Readable (use it or readStderr, not both). */
  get stderr(): Readable {
    return this.err.asReadable();
  }

  /** stdin as a Node Writable with backpressure from the guest. */
  get stdin(): Writable {
    if (!this.stdinStream) {
      this.stdinStream = new Writable({
        highWaterMark: 64 * 1024,
        write: (chunk: Buffer, _enc, cb) => {
          this.stream.writeStdin(chunk).then(() => cb(), cb);
        },
        final: (cb) => {
          this.stream.closeStdin().then(() => cb(), cb);
        },
      });
    }
    return this.stdinStream;
  }

  /** Kills the process tree at once. */
  kill(): void {
    this.stream.cancel();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
    for (;;) {
      const b = await this.readStdout();
      if (b.length === 0) return;
      yield b;
    }
  }
}

function checkMax(n: unknown): number {
  if (typeof n !== "number" || !Number.isInteger(n) || n < 1) throw invalidOption("maxBytes", "a positive integer", n);
  return n;
}
