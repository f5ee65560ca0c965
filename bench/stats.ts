/**
 * Small helpers for benchmarks: percentiles and Markdown tables.
 * Benchmarks print numbers; they never assert on them.
 */

import { readFileSync, readdirSync } from "node:fs";

export interface Summary {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  mean: number;
  min: number;
  max: number;
}

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export function summarize(samples: readonly number[]): Summary {
  const s = [...samples].sort((a, b) => a - b);
  const mean = s.reduce((a, b) => a + b, 0) / (s.length || 1);
  return { n: s.length, p50: percentile(s, 50), p90: percentile(s, 90), p99: percentile(s, 99), mean, min: s[0] ?? NaN, max: s[s.length - 1] ?? NaN };
}

export function fmtMs(v: number): string {
  if (!Number.isFinite(v)) return "–";
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  if (v >= 1) return v.toFixed(2);
  return v.toFixed(3);
}

export function table(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const line = (cells: readonly string[]) => `| ${cells.join(" | ")} |`;
  return [line(header), line(header.map(() => "---")), ...rows.map(line)].join("\n");
}

/** Measures `f` n times, sequentially; returns milliseconds. */
export async function sample(n: number, f: () => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await f();
    out.push(performance.now() - t);
  }
  return out;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Proportional set size of a process, in KiB (shared pages divided among sharers). */
export function pssKib(pid: number): { pss: number; rss: number } {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, "latin1");
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN);
  return { pss: field("Pss"), rss: field("Rss") };
}

/** `pid` and all its descendants (from /proc/<pid>/stat). */
export function processTree(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, "latin1");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(d));
      children.set(ppid, list);
    } catch {
      /* gone */
    }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    out.push(p);
    for (const c of children.get(p) ?? []) walk(c);
  };
  walk(pid);
  return out;
}

/** Summed PSS and RSS (KiB) of processes; the ones that vanished count 0. */
export function sumPssKib(pids: Iterable<number>): { pss: number; rss: number } {
  let pss = 0;
  let rss = 0;
  for (const p of new Set(pids)) {
    try {
      const m = pssKib(p);
      if (Number.isFinite(m.pss)) pss += m.pss;
      if (Number.isFinite(m.rss)) rss += m.rss;
    } catch {
      /* gone */
    }
  }
  return { pss, rss };
}

/** Command-line arguments: `--name value`, `--flag`. */
export class Args {
  constructor(private readonly argv: readonly string[] = process.argv.slice(2)) {}
  has(name: string): boolean {
    return this.argv.includes(`--${name}`);
  }
  str(name: string): string | undefined {
    const i = this.argv.indexOf(`--${name}`);
    return i >= 0 ? this.argv[i + 1] : undefined;
  }
  num(name: string, dflt: number): number {
    const v = this.str(name);
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new TypeError(`--${name} expects a number ≥ 0, got ${JSON.stringify(v)}`);
    return n;
  }
  list(name: string): string[] | undefined {
    return this.str(name)?.split(",").map((s) => s.trim()).filter(Boolean);
  }
}
