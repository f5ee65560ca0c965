/**
 * The pool's base prewarm (src/pool/pool.ts basePrewarm): the image's own
 * `true`, else the agent's binary. The order of the two on a fake exec; a
 * real pool of an image that has no `true` (its VMs are still handed out);
 * a real pool skips the base prewarm of a VM a waiting acquire() takes, and
 * runs it for VMs that go idle (supermachine:pool:refill says which), the
 * argv list likewise (per VM only for an image loaded from its directory);
 * a pool's argv list is baked into a snapshot of its own, once per list,
 * and that bake's VM is the pool's first; shutdown() does not wait for a
 * prewarm in flight.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { cp, mkdir, mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { after, before, describe, it } from "node:test";
import { SnapshotError } from "../../src/errors.js";
import { Image } from "../../src/image/image.js";
import { basePrewarm } from "../../src/pool/pool.js";
import type { ExecOptions, ExecOutput } from "../../src/vm/options.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs, descendantsMatching, pidsMatching, processAlive, waitFor } from "../helpers.js";

/** A stand-in with only exec(): records each argv, answers with `exitOf(argv)`. */
function fakeVm(exitOf: (argv: readonly string[]) => number): { vm: Vm; calls: string[][] } {
  const calls: string[][] = [];
  const vm = {
    exec: async (o: ExecOptions): Promise<ExecOutput> => {
      const argv = o.argv.map(String);
      calls.push(argv);
      return { stdout: Buffer.alloc(0), stderr: Buffer.alloc(0), exitCode: exitOf(argv) } as ExecOutput;
    },
  } as unknown as Vm;
  return { vm, calls };
}

describe("basePrewarm", () => {
  it("runs the image's `true` only, when it exists", async () => {
    const { vm, calls } = fakeVm(() => 0);
    await basePrewarm(vm, 1000);
    assert.deepEqual(calls, [["true"]]);
  });

  it("runs the agent's binary when the image has no `true` (exit 127)", async () => {
    const { vm, calls } = fakeVm((argv) => (argv[0] === "true" ? 127 : 0));
    await basePrewarm(vm, 1000);
    assert.deepEqual(calls, [["true"], ["/proc/1/exe", "--version"]]);
  });
});

describe("a pool of an image without `true`", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let dir: string;
  let image: Image | undefined;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-prewarm-"));
    const rootfs = join(dir, "rootfs");
    await cp(await defaultRootfs(), rootfs, { recursive: true, verbatimSymlinks: true });
    for (const d of ["bin", "sbin", "usr/bin", "usr/sbin"]) {
      const names = await readdir(join(rootfs, d)).catch(() => [] as string[]);
      if (names.includes("true")) await rm(join(rootfs, d, "true"));
    }
    image = await Image.build({ ref: `dir:${rootfs}`, snapshotsDir: join(dir, "snapshots"), warmupTag: `prewarm-${randomBytes(3).toString("hex")}` });
  });

  after(async () => {
    await image?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("hands out prewarmed VMs (the prewarm falls back to the agent's binary)", async () => {
    const pool = await image!.pool({ min: 1, max: 1, prewarm: true });
    try {
      const vm = await pool.acquire();
      // The image really has no `true` program (the shell's builtin aside).
      const r = await vm.exec({ argv: ["true"] });
      assert.equal(r.exitCode, 127);
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      await vm.release();
    } finally {
      await pool.shutdown();
    }
  });
});

describe("the base prewarm and waiting acquires", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let dir: string;
  let image: Image | undefined;
  const refills: { ok?: boolean; prewarmed?: boolean }[] = [];
  const onRefill = (m: unknown) => void refills.push(m as { ok?: boolean; prewarmed?: boolean });

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-prewarm-wait-"));
    image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir: dir, warmupTag: `prewarm-wait-${randomBytes(3).toString("hex")}` });
    // Drops the bake's VM (the warm handoff): every VM of the pools below is restored.
    await image.close();
    subscribe("supermachine:pool:refill", onRefill);
  });

  after(async () => {
    unsubscribe("supermachine:pool:refill", onRefill);
    await image?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("a VM restored for a waiting acquire() skips it; one restored to wait idle gets it", async () => {
    const pool = await image!.pool({ min: 0, max: 1, prewarm: true });
    try {
      refills.length = 0;
      // Nothing idle: this acquire waits for the restore it starts.
      const vm = await pool.acquire();
      assert.deepEqual(refills.map((r) => [r.ok, r.prewarmed]), [[true, false]]);
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    refills.length = 0;
    const warm = await image!.pool({ min: 1, max: 1, prewarm: true });
    try {
      await waitFor(() => warm.stats().idle === 1, 120_000, "the idle VM");
      assert.deepEqual(refills.map((r) => [r.ok, r.prewarmed]), [[true, true]]);
    } finally {
      await warm.shutdown();
    }
  });

  it("the argv prewarm too (an image that cannot be baked again): skipped on a VM a waiting acquire() takes, run on one that waits idle", async () => {
    const mark: string[][] = [["sh", "-c", "echo warm > /tmp/prewarm-mark"]];
    const cat = async (vm: Vm) => (await vm.exec({ argv: ["cat", "/tmp/prewarm-mark"] })).stdout.toString();
    // Loaded from its directory: no recipe to bake the list with, so it runs per VM.
    const plain = await Image.fromSnapshot(image!.snapshotPath);
    const pool = await plain.pool({ min: 0, max: 1, prewarm: mark });
    try {
      refills.length = 0;
      const vm = await pool.acquire();
      assert.deepEqual(refills.map((r) => [r.ok, r.prewarmed]), [[true, false]]);
      assert.equal(await cat(vm), "", "no prewarm ran on it");
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    const warm = await plain.pool({ min: 1, max: 1, prewarm: mark });
    try {
      await waitFor(() => warm.stats().idle === 1, 120_000, "the idle VM");
      const vm = await warm.acquire();
      assert.equal(await cat(vm), "warm\n");
      await vm.release();
    } finally {
      await warm.shutdown();
    }
    await plain.close();
  });

  it("shutdown() does not wait for a prewarm: the VM being prewarmed is destroyed, its QEMU gone", async () => {
    const started: string[] = [];
    const onStart = (m: unknown) => void started.push((m as { id: string }).id);
    subscribe("supermachine:vm:start", onStart);
    try {
      const pool = await image!.pool({ min: 1, max: 1, prewarm: [["sleep", "600"]] });
      // The restore is done (the VM started) and its prewarm sleeps.
      await waitFor(() => started.length === 1, 120_000, "the restored VM");
      const qemu = pidsMatching(new RegExp(`sm-${started[0]}`));
      assert.ok(qemu.length > 0, "its QEMU runs");
      const t0 = performance.now();
      await pool.shutdown();
      const ms = performance.now() - t0;
      // Far below the prewarm's 600 s: shutdown did not wait for it.
      assert.ok(ms < 120_000, `shutdown took ${ms} ms`);
      // Resolved only with every QEMU of the pool gone (the spare started ahead of need too).
      assert.deepEqual(qemu.filter((p) => processAlive(p)), [], "the prewarmed VM's QEMU exited");
      assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
      assert.equal(pool.stats().alive, 0);
    } finally {
      unsubscribe("supermachine:vm:start", onStart);
    }
  });

  it("release() then shutdown() at once: the refill the release started is stopped and no QEMU remains", async () => {
    const pool = await image!.pool({ min: 1, max: 1, prewarm: true });
    const vm = await pool.acquire();
    assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
    await vm.release();
    await pool.shutdown();
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });
});

describe("the bake's own VM (the first pool's first VM)", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let dir: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-prewarm-handoff-"));
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("is the bake's VM, which ran the pool's argv prewarm before the pool's own snapshot was taken of it (no second boot)", async () => {
    const booted: string[] = [];
    const phases: string[] = [];
    const onStart = (m: unknown) => {
      const e = m as { id: string; how: string };
      if (e.how === "boot") booted.push(e.id);
    };
    subscribe("supermachine:vm:start", onStart);
    let image: Image | undefined;
    try {
      image = await Image.build({
        ref: `dir:${await defaultRootfs()}`,
        snapshotsDir: dir,
        warmupTag: `prewarm-handoff-${randomBytes(3).toString("hex")}`,
        onProgress: (p) => void (p.stage === "bake" && phases.push(p.phase)),
      });
      assert.equal(booted.length, 1, "the bake booted one VM");
      assert.deepEqual(phases, ["boot", "warmup", "snapshot", "done"]);
      const pool = await image.pool({ min: 1, max: 1, prewarm: [["sh", "-c", "echo warm > /tmp/prewarm-mark"]] });
      try {
        const vm = await pool.acquire();
        // The list ran in the bake's VM, and the pool's snapshot was taken of it: no boot.
        assert.equal(booted.length, 1, "no second boot");
        assert.deepEqual(phases.slice(4), ["warmup", "snapshot", "done"], "the pool's bake: no boot phase");
        assert.equal(vm.id, booted[0], "the bake's VM");
        assert.equal((await vm.exec({ argv: ["cat", "/tmp/prewarm-mark"] })).stdout.toString(), "warm\n");
        await vm.release();
        // A restored VM of the pool's snapshot has the mark too.
        const next = await pool.acquire();
        assert.notEqual(next.id, booted[0]);
        assert.equal((await next.exec({ argv: ["cat", "/tmp/prewarm-mark"] })).stdout.toString(), "warm\n");
        await next.release();
      } finally {
        await pool.shutdown();
      }
      const snaps = (await readdir(dir)).filter((n) => n.startsWith("sm-"));
      assert.equal(snaps.length, 2, `the image's snapshot and the list's: ${snaps.join(", ")}`);
      // A new Image object of the same build finds both on disk: nothing boots or bakes.
      const again = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir: dir, warmupTag: image.manifest.inputs.warmupTag as string });
      try {
        assert.equal(again.baked, false);
        const p2 = await again.pool({ min: 1, max: 1, prewarm: [["sh", "-c", "echo warm > /tmp/prewarm-mark"]] });
        try {
          const vm = await p2.acquire();
          assert.equal((await vm.exec({ argv: ["cat", "/tmp/prewarm-mark"] })).stdout.toString(), "warm\n");
          await vm.release();
        } finally {
          await p2.shutdown();
        }
        assert.equal(booted.length, 1, "nothing booted");
        assert.equal(phases.length, 7, "nothing baked");
      } finally {
        await again.close();
      }
    } finally {
      unsubscribe("supermachine:vm:start", onStart);
      await image?.close();
    }
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });

  it("the list's snapshot is written behind the pool: when it cannot be, its restores reject with a SnapshotError and no stage or lock is left", async () => {
    const image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir: dir, warmupTag: `prewarm-early-${randomBytes(3).toString("hex")}` });
    const list = [["sh", "-c", "echo warm > /tmp/prewarm-mark"]];
    try {
      // The image's own snapshot is published behind it too: on disk before the listing.
      await image.saved();
      const known = new Set(await readdir(dir));
      // As soon as the list's stage appears, a directory takes the place of
      // its manifest.json: writing the manifest fails after the capture.
      let blocked = "";
      const watch = (async () => {
        const deadline = Date.now() + VM_TEST_TIMEOUT;
        while (!blocked && Date.now() < deadline) {
          const stage = (await readdir(dir)).find((n) => !known.has(n) && n.includes(".tmp-"));
          if (stage) {
            await mkdir(join(dir, stage, "manifest.json"));
            blocked = stage;
          } else await new Promise((r) => setTimeout(r, 5));
        }
      })();
      const pool = await image.pool({ min: 1, max: 1, prewarm: list });
      await watch;
      assert.ok(blocked, "the list's stage appeared");
      try {
        // The bake's VM is handed out all the same: it needs no snapshot.
        const vm = await pool.acquire();
        assert.equal((await vm.exec({ argv: ["cat", "/tmp/prewarm-mark"] })).stdout.toString(), "warm\n");
        const derived = await image.sibling(image.memoryMib, image.vcpus, list);
        await assert.rejects(derived.restore(), (e: unknown) => e instanceof SnapshotError && /could not be written/.test(e.message) && /snapshotsDir/.test(e.message));
        await vm.release();
      } finally {
        await pool.shutdown();
      }
      await waitFor(async () => !(await readdir(dir)).some((n) => n === blocked || n.endsWith(".lock")), 10_000, "the stage and the lock gone");
      assert.equal((await readdir(dir)).filter((n) => n.startsWith("sm-") && !known.has(n)).length, 0, "nothing published for the list");
    } finally {
      await image.close();
    }
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });

  it("the image's workload starts once in each VM, after the list: in the bake's VM when the pool takes it, in the others at their restore", async () => {
    // The workload appends a line; the list records whether any was there.
    const image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir: dir,
      cmd: ["sh", "-c", "echo started >> /tmp/wl"],
      warmupTag: `prewarm-workload-${randomBytes(3).toString("hex")}`,
    });
    try {
      const pool = await image.pool({ min: 1, max: 1, prewarm: [["sh", "-c", "cat /tmp/wl > /tmp/list-saw 2>/dev/null || echo none > /tmp/list-saw"]] });
      try {
        for (let i = 0; i < 2; i++) {
          const vm = await pool.acquire();
          const lines = async () => (await vm.exec({ argv: ["sh", "-c", "cat /tmp/wl 2>/dev/null; true"] })).stdout.toString();
          await waitFor(async () => (await lines()) !== "", 60_000, "the workload's line");
          await new Promise((r) => setTimeout(r, 300));
          assert.equal(await lines(), "started\n", `VM ${i}: the workload ran once`);
          assert.equal((await vm.exec({ argv: ["cat", "/tmp/list-saw"] })).stdout.toString(), "none\n", `VM ${i}: the list ran before it`);
          await vm.release();
        }
      } finally {
        await pool.shutdown();
      }
    } finally {
      await image.close();
    }
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });
});

describe("a pool's prewarm list baked into a snapshot of its own", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let dir: string;
  let image: Image | undefined;
  const boots: string[] = [];
  const onStart = (m: unknown) => {
    const e = m as { id: string; how: string };
    if (e.how === "boot") boots.push(e.id);
  };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-prewarm-bake-"));
    image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir: dir, warmupTag: `prewarm-bake-${randomBytes(3).toString("hex")}` });
    subscribe("supermachine:vm:start", onStart);
  });

  after(async () => {
    unsubscribe("supermachine:vm:start", onStart);
    await image?.close();
    await rm(dir, { recursive: true, force: true });
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });

  // Writes a random id once: a VM restored from a snapshot taken after it ran shows the snapshot's id.
  const once: string[][] = [["sh", "-c", "[ -e /tmp/pw-id ] || cat /proc/sys/kernel/random/uuid > /tmp/pw-id"]];
  const id = async (vm: Vm) => (await vm.exec({ argv: ["cat", "/tmp/pw-id"] })).stdout.toString().trim();

  it("every restored VM has what the list did before the snapshot; a second pool with the same list bakes nothing", async () => {
    const seen: string[] = [];
    for (let round = 0; round < 2; round++) {
      const pool = await image!.pool({ min: 1, max: 1, prewarm: once });
      try {
        for (let i = 0; i < 2; i++) {
          const vm = await pool.acquire();
          seen.push(await id(vm));
          await vm.release();
        }
      } finally {
        await pool.shutdown();
      }
    }
    assert.match(seen[0]!, /^[0-9a-f-]{36}$/);
    assert.deepEqual(new Set(seen).size, 1, `one id from the bake in every VM: ${seen.join(", ")}`);
    // Baked from the image's own bake VM (it was still there): no boot.
    assert.equal(boots.length, 0, "no boot for the first pool's bake");
    assert.equal((await readdir(dir)).filter((n) => n.startsWith("sm-")).length, 2, "the list's snapshot beside the image's");
  });

  it("another list is another bake; an image loaded from its directory runs the list per VM", async () => {
    const before = boots.length;
    const other = [...once, ["true"]];
    const pool = await image!.pool({ min: 1, max: 1, prewarm: other });
    await pool.shutdown();
    // The bake's VM went to the first list: this one boots a VM of its own.
    assert.equal(boots.length, before + 1, "the new list baked once");
    const plain = await Image.fromSnapshot(image!.snapshotPath);
    try {
      const p = await plain.pool({ min: 1, max: 1, prewarm: once });
      const ids: string[] = [];
      try {
        for (let i = 0; i < 2; i++) {
          await waitFor(() => p.stats().idle === 1, 120_000, "the idle, prewarmed VM");
          const vm = await p.acquire();
          ids.push(await id(vm));
          await vm.release();
        }
      } finally {
        await p.shutdown();
      }
      assert.equal(boots.length, before + 1, "no bake");
      for (const x of ids) assert.match(x, /^[0-9a-f-]{36}$/, "the list ran in each VM");
      assert.equal(new Set(ids).size, 2, `each VM ran the list itself: ${ids.join(", ")}`);
    } finally {
      await plain.close();
    }
  });
});
