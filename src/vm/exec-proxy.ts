/**
 * The seed's escape hatch: `vm.execPath` (and `vm.vsockPath`) is a unix
 * socket on which a bring-your-own client speaking docs/protocol.md gets a
 * session of its own, concurrently with the Vm object's.
 *
 * The VM has one agent channel, owned by the Vm's AgentConnection. This
 * proxy serves each client connection as a protocol session: it answers
 * HELLO itself (with what the agent said in its HELLO_ACK), answers PING
 * with a real round trip, and maps the client's stream ids onto fresh ids of
 * the VM's connection, forwarding frames both ways. It enforces on the
 * client what the agent would (frame types, stream ids, the windows the
 * agent granted), so a client's mistake ends that client's session, never
 * the VM's. Requests that change the VM for the Vm object (CONFIGURE,
 * SNAPSHOT_PREPARE, WORKLOAD_START) are refused on the client's stream.
 *
 * The client is as trusted as the host user who can reach the socket (the
 * runtime directory is 0700); the guest stays hostile: the agent's frames
 * on proxied streams are checked by the connection (RawStream).
 */

import { randomBytes } from "node:crypto";
import { unlinkSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import type { AgentConnection, RawStream } from "../agent-client/connection.js";
import { DecodeError, FrameReader, RecordBuilder, RecordReader, encodeFrame, type Frame } from "../protocol/codec.js";
import { MAGIC, MAX_PAYLOAD, MsgType, PROTOCOL_VERSION, Tag, WireError } from "../protocol/constants.js";

/** Requests a client may open a stream with. */
const OPENERS = new Set<number>([MsgType.EXEC, MsgType.WRITE_FILE, MsgType.READ_FILE, MsgType.TCP_CONNECT, MsgType.WORKLOAD_SIGNAL, MsgType.WAIT_LISTEN]);
/** Requests that change the VM under the Vm object: refused with ERROR on the client's stream. */
const REFUSED = new Set<number>([MsgType.CONFIGURE, MsgType.SNAPSHOT_PREPARE, MsgType.WORKLOAD_START, MsgType.MOUNT, MsgType.LOGS]);
/** Frames a client may send on a stream it opened. */
const ON_STREAM = new Set<number>([MsgType.SIGNAL, MsgType.RESIZE, MsgType.CANCEL, MsgType.DATA, MsgType.EOF, MsgType.WINDOW]);
/** A client that does not read its socket is cut off past this much queued output. */
const MAX_CLIENT_BACKLOG = 32 << 20;

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
}

export class ExecProxy {
  /** The socket path clients connect to. */
  readonly path: string;
  private server: Server;
  private sessions = new Set<ProxySession>();
  private closed = false;

  /** Listens at once: the path exists when the constructor returns. */
  constructor(
    private conn: AgentConnection,
    dir: string,
  ) {
    this.path = join(dir, `exec-${randomBytes(4).toString("hex")}.sock`);
    this.server = createServer((sock) => {
      if (this.closed) {
        sock.destroy();
        return;
      }
      const s = new ProxySession(this.conn, sock, () => this.sessions.delete(s));
      this.sessions.add(s);
    });
    this.server.on("error", () => this.close());
    this.server.listen(this.path);
    // A listening proxy is not work: it does not keep the process alive.
    this.server.unref();
  }

  /** Number of client sessions (for tests). */
  get sessionCount(): number {
    return this.sessions.size;
  }

  /** Stops listening and ends every client session (their streams are cancelled). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.server.close();
    for (const s of [...this.sessions]) s.close();
    this.sessions.clear();
    try {
      unlinkSync(this.path);
    } catch {
      /* already gone with the runtime dir */
    }
  }
}

class ProxySession {
  private reader = new FrameReader();
  private helloDone = false;
  private lastId = 0;
  /** Client stream id → the stream on the VM's connection. */
  private streams = new Map<number, RawStream>();
  private closed = false;

  constructor(
    private conn: AgentConnection,
    private sock: Socket,
    private onClose: () => void,
  ) {
    sock.setNoDelay?.(true);
    sock.unref();
    sock.on("data", (chunk: Buffer) => this.onData(chunk));
    sock.on("error", () => this.close());
    sock.on("close", () => this.close());
  }

  /** Ends the session: the client's streams are cancelled in the guest. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.sock.destroy();
    this.cancelAll();
    this.onClose();
  }

  private cancelAll(): void {
    // The streams stay registered on the connection until their terminal
    // reply; forward() credits their late output so the agent never waits.
    for (const raw of this.streams.values()) if (!raw.done) this.conn._send(MsgType.CANCEL, 0, raw.id);
    this.streams.clear();
  }

  private send(type: number, flags: number, stream: number, payload?: Uint8Array): void {
    if (this.closed) return;
    this.sock.write(encodeFrame(type, flags, stream, payload));
    if (this.sock.writableLength > MAX_CLIENT_BACKLOG) this.close();
  }

  private refuse(stream: number, code: number, message: string): void {
    this.send(MsgType.ERROR, 0, stream, new RecordBuilder().u32(Tag.ERROR.code, code).bytes(Tag.ERROR.message, message).build());
  }

  private onData(chunk: Buffer): void {
    if (this.closed) return;
    let frames: Frame[];
    try {
      frames = this.reader.push(chunk);
    } catch (e) {
      if (e instanceof DecodeError) return this.close();
      throw e;
    }
    for (const f of frames) {
      if (this.closed) return;
      if (this.conn.closed) return this.close();
      let ok: boolean;
      try {
        ok = f.stream === 0 ? this.session(f) : this.onStream(f);
      } catch {
        ok = false;
      }
      if (!ok) return this.close();
    }
  }

  /** Stream 0: HELLO (a new session each time) and PING. */
  private session(f: Frame): boolean {
    if (f.type === MsgType.HELLO) {
      const r = new RecordReader(f.payload);
      const magic = r.bytes(Tag.HELLO.magic);
      const min = r.u32(Tag.HELLO.min_version) ?? 0;
      const max = r.u32(Tag.HELLO.max_version) ?? 0;
      if (!magic?.equals(MAGIC)) return false;
      if (min > PROTOCOL_VERSION || max < PROTOCOL_VERSION) {
        // As the agent does: ERROR on stream 0, then the session ends.
        this.refuse(0, WireError.UNSUPPORTED, `protocol versions ${min}..${max} offered; this agent speaks ${PROTOCOL_VERSION}`);
        return false;
      }
      // A HELLO mid-session starts a new session: the old streams are forgotten.
      this.cancelAll();
      this.lastId = 0;
      this.helloDone = true;
      const info = this.conn.info;
      const ack = new RecordBuilder().bytes(Tag.HELLO_ACK.magic, MAGIC).u32(Tag.HELLO_ACK.version, PROTOCOL_VERSION).bytes(Tag.HELLO_ACK.agent_version, info?.agentVersion ?? "?");
      for (const feat of info?.features ?? []) ack.bytes(Tag.HELLO_ACK.feature, feat);
      ack.u32(Tag.HELLO_ACK.max_payload, info?.maxPayload ?? MAX_PAYLOAD);
      this.send(MsgType.HELLO_ACK, 0, 0, ack.build());
      return true;
    }
    if (!this.helloDone) return false;
    if (f.type === MsgType.PING) {
      if (f.payload.length > 64) return false;
      const payload = Buffer.from(f.payload);
      this.conn.ping().then(
        () => this.send(MsgType.PONG, 0, 0, payload),
        () => this.close(),
      );
      return true;
    }
    return false;
  }

  private onStream(f: Frame): boolean {
    if (!this.helloDone) return false;
    const raw = this.streams.get(f.stream);
    if (raw) {
      if (!ON_STREAM.has(f.type)) return false;
      if (f.type === MsgType.DATA) {
        if (f.flags !== 0 || f.payload.length > raw.credit) return false;
        raw.credit -= f.payload.length;
      } else if (f.type === MsgType.EOF) {
        if (f.flags !== 0) return false;
      } else if (f.type === MsgType.WINDOW) {
        if ((f.flags !== 1 && f.flags !== 2) || f.payload.length !== 4) return false;
        if (!raw.grant(f.flags, f.payload.readUInt32LE(0))) return false;
      }
      this.conn._send(f.type, f.flags, raw.id, f.payload);
      return true;
    }
    if (f.stream <= this.lastId) {
      // A stream that already ended (frames racing its terminal reply): dropped.
      return ON_STREAM.has(f.type);
    }
    if (!OPENERS.has(f.type) && !REFUSED.has(f.type)) return false;
    this.lastId = f.stream;
    if (REFUSED.has(f.type)) {
      this.refuse(
        f.stream,
        WireError.PERMISSION,
        `this request (type ${f.type}) is not allowed through execPath: the Vm object owns CONFIGURE, SNAPSHOT_PREPARE, WORKLOAD_START, MOUNT and LOGS (use vm.logs())`,
      );
      return true;
    }
    const id = f.stream;
    const opened = this.conn.openRaw(
      f.type,
      Buffer.from(f.payload),
      (reply) => {
        if (this.closed) {
          // Nobody reads any more: credit the output so the stream can end.
          if (reply.type === MsgType.DATA && reply.payload.length && opened.grant(reply.flags as 1 | 2, reply.payload.length)) {
            this.conn._send(MsgType.WINDOW, reply.flags, opened.id, u32(reply.payload.length));
          }
          return;
        }
        this.send(reply.type, reply.flags, id, reply.payload);
      },
      () => {
        if (this.streams.get(id) === opened) this.streams.delete(id);
        if (this.conn.closed) this.close();
      },
    );
    this.streams.set(id, opened);
    return true;
  }
}
