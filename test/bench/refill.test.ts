/**
 * bench/refill.ts with tiny counts, so it cannot rot: it restores real VMs,
 * prints the phase table with a number in every cell, and the idle table.
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { runBenchScript } from "./helpers.js";
import { VM_TEST_TIMEOUT } from "../helpers.js";

function runRefill(args: readonly string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return runBenchScript("refill.js", args);
}

describe("bench/refill (quick)", { timeout: VM_TEST_TIMEOUT }, () => {
  it("prints CPU per phase and idle CPU", async () => {
    const r = await runRefill(["--refills", "1", "--idle-seconds", "1", "--idle-vms", "1"]);
    assert.equal(r.code, 0, r.stderr.slice(-4000));
    for (const phase of ["QEMU start → QMP ready", "state load", "first agent frame", "configure", "prewarm", "first user exec", "refill (restore → ready"]) {
      const line = r.stdout.split("\n").find((l) => l.startsWith("| ") && l.includes(phase));
      assert.ok(line, `a row for ${phase}:\n${r.stdout}`);
      const cells = line.split("|").slice(2, -1).map((c) => c.trim());
      assert.equal(cells.length, 7, line);
      for (const c of cells) assert.ok(Number.isFinite(Number(c)) && Number(c) >= 0, `${phase}: ${JSON.stringify(c)} is not a figure`);
    }
    // Every phase runs guest code or QEMU: none is free.
    const total = r.stdout.split("\n").find((l) => l.includes("refill + first exec"))!;
    assert.ok(Number(total.split("|")[2]) > 0, total);
    assert.match(r.stdout, /1 idle VM, running \| [0-9.]+ \|/);
    assert.match(r.stdout, /1 idle VM, paused \(QMP stop, as pools do\) \| [0-9.]+ \|/);
  });

  it("compares prewarms interleaved: one summary row per variant", async () => {
    const r = await runRefill(["--refills", "1", "--no-idle", "--prewarms", "pool,none"]);
    assert.equal(r.code, 0, r.stderr.slice(-4000));
    const summary = r.stdout.split("Per variant")[1] ?? "";
    const rows = summary.split("\n").filter((l) => /^\| -cpu /.test(l));
    assert.deepEqual(rows.map((l) => l.split("|")[1]!.trim().replace(/^.*prewarm /, "")), ["pool", "none"], r.stdout);
    for (const l of rows) {
      for (const c of l.split("|").slice(2, -1).map((x) => x.trim())) assert.ok(Number.isFinite(Number(c)), `${JSON.stringify(c)} is not a figure: ${l}`);
    }
    assert.doesNotMatch(r.stdout, /Idle CPU/);
  });
});
