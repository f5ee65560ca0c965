/**
 * bench/npm-install.ts with a tiny project and one run, so it cannot rot: the
 * host baseline, one VM placement (a volume) and the restore path run against
 * the fixture registry, and each prints a row with a figure in its cells.
 * The bench checks by itself that every install loads (`require` of the
 * top-level packages), in the VM and on the host. No figure is compared.
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { runBenchScript } from "./helpers.js";
import { VM_TEST_TIMEOUT } from "../helpers.js";

describe("bench/npm-install (quick)", { timeout: 2 * VM_TEST_TIMEOUT }, () => {
  it("installs on the host, into a volume, and loads a baked node_modules in a restored VM", async () => {
    const r = await runBenchScript("npm-install.js", ["--runs", "1", "--packages", "4", "--files", "2", "--only", "host,volume,restore"]);
    assert.equal(r.code, 0, r.stderr.slice(-4000));
    assert.match(r.stdout, /→ 4 packages, 12 files/);
    const rows: [string, number][] = [
      ["host (same node + npm, no VM)", 2],
      ["VM, volume at /work/node_modules", 3],
      ["restored VM, node_modules baked in a volume", 2],
    ];
    for (const [what, figures] of rows) {
      const line = r.stdout.split("\n").find((l) => l.startsWith(`| ${what}`));
      assert.ok(line, `a row for ${what}:\n${r.stdout}`);
      const cells = line.split("|").slice(2, -1).map((c) => c.trim());
      assert.equal(cells[0], "1", `${what}: runs`);
      for (const c of cells.slice(1, 1 + figures)) assert.ok(Number.isFinite(Number(c)) && Number(c) > 0, `${what}: ${JSON.stringify(c)} is not a figure\n${line}`);
    }
    for (const absent of ["tmpfs writable layer", "diskMib: 2048", "mount at /work"]) assert.ok(!r.stdout.includes(absent), `--only left out ${absent}`);
  });
});
