/**
 * PoolOptions memoryMib / vcpus override the image's without the user
 * re-baking (the seed's table): the guest of a pooled VM sees the pool's
 * size, its first VM too (not the base build's own VM). Real bakes and
 * restores.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs } from "../helpers.js";

async function memTotalKib(vm: Vm): Promise<number> {
  const m = /MemTotal:\s+(\d+) kB/.exec((await vm.readFile("/proc/meminfo")).toString());
  assert.ok(m, "MemTotal in /proc/meminfo");
  return Number(m[1]);
}

async function cpus(vm: Vm): Promise<number> {
  return (await vm.readFile("/proc/cpuinfo")).toString().split("\n").filter((l) => /^processor\s*:/.test(l)).length;
}

describe("Pool size overrides", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-resize-"));
    image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir,
      memoryMib: 256,
      warmupTag: `resize-${randomBytes(3).toString("hex")}`,
      // The warmup's effect must be in the resized image too (it is rerun).
      warmup: async (vm) => {
        await vm.writeFile("/etc/warmed", Buffer.from("yes\n"));
      },
    });
  });

  after(async () => {
    await image?.close();
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("a pool with memoryMib twice the image's gives VMs whose guest sees it; vcpus likewise; the warmup's state is there", async () => {
    const base = await image.pool({ min: 0, max: 1 });
    let baseKib: number;
    try {
      const vm = await base.acquire();
      try {
        baseKib = await memTotalKib(vm);
        assert.equal(await cpus(vm), 1);
      } finally {
        await vm.release();
      }
    } finally {
      await base.shutdown();
    }
    assert.ok(baseKib <= 256 * 1024, `the image's guest has ${baseKib} KiB`);

    const big = await image.pool({ min: 1, max: 1, memoryMib: 512, vcpus: 2 });
    try {
      assert.equal(big.image.memoryMib, 512);
      assert.equal(big.image.vcpus, 2);
      const vm = await big.acquire();
      try {
        const kib = await memTotalKib(vm);
        assert.ok(kib > 256 * 1024 && kib <= 512 * 1024, `the pool's guest has ${kib} KiB (image's: ${baseKib})`);
        assert.ok(kib - baseKib >= 200 * 1024, `MemTotal grew by ${kib - baseKib} KiB`);
        assert.equal(await cpus(vm), 2);
        assert.equal((await vm.readFile("/etc/warmed")).toString(), "yes\n");
        assert.equal(vm.memoryMib, 512);
      } finally {
        await vm.release();
      }
    } finally {
      await big.shutdown();
    }

    // The resized image is cached: a second pool at that size bakes nothing.
    const snapshotsBefore = (await readdir(snapshotsDir)).filter((n) => !n.startsWith(".")).sort();
    const again = await image.pool({ min: 0, max: 1, memoryMib: 512, vcpus: 2 });
    try {
      assert.equal(again.image.memoryMib, 512);
      const vm = await again.acquire();
      assert.ok((await memTotalKib(vm)) > 256 * 1024);
      await vm.release();
    } finally {
      await again.shutdown();
    }
    assert.deepEqual((await readdir(snapshotsDir)).filter((n) => !n.startsWith(".")).sort(), snapshotsBefore);
    assert.equal(snapshotsBefore.length, 2, "the image and its 512 MiB / 2 vCPU sibling");

    // A new process (a fresh Image.build of the same options) finds it on disk.
    const rebuilt = await Image.build({ ref: image.manifest.image.ref, snapshotsDir, memoryMib: 512, vcpus: 2, warmupTag: String((image.manifest.inputs as { warmupTag: string }).warmupTag), warmup: async () => undefined });
    assert.equal(rebuilt.baked, false);
    await rebuilt.close();
  });

  it("the first pool of a fresh build at another size hands out a VM of that size, not the build's own VM", async () => {
    const dir = await mkdtemp(join(tmpdir(), "sm-resize-first-"));
    // A new build: its bake VM (256 MiB) waits as the warm handoff.
    const fresh = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir: dir, memoryMib: 256, warmupTag: `resize-first-${randomBytes(3).toString("hex")}` });
    try {
      const pool = await fresh.pool({ min: 1, max: 1, memoryMib: 384 });
      try {
        const vm = await pool.acquire();
        const kib = await memTotalKib(vm);
        assert.ok(kib > 256 * 1024 && kib <= 384 * 1024, `the first VM's guest has ${kib} KiB`);
        assert.equal(vm.memoryMib, 384);
        await vm.release();
      } finally {
        await pool.shutdown();
      }
    } finally {
      await fresh.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
