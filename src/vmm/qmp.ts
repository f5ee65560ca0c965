/**
 * A minimal QMP client (QEMU Machine Protocol: JSON lines over a unix
 * socket). QEMU is trusted less than the host but more than the guest; its
 * replies are still size-bounded.
 */

import { connect, type Socket } from "node:net";
import { GuestDiedError, QemuError, TimeoutError } from "../errors.js";
import type { QemuProcess } from "./qemu.js";

const MAX_LINE = 1 << 20;

export interface QmpEvent {
  event: string;
  data?: unknown;
}

export class QmpClient {
  private sock: Socket;
  private buf = "";
  private nextId = 1;
  private pending = new Map<string, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private waiters: { name: string; resolve: (e: QmpEvent) => void }[] = [];
  private closedError: Error | undefined;
  private greeted: Promise<void>;
  private refed = true;

  private constructor(sock: Socket) {
    this.sock = sock;
    let greet!: () => void;
    let fail!: (e: Error) => void;
    this.greeted = new Promise<void>((res, rej) => {
      greet = res;
      fail = rej;
    });
    let gotGreeting = false;
    sock.setEncoding("utf8");
    sock.on("data", (chunk: string) => {
      this.buf += chunk;
      if (this.buf.length > MAX_LINE) {
        this.fail(new QemuError("QMP: oversized message from QEMU"));
        sock.destroy();
        return;
      }
      let i: number;
      while ((i = this.buf.indexOf("\n")) >= 0) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        if (!line) continue;
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line) as Record<string, unknown>;
        } catch {
          continue;
        }
        if (!gotGreeting && "QMP" in msg) {
          gotGreeting = true;
          greet();
          continue;
        }
        this.onMessage(msg);
      }
    });
    sock.on("error", (e) => this.fail(new QemuError(`QMP connection failed: ${e.message}`, { cause: e })));
    sock.on("close", () => {
      this.fail(new QemuError("QMP connection closed (QEMU exited)"));
      fail(this.closedError ?? new QemuError("QMP closed before the greeting"));
    });
  }

  static async connect(path: string): Promise<QmpClient> {
    const sock = connect(path);
    await new Promise<void>((resolve, reject) => {
      sock.once("connect", resolve);
      sock.once("error", reject);
    });
    const c = new QmpClient(sock);
    await c.greeted;
    await c.execute("qmp_capabilities");
    c.updateRef();
    return c;
  }

  /**
   * The socket holds the event loop only while a command or an event wait is
   * pending: an idle QMP connection (a QEMU started ahead of a restore, an
   * idle VM) must not keep the Node process alive.
   */
  private updateRef(): void {
    const busy = this.closedError === undefined && (this.pending.size > 0 || this.waiters.length > 0);
    if (busy === this.refed) return;
    this.refed = busy;
    if (busy) this.sock.ref();
    else this.sock.unref();
  }

  private onMessage(msg: Record<string, unknown>): void {
    if (typeof msg.event === "string") {
      const ev: QmpEvent = { event: msg.event, data: msg.data };
      const ws = this.waiters;
      this.waiters = [];
      for (const w of ws) {
        if (w.name === ev.event) w.resolve(ev);
        else this.waiters.push(w);
      }
      this.updateRef();
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    if (!id) return;
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    this.updateRef();
    if ("error" in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QemuError(`QMP error: ${err.class ?? "?"}: ${err.desc ?? "?"}`));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(e: Error): void {
    if (this.closedError) return;
    this.closedError = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  /** Runs a QMP command and returns its `return` value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = `c${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.updateRef();
      this.sock.write(JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id }) + "\n");
    });
  }

  /** Resolves on the next event with this name. */
  waitEvent(name: string): Promise<QmpEvent> {
    return new Promise((resolve) => {
      this.waiters.push({ name, resolve });
      this.updateRef();
    });
  }

  close(): void {
    this.sock.destroy();
  }
}

/** Connects to QMP as soon as QEMU has created its socket (QEMU exiting first, or the deadline passing, throws). */
export async function connectQmp(q: QemuProcess, deadline: number): Promise<QmpClient> {
  for (;;) {
    if (q.exitStatus) throw new GuestDiedError("QEMU exited during start", q.consoleTail());
    try {
      return await QmpClient.connect(q.qmpSocket);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== "ENOENT" && code !== "ECONNREFUSED") throw e;
      if (Date.now() > deadline) throw new TimeoutError("QEMU's QMP socket did not appear in time", 0);
      await new Promise((r) => setTimeout(r, 1));
    }
  }
}
