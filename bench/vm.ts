/**
 * Foundation benchmark: cold boot to agent ready, exec round trips, the
 * agent's own overhead (PING), and a host child_process spawn as the floor;
 * then an exec on a held VM against the guest's own fork + exec of the same
 * program, and the agent's CPU per exec.
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
    await execShare(vm, runs);
  } finally {
    await vm.destroy();
  }
}

/**
 * Guest counters so far: PID 1's (the agent's) CPU and all CPUs busy (not
 * idle), in ns; context switches and interrupts (/proc/stat).
 */
async function guestCpu(vm: Vm): Promise<{ agentNs: number; busyNs: number; ctxt: number; intr: number }> {
  const r = await vm.exec({ argv: ["cat", "/proc/1/schedstat", "/proc/stat"] });
  const lines = r.stdout.toString().split("\n");
  const agentNs = Number(lines[0]!.split(" ")[0]);
  // cpu  user nice system idle iowait irq softirq steal (USER_HZ ticks)
  const f = lines.find((l) => l.startsWith("cpu "))!.trim().split(/\s+/).slice(1).map(Number);
  const busyNs = (f.reduce((a, b) => a + b, 0) - f[3]! - f[4]!) * 1e7;
  const count = (key: string) => Number(lines.find((l) => l.startsWith(`${key} `))!.split(" ")[1]);
  return { agentNs, busyNs, ctxt: count("ctxt"), intr: count("intr") };
}

/**
 * Exec on a held VM against its floor (docs/performance.md): the same
 * static binary (the agent's own, `--version`) started by the host through
 * the agent, and by a shell loop inside the guest (fork + exec + wait, no
 * host); the agent's own CPU per exec from its schedstat.
 */
async function execShare(vm: Vm, runs: number): Promise<void> {
  const argv = ["/proc/1/exe", "--version"];
  // Blocks of host round trips alternate with guest shell loops of the same
  // size, and the share is taken per block: the host's speed drifts within
  // seconds here, and a difference of two halves measured apart moves with it.
  const blocks = 20;
  const m = Math.max(5, Math.round(runs / blocks));
  // busybox ash's EPOCHREALTIME: microseconds (/proc/uptime has 10 ms steps).
  const loop = `i=0; s=$EPOCHREALTIME; while [ $i -lt ${m} ]; do /proc/1/exe --version >/dev/null; i=$((i+1)); done; e=$EPOCHREALTIME; echo "$s $e"`;
  const viaHost: number[] = [];
  const inGuest: number[] = [];
  const share: number[] = [];
  for (let b = 0; b < blocks; b++) {
    const block = await sample(m, () => vm.exec({ argv }));
    viaHost.push(...block);
    const r = await vm.exec({ argv: ["sh", "-c", loop] });
    const [s, e] = r.stdout.toString().trim().split(" ").map(Number);
    if (!Number.isFinite(s) || !Number.isFinite(e)) throw new Error(`the guest loop printed ${JSON.stringify(r.stdout.toString())}: no EPOCHREALTIME in its shell?`);
    const perRun = ((e! - s!) * 1000) / m;
    inGuest.push(perRun);
    share.push(summarize(block).p50 - perRun);
  }
  const n = runs;
  const a = await guestCpu(vm);
  for (let i = 0; i < n; i++) await vm.exec({ argv: ["echo", "hi"] });
  const b = await guestCpu(vm);
  // n echo execs and the one that read the counters.
  const agentMs = (b.agentNs - a.agentNs) / 1e6 / (n + 1);
  const busyMs = (b.busyNs - a.busyNs) / 1e6 / (n + 1);
  const ctxt = (b.ctxt - a.ctxt) / (n + 1);
  const intr = (b.intr - a.intr) / (n + 1);
  const hostP50 = summarize(viaHost).p50;
  const guestP50 = summarize(inGuest).p50;
  const sh = summarize(share);
  console.log(`\nExec on a held VM against its floor — ${runs} runs, milliseconds (guest times in the guest's clock)\n`);
  console.log(
    table(
      ["what", "ms"],
      [
        ["host → agent → exec `/proc/1/exe --version` → exit, round trip p50", fmtMs(hostP50)],
        [`the same program in a guest shell loop (fork + exec + wait), per run, median of ${blocks} loops of ${m}`, fmtMs(guestP50)],
        [`round trip minus the guest's own fork + exec, per block (${blocks} blocks of ${m} round trips, each beside a loop): median [min – max]`, `${fmtMs(sh.p50)} [${fmtMs(sh.min)} – ${fmtMs(sh.max)}] (${((100 * sh.p50) / guestP50).toFixed(0)} % of the guest's fork + exec)`],
        ["agent (PID 1) CPU per `echo hi` exec (schedstat)", fmtMs(agentMs)],
        ["guest CPU busy per `echo hi` exec (/proc/stat, 10 ms ticks)", fmtMs(busyMs)],
        ["guest context switches per `echo hi` exec (/proc/stat ctxt; a count, not ms)", ctxt.toFixed(1)],
        ["guest interrupts per `echo hi` exec (/proc/stat intr; a count, not ms)", intr.toFixed(1)],
      ],
    ),
  );
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
