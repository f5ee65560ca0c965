/**
 * `npm run fuzz`: the host protocol fuzzer at full size.
 *
 *   node dist/test/fuzz/main.js [--seed N] [--inputs N] [--time-ms N]
 *
 * The seed defaults to FUZZ_SEED or a random one, and is printed first so a
 * finding can be replayed. Exits 1 on any finding.
 */

import { randomInt } from "node:crypto";
import { runFuzz } from "./agent-fuzzer.js";

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function num(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) {
    console.error(`fuzz: ${name} must be a non-negative integer, got ${JSON.stringify(v)}`);
    process.exit(2);
  }
  return n;
}

const seed = num(arg("--seed") ?? process.env.FUZZ_SEED, "--seed / FUZZ_SEED") ?? randomInt(0, 2 ** 32 - 1);
const inputs = num(arg("--inputs"), "--inputs") ?? 1_000_000;
const timeBudgetMs = num(arg("--time-ms"), "--time-ms") ?? 600_000;
console.log(`fuzz: seed ${seed} (replay with --seed ${seed}), ${inputs} inputs, time budget ${timeBudgetMs} ms`);
const r = await runFuzz({ seed, inputs, timeBudgetMs, log: (l) => console.log(`fuzz: ${l}`) });
console.log("");
console.log("| seed | inputs | codec | connection | frames decoded | sessions | protocol errors | limit errors | max heap growth | time |");
console.log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
console.log(
  `| ${r.seed} | ${r.inputs} | ${r.codecInputs} | ${r.connectionInputs} | ${r.framesDecoded} | ${r.sessions} | ${r.protocolErrors} | ${r.limitErrors} | ${(r.maxHeapGrowthBytes / (1 << 20)).toFixed(1)} MiB | ${(r.elapsedMs / 1000).toFixed(1)} s |`,
);
if (r.stoppedByTime) console.log(`fuzz: stopped by the time budget after ${r.inputs} of ${inputs} inputs`);
if (r.failures.length) {
  console.log(`fuzz: ${r.failures.length} finding(s) with seed ${seed}:`);
  for (const f of r.failures) console.log(`  ${f}`);
  process.exit(1);
}
console.log("fuzz: no crash, hang or unbounded growth");
// Timers of abandoned streams must not keep the process alive.
process.exit(0);
