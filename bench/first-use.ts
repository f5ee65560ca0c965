/**
 * Where the first use of a new image goes: the Debian + python3 image pushed
 * to a local registry, then, into a fresh cache each run (the machine's
 * kernel, initramfs, restore stub and boot templates linked in, as workload 6
 * does), Image.build → pool → acquire → the first Python exec → shutdown,
 * with the time at which each build phase began (pull, unpack, pack, bake
 * boot / warmup / snapshot). Wall times: run it on an idle machine and
 * compare variants of one run (they alternate).
 *
 *   node dist/bench/first-use.js [--runs N] [--overlap on,off] [--derive on,off]
 *
 * --overlap compares unpacking while the layers download (on, the default)
 * with unpacking after the pull (off: SUPERMACHINE_PULL_OVERLAP=0). --derive
 * compares taking the pool's prewarm-list snapshot of the bake's own VM (on,
 * the default) with baking the image again for it (off:
 * SUPERMACHINE_DERIVE_SIBLING=0). Each combination is a variant; they
 * alternate. Each run also measures the same again from its cache ("hit:").
 */

import { mkdir, mkdtemp, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "../src/index.js";
import type { ImageProgress } from "../src/image/resolve.js";
import { defaultCacheDir } from "../src/paths.js";
import { pushLayout, startRegistry } from "../test/fixtures/registry/registry.js";
import { pythonImage } from "./images.js";
import { enterLoopbackNetns } from "./netns.js";
import { Args, fmtMs, summarize, table } from "./stats.js";

const PY = ["python3", "-c", "print(6*7)"];
const MARKS = ["pull", "unpack", "pack", "bake:boot", "bake:warmup", "bake:snapshot", "built", "pool", "acquired", "first exec done", "shut down", "hit: built", "hit: pool", "hit: acquired", "hit: first exec done", "hit: shut down"] as const;

async function main(): Promise<void> {
  const a = new Args();
  if (a.has("help")) {
    console.log("usage: node dist/bench/first-use.js [--runs N] [--overlap on,off] [--derive on,off]");
    return;
  }
  enterLoopbackNetns({ what: "bench/first-use" });
  const runs = a.num("runs", 3);
  const onOff = (flag: string): string[] => {
    const l = a.list(flag) ?? ["on"];
    for (const v of l) if (v !== "on" && v !== "off") throw new TypeError(`--${flag} takes on and/or off, got ${v}`);
    return l;
  };
  const variants = onOff("overlap").flatMap((o) => onOff("derive").map((d) => `overlap ${o}, derive ${d}`));
  const img = await pythonImage();
  const reg = await startRegistry();
  const work = await mkdtemp(join(tmpdir(), "sm-bench-first-use-"));
  const results = new Map<string, Map<string, number[]>>(variants.map((v) => [v, new Map(MARKS.map((m) => [m, []]))]));
  try {
    await pushLayout(reg, img.layout!.dir, img.layout!.tag, "bench/python:bookworm");
    const ref = `${reg.host}/bench/python:bookworm`;
    let seq = 0;
    for (let i = 0; i < runs; i++) {
      for (const v of variants) {
        const cacheDir = join(work, `c${seq++}`);
        await mkdir(cacheDir, { recursive: true });
        for (const sub of ["kernel", "initramfs", "restore", "boot-templates"]) await symlink(join(defaultCacheDir(), sub), join(cacheDir, sub)).catch(() => undefined);
        process.env.SUPERMACHINE_PULL_OVERLAP = v.includes("overlap on") ? "1" : "0";
        process.env.SUPERMACHINE_DERIVE_SIBLING = v.includes("derive on") ? "1" : "0";
        const at = results.get(v)!;
        const mark = (m: string, t: number): void => {
          const l = at.get(m);
          if (l && l.length === i) l.push(t);
        };
        // As workload 6 does: a pool with the task in its prewarm list, then
        // the same again with everything cached (a cache hit).
        const use = async (prefix: string): Promise<void> => {
          const t0 = performance.now();
          const since = (): number => performance.now() - t0;
          const image = await Image.build({
            ref,
            cacheDir,
            snapshotsDir: join(cacheDir, "snapshots"),
            onProgress: (p: ImageProgress) => mark(prefix + (p.stage === "bake" ? `bake:${p.phase}` : p.stage), since()),
          });
          mark(prefix + "built", since());
          const pool = await image.pool({ min: 1, max: 1, prewarm: [PY] });
          mark(prefix + "pool", since());
          const vm = await pool.acquire();
          mark(prefix + "acquired", since());
          const r = await vm.exec({ argv: PY, timeoutMs: 120_000 });
          if (r.stdout.toString().trim() !== "42") throw new Error(`python printed ${JSON.stringify(r.stdout.toString())}`);
          mark(prefix + "first exec done", since());
          await vm.release();
          await pool.shutdown();
          await image.close();
          mark(prefix + "shut down", since());
          process.stderr.write(`run ${i + 1}/${runs} (${v}) ${prefix || "cold: "}${fmtMs(since())} ms\n`);
        };
        await use("");
        await use("hit: ");
        await rm(cacheDir, { recursive: true, force: true });
      }
    }
  } finally {
    delete process.env.SUPERMACHINE_PULL_OVERLAP;
    delete process.env.SUPERMACHINE_DERIVE_SIBLING;
    await reg.stop();
    await rm(work, { recursive: true, force: true });
  }
  console.log(`\nFirst use of the Debian + python3 image from a local registry: when each phase began, ms from Image.build (\"hit:\" the same again, all cached) (p50 of ${runs}; wall time)\n`);
  const rows = MARKS.map((m) => [m, ...variants.map((v) => fmtMs(summarize(results.get(v)!.get(m)!).p50))]);
  console.log(table(["phase", ...variants], rows));
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
