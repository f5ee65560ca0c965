/**
 * `supermachine run default true` as a user times it: the first run of an
 * image (one boot + the bake of its snapshot), later runs (a restore each),
 * and `--rootfs` (a cold boot every time), each a whole CLI process. Fresh
 * cache and snapshots directories (the kernel shared); prints a table.
 *
 *   node dist/bench/cli.js [--runs N]
 */

import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { defaultCacheDir } from "../src/paths.js";
import { ensureDefaultImage } from "../src/guest/default-image.js";
import { table } from "./stats.js";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const BIN = join(REPO, "bin", "supermachine.js");
const i = process.argv.indexOf("--runs");
const runs = i > 0 ? Number(process.argv[i + 1]) : 5;

const work = mkdtempSync(join(tmpdir(), "sm-bench-cli-"));
try {
  const cache = join(work, "cache");
  mkdirSync(cache);
  symlinkSync(join(defaultCacheDir(), "kernel"), join(cache, "kernel"));
  const env = { ...process.env, SUPERMACHINE_CACHE_DIR: cache, SUPERMACHINE_SNAPSHOTS_DIR: join(work, "snapshots") };
  const rootfs = await ensureDefaultImage(cache);
  const time = (args: string[]): number => {
    const t = performance.now();
    const r = spawnSync(process.execPath, [BIN, ...args], { env, encoding: "utf8" });
    if (r.status !== 0) throw new Error(`supermachine ${args.join(" ")} exited ${r.status}: ${r.stderr}`);
    return performance.now() - t;
  };
  // Warm the shared assets (initramfs) outside the measurement.
  time(["run", "-q", "--rootfs", rootfs, "true"]);
  const first = time(["run", "-q", "default", "true"]);
  const restores: number[] = [];
  const cold: number[] = [];
  for (let n = 0; n < runs; n++) {
    restores.push(time(["run", "-q", "default", "true"]));
    cold.push(time(["run", "-q", "--rootfs", rootfs, "true"]));
  }
  const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
  process.stdout.write(
    table(
      ["`supermachine run … true`", "runs", "median ms", "min ms", "max ms"],
      [
        ["first run of an image (boot + bake)", "1", first.toFixed(0), first.toFixed(0), first.toFixed(0)],
        ["later runs (restore the snapshot)", String(runs), med(restores).toFixed(0), Math.min(...restores).toFixed(0), Math.max(...restores).toFixed(0)],
        ["--rootfs (cold boot each time)", String(runs), med(cold).toFixed(0), Math.min(...cold).toFixed(0), Math.max(...cold).toFixed(0)],
      ],
    ) + "\n",
  );
} finally {
  rmSync(work, { recursive: true, force: true });
}
