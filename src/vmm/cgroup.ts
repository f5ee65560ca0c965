/**
 * The cgroup of each QEMU process: memory, task and CPU limits, on cgroup v2
 * or on cgroup v1's memory, pids and cpu hierarchies. docs/confinement.md
 * says where the cgroups go and what the limits are.
 */

import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { access, mkdir, readFile, readdir, rmdir, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { ConfinementError } from "../errors.js";

/**
 * Memory a QEMU process may use on top of its guest's RAM before its cgroup
 * limit is reached: TCG's translation cache (64 MiB, `tb-size`), QEMU's code,
 * heap and threads' stacks, migration buffers, and page cache read through
 * the VM's files. A 256 MiB TCG guest that fills its RAM peaks at ≈ 350 MiB.
 */
export const QEMU_MEMORY_OVERHEAD_MIB = 256;

/**
 * Tasks (processes and threads) a QEMU's cgroup may hold on top of one per
 * vCPU: QEMU's main, RCU and I/O threads (its block thread pool grows to 64)
 * and bubblewrap's init.
 */
export const QEMU_PIDS_BASE = 128;

/** cgroup v2 `cpu.weight` of each VM (the default, 100): VMs share CPU equally whatever their vCPU count. */
export const QEMU_CPU_WEIGHT = 100;

/** @internal Where VM cgroups are made. */
export interface CgroupRoot {
  version: 1 | 2;
  /** v2: one directory; v1: one per controller (memory, pids, cpu). */
  bases: { controller: "memory" | "pids" | "cpu" | "all"; dir: string }[];
}

function envFlagOff(v: string | undefined): boolean {
  return v !== undefined && /^(0|off|false|no)$/i.test(v);
}

interface MountInfo {
  mountPoint: string;
  fsType: string;
  superOptions: string[];
}

function cgroupMounts(): MountInfo[] {
  let text: string;
  try {
    text = readFileSync("/proc/self/mountinfo", "utf8");
  } catch {
    return [];
  }
  const out: MountInfo[] = [];
  for (const line of text.split("\n")) {
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const l = left.split(" ");
    const r = right.split(" ");
    if (r[0] !== "cgroup" && r[0] !== "cgroup2") continue;
    out.push({ mountPoint: l[4]!.replace(/\\040/g, " "), fsType: r[0], superOptions: (r[2] ?? "").split(",") });
  }
  return out;
}

/** This process's cgroup path per hierarchy: "" → v2 path, controller name → v1 path. */
function ownCgroups(): Map<string, string> {
  const m = new Map<string, string>();
  let text: string;
  try {
    text = readFileSync("/proc/self/cgroup", "utf8");
  } catch {
    return m;
  }
  for (const line of text.split("\n")) {
    const i = line.indexOf(":");
    const j = line.indexOf(":", i + 1);
    if (i < 0 || j < 0) continue;
    const ctrls = line.slice(i + 1, j);
    const path = line.slice(j + 1);
    if (ctrls === "") m.set("", path);
    else for (const c of ctrls.split(",")) m.set(c, path);
  }
  return m;
}

async function writable(dir: string): Promise<boolean> {
  try {
    await access(dir, 2 /* W_OK */);
    return true;
  } catch {
    return false;
  }
}

async function readText(p: string): Promise<string> {
  return (await readFile(p, "utf8")).trim();
}

/** Makes `dir` (a v2 cgroup without processes) hand memory, pids and cpu down to its children. */
async function enableV2Controllers(dir: string): Promise<void> {
  // The parent must hand them down first; it may already (systemd does),
  // and cgroup v2 refuses if it holds processes and is not the root.
  const parentCtl = join(dirname(dir), "cgroup.subtree_control");
  const parentOn = (await readText(parentCtl).catch(() => "")).split(/\s+/);
  const parentWant = ["memory", "pids", "cpu"].filter((c) => !parentOn.includes(c));
  if (parentWant.length) await writeFile(parentCtl, parentWant.map((c) => `+${c}`).join(" ")).catch(() => undefined);
  await mkdir(dir, { recursive: true });
  const have = (await readText(join(dir, "cgroup.controllers"))).split(/\s+/);
  for (const c of ["memory", "pids", "cpu"]) {
    if (!have.includes(c)) throw new Error(`${dir} has no ${c} controller`);
  }
  const on = (await readText(join(dir, "cgroup.subtree_control"))).split(/\s+/);
  const want = ["memory", "pids", "cpu"].filter((c) => !on.includes(c));
  if (want.length) await writeFile(join(dir, "cgroup.subtree_control"), want.map((c) => `+${c}`).join(" "));
}

/**
 * Finds where VM cgroups can be made. cgroup v2 first: SUPERMACHINE_CGROUP
 * (a delegated directory), else, as root, a `supermachine` cgroup next to
 * ours (v2 forbids controllers below a cgroup that holds processes, so not
 * inside our own unless ours is the root). Then cgroup v1 (memory, pids and
 * cpu hierarchies), as root, below our own cgroup in each.
 */
export async function findCgroupRoot(isRoot: boolean, env: NodeJS.ProcessEnv): Promise<{ root?: CgroupRoot; detail: string }> {
  if (envFlagOff(env.SUPERMACHINE_CGROUP)) return { detail: "off (SUPERMACHINE_CGROUP=0)" };
  const mounts = cgroupMounts();
  const own = ownCgroups();
  const v2 = mounts.find((m) => m.fsType === "cgroup2");
  const problems: string[] = [];
  const explicit = env.SUPERMACHINE_CGROUP;
  if (explicit) {
    try {
      await enableV2Controllers(resolve(explicit));
      return { root: { version: 2, bases: [{ controller: "all", dir: resolve(explicit) }] }, detail: "" };
    } catch (e) {
      throw new ConfinementError(`SUPERMACHINE_CGROUP=${explicit} cannot hold VM cgroups: ${(e as Error).message}. Point it at a writable cgroup v2 directory with the memory, pids and cpu controllers, or set it to 0.`, { cause: e });
    }
  }
  if (!isRoot) return { detail: "off: Node is not root (set SUPERMACHINE_CGROUP to a cgroup v2 directory delegated to this user)" };
  if (v2 && own.has("")) {
    const ownPath = own.get("")!;
    const base = ownPath === "/" ? join(v2.mountPoint, "supermachine") : join(v2.mountPoint, dirname(ownPath), "supermachine");
    try {
      if (!(await writable(v2.mountPoint))) throw new Error(`${v2.mountPoint} is read-only`);
      await enableV2Controllers(base);
      return { root: { version: 2, bases: [{ controller: "all", dir: base }] }, detail: "" };
    } catch (e) {
      problems.push(`cgroup v2: ${(e as Error).message}`);
    }
  }
  const bases: CgroupRoot["bases"] = [];
  for (const c of ["memory", "pids", "cpu"] as const) {
    const m = mounts.find((x) => x.fsType === "cgroup" && x.superOptions.includes(c));
    const path = own.get(c);
    if (!m || path === undefined) {
      problems.push(`cgroup v1: no ${c} hierarchy`);
      break;
    }
    bases.push({ controller: c, dir: join(m.mountPoint, path, "supermachine") });
  }
  if (bases.length === 3) {
    try {
      for (const b of bases) {
        await mkdir(b.dir, { recursive: true });
        if (!(await writable(b.dir))) throw new Error(`${b.dir} is not writable`);
      }
      return { root: { version: 1, bases }, detail: "" };
    } catch (e) {
      problems.push(`cgroup v1: ${(e as Error).message}`);
    }
  }
  return { detail: `off: ${problems.join("; ") || "no cgroup filesystem"}` };
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Removes VM cgroups left by Node processes that were killed. */
export async function sweepCgroups(root: CgroupRoot): Promise<void> {
  for (const b of root.bases) {
    let names: string[];
    try {
      names = await readdir(b.dir);
    } catch {
      continue;
    }
    for (const name of names) {
      const m = /^sm-(\d+)-/.exec(name);
      if (!m || Number(m[1]) === process.pid || pidAlive(Number(m[1]))) continue;
      await rmdir(join(b.dir, name)).catch(() => undefined);
    }
  }
}

/** The cgroup(s) of one QEMU process. */
export class VmCgroup {
  private constructor(
    readonly version: 1 | 2,
    /** The cgroup directories (one for v2, memory/pids/cpu for v1). */
    readonly dirs: readonly string[],
  ) {}

  /** Creates a VM's cgroup with its limits. */
  static async create(root: CgroupRoot, name: string, memoryMib: number, vcpus: number): Promise<VmCgroup> {
    const leaf = `sm-${process.pid}-${name.replace(/[^A-Za-z0-9_.-]/g, "_").slice(0, 40)}-${randomBytes(3).toString("hex")}`;
    const memBytes = String((memoryMib + QEMU_MEMORY_OVERHEAD_MIB) * 1024 * 1024);
    const pids = String(QEMU_PIDS_BASE + vcpus);
    const made: string[] = [];
    const cg = new VmCgroup(root.version, made);
    try {
      for (const b of root.bases) {
        const dir = join(b.dir, leaf);
        await mkdir(dir);
        made.push(dir);
        if (root.version === 2) {
          await writeFile(join(dir, "memory.max"), memBytes);
          await writeFile(join(dir, "pids.max"), pids);
          await writeFile(join(dir, "cpu.weight"), String(QEMU_CPU_WEIGHT));
          await writeFile(join(dir, "memory.oom.group"), "1").catch(() => undefined);
        } else if (b.controller === "memory") {
          // A soft limit on v1: v1 charges the page cache of the VM's disk
          // and RAM files to the cgroup and has no per-cgroup dirty-page
          // throttling, so a hard limit OOM-kills QEMU under heavy guest
          // writes (a 1 GiB write filled a 512 MiB cgroup here). v2 throttles
          // writeback per cgroup and gets memory.max.
          await writeFile(join(dir, "memory.soft_limit_in_bytes"), memBytes);
        } else if (b.controller === "pids") {
          await writeFile(join(dir, "pids.max"), pids);
        } else {
          await writeFile(join(dir, "cpu.shares"), "1024");
        }
      }
    } catch (e) {
      await cg.remove();
      throw new ConfinementError(`cannot set up the cgroup of VM ${name}: ${(e as Error).message}. Set SUPERMACHINE_CGROUP=0 to run without.`, { cause: e });
    }
    return cg;
  }

  /** The files a process writes "0" to in order to join this cgroup. */
  get procsFiles(): string[] {
    return this.dirs.map((d) => join(d, "cgroup.procs"));
  }

  /** Kills what is left inside and removes the cgroup (retrying while the kernel reaps). */
  async remove(): Promise<void> {
    for (const dir of [...this.dirs].reverse()) {
      for (let i = 0; i < 100; i++) {
        try {
          await rmdir(dir);
          break;
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code === "ENOENT") break;
          if (code !== "EBUSY" || i === 99) break;
          await this.killAll(dir);
          await new Promise((r) => setTimeout(r, 10));
        }
      }
    }
  }

  private async killAll(dir: string): Promise<void> {
    if (this.version === 2 && (await writeFile(join(dir, "cgroup.kill"), "1").then(() => true, () => false))) return;
    const pids = await readFile(join(dir, "cgroup.procs"), "utf8").catch(() => "");
    for (const p of pids.split("\n")) {
      const pid = Number(p);
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          /* gone */
        }
      }
    }
  }
}
