/**
 * The seed's "Performance, measured" table, measured here: bake, cache-hit
 * build, acquire paths, memory per idle VM, with a cold boot of the same VM
 * (no snapshot) in the same run as the baseline.
 *
 *   node dist/bench/snapshots.js [--runs N] [--idle N]
 */

import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image, Vm } from "../src/index.js";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../src/guest/default-image.js";
import { defaultCacheDir } from "../src/paths.js";
import { fmtMs, pssKib, sample, summarize, table } from "./stats.js";

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}

export { pssKib };

async function main(): Promise<void> {
  const runs = arg("runs", 50);
  const idleCount = arg("idle", 16);
  const rootfs = await ensureDefaultImage(defaultCacheDir());
  const ref = `dir:${rootfs}`;
  const snapshotsDir = await mkdtemp(join(tmpdir(), "sm-bench-snap-"));
  const rows: string[][] = [];
  const add = (what: string, samples: number[], note = "") => {
    const s = summarize(samples);
    rows.push([what, String(s.n), fmtMs(s.p50), fmtMs(s.p90), fmtMs(s.p99), note]);
  };
  let accel = "?";
  try {
    // Baseline: a cold boot of the same image, no snapshot.
    const cold = await sample(3, async () => {
      const vm = await Vm.boot({ rootfs, config: DEFAULT_IMAGE_CONFIG });
      accel = vm.accelerator;
      await vm.destroy();
    });
    add("cold boot, no snapshot (baseline)", cold);

    const bakes: number[] = [];
    let image: Image | undefined;
    for (let i = 0; i < 3; i++) {
      const t = performance.now();
      const img = await Image.build({ ref, snapshotsDir, warmupTag: `bench-${randomBytes(4).toString("hex")}` });
      bakes.push(performance.now() - t);
      if (image) await img.close();
      else image = img;
    }
    add("cold bake (boot + snapshot)", bakes);
    const tag = image!.manifest.inputs.warmupTag as string;
    add("cache-hit build", await sample(runs, () => Image.build({ ref, snapshotsDir, warmupTag: tag })));

    // First acquire after build: the bake's own VM.
    const handoffPool = await image!.pool({ min: 1, max: 1 });
    const t0 = performance.now();
    const first = await handoffPool.acquire();
    add("first acquire() after build (warm handoff)", [performance.now() - t0]);
    await first.release();
    await handoffPool.shutdown();

    const idlePool = await image!.pool({ min: 2, max: 2, restoreOnRelease: false });
    const idleSamples: number[] = [];
    for (let i = 0; i < runs * 4; i++) {
      const t = performance.now();
      const vm = await idlePool.acquire();
      idleSamples.push(performance.now() - t);
      await vm.release();
    }
    add("acquire() from an idle pool", idleSamples);
    await idlePool.shutdown();

    const cyclePool = await image!.pool({ min: 1, max: 1, restoreOnRelease: true });
    const cycle: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t = performance.now();
      const vm = await cyclePool.acquire();
      cycle.push(performance.now() - t);
      await vm.release();
    }
    add("acquire() right after release (cycle-restore)", cycle, "waits for the background restore");
    const paced: number[] = [];
    for (let i = 0; i < Math.min(runs, 20); i++) {
      await new Promise((r) => setTimeout(r, 300));
      const t = performance.now();
      const vm = await cyclePool.acquire();
      paced.push(performance.now() - t);
      await vm.release();
    }
    add("acquire() with cycle-restore, 300 ms between tasks", paced, "the restore finished in the gap");
    await cyclePool.shutdown();

    const diskPool = await image!.pool({ min: 0, max: 1 });
    add("acquire() that must restore from disk", await sample(Math.min(runs, 30), async () => {
      const vm = await diskPool.acquire();
      await vm.release();
    }), "includes the release");
    const restoreOnly: number[] = [];
    for (let i = 0; i < Math.min(runs, 30); i++) {
      const t = performance.now();
      const vm = await image!.restore();
      restoreOnly.push(performance.now() - t);
      await vm.destroy();
    }
    add("restore from snapshot (start QEMU → agent configured)", restoreOnly);
    await diskPool.shutdown();

    const big = await image!.pool({ min: idleCount, max: idleCount });
    const held: Vm[] = [];
    for (let i = 0; i < idleCount; i++) held.push(await big.acquire());
    // Each VM runs one command, as a used-then-idle VM would have.
    await Promise.all(held.map((v) => v.exec({ argv: ["true"] })));
    await new Promise((r) => setTimeout(r, 1000));
    const mem = held.map((v) => pssKib(v.pid!));
    const pss = mem.reduce((a, m) => a + m.pss, 0) / mem.length / 1024;
    const rss = mem.reduce((a, m) => a + m.rss, 0) / mem.length / 1024;
    for (const v of held) await v.release();
    await big.shutdown();
    await image!.close();

    const coldP50 = summarize(cold).p50;
    const restoreP50 = summarize(restoreOnly).p50;
    console.log(`\nSnapshots and pools — accelerator: ${accel}, default busybox image, 256 MiB guests, milliseconds\n`);
    console.log(table(["operation", "n", "p50", "p90", "p99", "notes"], rows));
    console.log(`\nrestore vs cold boot (p50): ${(coldP50 / restoreP50).toFixed(1)}x faster`);
    console.log(`host memory per idle VM (${idleCount} idle, after one exec each): PSS ${pss.toFixed(1)} MiB, RSS ${rss.toFixed(1)} MiB`);
  } finally {
    await rm(snapshotsDir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
