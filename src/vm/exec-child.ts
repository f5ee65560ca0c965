/**
 * ExecChild: a streaming process in the guest (the seed's pull API plus Node
 * streams on top). Output is credited back to the guest only as the caller
 * consumes it, so a fast writer in the guest blocks on its pipe instead of
 * filling host memory: at most one flow-control window (1 MiB) per channel
 * is ever buffered here.
 */

import { Readable, Writable } from "node:stream";
import type { ExecStream, OutputChannel } from "../agent-client/connection.js";
import { invalidOption } from "../errors.js";
import type { ExecWaitResult } from "./options.js";

export const DEFAULT_READ_BYTES = 64 * 1024;

class OutputQueue {
  private chunks: Buffer[] = [];
  private bytes = 0;
  private eof = false;
  private waiters: (() => void)[] = [];
  private readable: Readable | undefined;
  /** Bytes pushed into `readable` but not yet credited (it was full). */
  private unacked = 0;

  constructor(
    private stream: ExecStream,
    private ch: OutputChannel,
  ) {}

  push(chunk: Buffer): void {
    if (this.readable) {
      // Node stream consumer: credit once the stream has taken the bytes and
      // is below its high-water mark.
      if (this.readable.push(chunk)) this.stream.ack(this.ch, chunk.length);
      else this.unacked += chunk.length;
      return;
    }
    this.chunks.push(chunk);
    this.bytes += chunk.length;
    this.wake();
  }

  end(): void {
    this.eof = true;
    this.readable?.push(null);
    this.wake();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Up to `max` bytes; waits for data; a 0-length Buffer at EOF. */
  async read(max: number): Promise<Buffer> {
    while (this.bytes === 0 && !this.eof) await new Promise<void>((r) => this.waiters.push(r));
    if (this.bytes === 0) return Buffer.alloc(0);
    const parts: Buffer[] = [];
    let n = 0;
    while (n < max && this.chunks.length) {
      const c = this.chunks[0]!;
      const take = Math.min(c.length, max - n);
      parts.push(take === c.length ? c : c.subarray(0, take));
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
      n += take;
    }
    this.bytes -= n;
    this.stream.ack(this.ch, n);
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts, n);
  }

  asReadable(): Readable {
    if (this.readable) return this.readable;
    const r = new Readable({
      highWaterMark: 256 * 1024,
      read: () => {
        if (this.unacked) {
          this.stream.ack(this.ch, this.unacked);
          this.unacked = 0;
        }
        // Hand over what was queued before, crediting it.
        while (this.chunks.length) {
          const c = this.chunks.shift()!;
          this.bytes -= c.length;
          this.stream.ack(this.ch, c.length);
          if (!r.push(c)) return;
        }
        if (this.eof) r.push(null);
      },
    });
    this.readable = r;
    if (this.eof && this.bytes === 0) r.push(null);
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
