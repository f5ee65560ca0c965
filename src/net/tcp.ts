/**
 * One guest TCP connection, terminated on the host and re-originated as an
 * ordinary Node socket after the policy check.
 *
 * The link to the guest is a local socket that does not lose frames, so the
 * machine is small: no congestion control, a fixed retransmission timeout
 * (go-back-N from the oldest unacknowledged byte, in case the guest dropped
 * something), and strict flow control both ways:
 *   guest → host: the window we advertise is what the upstream socket can
 *     still take (RCV_BUF minus its write backlog); bytes beyond it are dropped.
 *   host → guest: we send at most the guest's window; the upstream socket is
 *     paused while SND_BUF bytes wait to be sent or acknowledged.
 * So one flow holds at most RCV_BUF + SND_BUF (+ one read chunk) of host memory.
 */

import type { Socket } from "node:net";
import { ByteQueue } from "./bytequeue.js";
import { ACK, FIN, PSH, RST, SYN, seqAdd, seqDiff, seqLe, seqLt, type TcpSegment } from "./wire/tcp.js";

export const RCV_BUF = 256 * 1024;
export const SND_BUF = 256 * 1024;
/** Our window scale shift (announced only when the guest announces one). */
export const OUR_WS = 4;
export const RTO_MS = 1000;
const MAX_RETRIES = 8;

/** What a flow needs from its stack. */
export interface FlowHost {
  /** Sends a segment to the guest; `data` = [offset, length] into the flow's send queue. */
  emitSegment(flow: TcpFlow, flags: number, seq: number, ack: number, window: number, data?: { offset: number; length: number }, synOptions?: { mss: number; windowScale?: number }): void;
  /** True while the link to QEMU is backed up: flows wait for `pump`. */
  readonly linkBlocked: boolean;
  /** The flow is finished: forget it. */
  remove(flow: TcpFlow): void;
  /** Payload bytes the guest sent out (to the upstream socket). */
  countFromGuest(n: number): void;
  /** Payload bytes sent to the guest. */
  countToGuest(n: number): void;
}

export type FlowState = "connecting" | "established" | "closed";

export class TcpFlow {
  state: FlowState = "connecting";
  socket: Socket | undefined;
  /** Next sequence number expected from the guest. */
  rcvNxt: number;
  readonly iss: number;
  sndUna: number;
  sndNxt: number;
  /** The guest's window in bytes (scaled). */
  sndWnd: number;
  readonly guestWs: number;
  readonly ourWs: number;
  readonly mss: number;
  readonly sendQueue = new ByteQueue();
  guestFin = false;
  upstreamEnded = false;
  finSent = false;
  finAcked = false;
  private paused = false;
  private timer: NodeJS.Timeout | undefined;
  private retries = 0;
  private dupAcks = 0;
  private lastAdvertised = 0;
  ackPending = false;

  constructor(
    readonly host: FlowHost,
    readonly key: string,
    readonly guestIp: Buffer,
    readonly guestPort: number,
    readonly dstIp: Buffer,
    readonly dstPort: number,
    syn: TcpSegment,
    linkMss: number,
    /** What the policy matched, for stats and re-checks. */
    readonly target: { name?: string; realIp: Buffer; fromHosts?: boolean },
  ) {
    this.rcvNxt = seqAdd(syn.seq, 1);
    this.iss = (Math.random() * 0x100000000) >>> 0;
    this.sndUna = this.iss;
    this.sndNxt = this.iss;
    const scaled = syn.windowScale !== undefined;
    this.guestWs = scaled ? syn.windowScale! : 0;
    this.ourWs = scaled ? OUR_WS : 0;
    this.sndWnd = syn.window; // a SYN's window is never scaled
    this.mss = Math.max(536, Math.min(syn.mss ?? 536, linkMss));
  }

  /** The upstream connect succeeded: answer the SYN. */
  accept(socket: Socket): void {
    this.socket = socket;
    this.state = "established";
    socket.on("data", (b: Buffer) => this.fromUpstream(b));
    socket.on("end", () => {
      this.upstreamEnded = true;
      this.pump();
    });
    socket.on("drain", () => this.windowUpdate());
    socket.on("error", () => {
      /* 'close' follows and resets the guest side */
    });
    socket.on("close", () => {
      if (this.state === "closed") return;
      // Ended without a clean close both ways: tell the guest.
      if (!(this.upstreamEnded && this.guestFin)) this.reset();
      else if (this.finAcked) this.close();
    });
    this.sendSynAck();
  }

  private sendSynAck(): void {
    this.host.emitSegment(this, SYN | ACK, this.iss, this.rcvNxt, Math.min(0xffff, RCV_BUF), undefined, {
      mss: this.mss,
      ...(this.guestWs || this.ourWs ? { windowScale: this.ourWs } : {}),
    });
    this.sndNxt = seqAdd(this.iss, 1);
    this.armTimer();
  }

  /** Bytes we can still take from the guest (advertised window, unscaled). */
  receiveWindow(): number {
    const backlog = this.socket ? this.socket.writableLength : 0;
    return Math.max(0, RCV_BUF - backlog);
  }

  windowField(): number {
    const w = this.receiveWindow() >> this.ourWs;
    this.lastAdvertised = w << this.ourWs;
    return Math.min(0xffff, w);
  }

  /** A segment from the guest for this flow. */
  segment(s: TcpSegment): void {
    if (this.state === "closed") return;
    if (s.flags & RST) {
      this.close(true);
      return;
    }
    if (s.flags & SYN) {
      // A retransmitted SYN: answer again once connected.
      if (this.state === "established" && seqAdd(s.seq, 1) === this.rcvNxt && this.sndUna === this.iss) this.sendSynAck();
      return;
    }
    if (this.state === "connecting") return; // nothing else is valid before our SYN-ACK
    if (s.flags & ACK) this.onAck(s);
    if (this.state !== "established") return;
    let n = s.payload.length;
    if (n > 0) {
      let data = s.payload;
      const ahead = seqDiff(s.seq, this.rcvNxt);
      if (ahead > 0) {
        // A gap (the guest dropped nothing we saw: it is a hostile or buggy guest): drop and re-ACK.
        this.ackPending = true;
        return;
      }
      if (ahead < 0) data = data.subarray(Math.min(data.length, -ahead));
      const room = this.receiveWindow();
      if (data.length > room) data = data.subarray(0, room);
      if (data.length > 0 && this.socket && !this.guestFin) {
        this.rcvNxt = seqAdd(this.rcvNxt, data.length);
        this.host.countFromGuest(data.length);
        this.socket.write(data);
      }
      n = data.length;
      this.ackPending = true;
    }
    if (s.flags & FIN && !this.guestFin && seqAdd(s.seq, s.payload.length) === this.rcvNxt) {
      this.guestFin = true;
      this.rcvNxt = seqAdd(this.rcvNxt, 1);
      this.ackPending = true;
      this.socket?.end();
      this.maybeDone();
    } else if (s.flags & FIN) {
      this.ackPending = true;
    }
  }

  private onAck(s: TcpSegment): void {
    const wnd = s.window << this.guestWs;
    if (seqLt(this.sndUna, s.ack) && seqLe(s.ack, this.sndNxt)) {
      let acked = seqDiff(s.ack, this.sndUna);
      if (this.sndUna === this.iss) acked -= 1; // our SYN
      if (this.finSent && s.ack === this.sndNxt) {
        this.finAcked = true;
        acked -= 1;
      }
      if (acked > 0) this.sendQueue.drop(acked);
      this.sndUna = s.ack;
      this.retries = 0;
      this.dupAcks = 0;
      this.sndWnd = wnd;
      if (this.sndUna === this.sndNxt) this.clearTimer();
      else this.armTimer(true);
      if (this.paused && this.sendQueue.length < SND_BUF / 2) {
        this.paused = false;
        this.socket?.resume();
      }
      this.pump();
      this.maybeDone();
      return;
    }
    if (s.ack === this.sndUna) {
      const opened = wnd > this.sndWnd;
      this.sndWnd = wnd;
      if (opened) this.pump();
      else if (s.payload.length === 0 && this.sndNxt !== this.sndUna && ++this.dupAcks === 3) this.retransmit();
    }
  }

  private fromUpstream(b: Buffer): void {
    if (this.state !== "established") return;
    this.sendQueue.push(b);
    if (this.sendQueue.length >= SND_BUF && !this.paused) {
      this.paused = true;
      this.socket?.pause();
    }
    this.pump();
  }

  /** Sends what the guest's window allows (called again when the link drains). */
  pump(): void {
    if (this.state !== "established" || this.host.linkBlocked) return;
    const base = this.sndUna === this.iss ? seqAdd(this.iss, 1) : this.sndUna;
    for (;;) {
      const inflight = seqDiff(this.sndNxt, base) - (this.finSent ? 1 : 0);
      const avail = this.sendQueue.length - inflight;
      const room = this.sndWnd - inflight;
      const n = Math.min(avail, room, this.mss);
      if (n <= 0 || this.finSent) break;
      this.host.emitSegment(this, ACK | PSH, this.sndNxt, this.rcvNxt, this.windowField(), { offset: inflight, length: n });
      this.host.countToGuest(n);
      this.ackPending = false;
      this.sndNxt = seqAdd(this.sndNxt, n);
      this.armTimer(true);
      if (this.host.linkBlocked) return;
    }
    const inflight = seqDiff(this.sndNxt, base);
    if (this.upstreamEnded && !this.finSent && inflight === this.sendQueue.length) {
      this.host.emitSegment(this, FIN | ACK, this.sndNxt, this.rcvNxt, this.windowField());
      this.ackPending = false;
      this.sndNxt = seqAdd(this.sndNxt, 1);
      this.finSent = true;
      this.armTimer(true);
    }
  }

  /** Sends an ACK now if one is owed (called once per batch of frames). */
  flushAck(): void {
    if (!this.ackPending || this.state !== "established") return;
    this.ackPending = false;
    this.host.emitSegment(this, ACK, this.sndNxt, this.rcvNxt, this.windowField());
  }

  /** The upstream socket drained: reopen a window we had closed. */
  private windowUpdate(): void {
    if (this.state !== "established") return;
    if (this.lastAdvertised < this.mss && this.receiveWindow() >= this.mss) {
      this.ackPending = true;
      this.flushAck();
    }
  }

  private retransmit(): void {
    if (this.state !== "established") return;
    if (this.sndUna === this.iss) {
      this.sendSynAck();
      return;
    }
    // Go back to the oldest unacknowledged byte.
    this.sndNxt = this.sndUna;
    this.finSent = false;
    this.dupAcks = 0;
    this.pump();
    if (this.sndNxt === this.sndUna && this.sndWnd === 0 && this.sendQueue.length > 0) {
      // Zero window: probe with an old sequence number; the guest answers with its window.
      this.host.emitSegment(this, ACK, seqAdd(this.sndUna, -1), this.rcvNxt, this.windowField());
      this.armTimer(true);
    }
  }

  private armTimer(restart = false): void {
    if (this.timer && !restart) return;
    this.clearTimer();
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (++this.retries > MAX_RETRIES) {
        this.reset();
        return;
      }
      this.retransmit();
    }, RTO_MS);
    this.timer.unref();
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private maybeDone(): void {
    if (this.guestFin && this.finAcked) this.close();
  }

  /** Aborts the connection both ways: RST to the guest, destroy upstream. */
  reset(): void {
    if (this.state === "closed") return;
    if (this.state === "established") this.host.emitSegment(this, RST | ACK, this.sndNxt, this.rcvNxt, 0);
    this.close(true);
  }

  /** Forgets the flow; `abort` destroys the upstream socket. */
  close(abort = false): void {
    if (this.state === "closed") return;
    this.state = "closed";
    this.clearTimer();
    this.sendQueue.clear();
    if (this.socket) {
      if (abort) this.socket.destroy();
      else this.socket.end();
      this.socket.removeAllListeners("data");
    }
    this.host.remove(this);
  }
}
