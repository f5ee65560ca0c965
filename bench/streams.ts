/**
 * Streams benchmark (issue 5): spawn-to-first-byte, stdout and stdin
 * throughput of a spawned process, TCP forwarder throughput both ways and
 * connection setup, each beside the same measurement without a VM in the
 * same run: the very same static busybox programs run natively on the host,
 * and host connections go straight to a loopback server.
 *
 *   node dist/bench/streams.js [--runs N] [--mib N] [--connects N]
 */

import { spawn } from "node:child_process";
import { connect } from "node:net";
import { join } from "node:path";
import { Vm } from "../src/index.js";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../src/guest/default-image.js";
import { defaultCacheDir } from "../src/paths.js";
import { Background, waitUntil } from "./proc.js";
import { Args, fmtMs, summarize, table } from "./stats.js";
import { tcpConnect, tcpTransfer } from "./tcp-clients.js";

const MiB = 1 << 20;

/** Host: time from spawn() to the first stdout byte. */
function hostFirstByte(busybox: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    const c = spawn(busybox, ["echo", "hi"], { stdio: ["ignore", "pipe", "ignore"] });
    let first = 0;
    c.stdout.once("data", () => (first = performance.now() - t));
    c.stdout.resume();
    c.once("error", reject);
    c.once("close", () => resolve(first));
  });
}

/** Host: MiB/s reading a process's stdout. */
function hostStdout(busybox: string, mib: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    const c = spawn(busybox, ["dd", "if=/dev/zero", "bs=1048576", `count=${mib}`], { stdio: ["ignore", "pipe", "ignore"] });
    let n = 0;
    c.stdout.on("data", (b: Buffer) => (n += b.length));
    c.once("error", reject);
    c.once("close", () => (n === mib * MiB ? resolve(mib / ((performance.now() - t) / 1000)) : reject(new Error(`read ${n} bytes`))));
  });
}

/** Host: MiB/s writing a process's stdin (with the pipe's backpressure). */
function hostStdin(busybox: string, mib: number, chunk: Buffer): Promise<number> {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    const c = spawn(busybox, ["dd", "of=/dev/null", "bs=1048576"], { stdio: ["pipe", "ignore", "ignore"] });
    c.once("error", reject);
    c.once("close", () => resolve(mib / ((performance.now() - t) / 1000)));
    let i = 0;
    const pump = () => {
      while (i < mib) {
        i++;
        if (!c.stdin.write(chunk)) return void c.stdin.once("drain", pump);
      }
      c.stdin.end();
    };
    pump();
  });
}

/** Guest: spawn → first stdout byte. */
async function vmFirstByte(vm: Vm): Promise<number> {
  const t = performance.now();
  const c = await vm.spawn({ argv: ["echo", "hi"] });
  const b = await c.readStdout();
  const first = performance.now() - t;
  if (b.length === 0) throw new Error("no output");
  await c.wait();
  return first;
}

async function vmStdout(vm: Vm, mib: number): Promise<number> {
  const t = performance.now();
  const c = await vm.spawn({ argv: ["dd", "if=/dev/zero", "bs=1048576", `count=${mib}`] });
  let n = 0;
  for (;;) {
    const b = await c.readStdout(MiB);
    if (b.length === 0) break;
    n += b.length;
  }
  await c.wait();
  if (n !== mib * MiB) throw new Error(`read ${n} bytes`);
  return mib / ((performance.now() - t) / 1000);
}

async function vmStdin(vm: Vm, mib: number, chunk: Buffer): Promise<number> {
  const t = performance.now();
  const c = await vm.spawn({ argv: ["dd", "of=/dev/null", "bs=1048576"] });
  for (let i = 0; i < mib; i++) await c.writeStdin(chunk);
  await c.closeStdin();
  const r = await c.wait();
  if (r.exitCode !== 0) throw new Error(`dd exited ${r.exitCode}`);
  return mib / ((performance.now() - t) / 1000);
}

async function retrying<T>(f: () => Promise<T>, what: string): Promise<T> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      return await f();
    } catch (e) {
      if (Date.now() > deadline) throw new Error(`${what}: ${(e as Error).message}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

const median = (xs: number[]) => summarize(xs).p50;

async function main(): Promise<void> {
  const a = new Args();
  const runs = a.num("runs", 100);
  const mib = a.num("mib", 256);
  const reps = a.num("reps", 3);
  const connects = a.num("connects", 50);
  const rootfs = await ensureDefaultImage(defaultCacheDir());
  const busybox = join(rootfs, "bin", "busybox");
  const chunk = Buffer.alloc(MiB, 0x61);
  const vm = await Vm.boot({ rootfs, config: DEFAULT_IMAGE_CONFIG });
  const hostServers: Background[] = [];
  try {
    const accel = vm.accelerator;
    // Warm up the guest's code paths (TCG translates code on first use).
    for (let i = 0; i < 10; i++) await vmFirstByte(vm);
    await vmStdout(vm, 16);
    await vmStdin(vm, 16, chunk);

    const latency: string[][] = [];
    const first = { vm: [] as number[], host: [] as number[] };
    for (let i = 0; i < runs; i++) {
      first.vm.push(await vmFirstByte(vm));
      first.host.push(await hostFirstByte(busybox));
    }

    const tput = { out: { vm: [] as number[], host: [] as number[] }, in: { vm: [] as number[], host: [] as number[] } };
    for (let i = 0; i < reps; i++) {
      tput.out.vm.push(await vmStdout(vm, mib));
      tput.out.host.push(await hostStdout(busybox, mib));
      tput.in.vm.push(await vmStdin(vm, mib, chunk));
      tput.in.host.push(await hostStdin(busybox, mib, chunk));
    }

    // The same busybox servers in the guest (behind forwarders) and on the host.
    const blocks = (mib * MiB) / 65536;
    const servers = {
      down: (p: number) => ["nc", "-ll", "-p", String(p), "-e", "dd", "if=/dev/zero", "bs=65536", `count=${blocks}`],
      up: (p: number) => ["nc", "-ll", "-p", String(p), "-e", "dd", "of=/dev/null", "bs=65536"],
      echo: (p: number) => ["nc", "-ll", "-p", String(p), "-e", "cat"],
    };
    const guestPorts = { down: 9101, up: 9102, echo: 9103 };
    // The host's copies listen on other ports, so they never meet ours.
    const hostPorts = { down: 19101, up: 19102, echo: 19103 };
    for (const k of ["down", "up", "echo"] as const) {
      await vm.spawn({ argv: servers[k](guestPorts[k]) });
      hostServers.push(new Background([busybox, ...servers[k](hostPorts[k])]));
    }
    const fwd = { down: await vm.exposeTcp(0, guestPorts.down), up: await vm.exposeTcp(0, guestPorts.up), echo: await vm.exposeTcp(0, guestPorts.echo) };
    const port = (f: { localAddr: string }) => Number(f.localAddr.split(":")[1]);
    await retrying(() => tcpConnect(port(fwd.echo)), "guest echo server");
    await retrying(() => tcpConnect(hostPorts.echo), "host echo server");
    await waitUntil(() => hostServers.every((s) => s.running), 1000, "host servers");

    const tcp = { down: { vm: [] as number[], host: [] as number[] }, up: { vm: [] as number[], host: [] as number[] } };
    await tcpTransfer(port(fwd.down), mib, undefined); // warm-up
    for (let i = 0; i < reps; i++) {
      tcp.down.vm.push(await tcpTransfer(port(fwd.down), mib, undefined));
      tcp.down.host.push(await tcpTransfer(hostPorts.down, mib, undefined));
      tcp.up.vm.push(await tcpTransfer(port(fwd.up), mib, chunk));
      tcp.up.host.push(await tcpTransfer(hostPorts.up, mib, chunk));
    }
    const conn = { vm: [] as number[], host: [] as number[] };
    for (let i = 0; i < connects; i++) {
      conn.vm.push(await tcpConnect(port(fwd.echo)));
      conn.host.push(await tcpConnect(hostPorts.echo));
    }

    const lat = (what: string, xs: number[]) => {
      const s = summarize(xs);
      latency.push([what, String(s.n), fmtMs(s.p50), fmtMs(s.p90), fmtMs(s.p99)]);
    };
    lat(`spawn → first stdout byte, VM (${accel})`, first.vm);
    lat("spawn → first stdout byte, host process", first.host);
    lat(`TCP connect + 1-byte echo via forwarder (${accel})`, conn.vm);
    lat("TCP connect + 1-byte echo, direct loopback", conn.host);
    const f1 = (x: number) => x.toFixed(1);
    const rows = [
      ["stdout, guest → host", f1(median(tput.out.vm)), f1(median(tput.out.host))],
      ["stdin, host → guest", f1(median(tput.in.vm)), f1(median(tput.in.host))],
      ["TCP download (guest server → host client)", f1(median(tcp.down.vm)), f1(median(tcp.down.host))],
      ["TCP upload (host client → guest server)", f1(median(tcp.up.vm)), f1(median(tcp.up.host))],
    ];
    console.log(`\nStreams benchmark — accelerator: ${accel}; the host column runs the same static busybox natively\n`);
    console.log(table(["latency", "n", "p50 ms", "p90 ms", "p99 ms"], latency));
    console.log();
    console.log(table([`throughput, median of ${reps} × ${mib} MiB`, `VM MiB/s (${accel})`, "host MiB/s"], rows));
    console.log(`\ntarget under TCG: ≥ 100 MiB/s both ways (stdout ${f1(median(tput.out.vm))}, stdin ${f1(median(tput.in.vm))})`);
  } finally {
    for (const s of hostServers) await s.stop();
    await vm.destroy();
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
