/**
 * The benchmark harness with tiny sample counts, so it cannot rot: every
 * workload runs for every system that can run here, the results JSON, the
 * chart and BENCHMARKS.md are written (to a temp dir), and the figures in
 * them are real measurements of this run.
 */

import assert from "node:assert/strict";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import type { BenchResults } from "../../bench/report.js";
import { fmtMs } from "../../bench/stats.js";
import { VM_TEST_TIMEOUT, pidsMatching } from "../helpers.js";
import { runBenchScript } from "./helpers.js";

function runBench(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return runBenchScript("run.js", args, 200_000);
}

describe("bench harness (quick)", { timeout: VM_TEST_TIMEOUT }, () => {
  it("runs every workload with tiny samples and writes results JSON, chart and BENCHMARKS.md", async () => {
    const out = await mkdtemp(join(tmpdir(), "sm-bench-smoke-"));
    try {
      const r = await runBench(["--quick", "--out", out, "--no-install"]);
      assert.equal(r.code, 0, r.stderr.slice(-4000));
      const dir = join(out, "bench", "results");
      const jsons = readdirSync(dir).filter((f) => f.endsWith("-quick.json"));
      assert.equal(jsons.length, 1, `results: ${readdirSync(dir).join(", ")}`);
      const res = JSON.parse(readFileSync(join(dir, jsons[0]!), "utf8")) as BenchResults;
      assert.equal(res.quick, true);
      assert.ok(res.accel === "tcg" || res.accel === "kvm");
      assert.deepEqual(res.workloads.map((w) => w.id), ["w1", "w2", "w3", "w4", "w5", "w6"]);
      // Our own system and the floor always run; every workload measured them.
      for (const w of res.workloads) {
        for (const id of ["supermachine", "host"] as const) {
          const s = w.results.find((x) => x.system === id);
          assert.ok(s, `${w.id}: no result for ${id}`);
          if (w.id === "w6" && id === "host") continue; // the host has no image to prepare
          assert.equal(s.status, "ok", `${w.id} ${id}: ${s.status} ${s.reason ?? ""}`);
        }
        const ours = w.results.find((x) => x.system === "supermachine")!;
        if (w.kind === "latency") {
          assert.ok(ours.samples && ours.samples.length >= 3 && ours.samples.every((v) => Number.isFinite(v) && v > 0), `${w.id}: samples ${ours.samples}`);
        }
        if (w.kind === "throughput") assert.ok(ours.throughput!.tasksPerSec > 0);
        if (w.kind === "memory") assert.ok(ours.memory!.pssMibPerEnv > 1, "an idle VM holds some memory");
        if (w.kind === "first-use") {
          assert.ok(ours.firstUse!.cold.samples.length >= 1 && ours.firstUse!.hit.samples.length >= 1);
          // The split's phases (p50 of each) are this run's and fit in the samples they split.
          const split = ours.extra?.split as Record<"cold" | "hit", Record<string, number>>;
          for (const k of ["cold", "hit"] as const) {
            assert.deepEqual(Object.keys(split[k]), ["build", "pool", "task", "close"], `${k}: ${JSON.stringify(split[k])}`);
            const sum = Object.values(split[k]).reduce((a, b) => a + b, 0);
            const { min, max } = ours.firstUse![k].summary;
            assert.ok(Object.values(split[k]).every((v) => v > 0) && sum <= max && sum > min / 2, `${k}: split ${JSON.stringify(split[k])} of samples ${min}–${max} ms`);
          }
        }
      }
      // A peer that did not run says why.
      for (const s of res.systems) if (!s.available) assert.ok(s.reason && s.reason.length > 5, `${s.id} not run without a reason`);
      const svg = join(dir, jsons[0]!.replace(/\.json$/, ".svg"));
      assert.ok(existsSync(svg));
      assert.match(readFileSync(svg, "utf8").slice(0, 2000), /<svg/);
      const md = readFileSync(join(out, "BENCHMARKS.md"), "utf8");
      assert.match(md, /quoted/);
      const w2 = res.workloads.find((w) => w.id === "w2")!.results.find((x) => x.system === "supermachine")!;
      // The table shows this run's p50, not a number from elsewhere.
      assert.ok(md.includes(`**${fmtMs(w2.summary!.p50)}**`), `BENCHMARKS.md shows the measured p50 ${fmtMs(w2.summary!.p50)}`);
      assert.match(md, /supermachine's first use, split \(p50 of each phase, ms\): cold: Image\.build [\d.]+, pool\(\)/);
      // Workload 2's floor: measured in the VM and on the host, shown with what the exec costs above it.
      for (const id of ["supermachine", "host"] as const) {
        const x = res.workloads.find((w) => w.id === "w2")!.results.find((s) => s.system === id)!;
        const f = x.extra?.floor as { ms: number; runs: number[] } | { error: string } | undefined;
        assert.ok(f && "ms" in f, `w2 ${id}: floor ${JSON.stringify(f)}`);
        assert.equal(f.runs.length, 3);
        assert.ok(f.runs.every((v) => Number.isFinite(v) && v >= 0) && f.runs.some((v) => v > 0), `w2 ${id}: floor runs ${f.runs}`);
        assert.ok(md.includes(`${fmtMs(f.ms)} ms (runs ${f.runs.map(fmtMs).join(", ")}; exec p50 − floor = ${fmtMs(x.summary!.p50 - f.ms)} ms)`), `BENCHMARKS.md shows w2 ${id}'s floor`);
      }
      assert.match(r.stdout, /\| target \|/);
    } finally {
      await rm(out, { recursive: true, force: true });
    }
    assert.deepEqual(pidsMatching(/sm-bench-snapshots/), [], "the bench left QEMU processes behind");
  });
});
