/**
 * The QEMU process of one VM: command line, start, console capture, stop.
 *
 * QEMU runs the `microvm` machine with `-nodefaults`, the seccomp sandbox,
 * and only: an ISA serial console, a virtio-serial port for the agent, a
 * read-only virtio-blk root disk, and QMP on a unix socket. It is started
 * confined (vmm/confine.ts, docs/confinement.md): its own cgroup, a raised
 * oom_score_adj, a parent-death signal, bubblewrap's namespaces with only the
 * VM's files, an empty environment, and, when Node is root, an unprivileged
 * user. A process 'exit' hook covers what the death signal does not.
 *
 * A running QEMU does not hold Node's event loop (the child and its output
 * pipes are unref'd): a script whose work is done exits, and the 'exit' hook
 * kills what is left. What waits on the guest holds the loop instead (the
 * agent connection while a request is in flight, `stop()` until QEMU is gone).
 */

import { defaultCacheDir } from "../paths.js";
import { spawn, type ChildProcess } from "node:child_process";
import type { Writable } from "node:stream";
import { existsSync, readFileSync, readdirSync, realpathSync } from "node:fs";
import { chown } from "node:fs/promises";
import { delimiter, dirname, join, resolve } from "node:path";
import { MissingAssetError, QemuError } from "../errors.js";
import { guestText } from "../guest-text.js";
import type { QemuDisk } from "../volumes/disks.js";
import { ROOT_SERIAL } from "../volumes/spec.js";
import type { Accelerator } from "./accel.js";
import { confineLaunch, confinementPlan, decodeExit, descendantPid, qemuFeatures, type ConfinedCommand } from "./confine.js";

/**
 * TCG's guest CPU model when nothing else is asked (docs/performance.md):
 * every feature TCG emulates (x86-64-v3: AVX2, BMI, FMA...) but ERMS/FSRM.
 * With ERMS the guest kernel's and libc's copies use `rep movsb`, which TCG
 * runs one byte per iteration: dropping it doubled stream throughput and
 * made a warm exec ≈ 10 % cheaper (a refill's CPU did not move).
 */
export const DEFAULT_TCG_CPU = "max,-erms,-fsrm";

/**
 * The model of snapshots whose manifest names none, and of cache keys that
 * name none (the default before {@link DEFAULT_TCG_CPU} dropped ERMS).
 */
export const UNNAMED_TCG_CPU = "max";

const CPU_MODEL_RE = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}(,[+-]?[A-Za-z0-9_.-]{1,40}(=[A-Za-z0-9_.-]{1,20})?){0,32}$/;

/** True for a `-cpu` model name QEMU may be given (no options, no commas). */
export function isCpuModelName(s: unknown): boolean {
  return typeof s === "string" && CPU_MODEL_RE.test(s);
}

/**
 * @internal The guest CPU model new TCG VMs (boots, bakes) get:
 * SUPERMACHINE_TCG_CPU (for benchmarks comparing models), else
 * {@link DEFAULT_TCG_CPU}. Restores use their snapshot's.
 */
export function tcgCpuModel(env: NodeJS.ProcessEnv = process.env): string {
  const v = env.SUPERMACHINE_TCG_CPU;
  if (v === undefined || v === "") return DEFAULT_TCG_CPU;
  if (!isCpuModelName(v)) throw new QemuError(`SUPERMACHINE_TCG_CPU=${JSON.stringify(v.slice(0, 80))} is not a QEMU CPU model (a name of letters, digits and "._+-", then optional ",+feature", ",-feature" or ",feature=value"; see \`qemu-system-x86_64 -cpu help\`). Unset it for the default (${DEFAULT_TCG_CPU}).`);
  return v;
}

export interface QemuLaunch {
  /** Path of qemu-system-*; default from SUPERMACHINE_QEMU or PATH. */
  qemuBinary?: string;
  accel: Accelerator;
  memoryMib: number;
  vcpus: number;
  kernel: string;
  /** Omitted for snapshot restores (the guest's RAM comes from the snapshot). */
  initrd?: string;
  cmdline: string;
  /** Read-only root filesystem image (virtio-blk). */
  rootfs?: string;
  /**
   * Writable disks after the root disk (volumes, the writable layer), each a
   * virtio-blk device the guest finds by its serial. QEMU never flushes them
   * to stable storage (`cache=unsafe`): they are throwaway per-VM overlays.
   */
  disks?: readonly QemuDisk[];
  /** Directory for the sockets (short path: unix sockets are ≤ 107 bytes). */
  dir: string;
  /**
   * Guest RAM in a file (for snapshots): shared or private (copy-on-write).
   * `readOnly` (private only, QEMU ≥ 8.2) opens the file read-only; start()
   * sets it where QEMU can.
   */
  memoryFile?: { path: string; share: boolean; readOnly?: boolean };
  /** Start paused, listening for a migration stream on `dir`/mig-in.sock (snapshot restore). */
  incoming?: boolean;
  /** Stay paused after start (or after an incoming migration): -S. */
  paused?: boolean;
  /** Process name shown by ps (≤ 15 chars). */
  name: string;
  /**
   * TCG's guest CPU model (`-cpu`); a restore must use its snapshot's.
   * Ignored under KVM (`-cpu host`). @default {@link DEFAULT_TCG_CPU}
   */
  cpuModel?: string;
  /**
   * Unix socket of the host's network stack: the VM gets a virtio-net NIC
   * whose frames QEMU carries there (`-netdev stream`, QEMU the client: a
   * 4-byte big-endian length, then the Ethernet frame). Someone must listen
   * on it before QEMU starts. Absent: the VM has no NIC.
   */
  netSocket?: string;
  /**
   * Drop to this user once QEMU has opened its files: `-runas`, or
   * `-run-with user=` (QEMU ≥ 9.1) with `runWith`. start() sets it when Node is root.
   */
  runAs?: { uid: number; gid: number; runWith?: boolean };
}

/** The MAC address of every VM's NIC: each VM has a host stack of its own. */
export const GUEST_MAC = "52:54:00:53:4d:02";

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

const CONSOLE_TAIL = 64 * 1024;
/** The socket (in the VM's runtime directory) a restoring QEMU reads its state from. */
export const MIGRATION_IN_SOCKET = "mig-in.sock";
/** How long bubblewrap may take to set up QEMU's namespaces and start it. */
const QEMU_PID_TIMEOUT_MS = 30_000;

function signalPid(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    /* already gone */
  }
}

const live = new Set<QemuProcess>();
let hooked = false;
let started = 0;

/** How many QEMU processes this Node process has started (for tests and stats). */
export function qemuStartCount(): number {
  return started;
}

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on("exit", () => {
    for (const q of live) q.kill("SIGKILL");
  });
}

/** PIDs of QEMU processes this Node process started and that still run. */
export function liveQemuPids(): number[] {
  return [...live].map((q) => q.pid).filter((p): p is number => typeof p === "number");
}

function which(cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? "/usr/bin:/bin").split(delimiter)) {
    const p = join(dir, cmd);
    if (existsSync(p)) return p;
  }
  return undefined;
}

export function qemuBinaryName(arch: string = process.arch): string {
  return arch === "arm64" ? "qemu-system-aarch64" : "qemu-system-x86_64";
}

/** The QMP command of QEMU builds with qemu/supermachine-reload.patch (docs/qemu-reuse.md). */
export const RELOAD_COMMAND = "x-supermachine-reload";

/**
 * Where `npm run setup` puts the QEMU it builds with
 * qemu/supermachine-reload.patch (scripts/qemu.ts; docs/qemu-reuse.md).
 */
export function builtQemuDir(env: NodeJS.ProcessEnv = process.env): string {
  return join(defaultCacheDir(env), "qemu");
}

/** Where `sudo supermachine setup --qemu` puts that QEMU, for every user of the host. */
export const SYSTEM_BUILT_QEMU_DIR = "/usr/local/lib/supermachine/qemu";

/**
 * Finds the QEMU binary or throws MissingAssetError naming the fix: the
 * qemuBinary option, else SUPERMACHINE_QEMU, else a build with the reload
 * patch (`npm run setup`'s in the cache, then `supermachine setup --qemu`'s
 * system-wide one: pools reuse QEMU processes under TCG), else the host's.
 */
export function findQemu(explicit?: string): string {
  const p = explicit ?? process.env.SUPERMACHINE_QEMU;
  if (p) {
    if (!existsSync(p)) throw new MissingAssetError("qemu", `QEMU binary ${p} (from ${explicit ? "the qemuBinary option" : "SUPERMACHINE_QEMU"}) does not exist.`);
    return p;
  }
  for (const dir of [builtQemuDir(), SYSTEM_BUILT_QEMU_DIR]) {
    const built = join(dir, "bin", qemuBinaryName());
    if (existsSync(built)) return built;
  }
  const name = qemuBinaryName();
  const found = which(name);
  if (!found) {
    throw new MissingAssetError(
      "qemu",
      `${name} is not installed. Run \`npm run setup\` (Debian/Ubuntu: apt-get install qemu-system-x86), or point SUPERMACHINE_QEMU at a QEMU binary.`,
    );
  }
  // The real path: QEMU finds its modules (Debian builds TCG's as one)
  // relative to its own location, which a symlink in PATH would hide.
  try {
    return realpathSync(found);
  } catch {
    return found;
  }
}

/** A path inside a QEMU option value: a comma is written twice. */
function optPath(p: string): string {
  return p.replace(/,/g, ",,");
}

/** Builds QEMU's argument vector. Pure, for tests. */
export function qemuArgs(l: QemuLaunch): string[] {
  const a: string[] = [];
  // debug-threads: vCPU threads are named "CPU N/TCG" (or /KVM), which
  // vcpusRunning() looks for.
  a.push("-name", `${l.name},process=${l.name.slice(0, 15)},debug-threads=on`);
  a.push("-M", "microvm,x-option-roms=off,isa-serial=on,acpi=on");
  if (l.accel === "kvm") a.push("-accel", "kvm", "-cpu", "host");
  // tb-size bounds TCG's translation cache (and so QEMU's RSS).
  else a.push("-accel", "tcg,tb-size=64", "-cpu", l.cpuModel ?? DEFAULT_TCG_CPU);
  if (l.memoryFile) {
    a.push("-m", `${l.memoryMib}M`);
    a.push(
      "-object",
      `memory-backend-file,id=ram,size=${l.memoryMib}M,mem-path=${l.memoryFile.path},share=${l.memoryFile.share ? "on" : "off"}` +
        (l.memoryFile.readOnly && !l.memoryFile.share ? ",readonly=on,rom=off" : ""),
    );
    a.push("-machine", "memory-backend=ram");
  } else {
    // Named like the file-backed RAM ("ram", not "microvm.ram"): a snapshot
    // of this VM is loaded into a helper QEMU whose RAM is a file, and
    // migration matches RAM blocks by name.
    a.push("-m", `${l.memoryMib}M`);
    a.push("-object", `memory-backend-ram,id=ram,size=${l.memoryMib}M`);
    a.push("-machine", "memory-backend=ram");
  }
  a.push("-smp", String(l.vcpus));
  a.push("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot");
  // -runas needs set*uid once, after seccomp is installed; after the drop
  // QEMU has no capabilities, so those calls cannot raise its privileges.
  a.push("-sandbox", `on,obsolete=deny,elevateprivileges=${l.runAs ? "allow" : "deny"},spawn=deny,resourcecontrol=deny`);
  if (l.runAs) a.push(...(l.runAs.runWith ? ["-run-with", `user=${l.runAs.uid}:${l.runAs.gid}`] : ["-runas", `${l.runAs.uid}:${l.runAs.gid}`]));
  a.push("-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con");
  a.push("-kernel", l.kernel);
  if (l.initrd) a.push("-initrd", l.initrd);
  a.push("-append", l.cmdline);
  a.push("-device", "virtio-serial-device,max_ports=2");
  a.push("-chardev", `socket,id=agent,path=${join(l.dir, "agent.sock")},server=on,wait=off`);
  a.push("-device", "virtserialport,chardev=agent,name=sm.agent");
  if (l.rootfs) {
    a.push("-drive", `id=root,file=${optPath(l.rootfs)},format=raw,if=none,readonly=on`);
    a.push("-device", `virtio-blk-device,drive=root,serial=${ROOT_SERIAL}`);
  }
  for (const [i, d] of (l.disks ?? []).entries()) {
    a.push("-drive", `id=disk${i},file=${optPath(d.file)},format=${d.format},if=none,${d.readOnly ? "readonly=on" : "cache=unsafe"}`);
    a.push("-device", `virtio-blk-device,drive=disk${i},serial=${d.serial}`);
  }
  if (l.netSocket !== undefined) {
    // QEMU's option syntax would split the path at a comma.
    if (l.netSocket.includes(",") || !l.netSocket.startsWith("/") || Buffer.byteLength(l.netSocket) > 107) {
      throw new TypeError(`netSocket must be an absolute path of at most 107 bytes without commas, received ${JSON.stringify(l.netSocket)}`);
    }
    a.push("-netdev", `stream,id=net0,server=off,addr.type=unix,addr.path=${l.netSocket}`);
    a.push("-device", `virtio-net-device,netdev=net0,mac=${GUEST_MAC}`);
  }
  a.push("-qmp", `unix:${join(l.dir, "qmp.sock")},server=on,wait=off`);
  // QEMU listens for the state at start, before it drops privileges: after
  // the drop it may not create anything in the runtime directory.
  if (l.incoming) a.push("-incoming", `unix:${join(l.dir, MIGRATION_IN_SOCKET)}`);
  if (l.paused) a.push("-S");
  return a;
}

export class QemuProcess {
  /** The first process of QEMU's exec chain (the confinement wrapper, or QEMU itself). */
  readonly child: ChildProcess;
  readonly agentSocket: string;
  readonly qmpSocket: string;
  /** The QEMU binary this runs. */
  readonly binary: string;
  /** Resolves when QEMU has exited and its cgroup is gone (never rejects). */
  readonly exited: Promise<QemuExit>;
  /**
   * Aborted when `exited` resolves. Listeners can be removed, unlike a
   * promise's: a QEMU that serves many VMs one after another
   * (docs/qemu-reuse.md) must not keep each of them reachable.
   */
  readonly exitSignal: AbortSignal;
  private readonly exitController = new AbortController();
  private tail: Buffer[] = [];
  private tailBytes = 0;
  private exitInfo: QemuExit | undefined;
  private errLine = "";
  private qemuPid: number | undefined;
  private vcpuTids: string[] | undefined;
  /**
   * Called when QEMU reports on stderr that the guest broke a virtio device
   * ("virtio: zero sized buffers are not allowed", ...): QEMU stops serving
   * that device, so the VM can no longer be reached and should be ended.
   */
  onDeviceError: ((message: string) => void) | undefined;
  /** Called with each chunk the guest's serial console printed (vm.logs({ console: true })). */
  onConsole: ((chunk: Buffer) => void) | undefined;

  private constructor(child: ChildProcess, l: QemuLaunch, c: ConfinedCommand, binary: string) {
    this.child = child;
    this.binary = binary;
    this.exitSignal = this.exitController.signal;
    this.agentSocket = join(l.dir, "agent.sock");
    this.qmpSocket = join(l.dir, "qmp.sock");
    const onData = (b: Buffer) => {
      this.keep(b);
      this.onConsole?.(b);
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", (b: Buffer) => {
      this.keep(b);
      this.scanStderr(b);
    });
    // Idle VMs must not keep the process alive (see the file comment).
    child.unref();
    for (const pipe of [child.stdout, child.stderr]) (pipe as unknown as { unref?: () => void } | null)?.unref?.();
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        void (async () => {
          const info = decodeExit(code, signal, c.exitCodeEncodesSignal);
          // bubblewrap exits after its init, and the kernel ends a PID
          // namespace's processes before its init is reaped: QEMU is gone.
          await c.cgroup?.remove().catch(() => undefined);
          live.delete(this);
          this.exitInfo = info;
          resolve(info);
          this.exitController.abort(info);
        })();
      });
    });
  }

  /** Starts QEMU, confined (see vmm/confine.ts). Spawn failures (binary missing) throw. */
  static async start(l: QemuLaunch): Promise<QemuProcess> {
    const qemu = findQemu(l.qemuBinary);
    const plan = await confinementPlan();
    // Absolute paths: QEMU runs with / as its working directory.
    const mem = l.memoryFile ? { ...l.memoryFile, path: resolve(l.memoryFile.path) } : undefined;
    const can = await qemuFeatures(qemu);
    if (mem && !mem.share && can.rom) mem.readOnly = true;
    const launch: QemuLaunch = {
      ...l,
      kernel: resolve(l.kernel),
      ...(l.initrd ? { initrd: resolve(l.initrd) } : {}),
      ...(l.rootfs ? { rootfs: resolve(l.rootfs) } : {}),
      ...(l.disks ? { disks: l.disks.map((d) => ({ ...d, file: resolve(d.file), backing: d.backing.map((b) => resolve(b)) })) } : {}),
      ...(mem ? { memoryFile: mem } : {}),
      ...(plan.runAs ? { runAs: { ...plan.runAs, runWith: can.runWithUser } } : {}),
      dir: resolve(l.dir),
    };
    const readOnly = [launch.kernel, ...(launch.initrd ? [launch.initrd] : []), ...(launch.rootfs ? [launch.rootfs] : [])];
    const readWrite = [launch.dir];
    // Overlays live in the runtime dir; what they read through to (a
    // snapshot's disk images) is bound read-only.
    const outside = (p: string) => !p.startsWith(launch.dir + "/");
    for (const d of launch.disks ?? []) {
      if (outside(d.file)) (d.readOnly ? readOnly : readWrite).push(d.file);
      readOnly.push(...d.backing.filter(outside));
      // QEMU opens a writable image again, by path and as the QEMU user,
      // when it re-activates its disks after a migration (a snapshot's
      // `cont`, a restore's end): the VM's own overlay (and the empty image
      // under a bake's) belong to that user.
      if (plan.runAs) for (const f of [d.file, ...d.backing].filter((f) => !outside(f))) await chown(f, plan.runAs.uid, plan.runAs.gid);
    }
    // A NIC peer outside the runtime dir (tests put their own there): QEMU
    // connects to it at start, still as root, so binding it is enough.
    if (launch.netSocket && !launch.netSocket.startsWith(launch.dir + "/")) readWrite.push(launch.netSocket);
    if (mem) {
      // QEMU 7.2 opens an existing RAM file read-write even for a private
      // mapping; a file QEMU creates needs its directory.
      if (!existsSync(mem.path)) readWrite.push(dirname(mem.path));
      else (mem.readOnly ? readOnly : readWrite).push(mem.path);
    }
    const c = await confineLaunch(plan, { qemu, accel: l.accel, readOnly, readWrite }, qemuArgs(launch), launch.dir, l.name, l.memoryMib, l.vcpus);
    hookExit();
    let child: ChildProcess;
    try {
      child = spawn(c.cmd, c.argv, { stdio: c.seccomp ? ["ignore", "pipe", "pipe", "pipe"] : ["ignore", "pipe", "pipe"], env: c.env, cwd: "/" });
      if (c.seccomp) {
        const fd3 = child.stdio[3] as Writable;
        fd3.on("error", () => undefined); // bubblewrap failed first: its exit says why
        fd3.end(c.seccomp);
      }
    } catch (e) {
      await c.cgroup?.remove();
      throw new QemuError(`cannot start QEMU: ${(e as Error).message}`, { cause: e });
    }
    started++;
    const proc = new QemuProcess(child, launch, c, qemu);
    live.add(proc);
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve);
      child.once("error", (e: NodeJS.ErrnoException) => {
        live.delete(proc);
        void c.cgroup?.remove();
        reject(
          e.code === "ENOENT"
            ? new MissingAssetError("qemu", `cannot run ${c.cmd}: not found. Run \`npm run setup\` or set SUPERMACHINE_QEMU.`, { cause: e })
            : new QemuError(`cannot start QEMU: ${e.message}`, { cause: e }),
        );
      });
    });
    if (c.qemuDepth === 0) proc.qemuPid = child.pid;
    else {
      // QEMU runs under bubblewrap's init, in its PID namespace.
      const pid = await descendantPid(child.pid!, c.qemuDepth, Date.now() + QEMU_PID_TIMEOUT_MS, () => proc.exitInfo !== undefined || child.exitCode !== null || child.signalCode !== null);
      if (pid === "timeout") {
        await proc.stop();
        throw new QemuError(`QEMU did not start within ${QEMU_PID_TIMEOUT_MS} ms under its confinement wrapper: ${proc.consoleTail(1024)}`);
      }
      // "gone": QEMU (or bubblewrap) exited at once; `exited` and the console tail tell why.
      if (pid !== "gone") proc.qemuPid = pid;
    }
    return proc;
  }

  /** QEMU's own pid (not its confinement wrapper's); undefined if it exited during start. */
  get pid(): number | undefined {
    return this.qemuPid;
  }

  /**
   * @internal CPU time (user + system, ms) used so far by QEMU, bubblewrap's
   * init and the confinement wrapper (its exec chain): the sum of their
   * threads' scheduler run time (/proc/PID/task/TID/schedstat, ns), or of
   * /proc/PID/stat's clock ticks where schedstat is missing. Threads that
   * already exited are not counted. For benchmarks (reads /proc, sync).
   */
  cpuTimeMs(): number {
    const pids = new Set<number>();
    if (this.child.pid !== undefined) pids.add(this.child.pid);
    if (this.qemuPid !== undefined) {
      pids.add(this.qemuPid);
      const pp = parentPid(this.qemuPid);
      if (pp !== undefined && pp > 1) pids.add(pp);
    }
    let ms = 0;
    for (const pid of pids) ms += processCpuMs(pid);
    return ms;
  }

  /**
   * @internal Whether a vCPU thread is running or waiting for a host CPU
   * (state R): a halted guest's vCPU threads sleep. Unlike CPU time, not
   * fooled by a host too busy to run the guest. Undefined when the threads
   * cannot be read (QEMU gone, or another user's /proc).
   */
  vcpusRunning(): boolean | undefined {
    const pid = this.qemuPid;
    if (pid === undefined) return undefined;
    try {
      if (!this.vcpuTids) {
        this.vcpuTids = readdirSync(`/proc/${pid}/task`).filter((t) => readFileSync(`/proc/${pid}/task/${t}/comm`, "latin1").startsWith("CPU "));
      }
      if (this.vcpuTids.length === 0) return undefined;
      // The state is the first field after the command name's ")".
      return this.vcpuTids.some((t) => {
        const st = readFileSync(`/proc/${pid}/task/${t}/stat`, "latin1");
        return st[st.lastIndexOf(")") + 2] === "R";
      });
    } catch {
      this.vcpuTids = undefined;
      return undefined;
    }
  }

  get exitStatus(): QemuExit | undefined {
    return this.exitInfo;
  }

  private keep(b: Buffer): void {
    this.tail.push(b);
    this.tailBytes += b.length;
    while (this.tailBytes - this.tail[0]!.length >= CONSOLE_TAIL) {
      this.tailBytes -= this.tail.shift()!.length;
    }
  }

  private scanStderr(b: Buffer): void {
    // Bounded: only the current line is kept, cut at 1 KiB.
    const lines = (this.errLine + b.toString("utf8")).split("\n");
    this.errLine = lines.pop()!.slice(-1024);
    for (const line of lines) {
      const m = /^[^:\s]*qemu[^:]*: (virtio[^:]*: .*)$/.exec(line.trim());
      if (m) this.onDeviceError?.(m[1]!.slice(0, 512));
    }
  }

  /** The last ~64 KiB the guest console and QEMU printed. */
  consoleTail(maxBytes = 4096): string {
    const all = Buffer.concat(this.tail);
    return guestText(all.subarray(Math.max(0, all.length - maxBytes)).toString("utf8"), { maxChars: maxBytes, keep: "tail" });
  }

  /** Sends a signal to QEMU and its wrapper; harmless after exit. */
  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    if (this.exitInfo) return;
    if (this.qemuPid !== undefined && this.qemuPid !== this.child.pid) signalPid(this.qemuPid, signal);
    try {
      this.child.kill(signal);
    } catch {
      /* already gone */
    }
  }

  /** Kills QEMU and waits for it to be gone (holding the event loop until then). */
  async stop(): Promise<QemuExit> {
    if (!this.exitInfo) this.child.ref();
    this.kill("SIGKILL");
    return this.exited;
  }
}

function parentPid(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
    return Number.isInteger(ppid) ? ppid : undefined;
  } catch {
    return undefined;
  }
}

/** CPU ms of one process (0 when it is gone); see QemuProcess.cpuTimeMs. */
function processCpuMs(pid: number): number {
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return 0;
  }
  let ns = 0;
  let schedstat = true;
  for (const tid of tids) {
    try {
      const v = Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "latin1").split(" ")[0]);
      if (Number.isFinite(v)) ns += v;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT" && existsSync(`/proc/${pid}/task/${tid}`)) schedstat = false;
    }
  }
  if (schedstat) return ns / 1e6;
  try {
    // utime and stime: fields 14 and 15, i.e. the 12th and 13th after the command name's ")".
    const f = readFileSync(`/proc/${pid}/stat`, "latin1").split(")").pop()!.trim().split(" ");
    return ((Number(f[11]) + Number(f[12])) * 1000) / CLOCK_TICKS_PER_S;
  } catch {
    return 0;
  }
}

/** USER_HZ: 100 on every Linux architecture Node runs on. */
const CLOCK_TICKS_PER_S = 100;
