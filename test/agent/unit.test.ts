/**
 * The guest agent's own unit tests (`cargo test` in agent/): the frame
 * codec, the stream ring's Linux AIO reads, FUSE and user-database parsing.
 * They run on the host, against the same sources the static agent is built from.
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { describe, it } from "node:test";
import { PACKAGE_ROOT } from "../../src/guest/assets.js";

describe("agent unit tests", { timeout: 10 * 60_000 }, () => {
  it("cargo test passes", () => {
    const r = spawnSync("cargo", ["test", "--offline", "--quiet"], { cwd: join(PACKAGE_ROOT, "agent"), encoding: "utf8", timeout: 9 * 60_000 });
    assert.equal(r.error, undefined, `cargo: ${r.error?.message}`);
    const out = `${r.stdout}\n${r.stderr}`;
    assert.equal(r.status, 0, out.slice(-4000));
    const results = [...out.matchAll(/test result: ok\. (\d+) passed; (\d+) failed/g)];
    assert.ok(results.length > 0, out.slice(-4000));
    assert.ok(results.every((m) => m[2] === "0"));
    assert.ok(results.reduce((n, m) => n + Number(m[1]), 0) >= 21, "the agent's tests ran");
  });
});
