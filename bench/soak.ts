/**
 * Soak: N acquire → exec → release cycles through one pool, reporting the
 * failures (target 0) and the host process's memory at the start, middle
 * and end (target: RSS flat within 10 %), with the file descriptors and
 * QEMU processes it holds. Measured and printed, never asserted.
 *
 *   npm run soak -- [--cycles N] [--pool N] [--every N]
 *   node dist/bench/soak.js --cycles 300
 *
 * Runs in a network namespace with only loopback (bench/netns.ts).
 */

import { randomBytes } from "node:crypto";
import { readFileSync, readdirSync, readlinkSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "../src/index.js";
import { SupermachineError } from "../src/errors.js";
import { busyboxImage } from "./images.js";
import { enterLoopbackNetns } from "./netns.js";
import { Args, fmtMs, processTree, summarize, table } from "./stats.js";

const HELP = `usage: node dist/bench/soak.js [options]

  --cycles N    acquire → exec → release cycles (default 10000)
  --pool N      pool size, min = max (default 2)
  --every N     print a progress line every N cycles (default cycles / 10)
`;

interface Point {
  readonly label: string;
  readonly cycle: number;
  readonly rssMib: number;
  readonly heapMib: number;
  readonly heapTotalMib: number;
  readonly externalMib: number;
  readonly fds: number;
  /** Open descriptors by kind: socket, pipe, anon_inode:[…], or a file's path. */
  readonly fdKinds: Map<string, number>;
  readonly qemus: number;
}

function fdKinds(): Map<string, number> {
  const out = new Map<string, number>();
  for (const fd of readdirSync("/proc/self/fd")) {
    let t: string;
    try {
      t = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue;
    }
    const kind = t.replace(/^(socket|pipe):\[\d+\]$/, "$1");
    out.set(kind, (out.get(kind) ?? 0) + 1);
  }
  return out;
}

const mib = (b: number) => b / 2 ** 20;

/** QEMU processes below this one (not the bubblewrap and shell parents whose command lines name QEMU). */
function qemuCount(): number {
  return processTree(process.pid).filter((p) => {
    try {
      // Its argv[0] (its comm is the VM's name).
      return /qemu-system/.test(readFileSync(`/proc/${p}/cmdline`, "latin1").split("\0")[0] ?? "");
    } catch {
      return false;
    }
  }).length;
}

function measure(label: string, cycle: number): Point {
  // --expose-gc is passed when the bench enters its namespace: collect
  // first, so the figures are what is held, not what is not yet collected.
  (globalThis as { gc?: () => void }).gc?.();
  const m = process.memoryUsage();
  return {
    label,
    cycle,
    rssMib: mib(m.rss),
    heapMib: mib(m.heapUsed),
    heapTotalMib: mib(m.heapTotal),
    externalMib: mib(m.external + m.arrayBuffers),
    fds: readdirSync("/proc/self/fd").length,
    fdKinds: fdKinds(),
    qemus: qemuCount(),
  };
}

async function main(): Promise<void> {
  const a = new Args();
  if (a.has("help")) {
    process.stdout.write(HELP);
    return;
  }
  enterLoopbackNetns({ what: "soak", nodeArgs: ["--expose-gc"] });
  const cycles = Math.max(1, Math.floor(a.num("cycles", 10_000)));
  const poolSize = Math.max(1, Math.floor(a.num("pool", 2)));
  const every = Math.max(1, Math.floor(a.num("every", Math.max(1, Math.floor(cycles / 10)))));
  const t0 = Date.now();
  const log = (s: string) => process.stderr.write(`[soak ${((Date.now() - t0) / 1000).toFixed(0).padStart(5)} s] ${s}\n`);

  const img = await busyboxImage();
  const snapshotsDir = await mkdtemp(join(tmpdir(), "sm-soak-"));
  let image: Image | undefined;
  const failures = new Map<string, { count: number; first: string }>();
  const latencies: number[] = [];
  const points: Point[] = [];
  const mid = Math.floor(cycles / 2);
  const tenth = Math.floor(cycles / 10);
  try {
    log(`bake (${img.ref})`);
    image = await Image.build({ ref: img.ref, snapshotsDir, warmupTag: `soak-${randomBytes(4).toString("hex")}` });
    const pool = await image.pool({ min: poolSize, max: poolSize });
    try {
      log(`${cycles} cycles through a pool of ${poolSize}`);
      for (let i = 0; i < cycles; i++) {
        // The start point is taken after one cycle, once the code paths have
        // been loaded and the pool has replaced its first VM.
        if (i === 1) points.push(measure("start", i));
        if (i === tenth && tenth > 1 && tenth < mid) points.push(measure("10 %", i));
        if (i === mid && mid > 1) points.push(measure("middle", i));
        const t = performance.now();
        try {
          const vm = await pool.acquire();
          try {
            const r = await vm.exec({ argv: ["echo", `cycle ${i}`], timeoutMs: 60_000 });
            if (r.exitCode !== 0 || r.stdout.toString() !== `cycle ${i}\n`) throw new Error(`exec returned ${r.exitCode}: ${JSON.stringify(r.stdout.toString().slice(0, 80))}`);
          } finally {
            await vm.release();
          }
          latencies.push(performance.now() - t);
        } catch (e) {
          const key = e instanceof SupermachineError ? e.code : (e as Error).name;
          const f = failures.get(key);
          if (f) f.count++;
          // The first of each kind whole (a GuestDiedError carries the console tail).
          else failures.set(key, { count: 1, first: `cycle ${i}: ${(e as Error).message.slice(0, 2000)}` });
        }
        if ((i + 1) % every === 0) {
          const m = process.memoryUsage();
          const failed = [...failures.values()].reduce((n, f) => n + f.count, 0);
          log(`cycle ${i + 1}/${cycles}: ${failed} failed, rss ${mib(m.rss).toFixed(1)} MiB, heap ${mib(m.heapUsed).toFixed(1)} MiB`);
        }
      }
      points.push(measure("end", cycles));
    } finally {
      await pool.shutdown();
    }
  } finally {
    await image?.close();
    await rm(snapshotsDir, { recursive: true, force: true });
  }
  const after = measure("after shutdown", cycles);
  const failed = [...failures.values()].reduce((n, f) => n + f.count, 0);
  const secs = (Date.now() - t0) / 1000;

  console.log(`\nsoak: ${cycles} acquire → exec → release cycles, pool of ${poolSize}, ${secs.toFixed(0)} s\n`);
  console.log(
    table(
      ["point", "cycle", "Node RSS MiB", "heap used / total MiB", "external MiB", "fds", "QEMUs"],
      [...points, after].map((p) => [p.label, String(p.cycle), p.rssMib.toFixed(1), `${p.heapMib.toFixed(1)} / ${p.heapTotalMib.toFixed(1)}`, p.externalMib.toFixed(1), String(p.fds), String(p.qemus)]),
    ),
  );
  const s = summarize(latencies);
  const start = points.find((p) => p.label === "start");
  const end = points.find((p) => p.label === "end");
  const pct = (from: Point | undefined, to: Point | undefined) => {
    if (!from || !to) return "n/a (too few cycles)";
    const d = ((to.rssMib - from.rssMib) / from.rssMib) * 100;
    return `${d >= 0 ? "+" : ""}${d.toFixed(1)} %`;
  };
  const warm = points.find((p) => p.label === "10 %");
  const middle = points.find((p) => p.label === "middle");
  console.log("");
  console.log(
    table(
      ["measure", "target", "measured"],
      [
        ["failed cycles", "0", `${failed} of ${cycles}`],
        ["Node RSS, end vs start", "within ±10 %", pct(start, end)],
        ["Node RSS, end vs 10 % (after warm-up)", "(informative)", pct(warm, end)],
        ["Node RSS, end vs middle", "(informative)", pct(middle, end)],
        ["cycle time p50 / p90 / p99", "(not a target)", s.n ? `${fmtMs(s.p50)} / ${fmtMs(s.p90)} / ${fmtMs(s.p99)} ms` : "n/a"],
        ["QEMU processes after shutdown", "0", String(after.qemus)],
      ],
    ),
  );
  if (start && (end || after)) {
    const last = end ?? after;
    const kinds = new Set([...start.fdKinds.keys(), ...last.fdKinds.keys(), ...after.fdKinds.keys()]);
    const changed = [...kinds].filter((k) => start.fdKinds.get(k) !== last.fdKinds.get(k) || start.fdKinds.get(k) !== after.fdKinds.get(k));
    if (changed.length) {
      console.log("\nopen descriptors that changed (start → end → after shutdown):");
      for (const k of changed) console.log(`  ${k}: ${start.fdKinds.get(k) ?? 0} → ${last.fdKinds.get(k) ?? 0} → ${after.fdKinds.get(k) ?? 0}`);
    }
  }
  if (failures.size) {
    console.log("\nfailures by code:");
    for (const [code, f] of failures) console.log(`  ${code}: ${f.count} (first: ${f.first})`);
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
