/**
 * What one fresh VM costs: the CPU time of each phase of a restore from a
 * snapshot (QEMU with its confinement chain, and Node, apart), then the CPU
 * idle VMs burn. The busybox default image, built as `dir:`; each refill is
 * what a pool does (Image.restore, then the prewarm), then a first user exec.
 *
 * CPU time, not wall time: the machines this runs on are shared, and other
 * processes' load stretches wall times (printed too, for reference) far more
 * than CPU times. QEMU's CPU is its threads' scheduler run time
 * (/proc/PID/task/TID/schedstat, ns); Node's is process.cpuUsage().
 *
 *   node dist/bench/refill.js [--refills N] [--cpu-models max,qemu64] [--agents A,B] [--prewarms pool,agent,true,none] [--bake-prewarms on,off]
 *                             [--idle-seconds S] [--idle-vms 1,16] [--no-paused] [--no-idle] [--reuse off,on] [--pretranslate off,on]
 *
 * Several models, agents or prewarms are compared in one run, interleaved
 * (one refill of each variant in turn), so that the machine's load changes
 * hit every variant alike.
 */

import { rm } from "node:fs/promises";
import { join } from "node:path";
import { Image } from "../src/index.js";
import { TB_HINTS_FILE } from "../src/vmm/pretranslate.js";
import { DEFAULT_TCG_CPU } from "../src/vmm/qemu.js";
import { basePrewarm } from "../src/pool/pool.js";
import type { PhaseCpu, Vm } from "../src/vm/vm.js";
import { busyboxImage } from "./images.js";
import { enterLoopbackNetns } from "./netns.js";
import { Args, fmtMs, sleep, summarize, table } from "./stats.js";

const HELP = `usage: node dist/bench/refill.js [options]

  --refills N        fresh VMs measured, one at a time (default 20; 2 more first, not counted)
  --idle-seconds S   how long idle VMs are watched (default 10)
  --idle-vms A,B     idle VM counts (default 1,16)
  --cpu-models A,B   TCG guest CPU models to compare, each baked into its own snapshot
                     (models with features: "max,-erms;qemu64", separated by ";")
                     (default: the library's default, max); idle VMs use the first
  --agents A,B       guest agent binaries to compare (SUPERMACHINE_AGENT for each bake; "default":
                     the one the library finds), each baked into its own snapshot
  --prewarms A,B     prewarms to compare: "pool" (what the pool runs, default), "agent"
                     (\`/proc/1/exe --version\`), "true" (the image's \`true\`), "none", or
                     several joined by "+" (run in that order)
  --bake-prewarms A,B  whether the bake runs the pool's prewarm before its snapshot: "on" (what
                     Image.build does, default) or "off" (SUPERMACHINE_BAKE_PREWARM=0), each baked
                     into its own snapshot
  --before AGENT     instead of the variants above, compare two: this code as it is ("after")
                     and as it was before the changes of 2026-11-30 afternoon ("before": the
                     given agent binary, prewarm "agent", no bake prewarm, QEMU's self-announce
                     after each restore: SUPERMACHINE_RESTORE_ANNOUNCE=1)
  --reuse A,B        "off": each VM's QEMU ends with it (default); "on": it serves the next
                     restore of the same variant (Vm._recycle; docs/qemu-reuse.md). Both: each
                     variant twice, with its own image object
  --pretranslate A,B "off": restores get no block key list (default); "on": each fresh QEMU
                     pretranslates the list an earlier restore of the snapshot recorded
                     (docs/pretranslate.md; recorded once before the measured refills). QEMU's
                     CPU then includes the pretranslate thread's
  --no-paused        skip the paused-idle comparison (QMP stop, then cont on use)
  --no-idle          skip the idle measurements
`;

type Prewarm = (vm: Vm) => Promise<void>;

/** Runs `argv`, which must exit 0. */
const run = (argv: readonly string[]): Prewarm => async (vm) => {
  const r = await vm.exec({ argv: [...argv], timeoutMs: 120_000, maxOutputBytes: 1 << 20 });
  if (r.exitCode !== 0) throw new Error(`prewarm ${argv.join(" ")} exited ${r.exitCode}`);
};

/** The prewarms --prewarms can name. */
const PREWARMS: Record<string, Prewarm> = {
  // What a pool runs (src/pool/pool.ts).
  pool: (vm) => basePrewarm(vm, 120_000),
  agent: run(["/proc/1/exe", "--version"]),
  true: run(["true"]),
  none: async () => undefined,
};

function prewarmOf(name: string): Prewarm {
  const parts = name.split("+").map((part) => {
    const p = PREWARMS[part];
    if (!p) throw new TypeError(`--prewarms: unknown prewarm ${JSON.stringify(part)} (known: ${Object.keys(PREWARMS).join(", ")})`);
    return p;
  });
  return async (vm) => {
    for (const p of parts) await p(vm);
  };
}

/** One thing compared: a baked image (CPU model, agent) and the prewarm run after each restore. */
interface Variant {
  label: string;
  image: Image;
  prewarm: Prewarm;
  /** Environment of this variant's restores (set before each one). */
  env?: Record<string, string | undefined>;
  /** End each VM with Vm._recycle (its QEMU serves the next restore of this image when it can: docs/qemu-reuse.md). */
  reuse?: boolean;
}

const PHASES: readonly { key: string; what: string }[] = [
  { key: "qemu", what: "QEMU start → QMP ready" },
  { key: "loadState", what: "state load (incoming migration) + cont" },
  { key: "agent", what: "first agent frame (HELLO)" },
  { key: "configure", what: "configure (hostname, network)" },
  { key: "prewarm", what: "prewarm" },
  { key: "exec", what: "first user exec (`echo hi`)" },
];

interface Refill {
  cpu: Record<string, PhaseCpu>;
  wallMs: Record<string, number>;
  tbFlushes: number | undefined;
  /** QEMU CPU ms of a third `echo hi` (translated by then). */
  warmExecQemuMs: number;
}

/** CPU ms of QEMU (with its wrapper) and Node while `f` runs. */
async function measured<T>(vm: Vm, f: () => Promise<T>): Promise<{ value: T; cpu: PhaseCpu; wallMs: number }> {
  const q0 = vm.qemu.cpuTimeMs();
  const n0 = process.cpuUsage();
  const t0 = performance.now();
  const value = await f();
  const wallMs = performance.now() - t0;
  const n = process.cpuUsage(n0);
  return { value, cpu: { qemuMs: vm.qemu.cpuTimeMs() - q0, nodeMs: (n.user + n.system) / 1000 }, wallMs };
}

/** QEMU's translation-buffer flush count ("info jit"), if it reports one. */
async function tbFlushes(vm: Vm): Promise<number | undefined> {
  try {
    const qmp = await vm.qmp();
    const out = await qmp.execute<string>("human-monitor-command", { "command-line": "info jit" });
    const m = /TB flush count\s+(\d+)/.exec(out);
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

const prewarm = PREWARMS.pool!;

/** Gives `image`'s snapshot a block key list as a pool's first fresh VM would (docs/pretranslate.md). */
async function recordTbHints(image: Image): Promise<void> {
  process.env.SUPERMACHINE_PRETRANSLATE = "0";
  let vm: Vm;
  try {
    vm = await image.restore({ timeoutMs: 120_000 });
  } finally {
    delete process.env.SUPERMACHINE_PRETRANSLATE;
  }
  try {
    await prewarm(vm);
    await rm(join(image.snapshotPath, TB_HINTS_FILE), { force: true });
    const n = await vm._recordTbHints();
    if (n === 0) throw new Error("no block key list recorded: is this the QEMU setup build (qemu/supermachine-pretranslate.patch)?");
    process.stderr.write(`pretranslation: ${n} block keys recorded\n`);
  } finally {
    await vm.destroy();
  }
}

async function refill(v: Variant): Promise<Refill> {
  for (const [k, val] of Object.entries(v.env ?? {})) {
    if (val === undefined) delete process.env[k];
    else process.env[k] = val;
  }
  const cpu: Record<string, PhaseCpu> = {};
  const wallMs: Record<string, number> = {};
  const vm = await v.image.restore({ cpu, timings: wallMs, timeoutMs: 120_000 });
  try {
    const p = await measured(vm, () => v.prewarm(vm));
    cpu.prewarm = p.cpu;
    wallMs.prewarm = p.wallMs;
    const e = await measured(vm, () => vm.exec({ argv: ["echo", "hi"], timeoutMs: 120_000 }));
    if (e.value.stdout.toString() !== "hi\n") throw new Error(`echo printed ${JSON.stringify(e.value.stdout.toString())}`);
    cpu.exec = e.cpu;
    wallMs.exec = e.wallMs;
    await vm.exec({ argv: ["echo", "hi"] });
    const warm = await measured(vm, () => vm.exec({ argv: ["echo", "hi"] }));
    return { cpu, wallMs, tbFlushes: await tbFlushes(vm), warmExecQemuMs: warm.cpu.qemuMs };
  } finally {
    if (v.reuse) {
      const s = await vm._recycle(new Error("refill measured"));
      if (s) await v.image.recycle(s);
    } else await vm.destroy();
  }
}

/** Runs `f`; a failure names the step and carries the VM's console tail. */
async function annotate<T>(vm: Vm, step: string, f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    const ex = vm.qemu.exitStatus;
    throw new Error(`${step} of VM ${vm.id} (status ${vm.status}, QEMU ${ex ? JSON.stringify(ex) : "running"}) failed: ${(e as Error).message}\n--- console ---\n${vm.consoleTail(2048)}`, { cause: e });
  }
}

/** Restores `n` VMs (prewarmed, as a pool holds them, and `echo` run twice), ready to watch. */
async function idleVms(image: Image, n: number): Promise<Vm[]> {
  const vms: Vm[] = [];
  try {
    for (let i = 0; i < n; i++) {
      const vm = await image.restore({ timeoutMs: 120_000 });
      vms.push(vm);
      await annotate(vm, "prewarm", () => prewarm(vm));
      // Translated already, so a later `echo` measures resume, not translation.
      for (let j = 0; j < 2; j++) await vm.exec({ argv: ["echo", "hi"], timeoutMs: 120_000 });
    }
  } catch (e) {
    await Promise.all(vms.map((v) => v.destroy()));
    throw e;
  }
  return vms;
}

/** QEMU CPU ms per second of wall time, per VM, over `seconds`. */
async function idleCpu(vms: readonly Vm[], seconds: number): Promise<number[]> {
  const before = vms.map((v) => v.qemu.cpuTimeMs());
  const t0 = performance.now();
  await sleep(seconds * 1000);
  const s = (performance.now() - t0) / 1000;
  // ≥ 0: a QEMU thread that exits meanwhile drops out of the sum.
  return vms.map((v, i) => Math.max(0, v.qemu.cpuTimeMs() - before[i]!) / s);
}

const pct = (msPerS: number) => `${(msPerS / 10).toFixed(2)} %`;

async function measureRefills(variants: readonly Variant[], refills: number): Promise<Refill[][]> {
  // Discarded: the first restores fault the snapshot files into the page cache.
  for (const v of variants) for (let i = 0; i < 2; i++) await refill(v);
  const runs: Refill[][] = variants.map(() => []);
  for (let i = 0; i < refills; i++) {
    for (let m = 0; m < variants.length; m++) runs[m]!.push(await refill(variants[m]!));
    process.stderr.write(`refill ${i + 1}/${refills}\r`);
  }
  process.stderr.write("\n");
  return runs;
}

/** Prints the phase table of one model; returns its row of the per-model summary. */
function printRefills(runs: readonly Refill[], label: string, refills: number): string[][] {
  const rows: string[][] = [];
  const col = (f: (r: Refill) => number) => summarize(runs.map(f));
  const row = (what: string, f: (r: Refill) => PhaseCpu | undefined, wall: (r: Refill) => number | undefined) => {
    const q = col((r) => f(r)?.qemuMs ?? NaN);
    const n = col((r) => f(r)?.nodeMs ?? NaN);
    const t = col((r) => (f(r) ? f(r)!.qemuMs + f(r)!.nodeMs : NaN));
    const w = col((r) => wall(r) ?? NaN);
    rows.push([what, fmtMs(q.p50), fmtMs(q.p90), fmtMs(n.p50), fmtMs(n.p90), fmtMs(t.p50), fmtMs(t.p90), fmtMs(w.p50)]);
    return { q, n, t };
  };
  for (const p of PHASES) row(p.what, (r) => r.cpu[p.key], (r) => r.wallMs[p.key]);
  const sum = (r: Refill, keys: readonly string[]): PhaseCpu => ({
    qemuMs: keys.reduce((s, k) => s + (r.cpu[k]?.qemuMs ?? 0), 0),
    nodeMs: keys.reduce((s, k) => s + (r.cpu[k]?.nodeMs ?? 0), 0),
  });
  const refillKeys = PHASES.filter((p) => p.key !== "exec").map((p) => p.key);
  const allKeys = PHASES.map((p) => p.key);
  const wallSum = (r: Refill, keys: readonly string[]) => keys.reduce((s, k) => s + (r.wallMs[k] ?? 0), 0);
  const total = row("**refill (restore → ready, prewarm included)**", (r) => sum(r, refillKeys), (r) => wallSum(r, refillKeys));
  const all = row("**refill + first exec**", (r) => sum(r, allKeys), (r) => wallSum(r, allKeys));
  const flushes = runs.map((r) => r.tbFlushes).filter((v): v is number => v !== undefined);
  const exec = summarize(runs.map((r) => (r.cpu.exec ? r.cpu.exec.qemuMs + r.cpu.exec.nodeMs : NaN)));
  const warm = summarize(runs.map((r) => r.warmExecQemuMs));

  console.log(`\nRefill CPU per fresh VM, ${label} (busybox, ${refills} refills, milliseconds of CPU; wall p50 for reference only: this machine is shared and wall times are noisy)\n`);
  console.log(table(["phase", "QEMU p50", "QEMU p90", "Node p50", "Node p90", "total p50", "total p90", "wall p50"], rows));
  console.log(`\nTB flushes (QEMU "info jit") after the first exec: ${flushes.length ? `max ${Math.max(...flushes)} over ${flushes.length} VMs` : "not reported"}; a later, warm exec \`echo hi\`: QEMU p50 ${fmtMs(warm.p50)} ms CPU`);
  return [[label, fmtMs(total.q.p50), fmtMs(total.n.p50), fmtMs(total.t.p50), fmtMs(total.t.p90), fmtMs(exec.p50), fmtMs(all.t.p50), fmtMs(warm.p50)]];
}

async function main(): Promise<void> {
  const a = new Args();
  if (a.has("help")) {
    console.log(HELP);
    return;
  }
  enterLoopbackNetns({ what: "refill bench" });
  const refills = Math.max(1, Math.round(a.num("refills", 20)));
  const idleSeconds = a.num("idle-seconds", 10);
  const idleCounts = (a.list("idle-vms") ?? ["1", "16"]).map((s) => Math.max(1, Math.round(Number(s))));
  const paused = !a.has("no-paused");

  // Models with feature flags ("max,-erms") are separated by ";".
  const modelArg = a.str("cpu-models");
  const models = modelArg?.includes(";") ? modelArg.split(";").map((s) => s.trim()).filter(Boolean) : (a.list("cpu-models") ?? [DEFAULT_TCG_CPU]);
  const agents = a.list("agents") ?? ["default"];
  const prewarms = a.list("prewarms") ?? ["pool"];
  const bakePrewarms = a.list("bake-prewarms") ?? ["on"];
  for (const w of bakePrewarms) if (w !== "on" && w !== "off") throw new TypeError(`--bake-prewarms: expected on or off, got ${JSON.stringify(w)}`);
  const prewarmLists = prewarms.map(prewarmOf);
  const reuse = a.list("reuse") ?? ["off"];
  for (const r of reuse) if (r !== "on" && r !== "off") throw new TypeError(`--reuse: expected on or off, got ${JSON.stringify(r)}`);
  const pretranslate = a.list("pretranslate") ?? ["off"];
  for (const r of pretranslate) if (r !== "on" && r !== "off") throw new TypeError(`--pretranslate: expected on or off, got ${JSON.stringify(r)}`);
  const busybox = await busyboxImage();
  const images: Image[] = [];
  const variants: Variant[] = [];
  const defaultAgent = process.env.SUPERMACHINE_AGENT;
  const bake = async (model: string, agent: string, bakePrewarm: boolean, what: string): Promise<Image> => {
    // Read by Image.build (the bake) and kept in the snapshot for its restores.
    process.env.SUPERMACHINE_TCG_CPU = model;
    if (agent === "default") {
      if (defaultAgent === undefined) delete process.env.SUPERMACHINE_AGENT;
      else process.env.SUPERMACHINE_AGENT = defaultAgent;
    } else process.env.SUPERMACHINE_AGENT = agent;
    if (bakePrewarm) delete process.env.SUPERMACHINE_BAKE_PREWARM;
    else process.env.SUPERMACHINE_BAKE_PREWARM = "0";
    const t0 = performance.now();
    const image = await Image.build({ ref: busybox.ref, bootTimeoutMs: 120_000 });
    images.push(image);
    process.stderr.write(`${what}: image ready in ${fmtMs(performance.now() - t0)} ms\n`);
    return image;
  };
  const before = a.str("before");
  let idleImage: Image | undefined;
  try {
    if (before !== undefined) {
      const model = models[0]!;
      const old = await bake(model, before, false, "before");
      variants.push({ label: `before: -cpu ${model}, agent ${before}, prewarm agent, no bake prewarm, self-announce`, image: old, prewarm: PREWARMS.agent!, env: { SUPERMACHINE_RESTORE_ANNOUNCE: "1" } });
      idleImage = await bake(model, "default", true, "after");
      variants.push({ label: `after: -cpu ${model}, this code`, image: idleImage, prewarm: PREWARMS.pool!, env: { SUPERMACHINE_RESTORE_ANNOUNCE: undefined } });
    } else {
      for (const model of models) {
        for (const agent of agents) {
          for (const bakePrewarm of bakePrewarms) {
            const what = [`-cpu ${model}`, ...(agents.length > 1 ? [`agent ${agent}`] : []), ...(bakePrewarms.length > 1 ? [`bake prewarm ${bakePrewarm}`] : [])].join(", ");
            for (const r of reuse) {
              const image = await bake(model, agent, bakePrewarm === "on", what);
              if (r === "on") image.keepSpare(true);
              const label = `${what}${reuse.length > 1 || r === "on" ? `, QEMU reuse ${r}` : ""}`;
              if (pretranslate.includes("on")) await recordTbHints(image);
              for (const pt of pretranslate) {
                const ptLabel = pretranslate.length > 1 || pt === "on" ? `, pretranslation ${pt}` : "";
                prewarms.forEach((p, i) =>
                  variants.push({
                    label: `${label}${ptLabel}, prewarm ${p}`,
                    image,
                    prewarm: prewarmLists[i]!,
                    reuse: r === "on",
                    env: { SUPERMACHINE_REUSE_QEMU: r === "on" ? undefined : "0", SUPERMACHINE_PRETRANSLATE: pt === "on" ? undefined : "0" },
                  }),
                );
              }
            }
          }
        }
      }
      idleImage = images[0]!;
    }
    delete process.env.SUPERMACHINE_BAKE_PREWARM;
    const runs = await measureRefills(variants, refills);
    const summaryRows: string[][] = [];
    variants.forEach((v, i) => summaryRows.push(...printRefills(runs[i]!, v.label, refills)));
    if (variants.length > 1) {
      console.log(`\nPer variant (same run, interleaved), CPU ms p50: refill = restore → ready with prewarm; first exec after it\n`);
      console.log(table(["variant", "refill QEMU", "refill Node", "refill total", "refill total p90", "first exec total", "refill + first exec", "warm exec QEMU"], summaryRows));
    }
    if (a.has("no-idle")) return;
    delete process.env.SUPERMACHINE_RESTORE_ANNOUNCE;
    const image = idleImage;
    const idleRows: string[][] = [];
    for (const n of idleCounts) {
      const vms = await idleVms(image, n);
      try {
        await sleep(2000); // let restore-time work settle
        const running = await idleCpu(vms, idleSeconds);
        const total = running.reduce((s, v) => s + v, 0);
        idleRows.push([`${n} idle VM${n > 1 ? "s" : ""}, running`, fmtMs(summarize(running).p50), pct(total)]);
        if (paused) {
          // What a pool does with the fresh VMs it holds idle (src/pool/pool.ts).
          const stopCpu: number[] = [];
          for (const vm of vms) stopCpu.push((await measured(vm, () => annotate(vm, "pause", () => vm._pause()))).cpu.qemuMs);
          const stopped = await idleCpu(vms, idleSeconds);
          const st = stopped.reduce((s, v) => s + v, 0);
          idleRows.push([`${n} idle VM${n > 1 ? "s" : ""}, paused (QMP stop, as pools do)`, fmtMs(summarize(stopped).p50), pct(st)]);
          const resume: PhaseCpu[] = [];
          const resumeWall: number[] = [];
          for (let i = 0; i < vms.length; i++) {
            const m = await measured(vms[i]!, async () => {
              await annotate(vms[i]!, "resume", () => vms[i]!._resume());
              return vms[i]!.exec({ argv: ["echo", "hi"], timeoutMs: 120_000 });
            });
            resume.push(m.cpu);
            resumeWall.push(m.wallMs);
          }
          const control: PhaseCpu[] = [];
          for (const vm of vms) control.push((await measured(vm, () => vm.exec({ argv: ["echo", "hi"], timeoutMs: 120_000 }))).cpu);
          const r = summarize(resume.map((c) => c.qemuMs + c.nodeMs));
          const c = summarize(control.map((c) => c.qemuMs + c.nodeMs));
          idleRows.push([
            `  → on use: resume (\`cont\`, guest clock set) + exec \`echo hi\` CPU p50 ${fmtMs(r.p50)} ms (p90 ${fmtMs(r.p90)}) vs the same exec on a running VM ${fmtMs(c.p50)} ms (p90 ${fmtMs(c.p90)}); wall p50 ${fmtMs(summarize(resumeWall).p50)} ms; \`stop\` ${fmtMs(summarize(stopCpu).p50)} ms QEMU CPU`,
            "",
            "",
          ]);
        }
      } finally {
        await Promise.all(vms.map((v) => v.destroy()));
      }
    }
    console.log(`\nIdle CPU (QEMU, over ${idleSeconds} s, after 2 s settling)\n`);
    console.log(table(["VMs", "ms CPU/s per VM (p50)", "all together, % of one core"], idleRows));
  } finally {
    delete process.env.SUPERMACHINE_REUSE_QEMU;
    for (const i of images) await i.close();
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
