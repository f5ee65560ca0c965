/**
 * Observability on Node's conventions: diagnostics_channel events for VM
 * starts and deaths, pool acquires and refills, image progress; the same as
 * NODE_DEBUG=supermachine lines.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { Image } from "../src/image/image.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, defaultRootfs } from "./helpers.js";

const execFileP = promisify(execFile);

describe("diagnostics_channel and NODE_DEBUG", { timeout: 2 * VM_TEST_TIMEOUT }, () => {
  let work: string;
  before(async () => {
    work = await mkdtemp(join(tmpdir(), "sm-diag-"));
  });
  after(async () => {
    await rm(work, { recursive: true, force: true });
  });

  it("a bake, a pool refill, an acquire and a VM death are published", async () => {
    const seen: Record<string, Record<string, unknown>[]> = {};
    const names = ["supermachine:vm:start", "supermachine:vm:death", "supermachine:pool:acquire", "supermachine:pool:refill", "supermachine:image"];
    const listeners = names.map((n) => {
      const f = (m: unknown) => (seen[n] ??= []).push(m as Record<string, unknown>);
      subscribe(n, f);
      return [n, f] as const;
    });
    try {
      const image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir: join(work, "snaps"), warmupTag: `diag-${Date.now()}` });
      const pool = await image.pool({ min: 0, max: 2 });
      try {
        const a = await pool.acquire(); // the bake's own VM
        const b = await pool.acquire(); // a restore
        b.qemu.kill("SIGKILL");
        await new Promise((r) => setTimeout(r, 1500));
        await a.release();
        await b.release().catch(() => undefined);
      } finally {
        await pool.shutdown();
        await image.close();
      }
      const starts = seen["supermachine:vm:start"] ?? [];
      assert.ok(starts.some((s) => s.how === "boot"), JSON.stringify(starts));
      assert.ok(starts.some((s) => s.how === "restore"), JSON.stringify(starts));
      assert.ok((seen["supermachine:image"] ?? []).some((p) => p.stage === "bake" && p.phase === "snapshot"));
      assert.ok((seen["supermachine:pool:refill"] ?? []).some((r) => r.ok === true));
      assert.equal((seen["supermachine:pool:acquire"] ?? []).length, 2);
      assert.ok((seen["supermachine:vm:death"] ?? []).some((d) => d.code === "ERR_SM_GUEST_DIED"), JSON.stringify(seen["supermachine:vm:death"]));
    } finally {
      for (const [n, f] of listeners) unsubscribe(n, f);
    }
  });

  it("NODE_DEBUG=supermachine prints the same events on stderr", async () => {
    const script = join(work, "boot.mjs");
    await writeFile(
      script,
      `import { Vm } from ${JSON.stringify(join(REPO_ROOT, "dist", "src", "index.js"))};\n` +
        `const vm = await Vm.boot({ rootfs: ${JSON.stringify(await defaultRootfs())} });\nawait vm.destroy();\n`,
    );
    const r = await execFileP(process.execPath, [script], { env: { ...process.env, NODE_DEBUG: "supermachine", SUPERMACHINE_ACCEL: "tcg" }, timeout: VM_TEST_TIMEOUT });
    assert.match(r.stderr, /SUPERMACHINE \d+: supermachine:vm:start \{"id":"[0-9a-f]+","how":"boot"/);
  });
});
