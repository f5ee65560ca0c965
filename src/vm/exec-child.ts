/**
 * ExecChild: a streaming process in the guest (the seed's pull API plus Node
 * streams on top). Output is credited back to the guest only as the caller
 * consumes it, so a fast writer in the guest blocks on its pipe instead of
 * filling host memory: at most one flow-control window (1 MiB) per channel
 * is ever buffered here, in one contiguous buffer whatever the frame sizes.
 */

import { Readable, Writable } from "node:stream";
import type { ExecStream, OutputChannel } from "../agent-client/connection.js";
import { ByteQueue } from "../agent-client/byte-queue.js";
import { invalidOption } from "../errors.js";
import type { ExecWaitResult } from "./options.js";

export const DEFAULT_READ_BYTES = 64 * 1024;

/**
 * Output of one channel not yet taken by the caller, in one growing buffer
 * (never an array of the guest's chunks: their sizes are the guest's choice).
 * Bytes are credited back to the guest only once the caller took them, so
 * the queue holds at most one window; a Node Readable gets coalesced chunks.
 */
class OutputQueue {
  private q = new ByteQueue();
  private eof = false;
  private waiters: (() => void)[] = [];
  private readable: Readable | undefined;
  /** The Readable asked for data and was not given any since. */
  private wanted = false;
  private flushScheduled = false;

  constructor(
    private stream: ExecStream,
    private ch: OutputChannel,
  ) {}

  /** `chunk` is a view valid during the call only: copied in. */
  push(chunk: Buffer): void {
    this.q.push(chunk);
    if (this.readable) this.scheduleFlush();
    else this.wake();
  }

  end(): void {
    this.eof = true;
    if (this.readable) this.scheduleFlush();
    this.wake();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Up to `max` bytes; waits for data; a 0-length Buffer at EOF. */
  async read(max: number): Promise<Buffer> {
    while (this.q.length === 0 && !this.eof) await new Promise<void>((r) => this.waiters.push(r));
    if (this.q.length === 0) return Buffer.alloc(0);
    const b = this.q.shift(max);
    this.stream.ack(this.ch, b.length);
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
    if (!r || !this.wanted) return;
    if (this.q.length) {
      const b = this.q.shift();
      // Credited once the Readable has it: its buffer holds at most its
      // high-water mark plus one window.
      this.stream.ack(this.ch, b.length);
      this.wanted = r.push(b);
    }
    if (this.eof && this.q.length === 0) {
      this.wanted = false;
      r.push(null);
    }
  }

  asReadable(): Readable {
    if (this.readable) return this.readable;
    const r = new Readable({
      highWaterMark: 256 * 1024,
      read: () => {
        this.wanted = true;
        if (this.q.length || this.eof) this.scheduleFlush();
      },
    });
    this.readable = r;
    return r;
  }
}

/** A process started with `vm.spawn()`. */
export class ExecChild {
  /** Guest pid of the process. */
  readonly pid: number;
  private out: OutputQueue;
  private err: OutputQueue;
  private stdinStream: Writable | undefined;
  private result: Promise<ExecWaitResult>;

  /** @internal */
  constructor(
    private stream: ExecStream,
    pid: number,
  ) {
    this.pid = pid;
    this.out = new OutputQueue(stream, 1);
    this.err = new OutputQueue(stream, 2);
    stream.onData = (ch, chunk) => (ch === 1 ? this.out : this.err).push(chunk);
    stream.onEof = (ch) => (ch === 1 ? this.out : this.err).end();
    this.result = stream.exit.then(
      (e) => ({ exitCode: e.exitCode, timedOut: e.timedOut, peakRssKib: e.peakRssKib }),
    );
    this.result.catch(() => undefined);
  }

  /** Resolves when the guest has accepted the bytes (flow control). */
  writeStdin(bytes: Uint8Array): Promise<void> {
    if (!(bytes instanceof Uint8Array)) return Promise.reject(invalidOption("bytes", "a Buffer or Uint8Array", bytes));
    return this.stream.writeStdin(bytes);
  }

  closeStdin(): Promise<void> {
    return this.stream.closeStdin();
  }

  /** Up to maxBytes of stdout (waits for some); a 0-length Buffer at EOF. */
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

  /** Resolves when the process has exited and its output was delivered. */
  wait(): Promise<ExecWaitResult> {
    return this.result;
  }

  /** stdout as a Node Readable (use it or readStdout, not both). */
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
