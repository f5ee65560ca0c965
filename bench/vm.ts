/**
 * Foundation benchmark: cold boot to agent ready, exec round trips, the
 * agent's own overhead (PING), and a host child_process spawn as the floor.
 *
 *   node dist/bench/vm.js [--runs N] [--boots N]
 */

import { spawn } from "node:child_process";
import { Vm } from "../src/index.js";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../src/guest/default-image.js";
import { defaultCacheDir } from "../src/paths.js";
import { fmtMs, sample, summarize, table } from "./stats.js";

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}

function hostEcho(): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = spawn("/bin/echo", ["hi"], { stdio: ["ignore", "pipe", "ignore"] });
    c.stdout.resume();
    c.once("error", reject);
    c.once("close", () => resolve());
  });
}

async function main(): Promise<void> {
  const runs = arg("runs", 200);
  const boots = arg("boots", 5);
  const rootfs = await ensureDefaultImage(defaultCacheDir());
  const bootMs: number[] = [];
  let accel = "?";
  for (let i = 0; i < boots; i++) {
    const t = performance.now();
    const vm = await Vm.boot({ rootfs, config: DEFAULT_IMAGE_CONFIG });
    bootMs.push(performance.now() - t);
    accel = vm.accelerator;
    await vm.destroy();
  }
  const vm = await Vm.boot({ rootfs, config: DEFAULT_IMAGE_CONFIG });
  try {
    // Warm up the guest (TCG translates code on first use).
    for (let i = 0; i < 20; i++) await vm.exec({ argv: ["echo", "hi"] });
    const rows: string[][] = [];
    const add = (what: string, samples: number[]) => {
      const s = summarize(samples);
      rows.push([what, String(s.n), fmtMs(s.p50), fmtMs(s.p90), fmtMs(s.p99)]);
    };
    add(`cold boot → agent ready (${accel})`, bootMs);
    add("exec `true`", await sample(runs, () => vm.exec({ argv: ["true"] })));
    add("exec `echo hi`", await sample(runs, () => vm.exec({ argv: ["echo", "hi"] })));
    add("exec `echo hi`, isolateTree (own cgroup)", await sample(runs, () => vm.exec({ argv: ["echo", "hi"], isolateTree: true })));
    add("agent PING round trip", await sample(runs, () => vm.ping()));
    add("host child_process spawn `/bin/echo` (floor)", await sample(runs, hostEcho));
    console.log(`\nFoundation benchmark — accelerator: ${accel}, ${runs} runs each (${boots} boots), milliseconds\n`);
    console.log(table(["operation", "n", "p50", "p90", "p99"], rows));
  } finally {
    await vm.destroy();
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
