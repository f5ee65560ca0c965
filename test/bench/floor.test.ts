/**
 * Workload 2's floor loop: what it runs, and how its output is read (a
 * wrong reading would put a made-up floor beside a measured exec).
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { describe, it } from "node:test";
import { floorLoop, parseFloorRun } from "../../bench/workloads.js";

describe("bench workload 2 floor", () => {
  it("reads the loop's two uptimes as milliseconds per exec", () => {
    assert.equal(parseFloorRun("100.50 101.50\n", 200), 5);
    assert.equal(parseFloorRun("7 7", 10), 0);
  });

  it("refuses output that is not two uptimes, or time going backwards", () => {
    for (const bad of ["", "100.5\n", "a b\n", "1 2 3\n", "1.5 2.5\nextra\n", "-1 2\n"]) assert.throws(() => parseFloorRun(bad, 10), /not two uptimes/, JSON.stringify(bad));
    assert.throws(() => parseFloorRun("5 4\n", 10), /backwards/);
  });

  it("runs under a POSIX shell here, forking /bin/echo the number of times asked", () => {
    const out = execFileSync("sh", ["-c", floorLoop(50)], { encoding: "utf8" });
    assert.ok(parseFloorRun(out, 50) >= 0);
    // The loop really execs /bin/echo: with it failing, the loop fails.
    assert.throws(() => execFileSync("sh", ["-c", floorLoop(3).replaceAll("/bin/echo", "/bin/false")], { encoding: "utf8", stdio: "pipe" }));
  });
});
