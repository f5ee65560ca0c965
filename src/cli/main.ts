/**
 * The `supermachine` command.
 *
 *   supermachine run [options] [--rootfs DIR | IMAGE] -- ARGV...
 *   supermachine info [--json]
 *   supermachine doctor [--json]
 *   supermachine setup [--dry-run]
 *
 * `run` boots a VM, runs ARGV, streams its stdout/stderr to ours, exits with
 * its exit code, and leaves no VM behind (also on Ctrl-C).
 */

import { parseArgs } from "node:util";
import { SupermachineError } from "../errors.js";
import { bootAssets } from "../guest/assets.js";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../guest/default-image.js";
import { defaultCacheDir } from "../paths.js";
import { chooseAccelerator, type AcceleratorOption } from "../vmm/accel.js";
import { confinement } from "../vmm/confine.js";
import { findQemu } from "../vmm/qemu.js";
import { Vm, type GuestConfig, type VmBootOptions } from "../vm/vm.js";
import type { ExecChild } from "../vm/exec-child.js";
import type { ImageConfig } from "../oci/manifest.js";

const USAGE = `usage:
  supermachine run [options] [--rootfs DIR | IMAGE] -- COMMAND [ARG...]
  supermachine info [--json]
  supermachine doctor [--json]
  supermachine setup [--dry-run]

doctor: checks QEMU, the boot assets, /dev/kvm, hardware virtualization,
cgroups, bubblewrap/setpriv and disk space, and prints what to do about each
problem; exits 1 when something required is missing. setup: installs what
doctor finds missing with apt-get (as root), then runs doctor.

info: accelerator, QEMU, boot assets, and which confinements apply to QEMU
(docs/confinement.md); --json prints the same as one JSON object.

run options:
  --rootfs DIR        boot this host directory as the root filesystem
  -m, --memory MIB    guest memory ceiling (default 256)
  --vcpus N           virtual CPUs (default 1)
  --accel MODE        kvm, tcg or auto (default auto, or SUPERMACHINE_ACCEL)
  -e, --env K=V       environment variable (repeatable)
  -w, --workdir DIR   working directory in the guest
  -u, --user USER     user to run as (name or uid[:gid])
  -t, --tty           allocate a pseudo-terminal
  -i, --interactive   forward standard input to the command
  --timeout MS        kill the command after MS milliseconds (default none)
  -q, --quiet         no progress messages on stderr

IMAGE is an OCI reference (alpine, host:port/repo:tag, repo@sha256:...) or an
offline source (oci:DIR[:tag], oci-archive:FILE, docker-archive:FILE); without
a COMMAND the image's Entrypoint + Cmd run. With neither --rootfs nor IMAGE,
the default image (busybox, built locally on first use) is used. Exit status: the command's; 124 when --timeout
killed it; 128+N when signal N killed it; 125 when supermachine itself failed.`;

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === "-h" || cmd === "--help" || cmd === "help") {
    process.stdout.write(`${USAGE}\n`);
    return cmd ? 0 : 2;
  }
  if (cmd === "run") return run(rest);
  if (cmd === "info") return info(rest);
  if (cmd === "doctor" || cmd === "setup") return doctorCommand(cmd, rest);
  process.stderr.write(`supermachine: unknown command ${JSON.stringify(cmd)}\n${USAGE}\n`);
  return 2;
}

async function doctorCommand(cmd: "doctor" | "setup", args: string[]): Promise<number> {
  let values: { json?: boolean; "dry-run"?: boolean };
  try {
    values = parseArgs({ args, options: cmd === "doctor" ? { json: { type: "boolean" } } : { json: { type: "boolean" }, "dry-run": { type: "boolean" } } }).values;
  } catch (e) {
    process.stderr.write(`supermachine ${cmd}: ${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const { doctor, formatDoctorReport } = await import("../doctor/index.js");
  let report;
  if (cmd === "setup") {
    const { runSetup } = await import("../doctor/setup.js");
    report = await runSetup({ dryRun: values["dry-run"] === true, log: (s) => process.stderr.write(`supermachine setup: ${s}\n`) });
  } else report = await doctor();
  process.stdout.write(values.json ? `${JSON.stringify(report, null, 2)}\n` : `${formatDoctorReport(report)}\n`);
  return report.ok ? 0 : 1;
}

async function info(args: string[]): Promise<number> {
  let json = false;
  try {
    json = parseArgs({ args, options: { json: { type: "boolean" } } }).values.json === true;
  } catch (e) {
    process.stderr.write(`supermachine info: ${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const choice = chooseAccelerator();
  const out: Record<string, unknown> = { accelerator: { accel: choice.accel, reason: choice.reason }, cache: defaultCacheDir() };
  const lines = [`accelerator: ${choice.accel} (${choice.reason})`, `cache: ${defaultCacheDir()}`];
  let qemu: string | undefined;
  try {
    qemu = findQemu();
    out.qemu = qemu;
    lines.push(`qemu: ${qemu}`);
  } catch (e) {
    out.qemu = null;
    lines.push(`qemu: missing (${(e as Error).message})`);
  }
  try {
    const a = await bootAssets();
    out.kernel = a.kernel;
    out.initramfs = a.initrd;
    lines.push(`kernel: ${a.kernel}`, `initramfs: ${a.initrd}`);
  } catch (e) {
    out.bootAssets = { missing: (e as Error).message };
    lines.push(`boot assets: missing (${(e as Error).message})`);
  }
  try {
    const c = await confinement(qemu);
    out.confinement = c;
    lines.push("confinement:");
    const row = (label: string, item: { active: boolean; detail: string }) => lines.push(`  ${label.padEnd(22)} ${item.active ? "on " : "off"}  ${item.detail.replace(/^off(: | )/, "")}`);
    row("unprivileged user", c.user);
    row("namespaces", c.namespaces);
    row("clean environment", c.cleanEnvironment);
    row("seccomp", c.seccomp);
    row("cgroup limits", c.cgroup);
    row("oom_score_adj", c.oomScoreAdj);
    row("dies with Node", c.diesWithNode);
    row("read-only snapshot RAM", c.snapshotRamReadOnly);
  } catch (e) {
    out.confinement = { error: (e as Error).message };
    lines.push(`confinement: cannot be set up (${(e as Error).message})`);
  }
  process.stdout.write(json ? `${JSON.stringify(out, null, 2)}\n` : lines.join("\n") + "\n");
  return 0;
}

async function run(args: string[]): Promise<number> {
  const dd = args.indexOf("--");
  const before = dd >= 0 ? args.slice(0, dd) : args;
  const command = dd >= 0 ? args.slice(dd + 1) : [];
  const { values, positionals } = parseArgs({
    args: before,
    allowPositionals: true,
    options: {
      rootfs: { type: "string" },
      memory: { type: "string", short: "m" },
      vcpus: { type: "string" },
      accel: { type: "string" },
      env: { type: "string", short: "e", multiple: true },
      workdir: { type: "string", short: "w" },
      user: { type: "string", short: "u" },
      tty: { type: "boolean", short: "t" },
      interactive: { type: "boolean", short: "i" },
      timeout: { type: "string" },
      quiet: { type: "boolean", short: "q" },
    },
  });
  if (positionals.length > 1) {
    process.stderr.write(`supermachine run: one IMAGE at most, got ${positionals.join(" ")}\n`);
    return 2;
  }
  const image = positionals[0];
  if (image !== undefined && values.rootfs !== undefined) {
    process.stderr.write("supermachine run: give either --rootfs DIR or IMAGE, not both\n");
    return 2;
  }
  if (command.length === 0 && image === undefined) {
    process.stderr.write(`supermachine run: no command given (put it after --)\n${USAGE}\n`);
    return 2;
  }
  const num = (v: string | undefined, name: string): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new TypeError(`--${name} expects a whole number, got ${JSON.stringify(v)}`);
    return n;
  };
  const env: Record<string, string> = {};
  for (const e of values.env ?? []) {
    const i = e.indexOf("=");
    if (i <= 0) throw new TypeError(`--env expects KEY=VALUE, got ${JSON.stringify(e)}`);
    env[e.slice(0, i)] = e.slice(i + 1);
  }
  const say = (s: string) => {
    if (!values.quiet) process.stderr.write(`supermachine: ${s}\n`);
  };
  const cacheDir = defaultCacheDir();
  const boot: VmBootOptions = {
    cacheDir,
    ...(values.memory ? { memoryMib: num(values.memory, "memory")! } : {}),
    ...(values.vcpus ? { vcpus: num(values.vcpus, "vcpus")! } : {}),
    ...(values.accel ? { accel: values.accel as AcceleratorOption } : {}),
  };
  let config: GuestConfig = DEFAULT_IMAGE_CONFIG;
  if (values.rootfs !== undefined) {
    boot.rootfs = values.rootfs;
  } else if (image !== undefined) {
    const img = await resolveImage(image, say);
    boot.rootfsImage = img.rootfsImage;
    config = img.config;
    if (command.length === 0) {
      // No command: the image's own (Entrypoint + Cmd), as `docker run IMAGE` does.
      command.push(...(img.imageConfig.entrypoint ?? []), ...(img.imageConfig.cmd ?? []));
      if (command.length === 0) {
        process.stderr.write(`supermachine run: ${image} has no Entrypoint or Cmd; give a command after --\n`);
        return 2;
      }
    }
  } else {
    boot.rootfs = await ensureDefaultImage(cacheDir);
  }
  boot.config = config;
  const controller = new AbortController();
  boot.signal = controller.signal;
  let vm: Vm | undefined;
  let interrupted = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted = sig === "SIGINT" ? 130 : 143;
    controller.abort(new Error(`interrupted by ${sig}`));
    void vm?.destroy();
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    const t0 = Date.now();
    vm = await Vm.boot(boot);
    say(`VM ${vm.id} up in ${Date.now() - t0} ms (accelerator: ${vm.accelerator})`);
    const timeoutMs = num(values.timeout, "timeout") ?? 0;
    const child = await vm.spawn({
      argv: command,
      env,
      ...(values.workdir ? { cwd: values.workdir } : {}),
      ...(values.user ? { user: values.user } : {}),
      ...(values.tty ? { tty: true, winsize: { cols: process.stdout.columns || 80, rows: process.stdout.rows || 24 } } : {}),
      timeoutMs,
    });
    const pumps = [pump(child, "out"), ...(values.tty ? [] : [pump(child, "err")])];
    if (values.interactive) {
      process.stdin.pipe(child.stdin);
    } else {
      await child.closeStdin();
    }
    if (values.tty && process.stdout.isTTY) {
      process.stdout.on("resize", () => void child.resize(process.stdout.columns, process.stdout.rows).catch(() => undefined));
    }
    const [res] = await Promise.all([child.wait(), ...pumps]);
    process.stdin.unpipe?.();
    process.stdin.pause();
    if (res.timedOut) return 124;
    // Killed by signal N: 128 + N, as a shell reports it.
    if (res.signal !== null) return 128 + res.signal;
    if (res.exitCode === -1) return 137;
    return res.exitCode;
  } catch (e) {
    if (interrupted) return interrupted;
    if (e instanceof SupermachineError || e instanceof TypeError) {
      process.stderr.write(`supermachine: ${e.message}\n`);
      return 125;
    }
    throw e;
  } finally {
    process.removeListener("SIGINT", onSignal);
    process.removeListener("SIGTERM", onSignal);
    await vm?.close();
  }
}

async function pump(child: ExecChild, which: "out" | "err"): Promise<void> {
  const dest = which === "out" ? process.stdout : process.stderr;
  for (;;) {
    const b = which === "out" ? await child.readStdout(256 * 1024) : await child.readStderr(256 * 1024);
    if (b.length === 0) return;
    if (!dest.write(b)) await new Promise((r) => dest.once("drain", r));
  }
}

/** Resolves IMAGE to a root filesystem image + config (registry pulls). */
async function resolveImage(ref: string, say: (s: string) => void): Promise<{ rootfsImage: string; config: GuestConfig; imageConfig: ImageConfig }> {
  const { resolveRootfs } = await import("../image/resolve.js");
  return resolveRootfs(ref, { onProgress: (m) => say(m) });
}
