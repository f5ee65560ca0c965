/**
 * From one run's results (bench/results/<date>-<accel>.json) to
 * BENCHMARKS.md and a chart (vega-lite, rendered to SVG by vega; no canvas
 * needed). Every figure and ratio comes from that one file.
 *
 *   node dist/bench/report.js bench/results/<file>.json [--out DIR]
 *
 * regenerates BENCHMARKS.md and the charts from a saved run.
 */

import { copyFile, mkdir, readFile, writeFile } from "node:fs/promises";
import { basename, dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import { fmtMs, type Summary, table } from "./stats.js";
import type { SystemId } from "./systems.js";
import type { BenchConfig, SystemResult, WorkloadResult } from "./workloads.js";

export interface SystemInfo {
  id: SystemId;
  label: string;
  isolation: string;
  detail: string;
  available: boolean;
  /** Why it could not run: what was tried, what came back. */
  reason?: string;
  tried?: string[];
}

export interface BenchResults {
  schema: 1;
  startedAt: string;
  finishedAt: string;
  date: string;
  accel: string;
  quick: boolean;
  machine: { cpus: number; cpuModel: string; memGiB: number; kernel: string; os: string; node: string; qemu: string };
  config: BenchConfig;
  images: Record<string, string>;
  systems: SystemInfo[];
  workloads: WorkloadResult[];
  seed: typeof SEED;
}

/**
 * The seed's published figures (the macOS original, Apple Silicon / HVF,
 * alpine): quoted, not measured here.
 */
export const SEED = {
  source: "the seed's \"Performance, measured\" table (macOS original, Apple Silicon M-series, HVF, alpine:latest)",
  coldBakeMs: 400,
  cacheHitBakeMs: 15,
  firstAcquireAfterBuildMs: 0,
  acquireIdleMs: 0,
  acquireCycleRestoreMs: 5,
  spawnFromDiskMs: 22,
  execEchoMs: 0.3,
  idleVmMib: 3,
} as const;

const ORDER: readonly SystemId[] = ["supermachine", "naive-vm", "bwrap", "gvisor", "host"];

const SHORT: Record<SystemId, string> = {
  supermachine: "supermachine",
  "naive-vm": "naive VM",
  bwrap: "bubblewrap",
  gvisor: "gVisor",
  host: "host spawn",
};

function wl(r: BenchResults, id: string): WorkloadResult | undefined {
  return r.workloads.find((w) => w.id === id);
}

function res(r: BenchResults, id: string, sys: SystemId): SystemResult | undefined {
  const x = wl(r, id)?.results.find((s) => s.system === sys);
  return x;
}

function ok(x: SystemResult | undefined): x is SystemResult {
  return !!x && x.status === "ok";
}

function p50(r: BenchResults, id: string, sys: SystemId): number {
  const x = res(r, id, sys);
  return ok(x) && x.summary ? x.summary.p50 : NaN;
}

const fmtX = (v: number): string => (!Number.isFinite(v) ? "–" : v >= 100 ? `${v.toFixed(0)}×` : v >= 10 ? `${v.toFixed(1)}×` : `${v.toFixed(2)}×`);
const fmtMib = (v: number): string => (!Number.isFinite(v) ? "–" : v >= 10 ? v.toFixed(1) : v.toFixed(2));

function short(s: string, n = 90): string {
  const one = s.replace(/\s+/g, " ").replace(/\|/g, "\\|");
  return one.length > n ? `${one.slice(0, n - 1)}…` : one;
}

function notRun(x: SystemResult | undefined): string {
  if (!x) return "–";
  if (x.status === "unavailable") return `n/a (${short(x.reason ?? "", 60)})`;
  return `failed: ${short(x.reason ?? "", 80)}`;
}

function latencyCell(x: SystemResult | undefined, s: Summary | undefined, full: number): string {
  if (!ok(x) || !s || !s.n) return notRun(x);
  const n = s.n < full ? ` (n=${s.n})` : "";
  return `**${fmtMs(s.p50)}** / ${fmtMs(s.p90)} / ${fmtMs(s.p99)}${n}`;
}

export interface Target {
  what: string;
  target: string;
  measured: string;
  met: boolean | null;
}

export function targets(r: BenchResults): Target[] {
  const ours1 = p50(r, "w1", "supermachine");
  const bw1 = p50(r, "w1", "bwrap");
  const naive1 = p50(r, "w1", "naive-vm");
  const ours2 = p50(r, "w2", "supermachine");
  const t = (id: SystemId) => {
    const x = res(r, "w4", id);
    return ok(x) && x.throughput ? x.throughput.tasksPerSec : NaN;
  };
  const m = res(r, "w5", "supermachine");
  const mem = ok(m) && m.memory ? m.memory.pssMibPerEnv : NaN;
  const judge = (v: number, good: (v: number) => boolean) => (Number.isFinite(v) ? good(v) : null);
  return [
    {
      what: "1. one-shot echo p50 within 2× bubblewrap's",
      target: "≤ 2×",
      measured: `${fmtMs(ours1)} ms vs ${fmtMs(bw1)} ms = ${fmtX(ours1 / bw1)}`,
      met: judge(ours1 / bw1, (v) => v <= 2),
    },
    {
      what: "1. one-shot echo p50 ≥ 100× faster than the naive VM",
      target: "≥ 100×",
      measured: `${fmtMs(naive1)} ms / ${fmtMs(ours1)} ms = ${fmtX(naive1 / ours1)}`,
      met: judge(naive1 / ours1, (v) => v >= 100),
    },
    { what: "2. exec `echo hi` in a running VM, p50", target: "≤ 4 ms", measured: `${fmtMs(ours2)} ms`, met: judge(ours2, (v) => v <= 4) },
    {
      what: "4. Python throughput ≥ 5× the naive VM's",
      target: "≥ 5×",
      measured: `${t("supermachine").toFixed(2)} / ${t("naive-vm").toFixed(3)} tasks/s = ${fmtX(t("supermachine") / t("naive-vm"))}`,
      met: judge(t("supermachine") / t("naive-vm"), (v) => v >= 5),
    },
    { what: "5. host memory (PSS) per idle VM", target: "≤ 40 MiB", measured: `${fmtMib(mem)} MiB`, met: judge(mem, (v) => v <= 40) },
  ];
}

function seedCell(id: string): string {
  switch (id) {
    case "w1":
      return `~${SEED.acquireCycleRestoreMs} acquire (cycle-restore) + ~${SEED.execEchoMs} exec`;
    case "w2":
      return `~${SEED.execEchoMs}`;
    case "w5":
      return `~${SEED.idleVmMib} MiB (phys_footprint)`;
    case "w6-cold":
      return `~${SEED.coldBakeMs} (cold bake, layers cached)`;
    case "w6-hit":
      return `~${SEED.cacheHitBakeMs} (cache-hit bake)`;
    default:
      return "–";
  }
}

// ------------------------------------------------------------------ markdown

export function markdown(r: BenchResults, chartRel: string, jsonRel: string): string {
  const sysInfo = (id: SystemId) => r.systems.find((s) => s.id === id);
  const cols = ORDER.filter((id) => sysInfo(id));
  const oursHead = `supermachine (${r.accel})`;
  const head = ["workload", ...cols.map((id) => (id === "supermachine" ? oursHead : SHORT[id])), "seed, quoted (not measured; M-series, HVF)"];
  const full = r.config.samples;
  const rows: string[][] = [];
  const lat = (id: string, label: string) => {
    const w = wl(r, id);
    if (!w) return;
    rows.push([label, ...cols.map((s) => latencyCell(res(r, id, s), res(r, id, s)?.summary, full)), seedCell(id)]);
  };
  lat("w1", "1. one-shot `echo hi`, fresh environment, 1 task / 100 ms — ms p50 / p90 / p99");
  lat("w2", "2. `echo hi` in a running environment — ms p50 / p90 / p99");
  lat("w3", "3. one-shot Python task, fresh environment — ms p50 / p90 / p99");
  const w4 = wl(r, "w4");
  if (w4) {
    rows.push([
      `4. throughput, Python tasks, ${r.config.poolSize} at a time — tasks/s`,
      ...cols.map((s) => {
        const x = res(r, "w4", s);
        if (!ok(x) || !x.throughput) return notRun(x);
        const n = x.throughput.tasks < r.config.throughputTasks ? ` (${x.throughput.tasks} tasks)` : "";
        return `**${x.throughput.tasksPerSec.toFixed(x.throughput.tasksPerSec >= 10 ? 1 : 2)}**${n}`;
      }),
      "–",
    ]);
  }
  const w5 = wl(r, "w5");
  if (w5) {
    rows.push([
      `5. host memory per idle environment (${r.config.idle} idle) — MiB PSS`,
      ...cols.map((s) => {
        const x = res(r, "w5", s);
        return ok(x) && x.memory ? `**${fmtMib(x.memory.pssMibPerEnv)}** (RSS ${fmtMib(x.memory.rssMibPerEnv)})` : notRun(x);
      }),
      seedCell("w5"),
    ]);
  }
  const w6 = wl(r, "w6");
  if (w6) {
    for (const phase of ["cold", "hit"] as const) {
      rows.push([
        phase === "cold" ? "6a. first use of a new image, cold (pull + prepare + first task) — ms p50" : "6b. first use, everything cached — ms p50 / p90 / p99",
        ...cols.map((s) => {
          const x = res(r, "w6", s);
          if (!ok(x) || !x.firstUse) return notRun(x);
          const f = x.firstUse[phase].summary;
          const b = phase === "cold" ? x.firstUse.coldBuild?.summary : x.firstUse.hitBuild?.summary;
          const build = b && s === "supermachine" ? `; Image.build ${fmtMs(b.p50)}` : "";
          const main = phase === "cold" ? `**${fmtMs(f.p50)}** (n=${f.n})` : `**${fmtMs(f.p50)}** / ${fmtMs(f.p90)} / ${fmtMs(f.p99)} (n=${f.n})`;
          return `${main}${build}`;
        }),
        seedCell(phase === "cold" ? "w6-cold" : "w6-hit"),
      ]);
    }
  }

  const out: string[] = [];
  out.push("# Benchmarks: supermachine beside the peers users would pick instead");
  out.push("");
  out.push(
    `One run of \`npm run bench\`, one machine, every system measured in the same process with its samples interleaved. ` +
      `Generated from [${basename(jsonRel)}](${jsonRel}); do not edit by hand (regenerate with \`node dist/bench/report.js ${jsonRel}\`).`,
  );
  out.push("");
  out.push(
    `**Machine:** ${r.machine.cpuModel}, ${r.machine.cpus} cores, ${r.machine.memGiB} GiB, ${r.machine.os}, Linux ${r.machine.kernel}, Node ${r.machine.node}, ${r.machine.qemu}. ` +
      `**Accelerator for the VMs: ${r.accel}**${r.accel === "tcg" ? " (no hardware virtualization on this machine: every guest instruction is translated by QEMU's TCG; KVM hosts will differ a lot)" : ""}. ` +
      `Run ${r.startedAt} → ${r.finishedAt}${r.quick ? " (**quick mode: tiny sample counts, not for publication**)" : ""}.`,
  );
  out.push("");
  out.push(`![latency, throughput and memory of every system](${chartRel})`);
  out.push("");
  out.push("## Results");
  out.push("");
  out.push(`Latencies in milliseconds as **p50** / p90 / p99; n = ${full} samples per cell unless stated. Lower is better except throughput.`);
  out.push("");
  out.push(table(head, rows));
  out.push("");

  out.push("## Targets (this run)");
  out.push("");
  out.push(table(["target", "threshold", "measured", "met?"], targets(r).map((t) => [t.what, t.target, t.measured, t.met === null ? "not measured" : t.met ? "**met**" : "**not met**"])));
  out.push("");

  out.push("## Ratios (same run)");
  out.push("");
  const ratioRows: string[][] = [];
  for (const [id, label] of [
    ["w1", "1. one-shot echo"],
    ["w2", "2. echo, running env"],
    ["w3", "3. one-shot Python"],
  ] as const) {
    const ours = p50(r, id, "supermachine");
    if (!Number.isFinite(ours)) continue;
    ratioRows.push([
      `${label} (p50)`,
      ...cols.filter((s) => s !== "supermachine").map((s) => {
        const v = p50(r, id, s);
        return Number.isFinite(v) ? (v >= ours ? `${fmtX(v / ours)} faster` : `${fmtX(ours / v)} slower`) : "–";
      }),
    ]);
  }
  const tput = (s: SystemId) => {
    const x = res(r, "w4", s);
    return ok(x) && x.throughput ? x.throughput.tasksPerSec : NaN;
  };
  if (Number.isFinite(tput("supermachine"))) {
    ratioRows.push([
      "4. throughput",
      ...cols.filter((s) => s !== "supermachine").map((s) => {
        const v = tput(s);
        const o = tput("supermachine");
        return Number.isFinite(v) ? (o >= v ? `${fmtX(o / v)} more tasks/s` : `${fmtX(v / o)} fewer tasks/s`) : "–";
      }),
    ]);
  }
  const mem = (s: SystemId) => {
    const x = res(r, "w5", s);
    return ok(x) && x.memory ? x.memory.pssMibPerEnv : NaN;
  };
  if (Number.isFinite(mem("supermachine"))) {
    ratioRows.push([
      "5. memory per idle env",
      ...cols.filter((s) => s !== "supermachine").map((s) => {
        const v = mem(s);
        const o = mem("supermachine");
        return Number.isFinite(v) ? (o <= v ? `${fmtX(v / o)} less memory` : `${fmtX(o / v)} more memory`) : "–";
      }),
    ]);
  }
  if (ratioRows.length) {
    out.push("supermachine compared with each system (how much faster / slower supermachine is):");
    out.push("");
    out.push(table(["", ...cols.filter((s) => s !== "supermachine").map((s) => SHORT[s])], ratioRows));
    out.push("");
  }

  out.push("## Systems");
  out.push("");
  out.push(
    table(
      ["system", "isolation", "version / configuration", "ran?"],
      ORDER.map((id) => sysInfo(id))
        .filter((s): s is SystemInfo => !!s)
        .map((s) => [s.label, s.isolation, short(s.detail, 160), s.available ? "yes" : `**no**: ${short(s.reason ?? "", 400)}`]),
    ),
  );
  out.push("");
  out.push(`Root filesystems, the same for every system but the host: ${Object.entries(r.images).map(([k, v]) => `**${k}**: ${v}`).join("; ")}. The host runs its own /bin/echo and /usr/bin/python3.`);
  out.push("");

  out.push("## Details per workload");
  for (const w of r.workloads) {
    out.push("");
    out.push(`### ${w.id.slice(1)}. ${w.title}`);
    out.push("");
    out.push(`Image: ${w.image}. Took ${w.seconds.toFixed(0)} s.`);
    out.push("");
    for (const n of w.notes) out.push(`- ${n}`);
    out.push("");
    const detail: string[][] = [];
    for (const id of ORDER) {
      const x = w.results.find((s) => s.system === id);
      if (!x) continue;
      const name = id === "supermachine" ? oursHead : SHORT[id];
      if (!ok(x)) {
        detail.push([name, notRun(x), "", "", "", "", ""]);
        continue;
      }
      if (w.kind === "latency" && x.summary) {
        const s = x.summary;
        detail.push([name, String(s.n), fmtMs(s.p50), fmtMs(s.p90), fmtMs(s.p99), fmtMs(s.mean), fmtMs(s.max)]);
      } else if (w.kind === "throughput" && x.throughput) {
        const t = x.throughput;
        detail.push([name, String(t.tasks), `${t.tasksPerSec.toFixed(3)} tasks/s`, `${t.seconds.toFixed(1)} s`, "", "", ""]);
      } else if (w.kind === "memory" && x.memory) {
        const m = x.memory;
        detail.push([name, String(m.envs), `${fmtMib(m.pssMibPerEnv)} MiB`, `${fmtMib(m.rssMibPerEnv)} MiB`, `${fmtMib(m.pssMibTotal)} MiB`, `${fmtMib(m.sharedPssMib)} MiB`, ""]);
      } else if (w.kind === "first-use" && x.firstUse) {
        const f = x.firstUse;
        detail.push([
          name,
          `${f.cold.summary.n} / ${f.hit.summary.n}`,
          fmtMs(f.cold.summary.p50),
          `${fmtMs(f.cold.summary.min)}–${fmtMs(f.cold.summary.max)}`,
          fmtMs(f.hit.summary.p50),
          fmtMs(f.hit.summary.p99),
          f.coldBuild ? `${fmtMs(f.coldBuild.summary.p50)} / ${f.hitBuild ? fmtMs(f.hitBuild.summary.p50) : "–"}` : "",
        ]);
      }
    }
    const heads: Record<WorkloadResult["kind"], string[]> = {
      latency: ["system", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "max ms"],
      throughput: ["system", "tasks", "throughput", "time in chunks", "", "", ""],
      memory: ["system", "environments", "PSS / env", "RSS / env", "PSS total", "shared (spare QEMU)", ""],
      "first-use": ["system", "n cold / hit", "cold p50 ms", "cold min–max ms", "hit p50 ms", "hit p99 ms", "build or resolve p50 ms, cold / hit"],
    };
    out.push(table(heads[w.kind], detail));
    for (const line of [floorLine(w), splitLine(w)]) if (line) out.push("", line);
    const ours = w.results.find((s) => s.system === "supermachine");
    if (ours?.extra && w.kind === "latency" && "acquire" in ours.extra) {
      const e = ours.extra as { acquire: Summary; exec: Summary; release: Summary; tasksThatWaitedForARestore: number; tasks: number };
      out.push("");
      out.push(
        `supermachine's task, split (p50 / p99 ms, lead-ins included): acquire ${fmtMs(e.acquire.p50)} / ${fmtMs(e.acquire.p99)}, exec ${fmtMs(e.exec.p50)} / ${fmtMs(e.exec.p99)}, release ${fmtMs(e.release.p50)} / ${fmtMs(e.release.p99)}; ` +
          `${e.tasksThatWaitedForARestore} of ${e.tasks} acquires found no idle VM and waited for a restore.`,
      );
    }
  }
  out.push("");
  out.push("## How to run");
  out.push("");
  out.push(
    "`npm run bench` (setup, then `node dist/bench/run.js`): installs the peers from Debian when missing (bubblewrap, runsc, docker-registry, skopeo, mmdebstrap), " +
      "writes `bench/results/<date>-<accel>.json`, the chart next to it, and this file. `node dist/bench/run.js --help` lists the options (sample counts, `--quick`, `--out DIR`, `--only w1,w2`).",
  );
  out.push("");
  return out.join("\n");
}

/** Workload 2's in-environment floors (SystemResult.extra.floor), with what each exec costs above its own. */
function floorLine(w: WorkloadResult): string | undefined {
  const parts: string[] = [];
  for (const id of ORDER) {
    const x = w.results.find((s) => s.system === id);
    const f = x?.extra?.floor as { ms: number; runs: number[] } | { error: string } | undefined;
    if (!x || !f) continue;
    if ("error" in f) {
      parts.push(`${SHORT[id]}: not measured (${f.error})`);
      continue;
    }
    const above = x.summary ? `; exec p50 − floor = ${fmtMs(x.summary.p50 - f.ms)} ms` : "";
    parts.push(`${SHORT[id]} ${fmtMs(f.ms)} ms (runs ${f.runs.map(fmtMs).join(", ")}${above})`);
  }
  return parts.length ? `Each environment's own fork + exec + wait of /bin/echo (the floor), per exec: ${parts.join("; ")}.` : undefined;
}

/** Workload 6's split of supermachine's first use (SystemResult.extra.split). */
function splitLine(w: WorkloadResult): string | undefined {
  const split = w.results.find((x) => x.system === "supermachine")?.extra?.split as Record<"cold" | "hit", Record<string, number>> | undefined;
  if (w.kind !== "first-use" || !split) return undefined;
  const names: Record<string, string> = { build: "Image.build", pool: "pool() (the bake's VM or a restore, and the prewarm list)", task: "acquire + exec + release", close: "shutdown + close" };
  const one = (p: Record<string, number>) => Object.entries(p).map(([k, v]) => `${names[k] ?? k} ${fmtMs(v)}`).join(", ");
  return `supermachine's first use, split (p50 of each phase, ms): cold: ${one(split.cold)}; cache hit: ${one(split.hit)}.`;
}

// --------------------------------------------------------------------- chart

const COLORS: Record<string, string> = {
  supermachine: "#d62728",
  "naive VM": "#8c564b",
  bubblewrap: "#1f77b4",
  gVisor: "#2ca02c",
  "host spawn": "#7f7f7f",
  "seed (quoted)": "#bcbd22",
};

export function chartSpec(r: BenchResults): TopLevelSpec {
  interface Row {
    panel: string;
    system: string;
    p50: number;
    p90: number | null;
    p99: number | null;
    label: string;
  }
  const rows: Row[] = [];
  const panels: [string, string][] = [
    ["w1", "1. one-shot echo, fresh env"],
    ["w2", "2. echo in a running env"],
    ["w3", "3. one-shot Python, fresh env"],
  ];
  for (const [id, panel] of panels) {
    for (const s of ORDER) {
      const x = res(r, id, s);
      if (ok(x) && x.summary && x.summary.n) rows.push({ panel, system: SHORT[s], p50: x.summary.p50, p90: x.summary.p90, p99: x.summary.p99, label: `${fmtMs(x.summary.p50)} ms` });
    }
  }
  rows.push({ panel: panels[0]![1], system: "seed (quoted)", p50: SEED.acquireCycleRestoreMs + SEED.execEchoMs, p90: null, p99: null, label: `~${SEED.acquireCycleRestoreMs + SEED.execEchoMs} ms (quoted)` });
  rows.push({ panel: panels[1]![1], system: "seed (quoted)", p50: SEED.execEchoMs, p90: null, p99: null, label: `~${SEED.execEchoMs} ms (quoted)` });
  for (const phase of ["cold", "hit"] as const) {
    const panel = phase === "cold" ? "6a. first use of a new image, cold" : "6b. first use, cached";
    for (const s of ORDER) {
      const x = res(r, "w6", s);
      if (ok(x) && x.firstUse && x.firstUse[phase].summary.n) {
        const f = x.firstUse[phase].summary;
        rows.push({ panel, system: SHORT[s], p50: f.p50, p90: f.p90, p99: f.p99, label: `${fmtMs(f.p50)} ms` });
      }
    }
    const q = phase === "cold" ? SEED.coldBakeMs : SEED.cacheHitBakeMs;
    rows.push({ panel, system: "seed (quoted)", p50: q, p90: null, p99: null, label: `~${q} ms (${phase === "cold" ? "bake" : "cache-hit bake"}, quoted)` });
  }
  const systems = [...ORDER.map((s) => SHORT[s]), "seed (quoted)"];
  const color = { field: "system", type: "nominal" as const, scale: { domain: systems, range: systems.map((s) => COLORS[s]!) }, legend: null };
  const y = { field: "system", type: "nominal" as const, sort: systems, title: null };
  const latency = {
    data: { values: rows },
    facet: { row: { field: "panel", type: "nominal" as const, title: null, header: { labelAngle: 0, labelAlign: "left" as const, labelAnchor: "start" as const, labelOrient: "top" as const, labelFontWeight: "bold" as const, labelFontSize: 12 } } },
    spec: {
      width: 560,
      layer: [
        { mark: { type: "rule" as const, strokeWidth: 2 }, encoding: { y, x: { field: "p50", type: "quantitative" as const }, x2: { field: "p99" }, color } },
        { mark: { type: "tick" as const, thickness: 2, size: 10 }, encoding: { y, x: { field: "p90", type: "quantitative" as const }, color } },
        { mark: { type: "point" as const, filled: true, size: 70 }, encoding: { y, x: { field: "p50", type: "quantitative" as const }, color } },
        { mark: { type: "text" as const, align: "left" as const, dx: 8, dy: -8, fontSize: 10 }, encoding: { y, x: { field: "p50", type: "quantitative" as const }, text: { field: "label" } } },
      ],
      encoding: {
        x: { field: "p50", type: "quantitative" as const, scale: { type: "log" as const }, title: "milliseconds (log scale): dot p50, tick p90, line to p99" },
      },
    },
    resolve: { scale: { y: "independent" as const } },
  };
  const tputRows = ORDER.flatMap((s) => {
    const x = res(r, "w4", s);
    return ok(x) && x.throughput ? [{ system: SHORT[s], value: x.throughput.tasksPerSec, label: x.throughput.tasksPerSec.toFixed(2) }] : [];
  });
  const memRows = ORDER.flatMap((s) => {
    const x = res(r, "w5", s);
    return ok(x) && x.memory ? [{ system: SHORT[s], value: x.memory.pssMibPerEnv, label: `${fmtMib(x.memory.pssMibPerEnv)} MiB` }] : [];
  });
  memRows.push({ system: "seed (quoted)", value: SEED.idleVmMib, label: `~${SEED.idleVmMib} MiB (quoted)` });
  const bars = (title: string, values: { system: string; value: number; label: string }[], xTitle: string) => ({
    title: { text: title, anchor: "start" as const, fontSize: 12 },
    width: 260,
    data: { values },
    layer: [
      { mark: { type: "bar" as const }, encoding: { y, x: { field: "value", type: "quantitative" as const, title: xTitle }, color } },
      { mark: { type: "text" as const, align: "left" as const, dx: 4, fontSize: 10 }, encoding: { y, x: { field: "value", type: "quantitative" as const }, text: { field: "label" } } },
    ],
  });
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v5.json",
    title: {
      text: `supermachine beside its peers — ${r.date}, VMs under ${r.accel.toUpperCase()}`,
      subtitle: `${r.machine.cpuModel}, ${r.machine.cpus} cores; one run, samples interleaved; "seed (quoted)" = the macOS original's published figures (HVF), not measured here${r.quick ? "; QUICK MODE" : ""}`,
      anchor: "start",
    },
    config: { font: "Helvetica, Arial, sans-serif", view: { stroke: "#ddd" } },
    vconcat: [
      latency,
      {
        hconcat: [
          bars(`4. throughput, Python tasks, ${r.config.poolSize} at a time`, tputRows, "tasks / s (higher is better)"),
          bars(`5. host memory per idle env (${r.config.idle} idle)`, memRows, "MiB PSS (lower is better)"),
        ],
      },
    ],
  } as unknown as TopLevelSpec;
}

export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: "none" });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}

/** Writes the JSON (unless it is already there), the charts and BENCHMARKS.md under `outRoot`. */
export async function writeReport(r: BenchResults, outRoot: string, jsonPath?: string): Promise<{ json: string; svg: string; latestSvg: string; md: string }> {
  const resultsDir = join(outRoot, "bench", "results");
  await mkdir(resultsDir, { recursive: true });
  const base = `${r.date}-${r.accel}${r.quick ? "-quick" : ""}`;
  const json = jsonPath ?? join(resultsDir, `${base}.json`);
  if (!jsonPath) await writeFile(json, `${JSON.stringify(r, null, 1)}\n`);
  const svg = join(resultsDir, `${base}.svg`);
  await writeFile(svg, await renderSvg(chartSpec(r)));
  const latestSvg = join(resultsDir, "latest.svg");
  await copyFile(svg, latestSvg);
  const md = join(outRoot, "BENCHMARKS.md");
  await writeFile(md, markdown(r, relative(outRoot, svg), relative(outRoot, json)));
  return { json, svg, latestSvg, md };
}

// `node dist/bench/report.js <results.json> [--out DIR]`: regenerate from a saved run.
if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const file = process.argv[2];
  if (!file) {
    console.error("usage: node dist/bench/report.js bench/results/<date>-<accel>.json [--out DIR]");
    process.exit(2);
  }
  const i = process.argv.indexOf("--out");
  const outRoot = i >= 0 ? process.argv[i + 1]! : resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
  const r = JSON.parse(await readFile(file, "utf8")) as BenchResults;
  const paths = await writeReport(r, outRoot, resolve(file));
  console.log(`wrote ${paths.md}, ${paths.svg}`);
}
