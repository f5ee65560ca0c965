/**
 * `supermachine setup`: installs what `doctor` finds missing that a package
 * manager can provide (Debian/Ubuntu, as root): QEMU, bubblewrap, util-linux
 * (setpriv), busybox-static when no default-image busybox is found, and the
 * unprivileged `supermachine-qemu` user QEMU drops to when Node is root
 * (docs/confinement.md). An installed package's agent and kernel come
 * prebuilt in its platform package; `--qemu` builds QEMU with the reload
 * patch (docs/qemu-reuse.md), system-wide when root.
 */

import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { doctor, type DoctorReport } from "./index.js";
import { buildPatchedQemu } from "../vmm/qemu-build.js";
import { missingDebianPackages } from "../platform/debian.js";
import { SYSTEM_BUILT_QEMU_DIR, builtQemuDir } from "../vmm/qemu.js";

export interface SetupPlan {
  /** Debian packages to install. */
  readonly packages: readonly string[];
  /** Whether to create the supermachine-qemu system user. */
  readonly createQemuUser: boolean;
  /** Why nothing can be done here (not root, no apt-get), or undefined. */
  readonly cannot?: string;
}

/** What `setup` would do on this host, given a doctor report. */
export function setupPlan(report: DoctorReport): SetupPlan {
  const wanted = ["qemu-system-x86", "bubblewrap", "util-linux"];
  // Volumes and diskMib (docs/volumes.md).
  if (report.checks.some((c) => c.id === "volumes" && c.status !== "ok")) wanted.push("qemu-utils", "e2fsprogs");
  if (report.checks.some((c) => c.id === "busybox" && c.status !== "ok")) wanted.push("busybox-static");
  const hasApt = existsSync("/usr/bin/apt-get") && existsSync("/usr/bin/dpkg-query");
  const root = typeof process.getuid === "function" && process.getuid() === 0;
  const packages = hasApt ? missingDebianPackages(wanted) : [];
  let hasUser = true;
  try {
    hasUser = readFileSync("/etc/passwd", "utf8").split("\n").some((l) => l.startsWith("supermachine-qemu:"));
  } catch {
    /* assume present */
  }
  const createQemuUser = root && !hasUser && existsSync("/usr/sbin/useradd");
  const cannot = !hasApt
    ? "this host has no apt-get: install QEMU (qemu-system-x86_64), bubblewrap and util-linux with its package manager"
    : !root && packages.length
      ? `run as root: sudo npx supermachine setup (or sudo apt-get install -y ${packages.join(" ")})`
      : undefined;
  return { packages, createQemuUser, ...(cannot ? { cannot } : {}) };
}

/**
 * Installs what is missing (when root on Debian/Ubuntu), then runs the
 * doctor again. `dryRun` only prints the commands.
 */
export async function runSetup(o: { dryRun?: boolean; qemu?: boolean; log: (s: string) => void }): Promise<DoctorReport> {
  const before = await doctor();
  const plan = setupPlan(before);
  if (plan.cannot && plan.packages.length) {
    o.log(plan.cannot);
    return before;
  }
  if (plan.packages.length) {
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    const cmds: string[][] = [["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", ...plan.packages]];
    for (const c of cmds) {
      o.log(`${o.dryRun ? "would run" : "running"}: ${c.join(" ")}`);
      if (o.dryRun) continue;
      const r = spawnSync(c[0]!, c.slice(1), { stdio: ["ignore", "inherit", "inherit"], env });
      if (r.status !== 0 && c[1] === "install") o.log(`${c.join(" ")} failed (exit ${r.status ?? r.signal})`);
    }
  } else o.log("Debian packages: nothing to install");
  if (plan.createQemuUser) {
    const c = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "supermachine-qemu"];
    o.log(`${o.dryRun ? "would run" : "running"}: ${c.join(" ")} (QEMU runs as this user when Node is root)`);
    if (!o.dryRun) spawnSync(c[0]!, c.slice(1), { stdio: "inherit" });
  }
  if (o.qemu) {
    const root = typeof process.getuid === "function" && process.getuid() === 0;
    const r = await buildPatchedQemu({ dest: root ? SYSTEM_BUILT_QEMU_DIR : builtQemuDir(), log: o.log, ...(o.dryRun ? { dryRun: true } : {}) });
    if (r.status === "built" || r.status === "present") o.log(`QEMU with process reuse${r.status === "present" ? " (already built)" : ""}: ${r.binary}`);
    else o.log(r.status === "skipped" ? r.reason : `could not build QEMU with process reuse: ${r.reason}`);
  } else if (before.checks.some((c) => c.id === "qemu-reuse" && c.status === "warn")) {
    o.log("under TCG, `supermachine setup --qemu` builds QEMU with process reuse (a few minutes; docs/qemu-reuse.md)");
  }
  return o.dryRun ? before : doctor();
}
