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

  it("a qemu64 bake restores as qemu64 after the variable is gone; the default model is another snapshot", async (t) => {
    const ref = `dir:${await defaultRootfs()}`;
    process.env.SUPERMACHINE_TCG_CPU = "qemu64";
    const small = await Image.build({ ref, snapshotsDir, warmupTag: tag });
    try {
      if (small.manifest.accel !== "tcg") {
        t.skip("KVM here: the CPU model applies to TCG only");
        return;
      }
      assert.equal(small.manifest.cpuModel, "qemu64");
      delete process.env.SUPERMACHINE_TCG_CPU;
      const flags = await cpuFlags(small);
      assert.ok(flags.includes("sse2"), flags.join(" "));
      assert.ok(!flags.includes("sse4_2"), `qemu64 has no SSE4.2: ${flags.join(" ")}`);
      const dflt = await Image.build({ ref, snapshotsDir, warmupTag: tag });
      try {
        assert.notEqual(dflt.manifest.key, small.manifest.key, "the model is part of the cache key");
        assert.equal(dflt.manifest.cpuModel, DEFAULT_TCG_CPU);
        assert.ok((await cpuFlags(dflt)).includes("sse4_2"), "max has SSE4.2");
      } finally {
        await dflt.close();
      }
    } finally {
      await small.close();
    }
  });
});
