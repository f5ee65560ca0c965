/**
 * `npm run bench`: this project beside the peers users would pick instead
 * (a cold-booted VM, bubblewrap, gVisor, a plain host spawn), six workloads,
 * one run, one machine. Writes bench/results/<date>-<accel>.json, a chart,
 * and BENCHMARKS.md (see bench/report.ts).
 *
 *   node dist/bench/run.js [options]
 */

import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { cpus, release, tmpdir, totalmem } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type BenchImages, busyboxImage, pythonImage } from "./images.js";
import { enterLoopbackNetns, loopbackOnly } from "./netns.js";
import { ensurePackages, hostDetail, probeBwrap, probeRunsc } from "./peers.js";
import { type BenchResults, SEED, type SystemInfo, targets, writeReport } from "./report.js";
import { Args, table } from "./stats.js";
import { Bubblewrap, Gvisor, Host, NaiveVm, Supermachine, type System, type SystemId, qemuChildren } from "./systems.js";
import { type BenchConfig, type Ctx, type WorkloadResult, workload1, workload2, workload3, workload4, workload5, workload6 } from "./workloads.js";

const HELP = `usage: node dist/bench/run.js [options]

  --quick                 tiny sample counts everywhere (smoke test; results are marked quick)
  --samples N             samples per system where cheap (default 200; quick 3)
  --naive-samples N       samples of the naive VM, a cold boot each (default 20; quick 1)
  --tasks N               workload 4 tasks per system (default 200; quick 4)
  --naive-tasks N         workload 4 tasks of the naive VM (default 20; quick 2)
  --idle N                workload 5 idle environments (default 16; quick 2)
  --floor-loops N         workload 2 execs per in-environment floor loop (default 200; quick 100)
  --cold N / --hits N     workload 6 cold first uses / cache hits (default 5 / 10; quick 1 / 2)
  --pool N                pool size (min = max) for one-shot tasks and throughput (default 2)
  --only w1,w2,...        run only these workloads
  --systems a,b,...       only these systems (supermachine, naive-vm, bwrap, gvisor, host)
  --out DIR               write bench/results/ and BENCHMARKS.md under DIR (default: the repository)
  --no-install            do not apt-get install missing peers (they are reported as not run)

Runs in a network namespace with only loopback (re-executes itself under
unshare --net after installing peers and building the images).
`;

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

function config(a: Args): BenchConfig {
  const quick = a.has("quick");
  const q = (full: number, small: number) => (quick ? small : full);
  const samples = a.num("samples", q(200, 3));
  return {
    samples,
    naiveSamples: a.num("naive-samples", q(20, 1)),
    paceMs: 100,
    block: Math.max(1, Math.min(10, samples)),
    throughputTasks: a.num("tasks", q(200, 4)),
    naiveThroughputTasks: a.num("naive-tasks", q(20, 2)),
    chunk: q(50, 2),
    idle: a.num("idle", q(16, 2)),
    floorLoops: a.num("floor-loops", q(200, 100)),
    coldSamples: a.num("cold", q(5, 1)),
    hitSamples: a.num("hits", q(10, 2)),
    poolSize: a.num("pool", 2),
  };
}

function localDate(d = new Date()): string {
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
}

function machine(): BenchResults["machine"] {
  const osRelease = (() => {
    try {
      return /^PRETTY_NAME="?([^"\n]*)"?/m.exec(readFileSync("/etc/os-release", "utf8"))?.[1] ?? "?";
    } catch {
      return "?";
    }
  })();
  const qemu = spawnSync(process.arch === "arm64" ? "qemu-system-aarch64" : "qemu-system-x86_64", ["--version"], { encoding: "utf8" }).stdout?.split("\n")[0] ?? "QEMU ?";
  return {
    cpus: cpus().length,
    cpuModel: (cpus()[0]?.model ?? "?").replace(/\s+/g, " ").trim(),
    memGiB: Math.round(totalmem() / 2 ** 30),
    kernel: release(),
    os: osRelease,
    node: process.version,
    qemu: qemu.replace(/\s*Copyright.*$/, "").trim(),
  };
}

async function main(): Promise<void> {
  const a = new Args();
  if (a.has("help")) {
    process.stdout.write(HELP);
    return;
  }
  const cfg = config(a);
  const quick = a.has("quick");
  const outRoot = resolve(a.str("out") ?? REPO);
  const only = new Set(a.list("only") ?? ["w1", "w2", "w3", "w4", "w5", "w6"]);
  const wanted = new Set<SystemId>((a.list("systems") as SystemId[] | undefined) ?? ["supermachine", "naive-vm", "bwrap", "gvisor", "host"]);
  const t0 = Date.now();
  const log = (s: string) => process.stderr.write(`[bench ${((Date.now() - t0) / 1000).toFixed(0).padStart(4)} s] ${s}\n`);
  const startedAt = new Date().toISOString();

  if (!loopbackOnly()) {
    // Every VM has a NIC: the run itself happens in a network namespace with
    // only loopback (bench/netns.ts). The package archive is reachable only
    // from here, so the peers are installed and the images built first.
    ensurePackages(!a.has("no-install"), log);
    log("images (before entering the network namespace)");
    await busyboxImage();
    await pythonImage(log);
    enterLoopbackNetns({ what: "bench", extraArgs: ["--no-install"] });
  }

  // Peers' tools (and workload 6's registry tools) from Debian, if missing.
  const problems = ensurePackages(!a.has("no-install"), log);

  log("images");
  const images: BenchImages = { busybox: await busyboxImage(), python: await pythonImage(log) };

  const snapshotsDir = await mkdtemp(join(tmpdir(), "sm-bench-snapshots-"));
  const ours = new Supermachine({ snapshotsDir, poolSize: cfg.poolSize, log });
  const naive = new NaiveVm();
  const infos: SystemInfo[] = [];
  const systems: System[] = [];
  const unavailable = new Map<SystemId, string>();
  const consider = (sys: System, ok: boolean, reason?: string, tried?: string[]) => {
    if (!wanted.has(sys.id)) return;
    infos.push({ id: sys.id, label: sys.label, isolation: sys.isolation, detail: sys.detail, available: ok, ...(reason ? { reason } : {}), ...(tried ? { tried } : {}) });
    if (ok) systems.push(sys);
    else unavailable.set(sys.id, reason ?? "unavailable");
  };
  let results: BenchResults | undefined;
  const exitCleanup = () => Gvisor.killAllSync();
  process.once("exit", exitCleanup);
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.once(sig, () => {
      log(`${sig}: stopping`);
      exitCleanup();
      process.exit(130);
    });
  }
  try {
    // Bake both images first: every later figure is about using them.
    if (wanted.has("supermachine")) {
      await ours.image(images.busybox);
      await ours.image(images.python);
    }
    consider(ours, true);
    consider(naive, true);
    const bw = await probeBwrap(images.busybox, problems.get("bubblewrap") ?? problems.get("util-linux"));
    consider(new Bubblewrap(`${bw.version}; --unshare-all (user, pid, net, ipc, uts, cgroup namespaces), read-only root bind, own /proc, /dev, /tmp`), bw.ok, bw.reason, bw.tried);
    const rs = await probeRunsc(images.busybox, problems.get("runsc"));
    consider(new Gvisor(`${rs.version}; Debian package; default platform (ptrace), --network=none, read-only root, OCI bundle per task`), rs.ok, rs.reason, rs.tried);
    consider(new Host(await hostDetail()), true);
    for (const i of infos) log(`system ${i.id}: ${i.available ? "ok" : `NOT RUN: ${i.reason}`}`);

    const ctx: Ctx = { cfg, systems, unavailable, images, ours, log };
    const workloads: WorkloadResult[] = [];
    const steps: [string, (c: Ctx) => Promise<WorkloadResult>][] = [
      ["w1", workload1],
      ["w2", workload2],
      ["w3", workload3],
      ["w4", workload4],
      ["w5", workload5],
      ["w6", workload6],
    ];
    for (const [id, fn] of steps) {
      if (!only.has(id)) continue;
      // The images' bake VMs wait (stopped) for a pool until the run closes
      // the images: what runs before a workload is not its leftover.
      const before = new Set(qemuChildren());
      try {
        workloads.push(await fn(ctx));
      } catch (e) {
        log(`${id} failed: ${(e as Error).stack ?? String(e)}`);
        workloads.push({
          id,
          title: `workload ${id}`,
          kind: "latency",
          image: "?",
          notes: [],
          results: systems.map((s) => ({ system: s.id, status: "failed" as const, reason: `the workload failed: ${(e as Error).message}` })),
          seconds: 0,
        });
      }
      const left = qemuChildren().filter((p) => !before.has(p));
      if (left.length) log(`warning: ${left.length} QEMU process(es) started by ${id} still running after it: ${left.join(", ")}`);
    }
    results = {
      schema: 1,
      startedAt,
      finishedAt: new Date().toISOString(),
      date: localDate(),
      accel: ours.accel,
      quick,
      machine: machine(),
      config: cfg,
      images: { busybox: images.busybox.description, python: images.python.description },
      systems: infos.map((i) => ({ ...i, detail: systems.find((s) => s.id === i.id)?.detail ?? i.detail })),
      workloads,
      seed: SEED,
    };
  } finally {
    await ours.close();
    await naive.close();
    for (const s of systems) await s.close().catch(() => undefined);
    await rm(snapshotsDir, { recursive: true, force: true });
    const left = qemuChildren();
    if (left.length) {
      log(`killing ${left.length} QEMU process(es) left behind: ${left.join(", ")}`);
      for (const p of left) process.kill(p, "SIGKILL");
    }
  }
  const paths = await writeReport(results, outRoot);
  log(`wrote ${relative(process.cwd(), paths.json)}, ${relative(process.cwd(), paths.svg)}, ${relative(process.cwd(), paths.md)}`);
  console.log(table(["target", "threshold", "measured", "met?"], targets(results).map((t) => [t.what, t.target, t.measured, t.met === null ? "not measured" : t.met ? "met" : "NOT met"])));
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
