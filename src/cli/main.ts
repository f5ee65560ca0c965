/**
 * The `supermachine` command: Docker's habits over the library.
 *
 *   supermachine run [OPTIONS] IMAGE [COMMAND [ARG...]]
 *   supermachine pull | build | images | snapshots ls|rm | rm | prune
 *   supermachine info | completion bash|zsh|fish | version | help [COMMAND]
 *
 * Every command takes --help (exit 0). Usage errors and supermachine's own
 * failures print one line and exit 125 (the stack only with
 * SUPERMACHINE_DEBUG=1); `run` otherwise exits with the command's status.
 * docs/cli.md documents every command.
 */

import { readFileSync } from "node:fs";
import { SupermachineError } from "../errors.js";
import { bootAssets } from "../guest/assets.js";
import { defaultCacheDir, defaultSnapshotsDir } from "../paths.js";
import { chooseAccelerator } from "../vmm/accel.js";
import { confinement } from "../vmm/confine.js";
import { findQemu } from "../vmm/qemu.js";
import { helpText, parseCommand, UsageError, type CommandSpec } from "./args.js";
import { buildCommand, imagesCommand, pruneCommand, pullCommand, rmCommand, snapshotsCommand } from "./cache.js";
import { COMMANDS, COMPLETION, DOCTOR, HELP, INFO, SETUP, VERSION } from "./commands.js";
import { completionScript } from "./completion.js";
import { runCommand } from "./run.js";

/** Exit status when supermachine itself failed (Docker's). */
export const EXIT_FAILED = 125;

export function version(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version?: string };
    return pkg.version ?? "unknown";
  } catch {
    return "unknown";
  }
}

function overview(): string {
  const w = Math.max(...COMMANDS.map((c) => c.name.length)) + 3;
  return [
    "usage: supermachine COMMAND [OPTIONS]",
    "",
    "Runs OCI images as microVMs (QEMU microvm; snapshots restore in milliseconds).",
    "",
    "commands:",
    ...COMMANDS.map((c) => `  ${c.name.padEnd(w)}${c.summary.split(/\. |\.$|: /)[0]}`),
    "",
    "`supermachine COMMAND --help` (or `supermachine help COMMAND`) shows a command's options.",
    "Environment: SUPERMACHINE_CACHE_DIR, SUPERMACHINE_SNAPSHOTS_DIR, SUPERMACHINE_ACCEL, SUPERMACHINE_DEBUG=1 (stack traces).",
    "",
  ].join("\n");
}

type Handler = (args: string[]) => Promise<number>;

const HANDLERS: Record<string, Handler> = {
  run: runCommand,
  pull: pullCommand,
  build: buildCommand,
  images: imagesCommand,
  snapshots: snapshotsCommand,
  rm: rmCommand,
  prune: pruneCommand,
  info: infoCommand,
  doctor: (args) => doctorCommand("doctor", args),
  setup: (args) => doctorCommand("setup", args),
  completion: async (args) => {
    const p = parseCommand(COMPLETION, args);
    if (p.help) return -1;
    const s = p.positionals.length === 1 ? completionScript(p.positionals[0]!) : undefined;
    if (s === undefined) throw new UsageError("supermachine completion: give bash, zsh or fish");
    process.stdout.write(s);
    return 0;
  },
  version: async (args) => {
    if (parseCommand(VERSION, args).help) return -1;
    process.stdout.write(`supermachine ${version()}\n`);
    return 0;
  },
  help: async (args) => {
    const p = parseCommand(HELP, args);
    if (p.help) return -1;
    if (p.positionals.length === 0) {
      process.stdout.write(overview());
      return 0;
    }
    const spec = COMMANDS.find((c) => c.name === p.positionals[0]);
    if (!spec) throw new UsageError(`supermachine help: unknown command ${JSON.stringify(p.positionals[0])}; \`supermachine help\` lists them`);
    process.stdout.write(helpText(spec));
    return 0;
  },
};

/** Runs the CLI; resolves to the exit status (never rejects). */
export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  // Node's warnings (the TCG one) as one line of ours, not Node's two.
  process.removeAllListeners("warning");
  process.on("warning", (w) => {
    if (!rest.includes("-q") && !rest.includes("--quiet")) process.stderr.write(`${w.message.startsWith("supermachine:") ? "" : "supermachine: "}${w.message}\n`);
  });
  try {
    if (cmd === undefined || cmd === "-h" || cmd === "--help") {
      process.stdout.write(overview());
      return cmd === undefined ? EXIT_FAILED : 0;
    }
    if (cmd === "--version" || cmd === "-V") {
      process.stdout.write(`supermachine ${version()}\n`);
      return 0;
    }
    const handler = HANDLERS[cmd];
    if (!handler) {
      throw new UsageError(cmd.startsWith("-") ? `supermachine: unknown flag ${cmd}; see \`supermachine --help\`` : `supermachine: unknown command ${JSON.stringify(cmd)}; \`supermachine help\` lists the commands`);
    }
    const code = await handler(rest);
    if (code === -1) {
      process.stdout.write(helpText(COMMANDS.find((c) => c.name === cmd) as CommandSpec));
      return 0;
    }
    return code;
  } catch (e) {
    process.stderr.write(`${errorLine(e)}\n`);
    if (process.env.SUPERMACHINE_DEBUG === "1" && e instanceof Error && !(e instanceof UsageError)) process.stderr.write(`${e.stack ?? ""}\n`);
    return EXIT_FAILED;
  }
}

/** One line: the message's first line, plus where the rest is. */
export function errorLine(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  const [first, ...more] = msg.split("\n").filter((l) => l.trim() !== "");
  const prefix = e instanceof UsageError ? "" : e instanceof SupermachineError ? `supermachine: ${e.code}: ` : e instanceof TypeError ? "supermachine: " : "supermachine: internal error: ";
  const hint = more.length > 0 || !(e instanceof SupermachineError || e instanceof UsageError || e instanceof TypeError) ? " (SUPERMACHINE_DEBUG=1 shows details)" : "";
  return `${prefix}${first ?? "failed"}${hint}`;
}

async function doctorCommand(cmd: "doctor" | "setup", args: string[]): Promise<number> {
  const p = parseCommand(cmd === "doctor" ? DOCTOR : SETUP, args);
  if (p.help) return -1;
  if (p.positionals.length) throw new UsageError(`supermachine ${cmd}: unexpected argument ${JSON.stringify(p.positionals[0])}`);
  const { doctor, formatDoctorReport } = await import("../doctor/index.js");
  let report;
  if (cmd === "setup") {
    const { runSetup } = await import("../doctor/setup.js");
    report = await runSetup({ dryRun: p.values["dry-run"] === true, qemu: p.values.qemu === true, log: (s) => process.stderr.write(`supermachine setup: ${s}\n`) });
  } else report = await doctor();
  process.stdout.write(p.values.json === true ? `${JSON.stringify(report, null, 2)}\n` : `${formatDoctorReport(report)}\n`);
  return report.ok ? 0 : 1;
}

async function infoCommand(args: string[]): Promise<number> {
  const p = parseCommand(INFO, args);
  if (p.help) return -1;
  if (p.positionals.length) throw new UsageError(`supermachine info: unexpected argument ${JSON.stringify(p.positionals[0])}`);
  const json = p.values.json === true;
  const choice = chooseAccelerator();
  const out: Record<string, unknown> = { version: version(), accelerator: { accel: choice.accel, reason: choice.reason }, cache: defaultCacheDir(), snapshots: defaultSnapshotsDir() };
  const lines = [`version: ${version()}`, `accelerator: ${choice.accel} (${choice.reason})`, `cache: ${defaultCacheDir()}`, `snapshots: ${defaultSnapshotsDir()}`];
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
