/**
 * Confinement of QEMU processes beyond QEMU's own seccomp sandbox.
 *
 * Every QEMU is started through a short chain of exec()s, each of which
 * replaces the previous one in the same process:
 *
 *   sh -c PROLOGUE          oom_score_adj, joins the VM's own cgroup(s)
 *   → setpriv --pdeathsig   dies with Node, even when Node is SIGKILLed
 *   → bwrap …               private mount/pid/net/ipc/uts namespaces,
 *                           empty environment, only the VM's files
 *   → qemu … -runas U:G     opens its files as root, then drops to U:G
 *
 * Why this shape (docs/confinement.md has the long version):
 * - QEMU 7.2 opens a `memory-backend-file` O_RDWR whatever the mapping, so an
 *   unprivileged QEMU could only restore a snapshot whose RAM file it may
 *   write. `-runas` lets QEMU open the 0600 snapshot files as root and then
 *   drop to an unprivileged user before the guest runs user code, so no
 *   file or directory permission is loosened.
 * - A uid change clears the parent-death signal, so `setpriv --pdeathsig`
 *   alone no longer ends QEMU with Node. bubblewrap's PID namespace does:
 *   its init (which keeps the death signal) dies with Node, and the kernel
 *   kills everything in a PID namespace whose init is gone.
 * - In bubblewrap's mount namespace QEMU sees /usr read-only, a minimal
 *   /dev, its own /proc, and, at their host paths, only this VM's kernel,
 *   initramfs, disk image, RAM file and runtime directory. Paths are the
 *   same inside and out, so QMP commands that name a path need no mapping.
 *
 * Every piece depends on the host: {@link confinement} reports what is
 * active and why the rest is not.
 */

import { execFile, spawnSync } from "node:child_process";
import { existsSync, lstatSync, readFileSync, readlinkSync, realpathSync } from "node:fs";
import { chmod, chown } from "node:fs/promises";
import { constants as osConstants } from "node:os";
import { delimiter, dirname, join } from "node:path";
import { ConfinementError } from "../errors.js";
import { QEMU_MEMORY_OVERHEAD_MIB, QEMU_PIDS_BASE, VmCgroup, findCgroupRoot, sweepCgroups, type CgroupRoot } from "./cgroup.js";
import type { Accelerator } from "./accel.js";
import { namespaceFilter } from "./seccomp.js";

/** oom_score_adj of QEMU processes: the kernel's OOM killer picks them before Node (0). */
export const QEMU_OOM_SCORE_ADJ = 800;

export { QEMU_CPU_WEIGHT, QEMU_MEMORY_OVERHEAD_MIB, QEMU_PIDS_BASE, VmCgroup } from "./cgroup.js";

/** One confinement and whether it is in force on this host. */
export interface ConfinementItem {
  /** True when this confinement applies to QEMU processes started from now on. */
  readonly active: boolean;
  /** What it does here, or why it is off and what would turn it on. */
  readonly detail: string;
}

/** What confines QEMU on this host, as {@link confinement} found it. */
export interface ConfinementReport {
  /** Whether this Node process runs as root. */
  readonly nodeIsRoot: boolean;
  /** QEMU runs as an unprivileged user (a user of its own when Node is root, else Node's). */
  readonly user: ConfinementItem & { readonly uid: number; readonly gid: number };
  /** Private mount, PID, network, IPC and UTS namespaces (bubblewrap). */
  readonly namespaces: ConfinementItem;
  /** QEMU's environment is empty (nothing of Node's is passed on). */
  readonly cleanEnvironment: ConfinementItem;
  /** QEMU's seccomp filter (`-sandbox on`). */
  readonly seccomp: ConfinementItem;
  /** Each QEMU in its own cgroup with memory, task and CPU limits. */
  readonly cgroup: ConfinementItem & { readonly version?: 1 | 2; readonly base?: string };
  /** QEMU's oom_score_adj is raised so the OOM killer takes it before Node. */
  readonly oomScoreAdj: ConfinementItem & { readonly value: number };
  /** QEMU dies with Node, also when Node is SIGKILLed. */
  readonly diesWithNode: ConfinementItem;
  /** Snapshot restores open the RAM file read-only (needs QEMU ≥ 8.2's `rom` option). */
  readonly snapshotRamReadOnly: ConfinementItem;
}

interface Plan {
  report: ConfinementReport;
  sh: string;
  setpriv?: string;
  bwrap?: string;
  runAs?: { uid: number; gid: number };
  cgroup?: CgroupRoot;
}

const SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin";

function which(cmd: string): string | undefined {
  for (const dir of SAFE_PATH.split(delimiter)) {
    const p = join(dir, cmd);
    if (existsSync(p)) return p;
  }
  return undefined;
}

function envFlagOff(v: string | undefined): boolean {
  return v !== undefined && /^(0|off|false|no)$/i.test(v);
}

/** Looks a user up in /etc/passwd (no NSS: the result must not depend on services). */
function passwdEntry(name: string): { uid: number; gid: number } | undefined {
  let text: string;
  try {
    text = readFileSync("/etc/passwd", "utf8");
  } catch {
    return undefined;
  }
  for (const line of text.split("\n")) {
    const f = line.split(":");
    if (f[0] === name && f.length >= 4) {
      const uid = Number(f[2]);
      const gid = Number(f[3]);
      if (Number.isInteger(uid) && Number.isInteger(gid)) return { uid, gid };
    }
  }
  return undefined;
}

/** The user QEMU drops to when Node is root: SUPERMACHINE_QEMU_USER, else `supermachine-qemu`, else nobody. */
export function qemuUser(env: NodeJS.ProcessEnv = process.env): { uid: number; gid: number; name: string } {
  const v = env.SUPERMACHINE_QEMU_USER;
  if (v !== undefined && v !== "") {
    const m = /^(\d+):(\d+)$/.exec(v);
    const ids = m ? { uid: Number(m[1]), gid: Number(m[2]) } : passwdEntry(v);
    if (!ids) throw new ConfinementError(`SUPERMACHINE_QEMU_USER=${JSON.stringify(v)} is neither a user in /etc/passwd nor UID:GID. Set it to an unprivileged user, e.g. 65534:65534.`);
    if (ids.uid === 0 || ids.gid === 0 || ids.uid > 0xfffffffe || ids.gid > 0xfffffffe) {
      throw new ConfinementError(`SUPERMACHINE_QEMU_USER=${JSON.stringify(v)} must name an unprivileged user (uid and gid not 0).`);
    }
    return { ...ids, name: v };
  }
  const own = passwdEntry("supermachine-qemu");
  if (own && own.uid !== 0 && own.gid !== 0) return { ...own, name: "supermachine-qemu" };
  return { uid: 65534, gid: 65534, name: "nobody" };
}

// ------------------------------------------------------------------ bwrap

/** The read-only system part of QEMU's mount namespace: /usr and the top-level links into it. */
function systemBinds(): string[] {
  const a = ["--ro-bind", "/usr", "/usr"];
  for (const top of ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"]) {
    let st;
    try {
      st = lstatSync(top);
    } catch {
      continue;
    }
    if (st.isSymbolicLink()) a.push("--symlink", readlinkSync(top), top);
    else if (st.isDirectory()) a.push("--ro-bind", top, top);
  }
  a.push("--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache");
  return a;
}

const NAMESPACES = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try", "--die-with-parent", "--new-session"];

/** Capabilities QEMU keeps until -runas: setuid/setgid, and opening the VM's files whoever owns them (as Node, root, could). */
const RUNAS_CAPS = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_DAC_OVERRIDE"];

/** Runs `true` under the same bubblewrap options QEMU gets (an older bubblewrap lacks some): undefined when it works. */
function probeBwrap(bwrap: string, isRoot: boolean): string | undefined {
  const t = which("true");
  if (!t) return "no `true` binary to probe bubblewrap with";
  const filter = namespaceFilter();
  const args = [...NAMESPACES, "--clearenv", "--chdir", "/", ...(isRoot ? RUNAS_CAPS : []), ...systemBinds(), "--dev", "/dev", "--proc", "/proc", "--perms", "0755", "--dir", "/tmp/probe"];
  if (filter) args.push("--seccomp", "0");
  const r = spawnSync(bwrap, [...args, "--", realpathSync(t)], {
    env: { PATH: SAFE_PATH },
    stdio: [filter ? "pipe" : "ignore", "ignore", "pipe"],
    ...(filter ? { input: filter } : {}),
    timeout: 10_000,
  });
  if (r.status === 0) return undefined;
  return `bubblewrap cannot create namespaces here (${r.error?.message ?? (r.stderr.toString("utf8").trim().slice(0, 300) || `exit ${r.status}`)})`;
}

// ------------------------------------------------------------------ the plan

let planPromise: Promise<Plan> | undefined;
/** What this QEMU binary can do that confinement uses. */
export interface QemuFeatures {
  /** memory-backend-file has `rom` (QEMU ≥ 8.2): read-only open, writable private map. */
  readonly rom: boolean;
  /** `-run-with user=` (QEMU ≥ 9.1), which replaces the deprecated `-runas`. */
  readonly runWithUser: boolean;
}

const features = new Map<string, Promise<QemuFeatures>>();

function qemuOutput(qemu: string, args: string[]): Promise<string> {
  return new Promise((res) => {
    execFile(qemu, args, { env: {}, timeout: 30_000, maxBuffer: 4 * 1024 * 1024 }, (err, stdout, stderr) => res(err ? "" : `${stdout}${stderr}`));
  });
}

/** @internal Probes (once per binary) what this QEMU supports. */
export function qemuFeatures(qemu: string): Promise<QemuFeatures> {
  let p = features.get(qemu);
  if (!p) {
    p = Promise.all([qemuOutput(qemu, ["-object", "memory-backend-file,help"]), qemuOutput(qemu, ["-help"])]).then(([obj, help]) => ({
      rom: /^\s*rom=/m.test(obj),
      runWithUser: /^-run-with .*user=/m.test(help),
    }));
    features.set(qemu, p);
  }
  return p;
}

async function makePlan(env: NodeJS.ProcessEnv): Promise<Plan> {
  const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
  const sh = which("sh") ?? "/bin/sh";
  const setpriv = which("setpriv");
  const off = envFlagOff(env.SUPERMACHINE_CONFINE);
  let bwrap = off ? undefined : which("bwrap");
  let nsDetail: string;
  if (off) nsDetail = "off (SUPERMACHINE_CONFINE=0)";
  else if (!bwrap) nsDetail = "off: bubblewrap is not installed (apt-get install bubblewrap, or npm run setup)";
  else {
    const why = probeBwrap(bwrap, isRoot);
    if (why) {
      nsDetail = `off: ${why}`;
      bwrap = undefined;
    } else nsDetail = "mount (only /usr, a minimal /dev, its own /proc and the VM's files), pid, network (none), ipc, uts";
  }
  let runAs: { uid: number; gid: number } | undefined;
  let userDetail: string;
  let user = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
  if (!isRoot) userDetail = `Node is not root: QEMU runs as Node's user (uid ${user.uid})`;
  else if (!bwrap) userDetail = "off: QEMU runs as root (dropping privileges needs bubblewrap's PID namespace to still end QEMU with Node)";
  else {
    const u = qemuUser(env);
    runAs = { uid: u.uid, gid: u.gid };
    user = runAs;
    userDetail = `uid ${u.uid}, gid ${u.gid} (${u.name}), no other groups, no capabilities: QEMU opens its files as root, then drops (-runas) before any code of the image runs`;
  }
  const cg = await findCgroupRoot(isRoot, env);
  if (cg.root) await sweepCgroups(cg.root).catch(() => undefined);
  const cgDetail = cg.root
    ? `cgroup v${cg.root.version} under ${cg.root.bases.map((b) => b.dir).join(", ")}: memory = guest RAM + ${QEMU_MEMORY_OVERHEAD_MIB} MiB${cg.root.version === 1 ? " (soft limit on v1)" : ""}, tasks = ${QEMU_PIDS_BASE} + vCPUs, equal CPU weight`
    : cg.detail;
  const report: ConfinementReport = {
    nodeIsRoot: isRoot,
    user: { active: runAs !== undefined || !isRoot, uid: user.uid, gid: user.gid, detail: userDetail },
    namespaces: { active: bwrap !== undefined, detail: nsDetail },
    cleanEnvironment: { active: true, detail: "nothing of Node's: only PWD=/" },
    seccomp: {
      active: true,
      detail:
        `QEMU's -sandbox (obsolete, spawn, resourcecontrol denied; set*uid ${runAs ? "allowed for -runas, harmless after the drop" : "denied"})` +
        (bwrap && namespaceFilter() ? "; no new namespaces (unshare, setns, clone with CLONE_NEW*)" : ""),
    },
    cgroup: { active: cg.root !== undefined, ...(cg.root ? { version: cg.root.version, base: cg.root.bases[0]!.dir } : {}), detail: cgDetail },
    oomScoreAdj: { active: true, value: QEMU_OOM_SCORE_ADJ, detail: `${QEMU_OOM_SCORE_ADJ} (Node keeps its own)` },
    diesWithNode: bwrap
      ? { active: true, detail: "bubblewrap's init has a parent-death signal; its PID namespace ends with it" }
      : setpriv
        ? { active: true, detail: "setpriv --pdeathsig KILL" }
        : { active: false, detail: "off: setpriv (util-linux) is missing; only a normal Node exit kills QEMU" },
    snapshotRamReadOnly: { active: false, detail: "checked per QEMU binary at start" },
  };
  return { report, sh, ...(setpriv ? { setpriv } : {}), ...(bwrap ? { bwrap } : {}), ...(runAs ? { runAs } : {}), ...(cg.root ? { cgroup: cg.root } : {}) };
}

/** @internal The confinement plan, probed once per process. */
export function confinementPlan(): Promise<Plan> {
  if (!planPromise) {
    planPromise = makePlan(process.env);
    planPromise.catch(() => {
      planPromise = undefined;
    });
  }
  return planPromise;
}

/**
 * Says which confinements apply to the QEMU processes this Node process
 * starts. The host is probed once per process (bubblewrap, the QEMU user,
 * cgroups; SUPERMACHINE_CONFINE, SUPERMACHINE_QEMU_USER and
 * SUPERMACHINE_CGROUP are read then), the QEMU binary once per path.
 * See docs/confinement.md.
 *
 * @param qemuBinary - the QEMU whose snapshot-RAM handling to report.
 * @default qemuBinary: SUPERMACHINE_QEMU, else qemu-system-* on PATH
 * @throws ConfinementError when SUPERMACHINE_QEMU_USER or SUPERMACHINE_CGROUP cannot be used.
 */
export async function confinement(qemuBinary?: string): Promise<ConfinementReport> {
  const plan = await confinementPlan();
  if (!qemuBinary) {
    const { findQemu } = await import("./qemu.js");
    try {
      qemuBinary = findQemu();
    } catch {
      /* reported below */
    }
  }
  let ram: ConfinementItem;
  if (!qemuBinary) ram = { active: false, detail: "unknown: no QEMU binary found" };
  else if ((await qemuFeatures(qemuBinary)).rom) ram = { active: true, detail: "memory-backend-file readonly=on,rom=off: opened read-only, mapped private" };
  else ram = { active: false, detail: "off: this QEMU (< 8.2) opens a memory-backend-file read-write even for a private mapping; the mapping is private (copy-on-write), so the guest's writes never reach the file, but a QEMU taken over could write to it" };
  return { ...plan.report, snapshotRamReadOnly: ram };
}

// ------------------------------------------------------------------ per launch

/** The files one QEMU needs, for its mount namespace. */
export interface LaunchFiles {
  qemu: string;
  accel: Accelerator;
  /** Bound read-only. */
  readOnly: string[];
  /** Bound read-write (the runtime dir; a RAM file QEMU must open O_RDWR; the directory of a RAM file QEMU creates). */
  readWrite: string[];
}

/** @internal The command that starts QEMU confined, with its environment. */
export interface ConfinedCommand {
  cmd: string;
  argv: string[];
  env: NodeJS.ProcessEnv;
  /** How many fork levels below the spawned process QEMU runs (0: it is QEMU after the exec chain). */
  qemuDepth: number;
  /** QEMU drops to this user (-runas). */
  runAs?: { uid: number; gid: number };
  cgroup?: VmCgroup;
  /** A seccomp program for bubblewrap, to write to the child's fd 3. */
  seccomp?: Buffer;
  /** bubblewrap reports QEMU's death by signal N as exit code 128 + N. */
  exitCodeEncodesSignal: boolean;
}

/**
 * @internal Builds the exec chain for one QEMU, creates its cgroup and hands
 * its runtime directory to the QEMU user. Undo with `cgroup.remove()`.
 */
export async function confineLaunch(plan: Plan, f: LaunchFiles, qemuArgv: string[], runtimeDir: string, name: string, memoryMib: number, vcpus: number): Promise<ConfinedCommand> {
  const cgroup = plan.cgroup ? await VmCgroup.create(plan.cgroup, name, memoryMib, vcpus) : undefined;
  try {
    // The QEMU user may enter the runtime directory (to connect to a socket
    // Node listens on) but not add, remove or replace anything in it: the
    // paths Node connects to, chmods or removes stay Node's.
    if (plan.runAs) {
      await chown(runtimeDir, process.getuid!(), plan.runAs.gid);
      await chmod(runtimeDir, 0o750);
    }
    // sh: raise oom_score_adj and join the cgroup(s), then exec the rest.
    const prologue =
      'echo "$1" > /proc/self/oom_score_adj || exit 126; n=$2; shift 2; ' +
      'while [ "$n" -gt 0 ]; do echo 0 > "$1" || exit 126; shift; n=$((n - 1)); done; exec "$@"';
    const files = cgroup?.procsFiles ?? [];
    const seccomp = plan.bwrap ? namespaceFilter() : undefined;
    const argv = ["-c", prologue, "sm-qemu", String(QEMU_OOM_SCORE_ADJ), String(files.length), ...files];
    if (plan.setpriv) argv.push(plan.setpriv, "--pdeathsig", "KILL", "--");
    if (plan.bwrap) {
      argv.push(plan.bwrap, ...NAMESPACES, "--clearenv", "--chdir", "/");
      // All capabilities are gone once QEMU has dropped (-runas).
      if (plan.runAs) argv.push(...RUNAS_CAPS);
      // No new namespaces (vmm/seccomp.ts); the program comes on fd 3.
      if (seccomp) argv.push("--seccomp", "3");
      argv.push(...systemBinds(), "--dev", "/dev", "--proc", "/proc");
      if (f.accel === "kvm") argv.push("--dev-bind", "/dev/kvm", "/dev/kvm");
      // bubblewrap would create the directories above each file 0700 (like
      // the cache's): make them 0755 so the QEMU user can reach its files.
      // They are empty tmpfs directories in QEMU's own mount namespace.
      const above = new Set<string>();
      for (const p of [...f.readWrite, ...f.readOnly, ...(f.qemu.startsWith("/usr/") ? [] : [f.qemu])]) {
        for (let d = dirname(p); d !== "/" && d !== "." && !d.startsWith("/usr/") && d !== "/usr"; d = dirname(d)) above.add(d);
      }
      for (const d of [...above].sort((a, b) => a.split("/").length - b.split("/").length)) argv.push("--perms", "0755", "--dir", d);
      if (!f.qemu.startsWith("/usr/")) argv.push("--ro-bind", f.qemu, f.qemu);
      const seen = new Set<string>();
      for (const p of f.readWrite) {
        if (seen.has(p)) continue;
        seen.add(p);
        // -try: a missing file is QEMU's to report, in its own words.
        argv.push("--bind-try", p, p);
      }
      for (const p of f.readOnly) {
        if (seen.has(p)) continue;
        seen.add(p);
        argv.push("--ro-bind-try", p, p);
      }
      argv.push("--");
    }
    argv.push(f.qemu, ...qemuArgv);
    return {
      cmd: plan.sh,
      argv,
      env: {},
      qemuDepth: plan.bwrap ? 2 : 0,
      ...(seccomp ? { seccomp } : {}),
      ...(plan.runAs ? { runAs: plan.runAs } : {}),
      ...(cgroup ? { cgroup } : {}),
      exitCodeEncodesSignal: plan.bwrap !== undefined,
    };
  } catch (e) {
    await cgroup?.remove();
    throw e;
  }
}

/**
 * @internal Lets QEMU connect to a unix socket Node listens on in a VM's
 * runtime directory (the migration stream out): the socket is given to the
 * QEMU user, so no one else may connect. The directory is not writable by
 * QEMU, so the path cannot have been swapped for a link.
 */
export async function allowQemuConnect(socketPath: string): Promise<void> {
  const plan = await confinementPlan();
  if (plan.runAs) await chown(socketPath, plan.runAs.uid, plan.runAs.gid);
}

/** @internal Translates bubblewrap's "128 + N" exit code of a QEMU killed by signal N. */
export function decodeExit(code: number | null, signal: NodeJS.Signals | null, encoded: boolean): { code: number | null; signal: NodeJS.Signals | null } {
  if (!encoded || signal || code === null || code <= 128 || code >= 128 + 65) return { code, signal };
  const n = code - 128;
  const name = (Object.entries(osConstants.signals) as [NodeJS.Signals, number][]).find(([, v]) => v === n)?.[0];
  return name ? { code: null, signal: name } : { code, signal };
}

/**
 * @internal Finds the pid `depth` fork levels below `root` (QEMU under
 * bubblewrap's init): "gone" when the chain ended first, "timeout" past the deadline.
 */
export async function descendantPid(root: number, depth: number, deadline: number, gone: () => boolean): Promise<number | "gone" | "timeout"> {
  let pid = root;
  for (let level = 0; level < depth; level++) {
    let child: number | undefined;
    for (let delay = 1; ; delay = Math.min(delay * 2, 20)) {
      if (gone()) return "gone";
      try {
        const first = readFileSync(`/proc/${pid}/task/${pid}/children`, "latin1").trim().split(/\s+/)[0];
        if (first) child = Number(first);
      } catch {
        return "gone";
      }
      if (child) break;
      if (Date.now() > deadline) return "timeout";
      await new Promise((r) => setTimeout(r, delay));
    }
    pid = child;
  }
  return pid;
}
