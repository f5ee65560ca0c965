/**
 * Vm: one running microVM — its QEMU process, its agent connection, its
 * runtime directory — and the seed's Vm API on top.
 *
 * Lifecycle (cf. undici's dispatcher): `ready` → `close()` (graceful: waits
 * for operations in flight) or `destroy()` (at once) → `closed`. A guest that
 * dies on its own goes to `dead`. Both are idempotent; any operation after
 * them throws ClosedError (or GuestDiedError with the console tail).
 */

import { randomBytes, randomUUID } from "node:crypto";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { copyFile, link, mkdir, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, join, resolve } from "node:path";
import { AgentConnection, type ExecStream } from "../agent-client/connection.js";
import {
  AbortError,
  AgentError,
  ClosedError,
  FileTooLargeError,
  GuestDiedError,
  QemuError,
  OutputLimitError,
  SnapshotError,
  SupermachineError,
  TimeoutError,
  invalidOption,
} from "../errors.js";
import type { Image } from "../image/image.js";
import { bootAssets, defaultAslr, kernelCmdline } from "../guest/assets.js";
import { assertSupportedHost } from "../platform/host.js";
import { defaultCacheDir } from "../paths.js";
import { RecordBuilder } from "../protocol/codec.js";
import { FILE_LIMIT, MsgType, Tag, WireError } from "../protocol/constants.js";
import { encodeNetConfig, type GuestNetConfig } from "../protocol/net-config.js";
import { directoryImage } from "../rootfs/cache.js";
import { chooseAccelerator, warnTcgOnce, type Accelerator, type AcceleratorChoice, type AcceleratorOption } from "../vmm/accel.js";
import { QemuProcess, RELOAD_COMMAND, tcgCpuModel } from "../vmm/qemu.js";
import { QmpClient, connectQmp } from "../vmm/qmp.js";
import { loadState, reloadState } from "../snapshot/migrate.js";
import { PRETRANSLATE_COMMAND, TB_HINTS_SAVE_COMMAND, deprioritizePretranslator, pretranslate, readTbHints, readTbHintsLabel, saveTbHints, tbHintsPath } from "../vmm/pretranslate.js";
import { SNAPSHOT_FORMAT, SNAPSHOT_VERSION, type SnapshotManifest, type WorkloadSpec } from "../snapshot/manifest.js";
import { ExecChild } from "./exec-child.js";
import { collectOutput } from "./exec-collect.js";
import { ExecProxy } from "./exec-proxy.js";
import { LOG_BUFFER_BYTES, LogRing, type LogEntry, type LogReader, type LogsOptions } from "./logs.js";
import { guestText } from "../guest-text.js";
import { DEFAULT_EXEC_TIMEOUT_MS, validateExec, type ExecOptions, type ExecOutput, type ValidExec } from "./options.js";
import { createRuntimeDir, removeRuntimeDir } from "./runtime-dir.js";
import { TcpForwarder } from "./tcp-forwarder.js";
import { prepareDisks, type QemuDisk } from "../volumes/disks.js";
import { StreamRing, clearRingFile, ringDisk } from "../agent-client/ring.js";
import { coldBootLaunch, continueFromTemplate } from "./boot-template.js";
import { fsyncFile, sparseCopy } from "../snapshot/files.js";
import type { DiskPlan } from "../volumes/spec.js";
import { NetworkStack, guestNetConfig } from "../net/stack.js";
import { channels, trace } from "../diagnostics.js";
import { compilePolicy, type CompiledPolicy, type NetworkOption } from "../net/policy.js";
import type { NetworkDeniedEvent, NetworkStats } from "../net/stack.js";
import { MountAttachment, checkHostPaths, validateMounts, type ValidMount } from "../mounts/attach.js";
import type { MountSpec } from "../mounts/server.js";

/** What a Vm shows of its network stack. */
export interface VmNetwork {
  /** Counters since the VM started (or was restored). */
  stats(): NetworkStats;
  on(event: "denied", listener: (e: NetworkDeniedEvent) => void): unknown;
  off(event: "denied", listener: (e: NetworkDeniedEvent) => void): unknown;
  once(event: "denied", listener: (e: NetworkDeniedEvent) => void): unknown;
}

export type { GuestNetConfig } from "../protocol/net-config.js";

// Node < 18.18 has neither Symbol.dispose nor Symbol.asyncDispose, the names
// `using` / `await using` look up: give them the values later Nodes use, so
// that the class methods below get stable keys on every supported runtime.
{
  const S = Symbol as unknown as { dispose?: symbol; asyncDispose?: symbol };
  S.dispose ??= Symbol.for("nodejs.dispose");
  S.asyncDispose ??= Symbol.for("nodejs.asyncDispose");
}

/** What the image says about how to run things in it (OCI config). */
export interface GuestConfig {
  /** KEY=VALUE entries. */
  env?: readonly string[];
  workingDir?: string;
  user?: string;
}

export interface VmBootOptions {
  /** Host directory to boot as the root filesystem (built into a cached erofs image). */
  rootfs?: string;
  /** A prebuilt erofs root filesystem image. */
  rootfsImage?: string;
  /** Guest-visible memory ceiling in MiB. @default 256 */
  memoryMib?: number;
  /** @default 1 */
  vcpus?: number;
  /** @default "auto" (or SUPERMACHINE_ACCEL) */
  accel?: AcceleratorOption;
  /** Image environment, working directory and user. */
  config?: GuestConfig;
  /** @default "sm-" + 8 random hex digits */
  hostname?: string;
  /** (extension) The VM's egress policy; see BuildOptions.network. @default true */
  network?: NetworkOption;
  /** Live host directories (see BuildOptions.mounts and docs/mounts.md). @default [] */
  mounts?: readonly MountSpec[];
  /** Deadline for QEMU start + kernel boot + agent handshake. @default 120000 under TCG, 30000 under KVM */
  bootTimeoutMs?: number;
  signal?: AbortSignal;
  cacheDir?: string;
  kernel?: string;
  modulesDir?: string;
  agentPath?: string;
  qemuBinary?: string;
  /**
   * (extension) Start from the machine's boot template instead of booting
   * the kernel (docs/boot-templates.md); false boots cold.
   * @default true (SUPERMACHINE_BOOT_TEMPLATE=0 makes it false)
   */
  bootTemplate?: boolean;
  /** (extension) User-space address randomization in the guest (see BuildOptions.aslr). @default true under KVM, false under TCG */
  aslr?: boolean;
}

type State = "ready" | "closing" | "closed" | "dead";

/**
 * How long the agent may stay silent while pinged before its VM is declared
 * dead. SUPERMACHINE_LIVENESS_MS overrides it. @default 60000
 */
export function livenessTimeoutMs(): number {
  const v = Number(process.env.SUPERMACHINE_LIVENESS_MS);
  return Number.isInteger(v) && v > 0 ? v : 60_000;
}

/** @internal How a VM's guest RAM is backed. */
export type RamBacking =
  /** Plain anonymous memory (Vm.boot). */
  | { kind: "anonymous" }
  /** A file in the runtime dir mapped shared: the file is the memory (bakes); `from`: a copy of that file to start with (a boot template's). */
  | { kind: "shared-file"; from?: string }
  /** A snapshot's RAM file mapped private: copy-on-write (restores). */
  | { kind: "snapshot"; path: string };

/** @internal What a VM was made from; recorded in snapshots taken of it. */
export interface VmOrigin {
  image: { ref: string; digest: string };
  config: GuestConfig;
  workload: WorkloadSpec | null;
  guestPort: number;
  listenerRequired: boolean;
  cacheDir: string;
}

/** @internal Everything needed to start (or restore) one VM. */
export interface LaunchSpec {
  id: string;
  accel: AcceleratorChoice;
  memoryMib: number;
  vcpus: number;
  kernel: string;
  initrd?: string;
  cmdline: string;
  rootfsImage?: string;
  ram: RamBacking;
  /** Restore: the device state to load (QEMU starts with -incoming). */
  incomingState?: string;
  hostname: string;
  /** Image environment/cwd/user to send; restores already have them. */
  config?: GuestConfig;
  bootTimeoutMs: number;
  signal?: AbortSignal;
  qemuBinary?: string;
  origin: VmOrigin;
  /** TCG's guest CPU model (a restore: its snapshot's). @default DEFAULT_TCG_CPU */
  cpuModel?: string;
  /** Attach the stream ring disk (src/agent-client/ring.ts); a restore: when its snapshot has one. */
  streamRing?: boolean;
  /**
   * The launch restores a boot template (boot-template.ts; `incomingState`
   * and `ram` are the template's): after the state load the agent gets
   * `line`, the kernel command line of this VM, and boots on.
   */
  template?: { line: string };
  /** Filled with the milliseconds each phase took (for benchmarks). */
  timings?: Record<string, number>;
  /**
   * Filled with the CPU milliseconds each phase (same names as `timings`)
   * cost QEMU with its confinement chain, and this Node process (for
   * benchmarks: bench/refill.ts). QEMU's figure for the first phase counts
   * from its process start, also when it was started ahead of time.
   */
  cpu?: Record<string, PhaseCpu>;
  /** The egress policy applied when the VM starts. @default public internet */
  network?: CompiledPolicy;
  /** The host network stack's unix socket (see QemuLaunch.netSocket); absent: no NIC. */
  netSocket?: string;
  /** Volumes and the writable layer (docs/volumes.md); the guest learns of them from the kernel command line at boot. */
  disks?: readonly DiskPlan[];
  /** Restore: the snapshot's image of each disk (each VM writes to an overlay of its own); absent: fresh empty filesystems. */
  diskBases?: readonly string[];
  /** Mounts registered with the agent once it answers (guestPath: mounted there). */
  mounts?: readonly ValidMount[];
}

/** @internal CPU milliseconds one launch phase cost (see LaunchSpec.cpu). */
export interface PhaseCpu {
  qemuMs: number;
  nodeMs: number;
}

/** @internal A QEMU process started for a LaunchSpec, not yet attached to. */
export interface StartedQemu {
  id: string;
  dir: string;
  qemu: QemuProcess;
  /** Connected when the spec restores a snapshot (QMP feeds the state). */
  qmp?: QmpClient;
  /** The VM's host-side network stack (QEMU is connected to it). */
  net: NetworkStack;
  /** The stream ring's file, when the VM has one. */
  ring?: string;
  /**
   * A QEMU a previous VM of the same snapshot ran in (Vm._recycle): stopped,
   * its QMP connected; the state goes in with `x-supermachine-reload`
   * instead of an incoming migration (docs/qemu-reuse.md).
   */
  reload?: boolean;
}

/**
 * @internal Whether QEMU processes are reused from one VM to the next of
 * the same snapshot (docs/qemu-reuse.md): under TCG, with a QEMU that has
 * `x-supermachine-reload`. SUPERMACHINE_REUSE_QEMU=0 turns it off.
 */
export function reuseQemuFor(accel: "kvm" | "tcg", env: NodeJS.ProcessEnv = process.env): boolean {
  return accel === "tcg" && env.SUPERMACHINE_REUSE_QEMU !== "0";
}

/** Per QEMU binary: its QMP commands (asked once; the answer replaces the question). */
const qmpCommands = new Map<string, ReadonlySet<string> | Promise<ReadonlySet<string>>>();

async function hasCommand(binary: string, qmp: QmpClient, name: string): Promise<boolean> {
  let v = qmpCommands.get(binary);
  if (v === undefined) {
    const asked = qmp.execute<{ name: string }[]>("query-commands").then(
      (cmds) => new Set(cmds.map((c) => c.name)),
      () => new Set<string>(),
    );
    qmpCommands.set(binary, asked);
    void asked.then((known) => qmpCommands.set(binary, known));
    v = asked;
  }
  return (await v).has(name);
}

const hasReload = (binary: string, qmp: QmpClient) => hasCommand(binary, qmp, RELOAD_COMMAND);

/** Whether `binary` is known (already asked) to lack the QMP command `name`. */
function knownWithout(binary: string, name: string): boolean {
  const v = qmpCommands.get(binary);
  return v !== undefined && !(v instanceof Promise) && !v.has(name);
}

/**
 * A fresh restore's pretranslation (src/vmm/pretranslate.ts): under TCG,
 * when the snapshot has a hints file and QEMU the command. Never fails the
 * restore: without it the guest only translates for itself. Resolves to
 * the list's label ("" without one), or false when nothing started.
 */
async function startPretranslation(spec: LaunchSpec, s: StartedQemu, qmp: QmpClient): Promise<string | false> {
  if (spec.accel.accel !== "tcg" || !spec.incomingState || process.env.SUPERMACHINE_PRETRANSLATE === "0") return false;
  const file = tbHintsPath(spec.incomingState);
  const [hints, label] = await Promise.all([readTbHints(file), readTbHintsLabel(file)]);
  if (!hints || !(await hasCommand(s.qemu.binary, qmp, PRETRANSLATE_COMMAND))) return false;
  try {
    await pretranslate(qmp, s.dir, hints);
  } catch {
    return false;
  }
  // Best effort, and nothing waits for it.
  if (s.qemu.pid !== undefined) void deprioritizePretranslator(s.qemu.pid);
  return label ?? "";
}

/** Throws the start's AbortError once `signal` has aborted. */
function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AbortError("VM start aborted", { cause: signal.reason });
}

/**
 * Kills `q` when `signal` aborts (at once if it has), so that whatever the
 * start waits for (QMP's greeting, a state load, the agent) fails now, not
 * when it is over: a pool's shutdown waits for its restores. Returns the undo.
 */
function killOnAbort(signal: AbortSignal | undefined, q: QemuProcess): () => void {
  if (!signal) return () => undefined;
  const kill = () => q.kill("SIGKILL");
  signal.addEventListener("abort", kill, { once: true });
  if (signal.aborted) kill();
  return () => signal.removeEventListener("abort", kill);
}

/**
 * @internal Starts the QEMU process of `spec` (and, for a restore, its QMP
 * connection), ready for {@link launchVm}. Pools start one ahead of need.
 */
export async function startQemu(spec: LaunchSpec): Promise<StartedQemu> {
  throwIfAborted(spec.signal);
  const dir = createRuntimeDir();
  let qemu: QemuProcess | undefined;
  let net: NetworkStack | undefined;
  let unwatch: (() => void) | undefined;
  try {
    net = await NetworkStack.listen(join(dir, "net.sock"), { policy: spec.network ?? compilePolicy(true) });
    const disks: QemuDisk[] = spec.disks?.length ? await prepareDisks(dir, spec.disks, spec.diskBases) : [];
    const ring = spec.streamRing ? ringDisk(dir) : undefined;
    if (ring) disks.push(ring);
    // Sparse: a template's RAM is mostly untouched pages.
    if (spec.ram.kind === "shared-file" && spec.ram.from) await sparseCopy(spec.ram.from, join(dir, "ram"));
    const memoryFile =
      spec.ram.kind === "shared-file"
        ? { path: join(dir, "ram"), share: true }
        : spec.ram.kind === "snapshot"
          ? { path: spec.ram.path, share: false }
          : undefined;
    qemu = await QemuProcess.start({
      ...(spec.qemuBinary ? { qemuBinary: spec.qemuBinary } : {}),
      accel: spec.accel.accel,
      memoryMib: spec.memoryMib,
      vcpus: spec.vcpus,
      kernel: spec.kernel,
      ...(spec.initrd ? { initrd: spec.initrd } : {}),
      cmdline: spec.cmdline,
      ...(spec.rootfsImage ? { rootfs: spec.rootfsImage } : {}),
      ...(disks.length ? { disks } : {}),
      ...(memoryFile ? { memoryFile } : {}),
      ...(spec.incomingState ? { incoming: true } : {}),
      dir,
      // Every VM has a NIC on its own stack (a test may put its own peer there).
      netSocket: spec.netSocket ?? join(dir, "net.sock"),
      name: `sm-${spec.id}`,
      ...(spec.cpuModel ? { cpuModel: spec.cpuModel } : {}),
    });
    // Until launchVm watches the signal itself.
    unwatch = killOnAbort(spec.signal, qemu);
    const qmp = spec.incomingState ? await connectQmp(qemu, Date.now() + spec.bootTimeoutMs) : undefined;
    return { id: spec.id, dir, qemu, net, ...(qmp ? { qmp } : {}), ...(ring ? { ring: ring.file } : {}) };
  } catch (e) {
    net?.close();
    if (qemu) await qemu.stop();
    await removeRuntimeDir(dir);
    throwIfAborted(spec.signal);
    throw e;
  } finally {
    unwatch?.();
  }
}

/** @internal Stops a started QEMU that was never attached to. */
export async function discardQemu(s: StartedQemu): Promise<void> {
  s.qmp?.close();
  s.net.close();
  await s.qemu.stop();
  await removeRuntimeDir(s.dir);
}

/**
 * @internal Starts QEMU for `spec` (or takes `started`), loads the snapshot
 * state for a restore, connects to the agent, configures the guest.
 */
export async function launchVm(spec: LaunchSpec, started?: StartedQemu): Promise<Vm> {
  let mark = performance.now();
  const started0 = mark;
  // CPU sampling only when a benchmark asks (it reads /proc).
  let nodeMark = spec.cpu ? process.cpuUsage() : undefined;
  // A reused QEMU's earlier VMs are not this one's cost.
  let qemuMark = spec.cpu && started?.reload ? started.qemu.cpuTimeMs() : 0;
  let s: StartedQemu | undefined;
  const phase = (name: string) => {
    const now = performance.now();
    if (spec.timings) spec.timings[name] = now - mark;
    mark = now;
    if (spec.cpu && nodeMark && s) {
      const node = process.cpuUsage(nodeMark);
      const qemuNow = s.qemu.cpuTimeMs();
      spec.cpu[name] = { qemuMs: qemuNow - qemuMark, nodeMs: (node.user + node.system) / 1000 };
      qemuMark = qemuNow;
      nodeMark = process.cpuUsage();
    }
  };
  s = started ?? (await startQemu(spec));
  s.net.setPolicy(spec.network ?? compilePolicy(true));
  phase("qemu");
  const { dir, qemu: q, qmp } = s;
  let pretranslating: Promise<string | false> | undefined;
  const unwatch = killOnAbort(spec.signal, q);
  try {
    throwIfAborted(spec.signal);
    const deadline = Date.now() + spec.bootTimeoutMs;
    if (spec.incomingState) {
      if (!qmp) throw new QemuError("a restore needs its QMP connection");
      if (s.reload) {
        await reloadState(qmp, dir, spec.incomingState, { timeoutMs: Math.max(1, deadline - Date.now()) });
        // QEMU wrote the previous guest's last frames before it answered; the
        // rest of this poll phase reads them (into the muted stack) first.
        await new Promise((r) => setImmediate(r));
        s.net.unmute();
      } else await loadState(qmp, dir, spec.incomingState, { ignoreShared: true, timeoutMs: Math.max(1, deadline - Date.now()) });
      const st = await qmp.execute<{ status?: string }>("query-status");
      if (st.status !== "running") await qmp.execute("cont");
      if (!s.reload) pretranslating = startPretranslation(spec, s, qmp);
      phase("loadState");
      if (spec.template) {
        // The root image's size: the guest mounts it as a partition of the
        // template's placeholder disk (docs/boot-templates.md). Without it
        // (@internal SUPERMACHINE_TEMPLATE_ROOTSIZE=0, for the test of that
        // path) the guest probes the disk again, as an older host has it do.
        const rootSize = spec.rootfsImage && process.env.SUPERMACHINE_TEMPLATE_ROOTSIZE !== "0" ? (await stat(spec.rootfsImage)).size : 0;
        await continueFromTemplate(q, rootSize > 0 ? `${spec.template.line} sm.rootsize=${rootSize}` : spec.template.line, deadline);
        phase("template");
      }
    }
    const conn = await AgentConnection.connect(q.agentSocket, {
      timeoutMs: Math.max(1, deadline - Date.now()),
      gone: q.exitSignal,
      ...(spec.signal ? { signal: spec.signal } : {}),
    }).catch((e: unknown) => {
      if (e instanceof ClosedError) throw new GuestDiedError(`the VM did not ${spec.incomingState ? "resume" : "boot"}: ${e.message}`, q.consoleTail(), { cause: e });
      if (e instanceof TimeoutError) throw new TimeoutError(`${e.message}\n--- guest console (tail) ---\n${q.consoleTail()}`, e.timeoutMs, { cause: e });
      throw e;
    });
    phase("agent");
    if (conn.info?.bootError) {
      conn.destroy(new ClosedError("boot failed"));
      throw new GuestDiedError(`the guest failed to boot: ${conn.info.bootError}`, q.consoleTail());
    }
    // @internal SUPERMACHINE_STREAM_RING=0: frames only (for benchmarks comparing both).
    if (s.ring && process.env.SUPERMACHINE_STREAM_RING !== "0" && conn.info?.features.includes("ring")) conn._attachRing(StreamRing.open(s.ring));
    const vm = new Vm({
      // A reused QEMU's VM is a new VM: a name of its own.
      id: s.reload ? spec.id : s.id,
      accel: spec.accel.accel,
      reason: spec.accel.reason,
      memoryMib: spec.memoryMib,
      vcpus: spec.vcpus,
      qemu: q,
      conn,
      runtimeDir: dir,
      ram: spec.ram,
      launch: spec,
      net: s.net,
    });
    if (qmp) vm._adoptQmp(qmp);
    if (s.reload) vm._reloaded = true;
    if (pretranslating) vm._pretranslatedBy = pretranslating.then((l) => (l === false ? undefined : l));
    await vm.configure({
      hostname: spec.hostname,
      ...(spec.config ? { config: spec.config } : {}),
      // A test that puts its own peer on the NIC configures the guest itself.
      ...(spec.netSocket === undefined ? { net: guestNetConfig() } : {}),
    });
    phase("configure");
    trace(channels.vmStart, { id: s.id, how: spec.incomingState && !spec.template ? "restore" : "boot", ...(spec.template ? { template: true } : {}), accel: spec.accel.accel, ms: Math.round(performance.now() - started0), ...(spec.timings ? { phases: spec.timings } : {}) });
    if (spec.mounts?.length) {
      try {
        await vm._attachMounts(spec.mounts);
      } catch (e) {
        await vm._closeMounts();
        conn.destroy(new ClosedError("the VM's mounts could not be attached"));
        throw e;
      }
      phase("mounts");
    }
    return vm;
  } catch (e) {
    await discardQemu(s);
    throwIfAborted(spec.signal);
    throw e;
  } finally {
    unwatch();
  }
}

const HOSTNAME_RE = /^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$/;

function positiveInt(v: unknown, name: string, dflt: number, max: number): number {
  if (v === undefined) return dflt;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > max) throw invalidOption(name, `an integer in 1..${max}`, v);
  return v;
}

function guestPath(p: unknown, name: string): Buffer {
  if (typeof p !== "string" || !p.startsWith("/") || p.includes("\0")) throw invalidOption(name, "an absolute guest path", p);
  return Buffer.from(p, "utf8");
}

/** Turns an agent ERROR for a file operation into the right typed error. */
function fileError(e: unknown, path: string): unknown {
  if (e instanceof AgentError && e.agentCode === WireError.TOO_LARGE) {
    const m = /is (\d+) bytes/.exec(e.message);
    return new FileTooLargeError(`${path}: ${e.message} (the readFile/writeFile limit is 4 MiB)`, m ? Number(m[1]) : -1, FILE_LIMIT, { cause: e });
  }
  return e;
}

export class Vm {
  readonly id: string;
  /** The accelerator this VM runs on. */
  readonly accelerator: Accelerator;
  /** Why that accelerator was chosen. */
  readonly acceleratorReason: string;
  readonly memoryMib: number;
  readonly vcpus: number;
  /** @internal */ readonly qemu: QemuProcess;
  /** @internal */ readonly conn: AgentConnection;
  /** @internal */ readonly runtimeDir: string;
  /** @internal How guest RAM is backed (decides how a snapshot is taken). */
  readonly ram: RamBacking;
  /** @internal The launch this VM came from (reused to rebuild it elsewhere). */
  readonly launch: LaunchSpec;
  /**
   * @internal Restored into a reused QEMU process (qemu-reuse.md), whose
   * translations of the snapshot's code the earlier VMs left warm.
   */
  _reloaded = false;
  /** @internal The label of the block key list this fresh restore's QEMU got to pretranslate ("" without one; src/vmm/pretranslate.ts), undefined without a list. */
  _pretranslatedBy: Promise<string | undefined> = Promise.resolve(undefined);
  /** @internal Whether this fresh restore's QEMU got the snapshot's block keys to pretranslate. */
  get _pretranslated(): Promise<boolean> {
    return this._pretranslatedBy.then((l) => l !== undefined);
  }
  private qmpClient: Promise<QmpClient> | undefined;
  /** Set while paused by _pause(): restarts the liveness check. */
  private pausedLiveness: (() => void) | undefined;
  private state: State = "ready";
  private deathError: SupermachineError | undefined;
  private inflight = 0;
  private idleWaiters: (() => void)[] = [];
  private forwarders = new Set<TcpForwarder>();
  /** @internal The VM's host-side network stack. */
  readonly net: NetworkStack;
  /** Processes started with spawn() that have not ended. */
  private children = new Set<ExecChild>();
  /** The execPath socket, once asked for. */
  private proxy: ExecProxy | undefined;
  private logRing: LogRing | undefined;
  private closing: Promise<void> | undefined;
  /** Mounts registered with the agent. */
  private mounts: MountAttachment[] = [];
  /** @internal Called once when the guest dies on its own. */
  _onDeath: ((vm: Vm, err: SupermachineError) => void) | undefined;

  /** @internal */
  constructor(p: {
    id: string;
    accel: Accelerator;
    reason: string;
    memoryMib: number;
    vcpus: number;
    qemu: QemuProcess;
    conn: AgentConnection;
    runtimeDir: string;
    ram: RamBacking;
    launch: LaunchSpec;
    net: NetworkStack;
  }) {
    this.net = p.net;
    this.id = p.id;
    this.accelerator = p.accel;
    this.acceleratorReason = p.reason;
    this.memoryMib = p.memoryMib;
    this.vcpus = p.vcpus;
    this.qemu = p.qemu;
    this.conn = p.conn;
    this.runtimeDir = p.runtimeDir;
    this.ram = p.ram;
    this.launch = p.launch;
    // At once: the connection fails its pending requests with what died() gives it.
    p.conn.onFatal = (err) => this.died(err);
    p.qemu.onDeviceError = (msg) => this.died(new GuestDiedError(`the VM ${this.id} stopped: QEMU disabled a device the guest misused (${msg})`, this.qemu.consoleTail()));
    p.conn.startLiveness(livenessTimeoutMs(), (e) => this.died(new GuestDiedError(`the VM ${this.id} stopped: ${e.message}`, this.qemu.consoleTail())));
    this.onQemuExit = () => {
      const ex = this.qemu.exitStatus;
      if (this.state === "ready" || this.state === "closing") {
        this.died(new GuestDiedError(`the VM ${this.id} stopped: QEMU exited (${ex?.signal ?? `code ${ex?.code}`})`, this.qemu.consoleTail()));
      }
    };
    if (p.qemu.exitSignal.aborted) queueMicrotask(this.onQemuExit);
    else p.qemu.exitSignal.addEventListener("abort", this.onQemuExit, { once: true });
  }

  /** Reports QEMU's exit while this VM has it (removed when the QEMU goes to the next VM). */
  private readonly onQemuExit: () => void;

  /**
   * Boots a VM from a root filesystem directory or image: QEMU microvm, our
   * kernel and initramfs, the agent as PID 1.
   */
  static async boot(o: VmBootOptions = {}): Promise<Vm> {
    assertSupportedHost();
    if (typeof o !== "object" || o === null) throw invalidOption("options", "an object", o);
    const memoryMib = positiveInt(o.memoryMib, "memoryMib", 256, 1 << 20);
    const vcpus = positiveInt(o.vcpus, "vcpus", 1, 64);
    if (o.hostname !== undefined && (typeof o.hostname !== "string" || !HOSTNAME_RE.test(o.hostname))) {
      throw invalidOption("hostname", "a hostname (letters, digits, '.', '-')", o.hostname);
    }
    if (o.rootfs !== undefined && o.rootfsImage !== undefined) throw invalidOption("rootfs", "either rootfs or rootfsImage, not both", o.rootfs);
    const network = compilePolicy(o.network);
    const mounts = validateMounts(o.mounts);
    await checkHostPaths(mounts);
    const choice = chooseAccelerator(o.accel);
    warnTcgOnce(choice);
    const bootTimeoutMs = positiveInt(o.bootTimeoutMs, "bootTimeoutMs", choice.accel === "tcg" ? 120_000 : 30_000, 3_600_000);
    const cacheDir = o.cacheDir ?? defaultCacheDir();
    const assets = await bootAssets({
      cacheDir,
      ...(o.kernel ? { kernel: o.kernel } : {}),
      ...(o.modulesDir ? { modulesDir: o.modulesDir } : {}),
      ...(o.agentPath ? { agentPath: o.agentPath } : {}),
    });
    const rootfsImage = o.rootfs !== undefined ? await directoryImage(o.rootfs, cacheDir, o.signal ? { signal: o.signal } : {}) : o.rootfsImage;
    const id = randomBytes(4).toString("hex");
    const hostname = o.hostname ?? `sm-${id}`;
    const config = o.config ?? {};
    const cpuModel = choice.accel === "tcg" ? tcgCpuModel() : undefined;
    if (o.bootTemplate !== undefined && typeof o.bootTemplate !== "boolean") throw invalidOption("bootTemplate", "a boolean", o.bootTemplate);
    if (o.aslr !== undefined && typeof o.aslr !== "boolean") throw invalidOption("aslr", "a boolean", o.aslr);
    // A VM with a root filesystem starts from the boot template (its RAM
    // mapped copy-on-write) instead of booting.
    const boot = await coldBootLaunch({
      template: { accel: choice.accel, memoryMib, vcpus, kernel: assets.kernel, initrd: assets.initrd, ...(cpuModel ? { cpuModel } : {}), ...(o.qemuBinary ? { qemuBinary: o.qemuBinary } : {}), cacheDir, timeoutMs: bootTimeoutMs },
      cmdline: kernelCmdline({ accel: choice.accel, hostname, hasRootfs: rootfsImage !== undefined, aslr: o.aslr ?? defaultAslr(choice.accel) }),
      ram: "anonymous",
      useTemplate: rootfsImage !== undefined && o.bootTemplate !== false,
      ...(o.signal ? { signal: o.signal } : {}),
    });
    return launchVm({
      id,
      accel: choice,
      memoryMib,
      vcpus,
      ...boot,
      ...(cpuModel ? { cpuModel } : {}),
      streamRing: true,
      ...(rootfsImage ? { rootfsImage } : {}),
      hostname,
      config,
      bootTimeoutMs,
      network,
      mounts,
      ...(o.signal ? { signal: o.signal } : {}),
      ...(o.qemuBinary ? { qemuBinary: o.qemuBinary } : {}),
      origin: {
        image: { ref: o.rootfs !== undefined ? `dir:${o.rootfs}` : `rootfs:${rootfsImage ?? "none"}`, digest: "" },
        config,
        workload: null,
        guestPort: 80,
        listenerRequired: false,
        cacheDir,
      },
    });
  }

  /**
   * @internal Sends CONFIGURE: identity, clock, entropy, image config, and
   * the guest's network (`net`; the agent applies it idempotently, so it is
   * sent again after every restore). `identity`: `true` (default) sends a
   * new clock, entropy, machine-id and boot_id; `"reseed"` only the clock
   * and entropy (a VM that runs on after a snapshot keeps its identity);
   * `false` none. Every successful CONFIGURE also continues the processes
   * the agent stopped for a snapshot (docs/snapshots.md).
   */
  async configure(p: { hostname?: string; config?: GuestConfig; identity?: boolean | "reseed"; net?: GuestNetConfig }): Promise<string> {
    const r = new RecordBuilder();
    if (p.net !== undefined) {
      encodeNetConfig(r, p.net);
      if (!this.conn.info?.features.includes("net")) {
        throw new AgentError(WireError.UNSUPPORTED, `the guest agent ${this.conn.info?.agentVersion ?? "?"} cannot configure a network (no "net" feature): rebuild the agent`);
      }
    }
    for (const e of p.config?.env ?? []) r.bytes(Tag.CONFIGURE.env, e);
    if (p.config?.workingDir) r.bytes(Tag.CONFIGURE.cwd, p.config.workingDir);
    if (p.config?.user) r.bytes(Tag.CONFIGURE.user, p.config.user);
    if (p.hostname) r.bytes(Tag.CONFIGURE.hostname, p.hostname);
    if (p.identity !== false) {
      r.u64(Tag.CONFIGURE.time_ns, BigInt(Date.now()) * 1_000_000n);
      r.bytes(Tag.CONFIGURE.entropy, randomBytes(64));
    }
    if (p.identity === undefined || p.identity === true) {
      r.bytes(Tag.CONFIGURE.machine_id, randomBytes(16).toString("hex"));
      r.bytes(Tag.CONFIGURE.boot_id, randomUUID());
    }
    const ok = await this.conn.request(MsgType.CONFIGURE, r);
    return (ok.str(Tag.CONFIGURE_OK.boot_id, 64) ?? "").replace(/[^0-9a-f-]/g, "");
  }

  /**
   * @internal Registers mounts with the agent (each mounted at its
   * guestPath, when it has one). On failure the ones attached stay (the
   * caller destroys the VM).
   */
  async _attachMounts(list: readonly ValidMount[]): Promise<void> {
    for (const m of list) this.mounts.push(await MountAttachment.attach(this.conn, m, m.guestPath));
  }

  /**
   * @internal Detaches every mount (before a snapshot): unmounted in the
   * guest, host servers closed. Returns them with guestPath = where each
   * was mounted, for {@link _attachMounts} after the snapshot and in every
   * restored VM.
   */
  async _detachMounts(): Promise<ValidMount[]> {
    const all = this.mounts;
    this.mounts = [];
    const out: ValidMount[] = [];
    try {
      for (const a of all) {
        const at = await a.detach();
        const { guestPath: _g, ...rest } = a.spec;
        out.push({ ...rest, ...(at !== undefined ? { guestPath: at } : {}) });
      }
    } catch (e) {
      // No snapshot without every mount detached; the host servers close.
      await Promise.all(all.map((a) => a.close()));
      throw e;
    }
    return out;
  }

  /** @internal Closes the host servers of every mount (the VM is going away). */
  async _closeMounts(): Promise<void> {
    const mounts = this.mounts;
    this.mounts = [];
    await Promise.all(mounts.map((m) => m.close()));
  }

  /**
   * @internal Stops the guest's vCPUs (QMP `stop`): a VM waiting idle in a
   * pool then costs no CPU (docs/performance.md). The liveness check waits
   * until {@link Vm._resume}.
   */
  async _pause(): Promise<void> {
    // A capture's closing CONFIGURE answered first: a request left waiting
    // on a stopped guest would hold the event loop (the bake's VM is stopped
    // right after its capture).
    if (this.captureSettling) await this.captureSettling;
    const resumeLiveness = this.conn.pauseLiveness();
    try {
      await (await this.qmp()).execute("stop");
    } catch (e) {
      resumeLiveness();
      throw e;
    }
    this.pausedLiveness = resumeLiveness;
  }

  /** The closing CONFIGURE of a capture (src/snapshot/capture.ts), until it is answered. */
  private captureSettling: Promise<void> | undefined;

  /** @internal A capture's closing CONFIGURE, sent without waiting for its answer: _pause() waits for it. */
  _afterCapture(settled: Promise<void>): void {
    this.captureSettling = settled;
    void settled.then(() => {
      if (this.captureSettling === settled) this.captureSettling = undefined;
    });
  }

  /**
   * @internal Continues a VM stopped by {@link Vm._pause}, and sets the
   * guest's clock: under emulation it stood still while the VM was stopped.
   */
  async _resume(): Promise<void> {
    await (await this.qmp()).execute("cont");
    this.pausedLiveness?.();
    this.pausedLiveness = undefined;
    const r = new RecordBuilder();
    r.u64(Tag.CONFIGURE.time_ns, BigInt(Date.now()) * 1_000_000n);
    await this.conn.request(MsgType.CONFIGURE, r);
  }

  /** @internal */
  _adoptQmp(q: QmpClient): void {
    this.qmpClient = Promise.resolve(q);
  }

  /** @internal The QMP connection, opened on first use. */
  qmp(): Promise<QmpClient> {
    this.qmpClient ??= QmpClient.connect(this.qemu.qmpSocket);
    this.qmpClient.catch(() => (this.qmpClient = undefined));
    return this.qmpClient;
  }

  /**
   * @internal Under TCG, a fresh restore writes the keys of the blocks its
   * QEMU translated so far into the snapshot's hints file
   * (src/vmm/pretranslate.ts), unless there is one. A pool calls this after
   * a VM's prewarm, with its prewarm's `label`: then only a list with that
   * label stays, and a VM pretranslated from another list records what
   * its QEMU has made by then (its own blocks and the thread's). Returns the key count, or 0 when
   * nothing was written.
   */
  async _recordTbHints(label?: string): Promise<number> {
    const l = this.launch;
    if (this.accelerator !== "tcg" || this._reloaded || !l.incomingState || (l.template && label !== undefined) || process.env.SUPERMACHINE_PRETRANSLATE === "0") return 0;
    const file = tbHintsPath(l.incomingState);
    if (label === undefined) {
      if (await this._pretranslated) return 0;
      // A usable list stays; one that is not (corrupt, someone else's) is replaced.
      if (await readTbHints(file)) return 0;
    } else {
      if ((await this._pretranslatedBy) === label) return 0;
      if ((await readTbHintsLabel(file)) === label && (await readTbHints(file))) return 0;
    }
    const qmp = await this.qmp();
    if (!(await hasCommand(this.qemu.binary, qmp, TB_HINTS_SAVE_COMMAND))) return 0;
    return saveTbHints(qmp, this.runtimeDir, file, label);
  }

  /** The image, config and workload this VM was made from. */
  get origin(): VmOrigin {
    return this.launch.origin;
  }

  /** QEMU's pid (for diagnostics). */
  get pid(): number | undefined {
    return this.qemu.pid;
  }

  /**
   * Escape hatch for a bring-your-own client: a unix socket on which a client
   * speaking docs/protocol.md (HELLO, then EXEC, file and TCP streams, PING)
   * gets a session of its own, concurrently with this Vm's. The same socket
   * as {@link execPath} (here one channel carries everything). Created on
   * first use; it goes away with the VM, and when a pooled VM changes hands.
   */
  get vsockPath(): string {
    return this.execPath;
  }

  /** Escape hatch: the bring-your-own-client socket (see {@link vsockPath}). */
  get execPath(): string {
    this.ensureUsable();
    this.proxy ??= new ExecProxy(this.conn, this.runtimeDir);
    return this.proxy.path;
  }

  /**
   * The VM's network: counters (`stats()`) and a `"denied"` event for every
   * connection, datagram or DNS name the policy refused.
   * See docs/network.md.
   */
  get network(): VmNetwork {
    return this.net;
  }

  /**
   * Replaces the VM's egress policy. New connections follow it at once;
   * open connections it no longer allows are reset. `false` cuts the VM off
   * (DNS fails too); `true` is the public internet.
   */
  async setNetwork(policy: NetworkOption): Promise<void> {
    this.ensureUsable();
    this.net.setPolicy(compilePolicy(policy, "setNetwork(policy)"));
  }

  /** Version of the guest agent, from the handshake. */
  get agentVersion(): string {
    return this.conn.info?.agentVersion ?? "?";
  }

  /** "ready", "closing", "closed" or "dead". */
  get status(): State {
    return this.state;
  }

  /** The last lines printed by the guest console and QEMU. */
  consoleTail(maxBytes = 4096): string {
    return this.qemu.consoleTail(maxBytes);
  }

  /**
   * The VM's logs: the output of the workload (the image's ENTRYPOINT + CMD,
   * started by the image) and of guest processes that no exec or spawn
   * reads any more (a server a warmup started with `vm.spawn` and left
   * running: in the VMs of the image its ExecChild is gone; a background
   * child of a finished exec), as a Readable (object mode) of
   * {@link LogEntry} labelled with pid and stream. Starts with what the
   * agent and the host still hold (the guest keeps the newest 256 KiB while
   * nobody reads, the workload's start-up lines from before the snapshot
   * included; the host the newest {@link LOG_BUFFER_BYTES} per VM;
   * `droppedBytes` counts what was lost). Each call gives a new reader;
   * every reader ends when the VM ends or goes back to its pool. Reading
   * does not hold the event loop open. Output of processes started by
   * exec/spawn on this Vm goes to them, not here. With `console: true` the
   * guest's serial console (kernel messages) is in it too. See docs/logs.md.
   */
  logs(options: LogsOptions = {}): LogReader {
    if (typeof options !== "object" || options === null) throw invalidOption("options", "an object such as { console: true }", options);
    if (options.console !== undefined && typeof options.console !== "boolean") throw invalidOption("console", "a boolean", options.console);
    this.ensureUsable();
    if (!this.hasLogs) {
      throw new AgentError(
        WireError.UNSUPPORTED,
        `the guest agent of VM ${this.id} (version ${this.agentVersion}) has no log stream (agent feature "logs"): the image was baked with an older supermachine; rebuild it (Image.build with a new warmupTag, or remove the snapshot)`,
      );
    }
    if (!this.logRing || this.logRing.done) {
      this.logRing = new LogRing(this.conn.logs());
      this.qemu.onConsole = undefined;
    }
    const ring = this.logRing;
    // The console goes into the ring only once a reader asked for it.
    if (options.console === true) this.qemu.onConsole ??= (chunk) => ring._pushConsole(chunk);
    return ring.reader(options.console === true);
  }

  private died(err: Error): void {
    if (this.state === "closed" || this.state === "dead") return;
    const e =
      err instanceof SupermachineError && !(err instanceof ClosedError)
        ? err
        : new GuestDiedError(`the VM ${this.id} stopped: ${err.message}`, this.qemu.consoleTail(), { cause: err });
    this.state = "dead";
    this.deathError = e;
    trace(channels.vmDeath, { id: this.id, code: e.code, message: e.message.split("\n")[0] });
    this.proxy?.close();
    this.conn.destroy(e);
    void this._closeMounts();
    void this.qmpClient?.then((q) => q.close(), () => undefined);
    this.qemu.kill("SIGKILL");
    this.net.close();
    for (const f of this.forwarders) f.destroy();
    this.forwarders.clear();
    void this.qemu.exited.then(() => removeRuntimeDir(this.runtimeDir));
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
    this._onDeath?.(this, e);
  }

  /** @internal Throws when the VM cannot take new work. */
  ensureUsable(): void {
    if (this.state === "ready") return;
    if (this.state === "dead") throw this.deathError!;
    throw new ClosedError(`the VM ${this.id} is ${this.state}; acquire or boot a new one`);
  }

  private async track<T>(f: () => Promise<T>): Promise<T> {
    this.ensureUsable();
    this.inflight++;
    try {
      return await f();
    } catch (e) {
      // Operations cut short by the VM dying report why it died.
      if (this.state === "dead" && e instanceof ClosedError) throw this.deathError!;
      throw e;
    } finally {
      this.inflight--;
      if (this.inflight === 0) {
        const w = this.idleWaiters;
        this.idleWaiters = [];
        for (const f of w) f();
      }
    }
  }

  private async stage(files: ValidExec["files"]): Promise<void> {
    await Promise.all(files.map((f) => this.conn.writeFile(f.path, f.data, f.mode, true).catch((e: unknown) => {
      throw fileError(e, Buffer.from(f.path).toString("utf8"));
    })));
  }

  private startExec(v: ValidExec, spawn: boolean): ExecStream {
    return this.conn.exec({
      argv: v.argv,
      env: v.env,
      ...(v.cwd ? { cwd: v.cwd } : {}),
      ...(v.timeoutMs ? { timeoutMs: v.timeoutMs } : {}),
      ...(v.chain ? { chain: v.chain } : {}),
      ...(v.tty ? { tty: v.tty } : {}),
      ...(v.user ? { user: v.user } : {}),
      stdin: spawn,
      reportStarted: spawn,
      cgroup: v.isolateTree ?? spawn,
    });
  }

  /** Runs a command to completion and collects its output (byte-exact). */
  exec(options: ExecOptions): Promise<ExecOutput> {
    let v: ValidExec;
    try {
      v = validateExec(options, DEFAULT_EXEC_TIMEOUT_MS);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.track(async () => {
      if (v.signal?.aborted) throw new AbortError("exec aborted before it started", { cause: v.signal.reason });
      await this.stage(v.files);
      const s = this.startExec(v, false);
      const collected = collectOutput(s, v.maxOutputBytes);
      const timers: NodeJS.Timeout[] = [];
      let onAbort: (() => void) | undefined;
      try {
        const guard = new Promise<never>((_, reject) => {
          if (v.timeoutMs) {
            // The agent enforces timeoutMs; this is the host's safety net
            // for an agent that stopped answering.
            timers.push(setTimeout(() => s.cancel(), v.timeoutMs + 10_000));
            timers.push(
              setTimeout(
                () => reject(new TimeoutError(`exec ${JSON.stringify(String(options.argv[0]))} did not end ${v.timeoutMs + 30_000} ms after it started; the guest agent is not answering`, v.timeoutMs)),
                v.timeoutMs + 30_000,
              ),
            );
          }
          if (v.signal) {
            onAbort = () => {
              s.cancel();
              reject(new AbortError("exec aborted", { cause: v.signal!.reason }));
            };
            v.signal.addEventListener("abort", onAbort, { once: true });
          }
        });
        guard.catch(() => undefined);
        const exit = await Promise.race([s.exit, guard]).catch((e: unknown) => {
          // Timed out or aborted: forget the stream (late frames drop).
          s.abandon(e instanceof Error ? e : new Error(String(e)));
          throw e;
        });
        const stdout = collected.stdout();
        const stderr = collected.stderr();
        if (collected.overLimit) {
          throw new OutputLimitError(
            `exec output exceeded maxOutputBytes (${v.maxOutputBytes} bytes); the process was killed. Raise maxOutputBytes or use spawn() to stream`,
            stdout,
            stderr,
            v.maxOutputBytes,
          );
        }
        return { stdout, stderr, exitCode: exit.exitCode, timedOut: exit.timedOut, peakRssKib: exit.peakRssKib, signal: exit.signal };
      } finally {
        for (const t of timers) clearTimeout(t);
        if (onAbort) v.signal?.removeEventListener("abort", onAbort);
      }
    });
  }

  /** Starts a process and streams its I/O (see ExecChild). */
  spawn(options: ExecOptions): Promise<ExecChild> {
    let v: ValidExec;
    try {
      v = validateExec(options, 0);
    } catch (e) {
      return Promise.reject(e);
    }
    this.ensureUsable();
    this.inflight++;
    let settled = false;
    const done = () => {
      if (settled) return;
      settled = true;
      this.inflight--;
      if (this.inflight === 0) {
        const w = this.idleWaiters;
        this.idleWaiters = [];
        for (const f of w) f();
      }
    };
    return (async () => {
      try {
        if (v.signal?.aborted) throw new AbortError("spawn aborted before it started", { cause: v.signal.reason });
        await this.stage(v.files);
        const s = this.startExec(v, true);
        if (v.signal) {
          const onAbort = () => s.cancel();
          v.signal.addEventListener("abort", onAbort, { once: true });
          s.exit.finally(() => v.signal!.removeEventListener("abort", onAbort)).catch(() => undefined);
        }
        // Output can arrive in the same socket read as STARTED, before the
        // await below resumes: the child takes it from the start.
        const child = new ExecChild(s, 0, () => (this.state === "dead" ? this.deathError : undefined));
        const pid = await s.started.catch(async (e: unknown) => {
          // A program that could not start still "ran": 127/126 via EXIT.
          if (e instanceof ClosedError) return 0;
          throw e;
        });
        child._setPid(pid);
        // A started process is not an operation close() waits for (a server
        // would keep the VM open forever): closing the VM ends it.
        done();
        this.children.add(child);
        void child._settled.then(() => this.children.delete(child));
        return child;
      } catch (e) {
        done();
        if (this.state === "dead" && e instanceof ClosedError) throw this.deathError!;
        throw e;
      }
    })();
  }

  /** Writes a file in the guest (≤ 4 MiB; parent directories are created). */
  writeFile(path: string, bytes: Uint8Array): Promise<void> {
    let p: Buffer;
    try {
      p = guestPath(path, "path");
      if (!(bytes instanceof Uint8Array)) throw invalidOption("bytes", "a Buffer or Uint8Array", bytes);
      if (bytes.length > FILE_LIMIT) {
        throw new FileTooLargeError(`writeFile ${path}: ${bytes.length} bytes is over the ${FILE_LIMIT}-byte (4 MiB) limit; write a smaller file or split it`, bytes.length, FILE_LIMIT);
      }
    } catch (e) {
      return Promise.reject(e);
    }
    return this.track(() => this.conn.writeFile(p, bytes, 0o644, true).catch((e: unknown) => {
      throw fileError(e, path);
    }));
  }

  /** Reads a file from the guest (≤ 4 MiB). */
  readFile(path: string): Promise<Buffer> {
    let p: Buffer;
    try {
      p = guestPath(path, "path");
    } catch (e) {
      return Promise.reject(e);
    }
    return this.track(() => this.conn.readFile(p, FILE_LIMIT).catch((e: unknown) => {
      throw fileError(e, path);
    }));
  }

  /** Delivers a signal to the workload (the image's entrypoint process). */
  workloadSignal(signum: number): Promise<void> {
    if (!Number.isInteger(signum) || signum < 1 || signum > 64) return Promise.reject(invalidOption("signum", "a signal number 1..64", signum));
    return this.track(async () => {
      await this.conn.request(MsgType.WORKLOAD_SIGNAL, new RecordBuilder().u32(Tag.WORKLOAD_SIGNAL.signum, signum));
    });
  }

  /** Forwards 127.0.0.1:hostPort (0 = any free port) to guestPort inside the VM. */
  async exposeTcp(hostPort: number, guestPort: number): Promise<TcpForwarder> {
    if (!Number.isInteger(hostPort) || hostPort < 0 || hostPort > 65535) throw invalidOption("hostPort", "a port number 0..65535", hostPort);
    if (!Number.isInteger(guestPort) || guestPort < 1 || guestPort > 65535) throw invalidOption("guestPort", "a port number 1..65535", guestPort);
    this.ensureUsable();
    const f = await TcpForwarder.listen(() => {
      this.ensureUsable();
      return this.conn;
    }, hostPort, guestPort);
    if (this.state !== "ready") {
      f.destroy();
      this.ensureUsable();
    }
    this.forwarders.add(f);
    return f;
  }

  /** Agent round trip in ms (an extension, for health checks and benchmarks). */
  ping(): Promise<number> {
    return this.track(() => this.conn.ping());
  }

  /**
   * Gives the VM back. A VM from a pool goes back to it (the pool restores or
   * reuses it); a VM booted on its own is closed. Releasing twice is harmless.
   */
  async release(): Promise<void> {
    await this.close();
  }

  /** Whether this VM's agent has the log stream (agent feature "logs"). */
  private get hasLogs(): boolean {
    return this.conn.info?.features.includes("logs") ?? false;
  }

  /**
   * @internal The tail of what {@link logs} holds now (waiting up to
   * `waitMs` for the agent to send what it kept), as printable text, for
   * error messages (a workload that never listened). "" when there is none.
   */
  async _logsTail(waitMs = 1_000, maxBytes = 4096): Promise<string> {
    if (this.state !== "ready" || !this.hasLogs) return "";
    const reader = this.logs();
    const chunks: Buffer[] = [];
    await new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        reader.destroy();
        resolve();
      };
      const timer = setTimeout(done, waitMs);
      reader.on("data", (e: LogEntry) => chunks.push(e.data));
      reader.once("end", done);
      reader.once("error", done);
    });
    const all = Buffer.concat(chunks);
    return guestText(all.subarray(Math.max(0, all.length - maxBytes)).toString("utf8"), { maxChars: maxBytes, keep: "tail" });
  }

  /**
   * @internal The bake is over and this VM is handed out as the image's
   * first: processes the warmup spawned keep running, detached as in every
   * VM restored from the snapshot (their output goes to {@link logs}); their
   * ExecChild objects reject further use. Needs agent feature `logs`.
   */
  _detachChildren(): void {
    if (!this.hasLogs) return;
    const err = new ClosedError(`the process was detached when the image was baked (VM ${this.id}); its output goes to vm.logs()`);
    for (const c of this.children) c._detach(err);
    this.children.clear();
  }

  /** @internal Stops this VM's TCP forwarders (the VM changes hands). */
  stopForwarders(): void {
    for (const f of this.forwarders) f.destroy();
    this.forwarders.clear();
  }

  /**
   * @internal The VM changes hands: kills the processes started with spawn()
   * (their reads, writes and wait() reject with `err`) and ends the
   * bring-your-own-client sessions (the next holder gets a new execPath).
   */
  endSessions(err: Error): void {
    this.logRing?.close();
    this.logRing = undefined;
    this.qemu.onConsole = undefined;
    for (const c of this.children) c._end(err);
    this.children.clear();
    this.proxy?.close();
    this.proxy = undefined;
  }

  /**
   * Snapshots the running VM (its files and processes included) into
   * `destDir`, which must not exist yet; the VM keeps running. The result
   * restores like a built image.
   */
  async snapshot(destDir: string): Promise<Image> {
    if (typeof destDir !== "string" || destDir === "") throw invalidOption("destDir", "a directory path that does not exist yet", destDir);
    const dest = resolve(destDir);
    if (existsSync(dest)) throw new SnapshotError(`snapshot destination ${dest} already exists; pass a new directory`);
    return this.track(async () => {
      const [{ captureVm }, { Image }, { sha256File, sealSnapshotDir }] = await Promise.all([
        import("../snapshot/capture.js"),
        import("../image/image.js"),
        import("../snapshot/files.js"),
      ]);
      const stage = `${dest}.tmp-${randomBytes(4).toString("hex")}`;
      await mkdir(stage, { recursive: true, mode: 0o700 });
      try {
        const rootfs = join(stage, "rootfs.erofs");
        // A hard link shares the image's data (on disk since it was built); a copy is new data.
        let rootfsCopied = false;
        if (this.launch.rootfsImage)
          await link(this.launch.rootfsImage, rootfs).catch(async () => {
            await copyFile(this.launch.rootfsImage!, rootfs);
            rootfsCopied = true;
          });
        else throw new SnapshotError("this VM has no root filesystem image to snapshot");
        const captured = await captureVm(this, stage);
        const { diskFileName } = await import("../volumes/spec.js");
        const rootfsFile = { size: (await stat(rootfs)).size, sha256: await sha256File(rootfs) };
        const o = this.origin;
        const manifest: SnapshotManifest = {
          format: SNAPSHOT_FORMAT,
          version: SNAPSHOT_VERSION,
          key: createHash("sha256").update([captured.ram.sparseSha256, captured.state.sha256, ...captured.disks.map((d) => d.sha256)].join(":")).digest("hex"),
          name: basename(dest),
          createdAt: new Date().toISOString(),
          accel: this.accelerator,
          arch: process.arch,
          qemuVersion: "",
          ...(this.launch.cpuModel ? { cpuModel: this.launch.cpuModel } : {}),
          ...(this.launch.streamRing ? { streamRing: true } : {}),
          memoryMib: this.memoryMib,
          vcpus: this.vcpus,
          image: o.image,
          config: o.config,
          // A running workload is in the snapshot: restores must not start it again.
          workload: o.workload ? { ...o.workload, startAt: "bake" } : null,
          guestPort: o.guestPort,
          listenerRequired: o.listenerRequired,
          inputs: { from: "Vm.snapshot", vm: this.id },
          files: { ram: captured.ram, state: captured.state, rootfs: rootfsFile },
          ...(captured.disks.length ? { disks: captured.disks } : {}),
          ...(captured.mounts.length ? { mounts: captured.mounts } : {}),
        };
        await writeFile(join(stage, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n", { mode: 0o600 });
        const diskFiles = captured.disks.map(diskFileName);
        await sealSnapshotDir(stage, diskFiles);
        // As a bake publishes (image.ts sealBake): everything written after
        // the capture's records is on disk before the directory gets its name,
        // so a crash leaves no manifest that names data which never landed.
        for (const f of [...diskFiles, ...(rootfsCopied ? ["rootfs.erofs"] : []), "manifest.json"]) await fsyncFile(join(stage, f));
        await rename(stage, dest);
        return new Image({ snapshotPath: dest, manifest, baked: false, cacheDir: o.cacheDir });
      } catch (e) {
        await rm(stage, { recursive: true, force: true });
        throw e;
      }
    });
  }

  /** Alias of release(). */
  dispose(): Promise<void> {
    return this.release();
  }

  /** `await using vm = …`: releases the VM at the end of the block. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }

  /**
   * `using vm = …`: starts the release at the end of the block (a sync
   * disposer cannot wait; a pooled VM is back in its pool's accounting at
   * once, its teardown finishes in the background). A failure of that
   * background teardown is not reported here: use `await using` to see it.
   */
  [Symbol.dispose](): void {
    this.release().catch(() => undefined);
  }

  /**
   * Waits for requests in flight (exec, file transfers, a spawn that is
   * starting), then stops the VM. Processes started with spawn() end with
   * it: their wait() rejects with ClosedError. Idempotent.
   */
  close(): Promise<void> {
    if (this.closing) return this.closing;
    if (this.state === "dead" || this.state === "closed") {
      this.state = this.state === "dead" ? "dead" : "closed";
      this.closing = this.qemu.stop().then(() => removeRuntimeDir(this.runtimeDir));
      return this.closing;
    }
    this.state = "closing";
    this.closing = (async () => {
      if (this.inflight > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
      await this.shutdown(new ClosedError(`the VM ${this.id} was closed`));
    })();
    return this.closing;
  }

  /** Stops the VM at once; operations in flight fail with `err` (default ClosedError). Idempotent. */
  destroy(err?: Error): Promise<void> {
    if (this.state === "closed" || this.state === "dead") return this.closing ?? this.close();
    const e = err ?? new ClosedError(`the VM ${this.id} was destroyed`);
    this.closing = this.shutdown(e);
    return this.closing;
  }

  /**
   * @internal Whether {@link _recycle} may keep this VM's QEMU, as far as
   * can be told without asking it (its QEMU's support of the reload command
   * is known after the first ask).
   */
  _mayRecycle(): boolean {
    const l = this.launch;
    return (
      this.state === "ready" &&
      this.inflight === 0 &&
      this.qmpClient !== undefined &&
      reuseQemuFor(this.accelerator) &&
      this.ram.kind === "snapshot" &&
      l.incomingState !== undefined &&
      !l.template &&
      !l.disks?.length &&
      !this.qemu.exitStatus &&
      !knownWithout(this.qemu.binary, RELOAD_COMMAND)
    );
  }

  /**
   * @internal Ends this VM but keeps its QEMU process for the next VM of
   * the same snapshot (docs/qemu-reuse.md): the vCPUs stop, everything this
   * VM's holder had (agent connection, spawned processes, sessions, mounts,
   * forwarders, network connections, stream ring bytes) ends as in
   * destroy(), and the QEMU comes back as a StartedQemu to reload. Returns
   * undefined, having destroyed the VM, when it cannot be reused: not under
   * TCG with a QEMU that has the reload command, not a plain restore (disks,
   * a template), not healthy, or reuse turned off.
   */
  async _recycle(err: Error): Promise<StartedQemu | undefined> {
    const l = this.launch;
    const qmp = this.qmpClient ? await this.qmpClient.catch(() => undefined) : undefined;
    const reusable = this._mayRecycle() && qmp !== undefined && (await hasReload(this.qemu.binary, qmp));
    if (!reusable || this.state !== "ready") {
      await this.destroy(err);
      return undefined;
    }
    this.state = "closed";
    let done!: () => void;
    // A later close()/destroy() of this object must not touch the QEMU the next VM runs in.
    this.closing = new Promise<void>((r) => (done = r));
    try {
      await qmp.execute("stop");
      this.pausedLiveness = undefined;
      this.endSessions(err);
      await this.endHolder(err);
      const ring = l.streamRing ? join(this.runtimeDir, "ring") : undefined;
      if (ring) clearRingFile(ring);
      // The next VM gets a network stack of its own on the same link.
      const net = this.net.handOver();
      if (!net) throw new QemuError("frames for this VM were still queued");
      this.qemu.exitSignal.removeEventListener("abort", this.onQemuExit);
      this.qemu.onDeviceError = undefined;
      return { id: this.id, dir: this.runtimeDir, qemu: this.qemu, qmp, net, ...(ring ? { ring } : {}), reload: true };
    } catch {
      qmp.close();
      this.net.close();
      await this.qemu.stop();
      await removeRuntimeDir(this.runtimeDir);
      return undefined;
    } finally {
      done();
    }
  }

  /** Ends what reaches the guest from this host: forwarders, execPath, the agent connection (requests fail with `err`), mounts. */
  private async endHolder(err: Error): Promise<void> {
    for (const f of this.forwarders) f.destroy();
    this.forwarders.clear();
    this.conn.onFatal = () => undefined;
    this.proxy?.close();
    this.conn.destroy(err);
    await this._closeMounts();
  }

  private async shutdown(err: Error): Promise<void> {
    this.state = "closed";
    await this.endHolder(err);
    void this.qmpClient?.then((q) => q.close(), () => undefined);
    this.net.close();
    await this.qemu.stop();
    await removeRuntimeDir(this.runtimeDir);
  }
}
