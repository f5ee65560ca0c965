/**
 * Mount benchmark (issue 10). First the host side: what one FUSE request
 * costs the TypeScript server, without a VM or a transport (it sizes the
 * cache timeout: with cacheTimeoutMs = T, a guest re-stat-ing N hot files
 * costs at most N / T GETATTRs per second, each costing the time below);
 * then the same server behind the host kernel's FUSE client; then, in a VM
 * (the default image, in a loopback-only network namespace), a mount and the
 * image's own root filesystem side by side: sequential read/write of 64 MiB,
 * creating / stat-ing / reading `--files` small files (bench/guest/fsbench.rs,
 * built with rustc and staged into the guest). Prints tables; asserts nothing.
 *
 *   node dist/bench/mounts.js [--runs N] [--files N] [--no-vm]
 */

import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FuseClient, O_RDWR, O_CREAT, ROOT } from "../src/mounts/client.js";
import { FuseServer, MAX_WRITE_BYTES } from "../src/mounts/server.js";
import { hostKernelUnavailable, mountOnHostKernel } from "../test/mounts/host-kernel.js";
import { Args, fmtMs, sample, summarize, table } from "./stats.js";
import { enterLoopbackNetns } from "./netns.js";
import { Vm } from "../src/vm/vm.js";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../src/guest/default-image.js";
import { defaultCacheDir } from "../src/paths.js";

/**
 * Runs in a child process against the mounted tree (a process touching the
 * mount must not be the one serving it): stats every file twice, 0.6 s
 * apart (the second pass finds every cached entry expired: one LOOKUP round
 * trip each), then reads and writes 64 MiB sequentially. Prints JSON.
 */
const KERNEL_CLIENT = `
const fs = require("fs");
const [mnt, n] = [process.argv[1], Number(process.argv[2])];
const timeStats = () => { const t = []; for (let i = 0; i < n; i++) { const s = process.hrtime.bigint(); fs.statSync(mnt + "/many/f" + i); t.push(Number(process.hrtime.bigint() - s) / 1e6); } return t; };
const first = timeStats();
const until = Date.now() + 600; while (Date.now() < until);
const expired = timeStats();
const hot = timeStats();
let t = Date.now(); const fd = fs.openSync(mnt + "/big", "r"); const b = Buffer.alloc(1 << 20); let got = 0, r;
while ((r = fs.readSync(fd, b, 0, b.length, null)) > 0) got += r; fs.closeSync(fd);
const readMs = Date.now() - t;
t = Date.now(); const w = fs.openSync(mnt + "/written", "w"); for (let i = 0; i < 64; i++) fs.writeSync(w, b); fs.closeSync(w);
const writeMs = Date.now() - t;
process.stdout.write(JSON.stringify({ first, expired, hot, readMs, got, writeMs }));
`;

const args = new Args(process.argv.slice(2));
const withVm = !args.has("no-vm");
// VMs have a NIC: the VM part runs in a loopback-only network namespace.
if (withVm) enterLoopbackNetns({ what: "mounts bench" });
const runs = args.num("runs", 2000);
const files = args.num("files", 2000);
const MiB = 1 << 20;

const dir = mkdtempSync(join(tmpdir(), "sm-bench-mount-"));
try {
  mkdirSync(join(dir, "many"));
  for (let i = 0; i < files; i++) writeFileSync(join(dir, "many", `f${i}`), "x".repeat(100));
  writeFileSync(join(dir, "big"), Buffer.alloc(64 * MiB, 7));
  const server = await FuseServer.open({ hostPath: dir, guestTag: "bench" });
  const c = new FuseClient(server);
  await c.init();
  const many = await c.lookup(ROOT, "many");
  const rows: string[][] = [];
  const row = (name: string, samples: number[]): void => {
    const s = summarize(samples);
    rows.push([name, String(s.n), fmtMs(s.p50 * 1000), fmtMs(s.p90 * 1000), fmtMs(s.p99 * 1000)]);
  };

  const one = await c.lookup(many.nodeid, "f1");
  row("GETATTR", await sample(runs, () => c.getattr(one.nodeid)));
  let i = 0;
  row(
    "LOOKUP (new node) + FORGET",
    await sample(runs, async () => {
      const e = await c.lookup(many.nodeid, `f${i++ % files}`);
      if (e.nodeid !== one.nodeid) await c.forget(e.nodeid);
    }),
  );
  row("OPEN + READ 100 B + RELEASE", await sample(runs, () => c.readFile(one.nodeid)));
  let k = 0;
  row(
    "CREATE + RELEASE + UNLINK",
    await sample(Math.min(runs, 1000), async () => {
      const name = `new${k++}`;
      const made = await c.create(ROOT, name, 0o100644, O_RDWR | O_CREAT);
      await c.release(made.nodeid, made.fh);
      await c.forget(made.nodeid);
      await c.unlink(ROOT, name);
    }),
  );
  row(`READDIRPLUS of ${files} entries`, await sample(5, () => c.readdir(many.nodeid, true, 64 * 1024)));

  const big = await c.lookup(ROOT, "big");
  const fh = await c.open(big.nodeid);
  let t = performance.now();
  for (let off = 0; off < 64 * MiB; off += MAX_WRITE_BYTES) await c.read(big.nodeid, fh, off, MAX_WRITE_BYTES);
  const readMibS = 64 / ((performance.now() - t) / 1000);
  await c.release(big.nodeid, fh);
  const out = await c.create(ROOT, "out", 0o100644, O_RDWR | O_CREAT);
  const chunk = Buffer.alloc(MAX_WRITE_BYTES, 1);
  t = performance.now();
  for (let off = 0; off < 64 * MiB; off += MAX_WRITE_BYTES) await c.write(out.nodeid, out.fh, off, chunk);
  const writeMibS = 64 / ((performance.now() - t) / 1000);
  await c.release(out.nodeid, out.fh);
  await server.close();

  console.log("FuseServer, host side only (no VM, no transport); times in µs\n");
  console.log(table(["request", "n", "p50 µs", "p90 µs", "p99 µs"], rows));
  console.log(`\nsequential 128 KiB READs of a 64 MiB file: ${readMibS.toFixed(0)} MiB/s; WRITEs: ${writeMibS.toFixed(0)} MiB/s`);

  const why = hostKernelUnavailable();
  if (why !== undefined) {
    console.log(`\nhost kernel FUSE client: skipped (${why})`);
  } else {
    // The same server behind the host's own kernel FUSE client: no VM, but real kernel round trips.
    const mnt = join(dir, "mnt");
    mkdirSync(mnt);
    const served = await FuseServer.open({ hostPath: dir, guestTag: "bench" });
    const m = await mountOnHostKernel(served, mnt);
    try {
      const out = await new Promise<string>((resolve, reject) => {
        const child = spawn(process.execPath, ["-e", KERNEL_CLIENT, mnt, String(files)], { cwd: "/", stdio: ["ignore", "pipe", "inherit"] });
        let text = "";
        child.stdout.on("data", (b: Buffer) => (text += b.toString()));
        child.on("error", reject);
        child.on("close", (code) => (code === 0 ? resolve(text) : reject(new Error(`kernel client exited ${code}`))));
      });
      const k = JSON.parse(out) as { first: number[]; expired: number[]; hot: number[]; readMs: number; writeMs: number };
      const krow = (name: string, samples: number[]): string[] => {
        const s = summarize(samples);
        return [name, String(s.n), fmtMs(s.p50 * 1000), fmtMs(s.p90 * 1000), fmtMs(s.p99 * 1000)];
      };
      console.log("\nThe same server behind the host kernel's FUSE client (no VM, no transport); stat(2) from another process, µs\n");
      console.log(
        table(
          ["stat of", "n", "p50 µs", "p90 µs", "p99 µs"],
          [krow("a file never seen (LOOKUP)", k.first), krow("a file whose cache expired (0.5 s)", k.expired), krow("a file in cache", k.hot)],
        ),
      );
      console.log(`\nsequential read of 64 MiB through the kernel: ${(64 / (k.readMs / 1000)).toFixed(0)} MiB/s; write: ${(64 / (k.writeMs / 1000)).toFixed(0)} MiB/s`);
    } finally {
      await m.unmount();
      await served.close();
    }
  }
  if (withVm) await vmPart(dir);
} finally {
  rmSync(dir, { recursive: true, force: true });
}

interface GuestResult {
  writeMs: number;
  readMs: number;
  createMs: number;
  readSmallMs: number;
  first: number[];
  expired: number[];
  hot: number[];
}

/** The same in-guest workload on a mount and on the image's root filesystem, in one VM. */
async function vmPart(work: string): Promise<void> {
  const bin = join(work, "fsbench-bin");
  const src = fileURLToPath(new URL("../../bench/guest/fsbench.rs", import.meta.url));
  execFileSync("rustc", ["-O", "-C", "strip=symbols", "-C", "panic=abort", "-C", "target-feature=+crt-static", "--target", /host: (\S+)/.exec(execFileSync("rustc", ["-vV"], { encoding: "utf8" }))![1]!, src, "-o", bin], { stdio: "inherit" });
  const share = join(work, "share");
  mkdirSync(share);
  const vm = await Vm.boot({ rootfs: await ensureDefaultImage(defaultCacheDir()), config: DEFAULT_IMAGE_CONFIG, memoryMib: 512, mounts: [{ hostPath: share, guestTag: "bench", guestPath: "/mnt/bench" }] });
  try {
    await vm.writeFile("/root/fsbench", readFileSync(bin));
    await vm.exec({ argv: ["chmod", "755", "/root/fsbench"] });
    const run = async (where: string): Promise<GuestResult> => {
      const r = await vm.exec({ argv: ["/root/fsbench", where, String(files)], timeoutMs: 600_000 });
      if (r.exitCode !== 0) throw new Error(`fsbench in ${where} failed: ${r.stderr.toString()}`);
      return JSON.parse(r.stdout.toString()) as GuestResult;
    };
    const results: [string, GuestResult][] = [
      ["mount (/mnt/bench)", await run("/mnt/bench")],
      ["root filesystem (/root)", await run("/root")],
    ];
    const p50 = (v: number[]): string => fmtMs(summarize(v).p50 * 1000);
    const p90 = (v: number[]): string => fmtMs(summarize(v).p90 * 1000);
    console.log(`
In a VM (${vm.accelerator}, 1 vCPU, 512 MiB; the guest measures itself): 64 MiB sequential, ${files} files of 100 B
`);
    console.log(
      table(
        ["where", "seq write MiB/s", "seq read MiB/s", "create files/s", "read files/s", "stat new p50 µs", "stat cached-out p50 µs", "p90 µs", "stat cached p50 µs"],
        results.map(([name, g]) => [
          name,
          (64 / (g.writeMs / 1000)).toFixed(0),
          (64 / (g.readMs / 1000)).toFixed(0),
          (files / (g.createMs / 1000)).toFixed(0),
          (files / (g.readSmallMs / 1000)).toFixed(0),
          p50(g.first),
          p50(g.expired),
          p90(g.expired),
          p50(g.hot),
        ]),
      ),
    );
    console.log("\ntargets under TCG (issue 10): mount sequential read ≥ 50 MiB/s; stat of a cached-out file p50 ≤ 500 µs");
  } finally {
    await vm.destroy();
  }
}
