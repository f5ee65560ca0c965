/**
 * TcpForwarder: 127.0.0.1:hostPort on the host, each accepted connection a
 * stream to 127.0.0.1:guestPort inside the guest over the agent channel,
 * with half-close and backpressure both ways.
 */

import { createServer, type Server, type Socket } from "node:net";
import { ByteQueue, ChunkQueue } from "../agent-client/byte-queue.js";
import type { AgentConnection, TcpStream } from "../agent-client/connection.js";

/**
 * Host → guest bytes of one connection held while a write to the guest is in
 * flight; at this many the socket pauses. One stream-ring region of the
 * largest size (RING_MAX_REGION_BYTES).
 */
const UPLOAD_COALESCE_BYTES = 1 << 20;
/**
 * Host → guest bytes all of a forwarder's connections may hold (queued and in
 * flight) before each pauses after every chunk, as without coalescing: host
 * memory stays bounded however many connections upload at once.
 */
const UPLOAD_BUDGET_BYTES = 8 << 20;
/**
 * Guest → host payloads of at least this size, with nothing queued, go to
 * the socket as they are (kept until written) instead of copied into the
 * queue and out again. The agent's frames carry up to 256 KiB.
 */
const DIRECT_WRITE_BYTES = 32 * 1024;

export class TcpForwarder {
  /** e.g. "127.0.0.1:54321" */
  readonly localAddr: string;
  private server: Server;
  private sockets = new Set<Socket>();
  private stopped = false;
  /** Host → guest bytes its connections hold (UPLOAD_BUDGET_BYTES). */
  private uploadHeld = 0;

  private constructor(server: Server, localAddr: string) {
    this.server = server;
    this.localAddr = localAddr;
  }

  /** @internal Use vm.exposeTcp(). */
  static async listen(conn: () => AgentConnection, hostPort: number, guestPort: number): Promise<TcpForwarder> {
    let fwd: TcpForwarder | undefined;
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (sock) => {
      if (!fwd || fwd.stopped) {
        sock.destroy();
        return;
      }
      fwd.bridge(conn, sock, guestPort);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen({ host: "127.0.0.1", port: hostPort, exclusive: true }, () => {
        server.removeListener("error", reject);
        resolve();
      });
    });
    const addr = server.address();
    const port = typeof addr === "object" && addr ? addr.port : hostPort;
    fwd = new TcpForwarder(server, `127.0.0.1:${port}`);
    return fwd;
  }

  /** Connections being forwarded right now. */
  get activeConnections(): number {
    return this.sockets.size;
  }

  private bridge(getConn: () => AgentConnection, sock: Socket, guestPort: number): void {
    this.sockets.add(sock);
    sock.once("close", () => this.sockets.delete(sock));
    let tcp: TcpStream;
    try {
      tcp = getConn().tcpConnect(guestPort);
    } catch {
      sock.resetAndDestroy();
      return;
    }
    let finished = false;
    // Guest → host: one write in flight at a time; what arrives meanwhile
    // is coalesced in one buffer (at most a window), and the guest is
    // credited only once the host socket took the bytes.
    const pending = new ByteQueue();
    let writing = false;
    let eof = false;
    /** Writes `b` (the one write in flight); the guest gets its credit once the socket took it. */
    const write = (b: Buffer): void => {
      writing = true;
      sock.write(b, (err) => {
        writing = false;
        if (err) return;
        tcp.ack(b.length);
        pump();
      });
    };
    const pump = (): void => {
      if (writing || sock.destroyed) return;
      if (pending.length === 0) {
        if (eof && !sock.writableEnded) sock.end();
        return;
      }
      write(pending.shift());
    };
    tcp.onData = (chunk) => {
      // A large payload is a buffer of its own (a frame's body, or most of
      // one socket read of the agent connection): with nothing queued it is
      // written as it is, no copy.
      if (!writing && pending.length === 0 && chunk.length >= DIRECT_WRITE_BYTES && !sock.destroyed) return write(chunk);
      pending.push(chunk);
      pump();
    };
    tcp.onEof = () => {
      eof = true;
      pump();
    };
    tcp.ended.then(
      (how) => {
        finished = true;
        if (how === "reset") sock.resetAndDestroy();
        else {
          eof = true;
          pump();
        }
      },
      () => {
        finished = true;
        sock.resetAndDestroy();
      },
    );
    tcp.connected.then(
      () => {
        // Host → guest: one write in flight at a time; what the socket
        // delivers meanwhile is coalesced (up to UPLOAD_COALESCE_BYTES, then
        // the socket pauses until the write completes), so a fast sender's
        // bytes go as stream-ring regions instead of one frame per 64 KiB
        // chunk (docs/protocol.md, "Stream ring"). A lone chunk goes at once.
        // The socket's reads are buffers of their own: kept by reference,
        // and a region one read covers goes without a copy.
        const upload = new ChunkQueue();
        let uploading = false;
        let uploadEnd = false;
        const pumpUp = (): void => {
          if (uploading) return;
          if (upload.length === 0) {
            if (uploadEnd) {
              uploadEnd = false;
              tcp.end().catch(() => undefined);
            }
            return;
          }
          // The guest has a whole region's worth to work on: gather a whole
          // region (a grant or more data calls again).
          if (!uploadEnd && upload.length < UPLOAD_COALESCE_BYTES && tcp.sender.inFlight >= UPLOAD_COALESCE_BYTES) return;
          uploading = true;
          const b = upload.take(UPLOAD_COALESCE_BYTES);
          tcp.write(b).then(
            () => {
              this.uploadHeld -= b.length;
              uploading = false;
              if (sock.isPaused() && !sock.readableEnded) sock.resume();
              pumpUp();
            },
            () => {
              this.uploadHeld -= b.length;
              sock.destroy();
            },
          );
        };
        tcp.sender.onGrant = pumpUp;
        sock.on("data", (chunk: Buffer) => {
          upload.push(chunk);
          this.uploadHeld += chunk.length;
          if (upload.length >= UPLOAD_COALESCE_BYTES || this.uploadHeld >= UPLOAD_BUDGET_BYTES) sock.pause();
          pumpUp();
        });
        sock.once("close", () => {
          // Bytes queued but never written go with the connection.
          this.uploadHeld -= upload.length;
          upload.clear();
        });
        sock.on("end", () => {
          uploadEnd = true;
          pumpUp();
        });
        sock.resume();
      },
      () => sock.resetAndDestroy(),
    );
    sock.on("error", () => {
      if (!finished) tcp.reset();
    });
    sock.on("close", () => {
      if (!finished) tcp.reset();
    });
  }

  /**
   * Stops accepting connections (new ones are refused); connections in flight
   * finish on their own. Idempotent.
   */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    await new Promise<void>((resolve) => {
      this.server.close(() => undefined);
      // close() stops listening at once; its callback waits for open
      // connections, which we let finish without waiting for them.
      setImmediate(resolve);
    });
  }

  /** @internal Host → guest bytes the connections hold now (tests). */
  get _uploadHeld(): number {
    return this.uploadHeld;
  }

  /** @internal Stops and drops every connection (VM released). */
  destroy(): void {
    this.stopped = true;
    this.server.close(() => undefined);
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }
}
