/**
 * TCG's guest CPU model is part of a snapshot: a bake under
 * SUPERMACHINE_TCG_CPU records it (and keys the cache on it), and every
 * restore of that snapshot runs on the same model whatever the environment
 * says later (the guest kernel chose its code paths from the CPU it booted on).
 * Real QEMU, kernel, snapshot.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { DEFAULT_TCG_CPU } from "../../src/vmm/qemu.js";
import { VM_TEST_TIMEOUT, defaultRootfs } from "../helpers.js";

async function cpuFlags(image: Image): Promise<string[]> {
  const vm = await image.restore();
  try {
    const r = await vm.exec({ argv: ["grep", "-m1", "^flags", "/proc/cpuinfo"] });
    assert.equal(r.exitCode, 0, r.stderr.toString());
    return r.stdout.toString().split(":")[1]!.trim().split(/\s+/);
  } finally {
    await vm.destroy();
  }
}

describe("TCG CPU model of a snapshot", { timeout: VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  const saved = process.env.SUPERMACHINE_TCG_CPU;
  const tag = `cpu-${randomBytes(3).toString("hex")}`;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-cpu-"));
  });

  after(async () => {
    if (saved === undefined) delete process.env.SUPERMACHINE_TCG_CPU;
    else process.env.SUPERMACHINE_TCG_CPU = saved;
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("a bake under SUPERMACHINE_TCG_CPU=max restores as max (ERMS) after the variable is gone; the default (no ERMS, x86-64-v3 kept) is another snapshot", async (t) => {
    const ref = `dir:${await defaultRootfs()}`;
    process.env.SUPERMACHINE_TCG_CPU = "max";
    const old = await Image.build({ ref, snapshotsDir, warmupTag: tag });
    try {
      if (old.manifest.accel !== "tcg") {
        t.skip("KVM here: the CPU model applies to TCG only");
        return;
      }
      assert.equal(old.manifest.cpuModel, "max");
      assert.equal(old.manifest.inputs.cpuModel, undefined, "keys without a model mean max: snapshots baked before the default changed stay valid");
      delete process.env.SUPERMACHINE_TCG_CPU;
      const flags = await cpuFlags(old);
      assert.ok(flags.includes("erms"), `max has ERMS: ${flags.join(" ")}`);
      const dflt = await Image.build({ ref, snapshotsDir, warmupTag: tag });
      try {
        assert.notEqual(dflt.manifest.key, old.manifest.key, "the model is part of the cache key");
        assert.equal(dflt.manifest.cpuModel, DEFAULT_TCG_CPU);
        const f = await cpuFlags(dflt);
        assert.ok(!f.includes("erms"), `the default has no ERMS: ${f.join(" ")}`);
        for (const x86v3 of ["sse4_2", "popcnt", "avx2", "bmi2", "fma", "movbe"]) assert.ok(f.includes(x86v3), `the default keeps x86-64-v3's ${x86v3}: ${f.join(" ")}`);
      } finally {
        await dflt.close();
      }
    } finally {
      await old.close();
    }
  });
});
