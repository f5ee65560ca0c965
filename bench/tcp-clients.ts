/**
 * Host-side TCP clients for the benchmarks: one transfer's throughput and
 * a connect + 1-byte echo round trip, on 127.0.0.1.
 */

import { connect, type Socket } from "node:net";

const MiB = 1 << 20;

/** Writes `chunk` `count` times, honouring backpressure, then ends the socket. */
export function writeMiB(s: Socket, chunk: Buffer, count: number): void {
  let i = 0;
  const pump = () => {
    while (i < count) {
      i++;
      if (!s.write(chunk)) return void s.once("drain", pump);
    }
    s.end();
  };
  pump();
}

/** MiB/s of one connection: download (the server sends) or upload (we send, then half-close). */
export function tcpTransfer(port: number, mib: number, upload: Buffer | undefined): Promise<number> {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    const s = connect({ host: "127.0.0.1", port, allowHalfOpen: true });
    let n = 0;
    s.on("data", (b: Buffer) => (n += b.length));
    s.on("error", reject);
    s.on("end", () => {
      s.end();
      if (!upload && n !== mib * MiB) return reject(new Error(`received ${n} bytes`));
      resolve(mib / ((performance.now() - t) / 1000));
    });
    if (upload) s.once("connect", () => writeMiB(s, upload, mib));
  });
}

/** connect() → a 1-byte round trip through a per-connection `cat`. */
export function tcpConnect(port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    const s = connect({ host: "127.0.0.1", port });
    s.once("connect", () => s.write("x"));
    s.once("data", () => {
      const ms = performance.now() - t;
      s.destroy();
      resolve(ms);
    });
    s.once("error", reject);
    s.once("close", () => reject(new Error("closed before the echo")));
  });
}

