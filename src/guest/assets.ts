/**
 * Everything a VM boots from, located and versioned: kernel, initramfs
 * (agent as /init + kernel modules in load order), and the kernel command
 * line.
 */

import { createHash } from "node:crypto";
import { existsSync, readFileSync, statSync } from "node:fs";
import { mkdir, rename, writeFile, unlink } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { MissingAssetError } from "../errors.js";
import { defaultCacheDir } from "../paths.js";
import type { Accelerator } from "../vmm/accel.js";
import { buildCpio, S_IFCHR, S_IFDIR, S_IFREG, type CpioEntry } from "./cpio.js";
import { isStaticElf } from "./default-image.js";
import { locateKernel, type KernelAssets } from "./kernel.js";
import { diskCmdline, type DiskPlan } from "../volumes/spec.js";
import { missingAssetsHint, platformAssets } from "../platform/package.js";

/** Root of this package (where agent/ and package.json live). */
export const PACKAGE_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

export function agentTargetTriple(arch: string = process.arch): string {
  return arch === "arm64" ? "aarch64-unknown-linux-gnu" : "x86_64-unknown-linux-gnu";
}

export function defaultAgentPath(): string {
  return join(PACKAGE_ROOT, "agent", "target", agentTargetTriple(), "release", "supermachine-agent");
}

/**
 * The guest agent binary: `explicit`, else SUPERMACHINE_AGENT, else the
 * installed platform package's, else a checkout's cargo build.
 */
export function locateAgent(explicit?: string): string {
  const p = explicit ?? process.env.SUPERMACHINE_AGENT;
  if (p !== undefined && p !== "") {
    if (!existsSync(p)) throw new MissingAssetError("agent", `the guest agent binary ${p} (from ${explicit ? "the agentPath option" : "SUPERMACHINE_AGENT"}) does not exist.`);
    return p;
  }
  const pkg = platformAssets();
  if (pkg) return pkg.agent;
  const built = defaultAgentPath();
  if (existsSync(built)) return built;
  throw new MissingAssetError("agent", `no guest agent: ${missingAssetsHint()}`);
}

export interface BootAssets {
  kernel: string;
  initrd: string;
  /** Hash of kernel id + initramfs content: part of every snapshot key. */
  id: string;
  kernelId: string;
}

export interface AssetOptions {
  cacheDir?: string;
  kernel?: string;
  modulesDir?: string;
  agentPath?: string;
}

/** What a module in the modules directory's `order` file may be called. */
const MODULE_NAME = /^[A-Za-z0-9_.-]+\.ko$/;

/** Bumped when the initramfs layout changes. */
const INITRAMFS_FORMAT = 1;

const memo = new Map<string, Promise<BootAssets>>();

/**
 * Resolves kernel + initramfs, building (and caching) the initramfs when the
 * agent or the modules changed. Cheap after the first call in a process.
 */
export function bootAssets(o: AssetOptions = {}): Promise<BootAssets> {
  const cacheDir = o.cacheDir ?? defaultCacheDir();
  const key = JSON.stringify([cacheDir, o.kernel, o.modulesDir, o.agentPath, process.env.SUPERMACHINE_KERNEL, process.env.SUPERMACHINE_MODULES, process.env.SUPERMACHINE_AGENT]);
  let p = memo.get(key);
  if (!p) {
    p = resolveAssets(cacheDir, o);
    memo.set(key, p);
    p.catch(() => memo.delete(key));
  }
  return p;
}

/**
 * A file's identity for the initramfs index: path, device, inode, size,
 * mtime and ctime (ns). Rewriting or replacing the file changes its ctime,
 * which nobody can set back.
 */
function statKey(path: string): string {
  const s = statSync(path, { bigint: true });
  return [path, s.dev, s.ino, s.size, s.mtimeNs, s.ctimeNs].join(":");
}

/** The initramfs inputs' identity (INITRAMFS_FORMAT, the agent, the modules' order file and each module): the index's key. */
function initramfsInputsKey(agentFile: string, modulesDir: string | undefined): string | undefined {
  try {
    const keys = [`initramfs-inputs-v${INITRAMFS_FORMAT}`, statKey(agentFile)];
    if (modulesDir) {
      const orderFile = join(modulesDir, "order");
      if (existsSync(orderFile)) {
        keys.push(statKey(orderFile));
        for (const name of readFileSync(orderFile, "utf8").split("\n").map((l) => l.trim()).filter(Boolean)) {
          // A name the build refuses: no key, so the build says so.
          if (!MODULE_NAME.test(name)) return undefined;
          keys.push(statKey(join(modulesDir, name)));
        }
      } else keys.push(`no order in ${modulesDir}`);
    }
    return createHash("sha256").update(keys.join("\0")).digest("hex");
  } catch {
    return undefined;
  }
}

/**
 * The initramfs built from these inputs before (by any process with this
 * cache): `initramfs/index/<inputs key>` holds its content hash and size.
 * Saves the first bootAssets() of each process reading the agent and the
 * modules (~6 MB) and building the archive to find its name (≈ 90 ms of
 * the main thread in one cold sample's profile). A line that does not parse, or a file that is gone
 * or of another size, is a miss: the archive is built as before.
 */
function indexedInitramfs(dir: string, inputsKey: string | undefined): { hash: string; initrd: string } | undefined {
  if (!inputsKey) return undefined;
  try {
    const m = /^([0-9a-f]{64}) ([0-9]{1,12})\n$/.exec(readFileSync(join(dir, "index", inputsKey.slice(0, 32)), "latin1"));
    if (!m) return undefined;
    const initrd = join(dir, initrdName(m[1]!));
    const st = statSync(initrd);
    return st.isFile() && st.size === Number(m[2]) ? { hash: m[1]!, initrd } : undefined;
  } catch {
    return undefined;
  }
}

/** Writes the index entry (atomically; only an optimization, so a failure is ignored). */
async function indexInitramfs(dir: string, inputsKey: string | undefined, hash: string, size: number): Promise<void> {
  if (!inputsKey) return;
  await writeReplacing(join(dir, "index"), inputsKey.slice(0, 32), `${hash} ${size}\n`).catch(() => undefined);
}

/** The initramfs file of a content hash, in the cache's initramfs directory. */
function initrdName(hash: string): string {
  return `${hash.slice(0, 32)}.cpio`;
}

/** Writes `data` as `dir/name` through a temp file renamed over it (readers never see part of it). */
async function writeReplacing(dir: string, name: string, data: string | Buffer): Promise<void> {
  await mkdir(dir, { recursive: true });
  const file = join(dir, name);
  const tmp = `${file}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
  try {
    await writeFile(tmp, data);
    await rename(tmp, file);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
}

/** @internal (tests) Forgets what bootAssets() resolved in this process. */
export function _forgetBootAssets(): void {
  memo.clear();
}

async function resolveAssets(cacheDir: string, o: AssetOptions): Promise<BootAssets> {
  const k: KernelAssets = locateKernel(cacheDir, { ...(o.kernel ? { kernel: o.kernel } : {}), ...(o.modulesDir ? { modulesDir: o.modulesDir } : {}) });
  const agentFile = locateAgent(o.agentPath);
  const dir = join(cacheDir, "initramfs");
  // Taken before the files are read: a file changed meanwhile makes a key that matches nothing.
  const inputsKey = initramfsInputsKey(agentFile, k.modulesDir);
  const known = indexedInitramfs(dir, inputsKey);
  if (known) return { kernel: k.kernel, initrd: known.initrd, id: assetsId(k.id, known.hash), kernelId: k.id };
  const agent = readFileSync(agentFile);
  if (!isStaticElf(agent)) throw new MissingAssetError("agent", `the guest agent ${agentFile} is not a static ELF executable: it runs as the guest's /init, before any library exists. Build it static (npm run setup does: cargo build --release with RUSTFLAGS="-C target-feature=+crt-static").`);
  const entries: CpioEntry[] = [
    { name: "dev", mode: S_IFDIR | 0o755 },
    { name: "dev/console", mode: S_IFCHR | 0o600, rdevMajor: 5, rdevMinor: 1 },
    { name: "proc", mode: S_IFDIR | 0o755 },
    { name: "sys", mode: S_IFDIR | 0o755 },
    { name: "mnt", mode: S_IFDIR | 0o755 },
    { name: "lib", mode: S_IFDIR | 0o755 },
    { name: "lib/modules", mode: S_IFDIR | 0o755 },
    { name: "init", mode: S_IFREG | 0o755, data: agent },
  ];
  if (k.modulesDir) {
    const orderFile = join(k.modulesDir, "order");
    const order = existsSync(orderFile) ? readFileSync(orderFile, "utf8").split("\n").map((s) => s.trim()).filter(Boolean) : [];
    for (const name of order) {
      if (!MODULE_NAME.test(name)) throw new MissingAssetError("kernel", `bad module name ${JSON.stringify(name)} in ${orderFile}`);
      entries.push({ name: `lib/modules/${name}`, mode: S_IFREG | 0o644, data: readFileSync(join(k.modulesDir, name)) });
    }
    entries.push({ name: "lib/modules/order", mode: S_IFREG | 0o644, data: Buffer.from(order.join("\n") + "\n") });
  }
  const cpio = buildCpio(entries);
  const hash = createHash("sha256").update(`initramfs-v${INITRAMFS_FORMAT}\0`).update(cpio).digest("hex");
  const initrd = join(dir, initrdName(hash));
  if (!existsSync(initrd)) await writeReplacing(dir, initrdName(hash), cpio);
  await indexInitramfs(dir, inputsKey, hash, cpio.length);
  return { kernel: k.kernel, initrd, id: assetsId(k.id, hash), kernelId: k.id };
}

/** BootAssets.id: the kernel's id and the initramfs content hash. */
function assetsId(kernelId: string, initramfsHash: string): string {
  return createHash("sha256").update(kernelId).update("\0").update(initramfsHash).digest("hex").slice(0, 32);
}

export interface CmdlineOptions {
  accel: Accelerator;
  hostname?: string;
  hasRootfs: boolean;
  /** Volumes and the writable layer (sm.disk=, sm.vol=; see docs/volumes.md). */
  disks?: readonly DiskPlan[];
  /** TSC frequency for the guest (TCG); default: the host's, from /proc/cpuinfo. */
  tscKhz?: number | null;
  /** User-space address randomization in the guest (false: `sm.aslr=0`). @default true */
  aslr?: boolean;
}

let tscMemo: number | null | undefined;

/**
 * The host's TSC frequency in kHz, which is what a TCG guest's TSC ticks at
 * (QEMU's TCG reads the host TSC). Without it, the guest calibrates its TSC
 * against the emulated PIT, and under host load that calibration fails and
 * the boot hangs. null when unknown (not x86, or no "cpu MHz").
 * SUPERMACHINE_GUEST_TSC_KHZ overrides it (0: let the guest calibrate).
 */
export function hostTscKhz(): number | null {
  if (tscMemo !== undefined) return tscMemo;
  tscMemo = null;
  const forced = process.env.SUPERMACHINE_GUEST_TSC_KHZ;
  if (forced !== undefined && forced !== "") {
    const n = Number(forced);
    tscMemo = Number.isInteger(n) && n > 0 ? n : null;
    return tscMemo;
  }
  if (process.arch === "x64") {
    try {
      const m = /^cpu MHz\s*:\s*([0-9.]+)/m.exec(readFileSync("/proc/cpuinfo", "latin1"));
      const mhz = m ? Number(m[1]) : NaN;
      if (Number.isFinite(mhz) && mhz > 100) tscMemo = Math.round(mhz * 1000);
    } catch {
      /* unknown */
    }
  }
  return tscMemo;
}

/**
 * Whether a guest keeps user-space address randomization when the caller
 * does not say: under TCG a program whose code moves is translated again at
 * every start (docs/performance.md), under KVM it costs nothing.
 */
export function defaultAslr(accel: Accelerator): boolean {
  return accel !== "tcg";
}

/**
 * Whether the guest scheduler lets a woken task preempt the running one.
 * Not under TCG, where every switch between guest processes flushes QEMU's
 * software TLB: a woken task waits for the running one to block or for its
 * slice to end (docs/performance.md, "Wakeup preemption").
 * @internal SUPERMACHINE_WAKEUP_PREEMPTION=1 keeps the kernel's default (for benchmarks).
 */
export function wakeupPreemption(accel: Accelerator): boolean {
  return accel !== "tcg" || process.env.SUPERMACHINE_WAKEUP_PREEMPTION === "1";
}

/** The guest kernel command line. */
export function kernelCmdline(o: CmdlineOptions): string {
  const parts = [
    "console=ttyS0",
    "quiet",
    "loglevel=4",
    // A guest panic ends QEMU at once (with -no-reboot) instead of hanging.
    "panic=-1",
    "8250.nr_uarts=1",
    "cryptomgr.notests",
    // The guest is the sandbox: hardening that protects guest processes from
    // each other costs a lot under emulation and buys the host nothing.
    "mitigations=off",
    "init_on_alloc=0",
    "audit=0",
    "lsm=landlock,lockdown,yama",
    "nokaslr",
  ];
  if (o.accel === "tcg") {
    // TCG's TSC is the host's: stable, and of a known frequency. Calibrating
    // it against the emulated PIT is slow and, under load, fails (and the
    // boot hangs), so the frequency is given.
    parts.push("tsc=reliable", "no_timer_check");
    const khz = o.tscKhz === undefined ? hostTscKhz() : o.tscKhz;
    if (khz) parts.push(`tsc_early_khz=${khz}`);
    if (!wakeupPreemption(o.accel)) parts.push("sm.wakeup_preempt=0");
  }
  parts.push(`sm.root=${o.hasRootfs ? "/dev/vda" : "none"}`);
  if (o.hostname) parts.push(`sm.hostname=${o.hostname}`);
  if (o.aslr === false) parts.push("sm.aslr=0");
  if (o.disks) parts.push(...diskCmdline(o.disks));
  // The agent's frame-by-frame trace on the console (consoleTail), for debugging.
  if (process.env.SUPERMACHINE_GUEST_DEBUG === "1") parts.push("sm.debug=1");
  return parts.join(" ");
}
