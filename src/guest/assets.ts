/**
 * Everything a VM boots from, located and versioned: kernel, initramfs
 * (agent as /init + kernel modules in load order), and the kernel command
 * line.
 */

import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
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

async function resolveAssets(cacheDir: string, o: AssetOptions): Promise<BootAssets> {
  const k: KernelAssets = locateKernel(cacheDir, { ...(o.kernel ? { kernel: o.kernel } : {}), ...(o.modulesDir ? { modulesDir: o.modulesDir } : {}) });
  const agentFile = locateAgent(o.agentPath);
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
      if (!/^[A-Za-z0-9_.-]+\.ko$/.test(name)) throw new MissingAssetError("kernel", `bad module name ${JSON.stringify(name)} in ${orderFile}`);
      entries.push({ name: `lib/modules/${name}`, mode: S_IFREG | 0o644, data: readFileSync(join(k.modulesDir, name)) });
    }
    entries.push({ name: "lib/modules/order", mode: S_IFREG | 0o644, data: Buffer.from(order.join("\n") + "\n") });
  }
  const cpio = buildCpio(entries);
  const hash = createHash("sha256").update(`initramfs-v${INITRAMFS_FORMAT}\0`).update(cpio).digest("hex");
  const dir = join(cacheDir, "initramfs");
  const initrd = join(dir, `${hash.slice(0, 32)}.cpio`);
  if (!existsSync(initrd)) {
    await mkdir(dir, { recursive: true });
    const tmp = `${initrd}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
    try {
      await writeFile(tmp, cpio);
      await rename(tmp, initrd);
    } catch (e) {
      await unlink(tmp).catch(() => undefined);
      throw e;
    }
  }
  const id = createHash("sha256").update(k.id).update("\0").update(hash).digest("hex").slice(0, 32);
  return { kernel: k.kernel, initrd, id, kernelId: k.id };
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
