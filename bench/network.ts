/**
 * The VM network benchmark (docs/network.md): a guest client through the
 * host-side stack to servers on the host's loopback, beside the same
 * transfers through `vm.exposeTcp` (host client → guest server) and a
 * direct host loopback connection, in one run:
 *
 *   download   host → guest bytes (guest reads from a host server)
 *   upload     guest → host bytes
 *   connect    connect + 1-byte echo round trip
 *   conns/s    sequential connections per second (connect, echo, close)
 *
 * Python in the Debian image is the guest client and server (timed inside
 * the guest with perf_counter); Node is the host's. Runs in a network
 * namespace with only loopback.
 *
 *   node dist/bench/network.js [--mib N] [--reps N] [--connects N]
 */

import { once } from "node:events";
import { connect, createServer, type Server } from "node:net";
import { Image } from "../src/index.js";
import { enterLoopbackNetns } from "./netns.js";
import { busyboxImage, pythonImage } from "./images.js";
import { Args, fmtMs, summarize, table } from "./stats.js";
import { tcpTransfer, writeMiB } from "./tcp-clients.js";

const MiB = 1 << 20;

function listen(handler: (s: import("node:net").Socket) => void): Promise<{ server: Server; port: number }> {
  const server = createServer({ allowHalfOpen: true }, handler);
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({ server, port: (server.address() as { port: number }).port })));
}

/** Host servers: down sends N MiB then closes; up reads to EOF then answers; echo echoes. */
async function hostServers(mib: number): Promise<{ down: number; up: number; echo: number; close: () => void }> {
  const chunk = Buffer.alloc(MiB, 0x61);
  const down = await listen((s) => {
    s.on("error", () => undefined);
    // A GET (busybox wget) gets an HTTP/1.0 response; anything else the raw bytes at once.
    const t = setTimeout(() => writeMiB(s, chunk, mib), 50);
    s.once("data", (b: Buffer) => {
      if (!b.toString("latin1", 0, 4).startsWith("GET")) return;
      clearTimeout(t);
      s.write(`HTTP/1.0 200 OK\r\nContent-Length: ${mib * MiB}\r\n\r\n`);
      writeMiB(s, chunk, mib);
    });
  });
  // Counts bytes to EOF (Node clients half-close), or takes an HTTP POST
  // (busybox wget --post-file) and answers once its body is in.
  const up = await listen((s) => {
    let n = 0;
    let head: Buffer | undefined = Buffer.alloc(0);
    let want = -1;
    s.on("data", (b: Buffer) => {
      if (head !== undefined) {
        head = Buffer.concat([head, b]);
        if (!head.toString("latin1", 0, 4).startsWith("POST") && head.length >= 4) {
          n += head.length;
          head = undefined;
          return;
        }
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) return;
        want = Number(/content-length:\s*(\d+)/i.exec(head.toString("latin1", 0, end))?.[1] ?? -1);
        b = head.subarray(end + 4);
        head = undefined;
      }
      n += b.length;
      if (want >= 0 && n >= want) s.end(`HTTP/1.0 200 OK\r\nContent-Length: ${String(n).length + 1}\r\n\r\n${n}\n`);
    });
    s.on("end", () => s.end(`${n}\n`));
    s.on("error", () => undefined);
  });
  const echo = await listen((s) => {
    s.on("data", (b) => s.write(b));
    s.on("end", () => s.end());
    s.on("error", () => undefined);
  });
  return { down: down.port, up: up.port, echo: echo.port, close: () => [down, up, echo].forEach((x) => x.server.close()) };
}

/** Host client: connect → 1-byte echo → close, `n` times; per-connection ms. */
async function hostConnects(port: number, n: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    const s = connect({ host: "127.0.0.1", port });
    await once(s, "connect");
    s.write("x");
    await once(s, "data");
    out.push(performance.now() - t);
    s.destroy();
  }
  return out;
}

const GUEST_CLIENT = `
import socket, sys, time
mode, host, port, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
MiB = 1 << 20
if mode == "down":
    t = time.perf_counter(); s = socket.create_connection((host, port)); n = 0
    while True:
        b = s.recv(MiB)
        if not b: break
        n += len(b)
    dt = time.perf_counter() - t
    assert n == arg * MiB, n
    print(arg / dt)
elif mode == "up":
    chunk = b"c" * MiB
    t = time.perf_counter(); s = socket.create_connection((host, port))
    for i in range(arg): s.sendall(chunk)
    s.shutdown(socket.SHUT_WR); r = s.recv(100)
    dt = time.perf_counter() - t
    assert int(r) == arg * MiB, r
    print(arg / dt)
else:
    out = []
    for i in range(arg):
        t = time.perf_counter(); s = socket.create_connection((host, port)); s.sendall(b"x"); s.recv(1)
        out.append((time.perf_counter() - t) * 1000); s.close()
    print(" ".join("%.4f" % x for x in out))
`;

const GUEST_SERVERS = `
import socket, threading, sys
MiB = 1 << 20
mib = int(sys.argv[1])
def serve(port, handle):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind(("127.0.0.1", port)); l.listen(64)
    def loop():
        while True:
            c, _ = l.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def down(c):
    chunk = b"d" * MiB
    for i in range(mib): c.sendall(chunk)
    c.close()
def up(c):
    n = 0
    while True:
        b = c.recv(MiB)
        if not b: break
        n += len(b)
    c.sendall(b"%d\\n" % n); c.close()
def echo(c):
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.close()
serve(9201, down); serve(9202, up); serve(9203, echo)
print("ready", flush=True)
threading.Event().wait()
`;

async function main(): Promise<void> {
  enterLoopbackNetns();
  const a = new Args();
  const mib = a.num("mib", 64);
  const reps = a.num("reps", 3);
  const connects = a.num("connects", 50);
  const policy = { allow: ["host.internal"], hosts: { "host.internal": "127.0.0.1" } };
  const host = await hostServers(mib);
  // Throughput: busybox's C tools in the guest (wget, nc, dd), so the
  // guest program is not what is measured; latency: Python, timed in the guest.
  const bbImage = await Image.build({ ref: (await busyboxImage()).ref, network: policy });
  const pyImage = await Image.build({ ref: (await pythonImage((s) => console.error(s))).ref, network: policy });
  const bbPool = await bbImage.pool({ min: 1, max: 1 });
  const pyPool = await pyImage.pool({ min: 1, max: 1 });
  const bb = await bbPool.acquire();
  const py = await pyPool.acquire();
  try {
    const port = (f: { localAddr: string }) => Number(f.localAddr.split(":").pop());
    const blocks = (mib * MiB) / 65536;
    const timed = async (script: string): Promise<number> => {
      const t = performance.now();
      const r = await bb.exec({ argv: ["sh", "-c", script], timeoutMs: 600_000 });
      if (r.exitCode !== 0) throw new Error(`guest: ${script}: ${r.stderr.toString()}`);
      return mib / ((performance.now() - t) / 1000);
    };
    const stackDown = () => timed(`wget -q -O /dev/null http://host.internal:${host.down}/`);
    // busybox wget reads --post-file as a C string: the file must have no NUL byte.
    await bb.exec({ argv: ["sh", "-c", `yes abcdefghijklmnopqrstuvwxyz | head -c ${mib * MiB} > /tmp/up`], timeoutMs: 600_000 });
    const stackUp = () => timed(`wget -q -O /dev/null --post-file=/tmp/up http://host.internal:${host.up}/`);
    for (const [p, argv] of [
      [9101, ["dd", "if=/dev/zero", "bs=65536", `count=${blocks}`]],
      [9102, ["dd", "of=/dev/null", "bs=65536"]],
    ] as const) void bb.spawn({ argv: ["nc", "-ll", "-p", String(p), "-e", ...argv] });
    const bbFwd = { down: await bb.exposeTcp(0, 9101), up: await bb.exposeTcp(0, 9102) };
    const pyc = async (args: string[]): Promise<number[]> => {
      const r = await py.exec({ argv: ["python3", "-c", GUEST_CLIENT, ...args], timeoutMs: 600_000 });
      if (r.exitCode !== 0) throw new Error(`guest client failed: ${r.stderr.toString()}`);
      return r.stdout.toString().trim().split(/\s+/).map(Number);
    };
    const servers = await py.spawn({ argv: ["python3", "-c", GUEST_SERVERS, String(mib)] });
    if (!(await servers.readStdout()).toString().includes("ready")) throw new Error("guest servers did not start");
    const echoFwd = await py.exposeTcp(0, 9203);
    // Warm-up (TCG translates each path on first use).
    await stackDown();
    await stackUp();
    await tcpTransfer(port(bbFwd.down), mib, undefined);
    await pyc(["conn", "host.internal", String(host.echo), "10"]);
    const r = {
      down: { stack: [] as number[], expose: [] as number[], direct: [] as number[] },
      up: { stack: [] as number[], expose: [] as number[], direct: [] as number[] },
    };
    // Same direction in each row: "download" is host → guest bytes, which
    // through exposeTcp means the host sending to a guest server.
    const chunk = Buffer.alloc(MiB, 0x62);
    for (let i = 0; i < reps; i++) {
      r.down.stack.push(await stackDown());
      r.down.expose.push(await tcpTransfer(port(bbFwd.up), mib, chunk));
      r.down.direct.push(await tcpTransfer(host.down, mib, undefined));
      r.up.stack.push(await stackUp());
      r.up.expose.push(await tcpTransfer(port(bbFwd.down), mib, undefined));
      r.up.direct.push(await tcpTransfer(host.up, mib, chunk));
    }
    const lat = {
      stack: await pyc(["conn", "host.internal", String(host.echo), String(connects)]),
      expose: await hostConnects(port(echoFwd), connects),
      direct: await hostConnects(host.echo, connects),
    };
    const med = (xs: number[]) => summarize(xs).p50;
    const rate = (xs: number[]) => (1000 / (xs.reduce((s, x) => s + x, 0) / xs.length)).toFixed(0);
    console.log(`\nVM network (${bb.accelerator}), ${mib} MiB transfers × ${reps}, ${connects} connections; p50 of each\n`);
    console.log(
      table(
        ["", "guest ↔ host stack (ours)", "exposeTcp (same direction)", "host loopback"],
        [
          ["download MiB/s (host → guest)", med(r.down.stack).toFixed(1), med(r.down.expose).toFixed(1), med(r.down.direct).toFixed(0)],
          ["upload MiB/s (guest → host)", med(r.up.stack).toFixed(1), med(r.up.expose).toFixed(1), med(r.up.direct).toFixed(0)],
          ["connect + 1-byte echo", fmtMs(med(lat.stack)), fmtMs(med(lat.expose)), fmtMs(med(lat.direct))],
          ["connections/s (sequential)", rate(lat.stack), rate(lat.expose), rate(lat.direct)],
        ],
      ),
    );
    console.log(`\nthroughput: busybox wget / nc / dd in the guest; connections: Python in the guest, Node on the host.`);
    console.log(`targets under TCG: ≥ 50 MiB/s each way; connect within 2× exposeTcp's (ratio ${(med(lat.stack) / med(lat.expose)).toFixed(2)})`);
    for (const f of [bbFwd.down, bbFwd.up, echoFwd]) await f.stop();
  } finally {
    await bb.release();
    await py.release();
    await bbPool.shutdown();
    await pyPool.shutdown();
    await bbImage.close();
    await pyImage.close();
    host.close();
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
