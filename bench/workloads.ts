/**
 * The six workloads, each run for every available system in the same
 * process, interleaved (A B A B …) so that drift of the machine over the
 * run hits every system alike.
 */

import { randomBytes } from "node:crypto";
import { mkdtemp, mkdir, rm, symlink } from "node:fs/promises";
import { spawn } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { Image, Vm, resolveImage } from "../src/index.js";
import { openLayer, pullImage } from "../src/oci/index.js";
import { defaultCacheDir } from "../src/paths.js";
import { pushLayout, startRegistry } from "../test/fixtures/registry/registry.js";
import type { BenchImage, BenchImages } from "./images.js";
import { Bubblewrap, type Gvisor, type HeldEnv, type Supermachine, type System, type SystemId, mapLimit } from "./systems.js";
import { check } from "./proc.js";
import { type Summary, sleep, sumPssKib, summarize } from "./stats.js";

export const ECHO = ["echo", "hi"] as const;
export const ECHO_OUT = "hi\n";
export const PY_PROGRAM = "print(sum(i * i for i in range(10000)))";
export const PY = ["python3", "-c", PY_PROGRAM] as const;
export const PY_OUT = "333283335000\n";

export interface BenchConfig {
  /** Samples per system where a sample is cheap. */
  samples: number;
  /** Samples of the naive VM (a cold boot each). */
  naiveSamples: number;
  /** One-shot tasks start at most this often, per system (workloads 1, 3). */
  paceMs: number;
  /** Paced tasks run in blocks of this many per system (plus one unrecorded lead-in). */
  block: number;
  /** Workload 4: tasks per system, and for the naive VM. */
  throughputTasks: number;
  naiveThroughputTasks: number;
  /** Workload 4: tasks per interleaved chunk. */
  chunk: number;
  /** Workload 5: idle environments. */
  idle: number;
  /** Workload 2: execs per floor loop (its shell's fork + exec + wait of /bin/echo). */
  floorLoops: number;
  /** Workload 6: cold first uses and cache hits per system. */
  coldSamples: number;
  hitSamples: number;
  /** Pool size (min = max) for one-shot tasks and throughput. */
  poolSize: number;
}

export type Status = "ok" | "unavailable" | "failed";

export interface SystemResult {
  system: SystemId;
  status: Status;
  /** Why a system is unavailable or failed. */
  reason?: string;
  /** Latency samples (ms) and their summary. */
  samples?: number[];
  summary?: Summary;
  throughput?: { tasks: number; seconds: number; tasksPerSec: number; concurrency: number };
  memory?: { envs: number; pssMibPerEnv: number; rssMibPerEnv: number; sharedPssMib: number; pssMibTotal: number };
  firstUse?: {
    cold: { samples: number[]; summary: Summary };
    hit: { samples: number[]; summary: Summary };
    /** supermachine: Image.build alone (pull + erofs + bake when cold). */
    coldBuild?: { samples: number[]; summary: Summary };
    hitBuild?: { samples: number[]; summary: Summary };
  };
  /** Any further per-system figures (breakdowns). */
  extra?: Record<string, unknown>;
  note?: string;
}

export interface WorkloadResult {
  id: string;
  title: string;
  kind: "latency" | "throughput" | "memory" | "first-use";
  image: string;
  notes: string[];
  results: SystemResult[];
  seconds: number;
}

export interface Ctx {
  cfg: BenchConfig;
  /** Systems that can run. */
  systems: System[];
  /** Systems that cannot, with the reason. */
  unavailable: Map<SystemId, string>;
  images: BenchImages;
  ours: Supermachine;
  log: (s: string) => void;
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function expectOut(got: string, want: string, who: string): void {
  if (got !== want) throw new Error(`${who}: expected output ${JSON.stringify(want)}, got ${JSON.stringify(got.slice(0, 200))}`);
}

function unavailableResults(ctx: Ctx, ids: readonly SystemId[]): SystemResult[] {
  return ids.filter((id) => ctx.unavailable.has(id)).map((id) => ({ system: id, status: "unavailable" as const, reason: ctx.unavailable.get(id)! }));
}

// ------------------------------------------------------------ interleaving

interface Lane {
  system: SystemId;
  /** Samples wanted. */
  n: number;
  /** Samples per block (a block runs back to back, paced). */
  block: number;
  paced: boolean;
  task: () => Promise<void>;
  settle: () => Promise<void>;
  samples: number[];
  error?: string;
}

/**
 * Runs every lane's samples in rounds: each round runs one block of every
 * lane whose turn it is (lanes with fewer samples are spread evenly over the
 * rounds), in an order that rotates per round. A paced block starts its
 * tasks `paceMs` apart (start to start; back to back when a task takes
 * longer), and opens with one unrecorded lead-in task so that every recorded
 * task follows its predecessor by the pacing interval. After each block the
 * lane settles (a pool refills) so that its background work does not land
 * on the next lane's samples.
 */
async function interleave(lanes: Lane[], paceMs: number, log: (s: string) => void): Promise<void> {
  const blocks = lanes.map((l) => Math.ceil(l.n / l.block));
  const rounds = Math.max(0, ...blocks);
  for (let r = 0; r < rounds; r++) {
    const order = lanes.map((_, i) => lanes[(i + r) % lanes.length]!);
    for (const lane of order) {
      const k = blocks[lanes.indexOf(lane)]!;
      if (lane.error || Math.floor(((r + 1) * k) / rounds) === Math.floor((r * k) / rounds)) continue;
      const count = Math.min(lane.block, lane.n - lane.samples.length);
      const leadIn = lane.paced && paceMs > 0 ? 1 : 0;
      try {
        let lastStart = -Infinity;
        for (let j = 0; j < count + leadIn; j++) {
          if (lane.paced) {
            const wait = lastStart + paceMs - performance.now();
            if (wait > 0) await sleep(wait);
          }
          const t = performance.now();
          lastStart = t;
          await lane.task();
          if (j >= leadIn) lane.samples.push(performance.now() - t);
        }
        await lane.settle();
      } catch (e) {
        lane.error = errText(e);
        log(`  ${lane.system} failed: ${lane.error}`);
      }
    }
    if (r % 5 === 4 || r === rounds - 1) log(`  round ${r + 1}/${rounds}: ${lanes.map((l) => `${l.system} ${l.samples.length}/${l.n}`).join(", ")}`);
  }
}

function laneResult(l: Lane, extra?: Record<string, unknown>): SystemResult {
  const base: SystemResult = { system: l.system, status: l.error ? "failed" : "ok", samples: l.samples.map((x) => Math.round(x * 1000) / 1000), summary: summarize(l.samples) };
  if (l.error) base.reason = l.error;
  if (extra) base.extra = extra;
  return base;
}

// -------------------------------------------------- workloads 1 and 3: one-shot

async function oneShotWorkload(
  ctx: Ctx,
  p: { id: string; title: string; image: BenchImage; argv: readonly string[]; out: string; notes: string[] },
): Promise<WorkloadResult> {
  const started = performance.now();
  ctx.log(`${p.id}: ${p.title}`);
  const { cfg } = ctx;
  const lanes: Lane[] = [];
  const closers: (() => Promise<void>)[] = [];
  const failed: SystemResult[] = [];
  const breakdown = { acquire: [] as number[], exec: [] as number[], release: [] as number[], waited: 0 };
  try {
    for (const sys of ctx.systems) {
      try {
        const naive = sys.id === "naive-vm";
        let task: () => Promise<void>;
        let settle: () => Promise<void>;
        if (sys.id === "supermachine") {
          // Same as sys.oneShot, with the acquire / exec / release breakdown.
          const image = await ctx.ours.image(p.image);
          const pool = await image.pool({ min: cfg.poolSize, max: cfg.poolSize, restoreOnRelease: true, prewarm: [[...p.argv]] });
          closers.push(() => pool.shutdown());
          task = async () => {
            if (pool.stats().idle === 0) breakdown.waited++;
            const t0 = performance.now();
            const vm = await pool.acquire();
            const t1 = performance.now();
            let out: string;
            try {
              const r = await vm.exec({ argv: p.argv, timeoutMs: 60_000 });
              if (r.exitCode !== 0) throw new Error(`exit ${r.exitCode}: ${r.stderr.toString().slice(0, 300)}`);
              out = r.stdout.toString();
            } finally {
              const t2 = performance.now();
              await vm.release();
              breakdown.acquire.push(t1 - t0);
              breakdown.exec.push(t2 - t1);
              breakdown.release.push(performance.now() - t2);
            }
            expectOut(out, p.out, sys.id);
          };
          settle = () => waitForIdle(pool, cfg.poolSize);
        } else {
          const one = await sys.oneShot(p.image, p.argv);
          closers.push(() => one.close());
          task = async () => expectOut(await one.run(), p.out, sys.id);
          settle = () => one.settle();
        }
        lanes.push({ system: sys.id, n: naive ? cfg.naiveSamples : cfg.samples, block: naive ? 1 : cfg.block, paced: !naive, task, settle, samples: [] });
      } catch (e) {
        failed.push({ system: sys.id, status: "failed", reason: `setup: ${errText(e)}` });
      }
    }
    await interleave(lanes, cfg.paceMs, ctx.log);
  } finally {
    for (const c of closers) await c().catch(() => undefined);
  }
  const results = lanes.map((l) => {
    if (l.system !== "supermachine") return laneResult(l);
    // Trim to the recorded samples (lead-ins are in the breakdown too).
    return laneResult(l, {
      acquire: summarize(breakdown.acquire),
      exec: summarize(breakdown.exec),
      release: summarize(breakdown.release),
      tasksThatWaitedForARestore: breakdown.waited,
      tasks: breakdown.acquire.length,
    });
  });
  return {
    id: p.id,
    title: p.title,
    kind: "latency",
    image: p.image.name,
    notes: p.notes,
    results: [...results, ...failed, ...unavailableResults(ctx, ["supermachine", "naive-vm", "bwrap", "gvisor", "host"])],
    seconds: (performance.now() - started) / 1000,
  };
}

async function waitForIdle(pool: { stats(): { idle: number } }, n: number): Promise<void> {
  const deadline = Date.now() + 120_000;
  while (pool.stats().idle < n) {
    if (Date.now() > deadline) throw new Error(`the pool did not refill to ${n} idle VMs within 120 s`);
    await sleep(5);
  }
}

export function workload1(ctx: Ctx): Promise<WorkloadResult> {
  return oneShotWorkload(ctx, {
    id: "w1",
    title: "one-shot `echo hi` in a fresh environment, one task per 100 ms",
    image: ctx.images.busybox,
    argv: ECHO,
    out: ECHO_OUT,
    notes: [
      `supermachine: pool({ min: ${ctx.cfg.poolSize}, max: ${ctx.cfg.poolSize}, restoreOnRelease: true, prewarm: [["echo","hi"]] }); a task is acquire → exec → release (awaited); the pool restores a fresh VM in the background after each release.`,
      "naive VM: Vm.boot → exec → destroy per task, a real cold boot (bootTemplate: false).",
      "bubblewrap: `bwrap --unshare-all --die-with-parent --ro-bind ROOT / --proc /proc --dev /dev --tmpfs /tmp -- echo hi`; gVisor: `runsc --network=none run` of an OCI bundle on the same ROOT (read-only); host: spawn `/bin/echo hi`.",
      `Paced: per system, tasks start ≥ ${ctx.cfg.paceMs} ms apart in blocks of ${ctx.cfg.block} (+1 unrecorded lead-in), blocks of the systems interleaved; back to back when a task takes longer than ${ctx.cfg.paceMs} ms (gVisor, naive VM).`,
    ],
  });
}

export function workload3(ctx: Ctx): Promise<WorkloadResult> {
  return oneShotWorkload(ctx, {
    id: "w3",
    title: "one-shot Python task in a fresh environment",
    image: ctx.images.python,
    argv: PY,
    out: PY_OUT,
    notes: [
      `\`python3 -c '${PY_PROGRAM}'\` on the Debian + python3 image (the host runs its own /usr/bin/python3, same Debian version).`,
      `supermachine: pool({ min: ${ctx.cfg.poolSize}, max: ${ctx.cfg.poolSize}, restoreOnRelease: true, prewarm: [["python3","-c","${PY_PROGRAM}"]] }): prewarm runs the task's own command once on each restored VM, as a user who knows the workload would configure.`,
      `Paced like workload 1 (one task per ${ctx.cfg.paceMs} ms per system at most).`,
    ],
  });
}

// ------------------------------------------------- workload 2: held environment

/** Workload 2's floor: runs of the loop per environment. */
const FLOOR_RUNS = 3;

/** A shell loop of `n` fork + exec + wait of /bin/echo, bracketed by /proc/uptime (read by the shell: no fork). */
export function floorLoop(n: number): string {
  return `read s _ </proc/uptime; i=0; while [ $i -lt ${n} ]; do /bin/echo hi >/dev/null || exit 3; i=$((i+1)); done; read e _ </proc/uptime; echo "$s $e"`;
}

/** Milliseconds per exec from floorLoop's output ("start end", seconds); throws on anything else. */
export function parseFloorRun(out: string, n: number): number {
  const m = /^(\d+(?:\.\d+)?) (\d+(?:\.\d+)?)\n?$/.exec(out);
  if (!m) throw new Error(`the floor loop printed ${JSON.stringify(out.slice(0, 200))}, not two uptimes`);
  const ms = ((Number(m[2]) - Number(m[1])) * 1000) / n;
  if (!(ms >= 0)) throw new Error(`the floor loop's uptime went backwards: ${out.trim()}`);
  return ms;
}

export async function workload2(ctx: Ctx): Promise<WorkloadResult> {
  const started = performance.now();
  ctx.log("w2: `echo hi` in an already running environment");
  const lanes: Lane[] = [];
  const closers: (() => Promise<void>)[] = [];
  const failed: SystemResult[] = [];
  const floors = new Map<SystemId, { ms: number; runs: number[] } | { error: string }>();
  const loops = ctx.cfg.floorLoops;
  try {
    const envs: [SystemId, HeldEnv][] = [];
    for (const sys of ctx.systems) {
      try {
        const held = await sys.hold(ctx.images.busybox, 1, ECHO);
        closers.push(() => held.close());
        const env = held.envs[0]!;
        // Warm every system the same way (TCG translates code on first use).
        for (let i = 0; i < 20; i++) await env.exec(ECHO);
        lanes.push({ system: sys.id, n: ctx.cfg.samples, block: 1, paced: false, task: async () => expectOut(await env.exec(ECHO), ECHO_OUT, sys.id), settle: async () => undefined, samples: [] });
        envs.push([sys.id, env]);
      } catch (e) {
        failed.push({ system: sys.id, status: "failed", reason: `setup: ${errText(e)}` });
      }
    }
    await interleave(lanes, 0, ctx.log);
    // Each environment's own floor, after the samples: its shell forks and
    // execs the same /bin/echo, no host in the loop.
    for (const [id, env] of envs) {
      try {
        const runs: number[] = [];
        for (let k = 0; k < FLOOR_RUNS; k++) runs.push(parseFloorRun(await env.exec(["sh", "-c", floorLoop(loops)]), loops));
        floors.set(id, { ms: summarize(runs).p50, runs });
      } catch (e) {
        floors.set(id, { error: errText(e) });
      }
    }
  } finally {
    for (const c of closers) await c().catch(() => undefined);
  }
  return {
    id: "w2",
    title: "`echo hi` in an already running environment",
    kind: "latency",
    image: "busybox",
    notes: [
      "supermachine: vm.exec on a VM acquired from a pool and held; naive VM: vm.exec on a VM from Vm.boot (the same guest agent path).",
      "bubblewrap: `nsenter -t PID -a -r -w echo hi` into a running sandbox (what `docker exec` does); gVisor: `runsc exec`; host: a plain spawn (there is no environment to enter).",
      "20 unrecorded warm-up execs per system; samples interleaved one by one.",
      `Floor: after the samples, each environment's own shell runs \`/bin/echo hi >/dev/null\` ${loops} times (fork + exec + wait, nothing from outside), timed by its /proc/uptime (10 ms ticks); median of ${FLOOR_RUNS} runs, per exec. What an exec costs above it is the way in and out (for supermachine: the host, the transport and the guest agent).`,
    ],
    results: [...lanes.map((l) => laneResult(l, { floor: floors.get(l.system) })), ...failed, ...unavailableResults(ctx, ["supermachine", "naive-vm", "bwrap", "gvisor", "host"])],
    seconds: (performance.now() - started) / 1000,
  };
}

// ----------------------------------------------------- workload 4: throughput

export async function workload4(ctx: Ctx): Promise<WorkloadResult> {
  const started = performance.now();
  const { cfg } = ctx;
  const concurrency = cfg.poolSize;
  ctx.log(`w4: throughput, one-shot Python tasks, ${concurrency} at a time`);
  interface TLane {
    system: SystemId;
    n: number;
    chunk: number;
    task: () => Promise<void>;
    settle: () => Promise<void>;
    done: number;
    ms: number;
    error?: string;
  }
  const lanes: TLane[] = [];
  const closers: (() => Promise<void>)[] = [];
  const failed: SystemResult[] = [];
  try {
    for (const sys of ctx.systems) {
      try {
        const naive = sys.id === "naive-vm";
        const n = naive ? cfg.naiveThroughputTasks : cfg.throughputTasks;
        const chunk = naive ? Math.max(concurrency, Math.ceil(cfg.naiveThroughputTasks / Math.max(1, Math.ceil(cfg.throughputTasks / cfg.chunk)))) : cfg.chunk;
        if (sys.id === "supermachine") {
          const pool = await ctx.ours.pool(ctx.images.python, concurrency, PY);
          closers.push(() => pool.shutdown());
          lanes.push({
            system: sys.id,
            n,
            chunk,
            task: async () => {
              const vm = await pool.acquire();
              try {
                const r = await vm.exec({ argv: PY, timeoutMs: 60_000 });
                expectOut(r.stdout.toString(), PY_OUT, sys.id);
              } finally {
                await vm.release();
              }
            },
            settle: () => waitForIdle(pool, concurrency),
            done: 0,
            ms: 0,
          });
        } else {
          const one = await sys.oneShot(ctx.images.python, PY);
          closers.push(() => one.close());
          lanes.push({ system: sys.id, n, chunk, task: async () => expectOut(await one.run(), PY_OUT, sys.id), settle: () => one.settle(), done: 0, ms: 0 });
        }
      } catch (e) {
        failed.push({ system: sys.id, status: "failed", reason: `setup: ${errText(e)}` });
      }
    }
    const blocks = lanes.map((l) => Math.ceil(l.n / l.chunk));
    const rounds = Math.max(0, ...blocks);
    for (let r = 0; r < rounds; r++) {
      for (let i = 0; i < lanes.length; i++) {
        const lane = lanes[(i + r) % lanes.length]!;
        const k = blocks[lanes.indexOf(lane)]!;
        if (lane.error || Math.floor(((r + 1) * k) / rounds) === Math.floor((r * k) / rounds)) continue;
        const count = Math.min(lane.chunk, lane.n - lane.done);
        try {
          const t = performance.now();
          await mapLimit(Array.from({ length: count }), concurrency, () => lane.task());
          lane.ms += performance.now() - t;
          lane.done += count;
          await lane.settle();
        } catch (e) {
          lane.error = errText(e);
          ctx.log(`  ${lane.system} failed: ${lane.error}`);
        }
      }
      ctx.log(`  round ${r + 1}/${rounds}: ${lanes.map((l) => `${l.system} ${l.done}/${l.n}`).join(", ")}`);
    }
  } finally {
    for (const c of closers) await c().catch(() => undefined);
  }
  const results: SystemResult[] = lanes.map((l) => ({
    system: l.system,
    status: l.error ? "failed" : "ok",
    ...(l.error ? { reason: l.error } : {}),
    throughput: { tasks: l.done, seconds: l.ms / 1000, tasksPerSec: l.done / (l.ms / 1000), concurrency },
  }));
  return {
    id: "w4",
    title: `throughput: one-shot Python tasks through ${concurrency} at a time`,
    kind: "throughput",
    image: "python",
    notes: [
      `supermachine: pool({ min: ${concurrency}, max: ${concurrency}, restoreOnRelease: true, prewarm: [the task] }) and ${concurrency} workers doing acquire → exec → release; the others: ${concurrency} workers each running one-shot tasks.`,
      `Tasks run in interleaved chunks (${cfg.chunk} tasks; the naive VM's spread over the same rounds); tasks/s = tasks / time spent inside the system's chunks. Each chunk of supermachine starts with a full pool (it refilled while the other systems ran).`,
    ],
    results: [...results, ...failed, ...unavailableResults(ctx, ["supermachine", "naive-vm", "bwrap", "gvisor", "host"])],
    seconds: (performance.now() - started) / 1000,
  };
}

// --------------------------------------------------------- workload 5: memory

export async function workload5(ctx: Ctx): Promise<WorkloadResult> {
  const started = performance.now();
  const count = ctx.cfg.idle;
  ctx.log(`w5: host memory per idle environment, ${count} idle`);
  const results: SystemResult[] = [];
  // One system at a time: PSS divides shared pages among the processes sharing them.
  for (const sys of ctx.systems) {
    ctx.log(`  ${sys.id}: starting ${count}`);
    try {
      const held = await sys.hold(ctx.images.busybox, count, ["true"]);
      try {
        await sleep(1000);
        const per = held.envs.map((e) => sumPssKib(e.pids()));
        const shared = sumPssKib(held.sharedPids());
        const pss = per.reduce((a, m) => a + m.pss, 0);
        const rss = per.reduce((a, m) => a + m.rss, 0);
        results.push({
          system: sys.id,
          status: "ok",
          memory: {
            envs: count,
            pssMibPerEnv: (pss + shared.pss) / count / 1024,
            rssMibPerEnv: rss / count / 1024,
            sharedPssMib: shared.pss / 1024,
            pssMibTotal: (pss + shared.pss) / 1024,
          },
          extra: { pssMibPerEnvWithoutShared: pss / count / 1024, perEnvPssMib: per.map((m) => Math.round(m.pss / 102.4) / 10) },
        });
      } finally {
        await held.close();
      }
    } catch (e) {
      results.push({ system: sys.id, status: "failed", reason: errText(e) });
    }
  }
  return {
    id: "w5",
    title: `host memory per idle environment (${count} idle)`,
    kind: "memory",
    image: "busybox",
    notes: [
      `PSS (proportional set size: shared pages divided among sharers) from /proc/PID/smaps_rollup, summed over each environment's host processes, ${count} environments up at once, each after running \`true\` once, measured 1 s later.`,
      "supermachine: the QEMU of each VM restored from the snapshot (256 MiB guests; the snapshot's RAM is a private file mapping, shared until written) plus the one spare QEMU the pool keeps started ahead of the next restore, divided among the VMs; naive VM: the QEMU of each booted VM (anonymous guest RAM).",
      "bubblewrap: bwrap (two processes) + `sleep` in the sandbox; gVisor: the sandbox (Sentry + stubs) and the gofer; host: one `sleep` process.",
    ],
    results: [...results, ...unavailableResults(ctx, ["supermachine", "naive-vm", "bwrap", "gvisor", "host"])],
    seconds: (performance.now() - started) / 1000,
  };
}

// ----------------------------------------------------- workload 6: first use

/** A fresh cache dir sharing the machine's boot assets (kernel, initramfs, restore stub) but no image. */
async function freshCache(root: string, name: string): Promise<string> {
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  // The machine's assets, not the image's: kernel, initramfs, restore stub, boot templates.
  for (const sub of ["kernel", "initramfs", "restore", "boot-templates"]) await symlink(join(defaultCacheDir(), sub), join(dir, sub)).catch(() => undefined);
  return dir;
}

/** Pulls `ref` into `cacheDir` and extracts its layers (in order) into `dir` with tar. */
async function pullAndExtract(ref: string, cacheDir: string, dir: string): Promise<void> {
  const pulled = await pullImage(ref, { cacheDir });
  await mkdir(dir, { recursive: true });
  for (const layer of pulled.layers) {
    const tar = spawn("tar", ["-x", "-C", dir, "--numeric-owner", "--exclude=./dev/*"], { stdio: ["pipe", "ignore", "pipe"] });
    let err = "";
    tar.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
    const exited = new Promise<number | null>((r) => tar.once("close", r));
    await pipeline(openLayer(layer), tar.stdin);
    const code = await exited;
    if (code !== 0) throw new Error(`tar -x of ${layer.digest} exited ${code}: ${err}`);
  }
}

/** Per phase, the p50 of workload 6's cold and cache-hit samples (ms). */
function splitP50(s: { cold: Record<string, number>[]; hit: Record<string, number>[] }): Record<"cold" | "hit", Record<string, number>> {
  const p50 = (rows: Record<string, number>[]) => Object.fromEntries(Object.keys(rows[0] ?? {}).map((k) => [k, summarize(rows.map((r) => r[k]!)).p50]));
  return { cold: p50(s.cold), hit: p50(s.hit) };
}

export async function workload6(ctx: Ctx): Promise<WorkloadResult> {
  const started = performance.now();
  const { cfg } = ctx;
  ctx.log("w6: time to first use of a new image (local registry)");
  const img = ctx.images.python;
  const work = await mkdtemp(join(tmpdir(), "sm-bench-firstuse-"));
  const reg = await startRegistry();
  const results: SystemResult[] = [];
  const closers: (() => Promise<void>)[] = [];
  try {
    await pushLayout(reg, img.layout!.dir, img.layout!.tag, "bench/python:bookworm");
    const ref = `${reg.host}/bench/python:bookworm`;
    let seq = 0;
    const fresh = async () => freshCache(work, `c${seq++}`);

    interface FLane {
      system: SystemId;
      cold: () => Promise<number | void>;
      hit: () => Promise<number | void>;
      coldMs: number[];
      hitMs: number[];
      coldBuild: number[];
      hitBuild: number[];
      /** The phases of the last cold() or hit() (supermachine), and those of the timed ones. */
      phases?: () => Record<string, number> | undefined;
      split: { cold: Record<string, number>[]; hit: Record<string, number>[] };
      error?: string;
    }
    const lanes: FLane[] = [];
    const add = (system: SystemId, cold: FLane["cold"], hit: FLane["hit"], phases?: FLane["phases"]) =>
      lanes.push({ system, cold, hit, coldMs: [], hitMs: [], coldBuild: [], hitBuild: [], ...(phases ? { phases } : {}), split: { cold: [], hit: [] } });
    const have = (id: SystemId) => ctx.systems.some((s) => s.id === id);

    if (have("supermachine")) {
      // First use = Image.build (pull + erofs + bake) → pool → acquire → exec → release.
      // Where each sample's time went (ms): Image.build, pool() (its restore
      // or the bake's VM, and the prewarm list), acquire + exec + release,
      // shutdown + close.
      let last: Record<string, number> | undefined;
      const use = async (cacheDir: string, snapshotsDir: string): Promise<number> => {
        const t = performance.now();
        const phases: Record<string, number> = {};
        let mark = t;
        const phase = (name: string) => {
          const now = performance.now();
          phases[name] = now - mark;
          mark = now;
        };
        const image = await Image.build({ ref, cacheDir, snapshotsDir });
        phase("build");
        try {
          const pool = await image.pool({ min: 1, max: 1, prewarm: [[...PY]] });
          phase("pool");
          try {
            const vm = await pool.acquire();
            try {
              expectOut((await vm.exec({ argv: PY, timeoutMs: 60_000 })).stdout.toString(), PY_OUT, "supermachine");
            } finally {
              await vm.release();
              phase("task");
            }
          } finally {
            await pool.shutdown();
          }
        } finally {
          await image.close();
          phase("close");
          last = phases;
        }
        return phases.build!;
      };
      let warm: { cacheDir: string; snapshotsDir: string } | undefined;
      add(
        "supermachine",
        async () => {
          const cacheDir = await fresh();
          return use(cacheDir, join(cacheDir, "snapshots"));
        },
        async () => {
          if (!warm) {
            const cacheDir = await fresh();
            warm = { cacheDir, snapshotsDir: join(cacheDir, "snapshots") };
            await use(warm.cacheDir, warm.snapshotsDir);
          }
          return use(warm.cacheDir, warm.snapshotsDir);
        },
        () => last,
      );
    }
    if (have("naive-vm")) {
      const use = async (cacheDir: string): Promise<number> => {
        const t = performance.now();
        const r = await resolveImage(ref, { cacheDir });
        const resolved = performance.now() - t;
        const vm = await Vm.boot({ rootfsImage: r.rootfsImage, config: r.config, cacheDir, bootTemplate: false });
        try {
          expectOut((await vm.exec({ argv: PY, timeoutMs: 60_000 })).stdout.toString(), PY_OUT, "naive-vm");
        } finally {
          await vm.destroy();
        }
        return resolved;
      };
      let warm: string | undefined;
      add(
        "naive-vm",
        async () => use(await fresh()),
        async () => {
          if (!warm) await use((warm = await fresh()));
          return use(warm);
        },
      );
    }
    for (const id of ["bwrap", "gvisor"] as const) {
      const sys = ctx.systems.find((s) => s.id === id);
      if (!sys) continue;
      // First use = pull (the same client and cache as ours) → extract the layers → run.
      const use = async (cacheDir: string, rootDir: string, extract: boolean): Promise<void> => {
        if (extract) await pullAndExtract(ref, cacheDir, rootDir);
        else await pullImage(ref, { cacheDir });
        const local: BenchImage = { ...img, rootDir };
        if (id === "bwrap") {
          expectOut((await check([...Bubblewrap.args(rootDir), ...PY], { env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" } })).stdout, PY_OUT, id);
        } else {
          const g = sys as Gvisor;
          const bundle = await g.bundle(local, PY);
          expectOut((await check([...g.flags(), "run", "--bundle", bundle, `f-${randomBytes(6).toString("hex")}`], { env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" } })).stdout, PY_OUT, id);
        }
      };
      let warm: { cacheDir: string; rootDir: string } | undefined;
      add(
        id,
        async () => {
          const cacheDir = await fresh();
          await use(cacheDir, join(cacheDir, "root"), true);
        },
        async () => {
          if (!warm) {
            const cacheDir = await fresh();
            warm = { cacheDir, rootDir: join(cacheDir, "root") };
            await use(warm.cacheDir, warm.rootDir, true);
          }
          await use(warm.cacheDir, warm.rootDir, false);
        },
      );
    }

    for (const phase of ["cold", "hit"] as const) {
      const n = phase === "cold" ? cfg.coldSamples : cfg.hitSamples;
      for (let i = 0; i < n; i++) {
        for (let j = 0; j < lanes.length; j++) {
          const lane = lanes[(i + j) % lanes.length]!;
          if (lane.error) continue;
          try {
            // The warm cache for the hits is made outside the timing.
            if (phase === "hit" && i === 0) await lane.hit();
            const t = performance.now();
            const build = await lane[phase]();
            (phase === "cold" ? lane.coldMs : lane.hitMs).push(performance.now() - t);
            if (typeof build === "number") (phase === "cold" ? lane.coldBuild : lane.hitBuild).push(build);
            const phases = lane.phases?.();
            if (phases) lane.split[phase].push(phases);
          } catch (e) {
            lane.error = `${phase}: ${errText(e)}`;
            ctx.log(`  ${lane.system} failed: ${lane.error}`);
          }
        }
        ctx.log(`  ${phase} ${i + 1}/${n}`);
      }
      // Cold samples leave a cache each; drop them (the warm ones are made after this).
      if (phase === "cold") for (let k = 0; k < seq; k++) await rm(join(work, `c${k}`), { recursive: true, force: true });
    }
    for (const l of lanes) {
      const sr: SystemResult = {
        system: l.system,
        status: l.error ? "failed" : "ok",
        ...(l.error ? { reason: l.error } : {}),
        firstUse: {
          cold: { samples: l.coldMs, summary: summarize(l.coldMs) },
          hit: { samples: l.hitMs, summary: summarize(l.hitMs) },
          ...(l.coldBuild.length ? { coldBuild: { samples: l.coldBuild, summary: summarize(l.coldBuild) } } : {}),
          ...(l.hitBuild.length ? { hitBuild: { samples: l.hitBuild, summary: summarize(l.hitBuild) } } : {}),
        },
        ...(l.split.cold.length && l.split.hit.length ? { extra: { split: splitP50(l.split) } } : {}),
      };
      results.push(sr);
    }
    if (have("host")) results.push({ system: "host", status: "unavailable", reason: "no image: the host runs its own python3" });
  } finally {
    for (const c of closers) await c().catch(() => undefined);
    await reg.stop();
    await rm(work, { recursive: true, force: true });
  }
  return {
    id: "w6",
    title: "time to first use of a new image (Debian + python3, from a local registry)",
    kind: "first-use",
    image: "python",
    notes: [
      "The python image is pushed (skopeo) to a real local registry (Debian's docker-registry on 127.0.0.1); every system pulls it with this project's registry client into a fresh cache (the machine's kernel, initramfs, restore stub and boot template are linked in: only the image is new).",
      `First use = everything until the first Python task's output: supermachine: Image.build (pull → erofs → boot → snapshot) → pool({ min: 1, max: 1 }) → acquire → exec; naive VM: resolveImage (pull → erofs) → Vm.boot → exec; bubblewrap / gVisor: pull → \`tar -x\` of the layer → run.`,
      "Cache hit = the same with everything cached: supermachine's Image.build finds its snapshot, the naive VM its erofs image, bubblewrap / gVisor the pulled image and the extracted directory (pullPolicy \"missing\", the default: a cached tag is not asked of the registry again).",
      `${cfg.coldSamples} cold and ${cfg.hitSamples} cache-hit samples per system (a cold sample costs seconds), interleaved.`,
    ],
    results: [...results, ...unavailableResults(ctx, ["supermachine", "naive-vm", "bwrap", "gvisor", "host"])],
    seconds: (performance.now() - started) / 1000,
  };
}
