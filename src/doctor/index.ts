/**
 * `supermachine doctor`: checks that this host can run VMs and says what to
 * do about each problem. {@link doctor} returns the structured report (the
 * CLI prints it, or its JSON); {@link formatDoctorReport} renders it.
 *
 * Required (a failure makes `ok` false, and the CLI exit non-zero): a
 * supported host, QEMU with the microvm machine, the boot assets (kernel,
 * modules, agent). Advisory (warnings): KVM and hardware virtualization
 * (without them VMs run under TCG emulation), cgroup limits, bubblewrap and
 * setpriv (confinement, docs/confinement.md), disk space of the caches, the
 * default image's busybox.
 */

import { execFile } from "node:child_process";
import { accessSync, constants as fsc, existsSync, readFileSync, statSync, statfsSync } from "node:fs";
import { userInfo } from "node:os";
import { dirname, resolve } from "node:path";
import { defaultCacheDir } from "../paths.js";
import { locateAgent } from "../guest/assets.js";
import { locateKernel } from "../guest/kernel.js";
import { unsupportedHostReason, hostPlatform } from "../platform/host.js";
import { isCheckout, platformPackageStatus } from "../platform/package.js";
import { chooseAccelerator, cpuHasVirtualization, probeHost, type AcceleratorChoice } from "../vmm/accel.js";
import { confinement } from "../vmm/confine.js";
import { RELOAD_COMMAND, findQemu, qemuBinaryName } from "../vmm/qemu.js";
import { PRETRANSLATE_COMMAND } from "../vmm/pretranslate.js";

/** ok: fine; warn: works, but worse (slower, less confined); fail: cannot run VMs (when required). */
export type DoctorStatus = "ok" | "warn" | "fail";

/** One check of {@link doctor}. */
export interface DoctorCheck {
  /** Stable identifier: "platform", "qemu", "assets", "kvm", "cpu-virtualization", "accelerator", "cgroup", "bubblewrap", "setpriv", "disk", "busybox", "volumes". */
  readonly id: string;
  readonly title: string;
  readonly status: DoctorStatus;
  /** When true, a "fail" here means no VM can start. */
  readonly required: boolean;
  /** What was found. */
  readonly detail: string;
  /** What to do about it (absent when status is "ok"). */
  readonly fix?: string;
}

/** What {@link doctor} found. */
export interface DoctorReport {
  /** False when a required check failed: no VM can start on this host as it is. */
  readonly ok: boolean;
  /** `<platform>-<arch>`, e.g. "linux-x64". */
  readonly platform: string;
  /** The accelerator VMs would use, and why (null when it cannot be told). */
  readonly accelerator: AcceleratorChoice | null;
  readonly checks: readonly DoctorCheck[];
}

export interface DoctorOptions {
  /**
   * The cache directory whose disk space to check.
   * @default SUPERMACHINE_CACHE_DIR, else ~/.cache/supermachine
   */
  readonly cacheDir?: string;
  /**
   * The snapshots directory whose disk space to check.
   * @default SUPERMACHINE_SNAPSHOTS_DIR, else ~/.local/supermachine-snapshots
   */
  readonly snapshotsDir?: string;
  /**
   * Below this many free MiB on a cache's filesystem, the disk check warns.
   * @default 2048
   */
  readonly minFreeMib?: number;
}

const isRoot = (): boolean => typeof process.getuid === "function" && process.getuid() === 0;

function hasCommand(cmd: string): boolean {
  for (const dir of (process.env.PATH ?? "").split(":").concat(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])) {
    if (dir && existsSync(`${dir}/${cmd}`)) return true;
  }
  return false;
}

/** How to install Debian packages on this host, as one instruction. */
export function aptFix(pkgs: readonly string[], what: string): string {
  const list = pkgs.join(" ");
  if (!hasCommand("apt-get")) return `install ${what} with this system's package manager`;
  if (isRoot()) return `run \`npx supermachine setup\` (it runs apt-get install -y ${list}), or apt-get install -y ${list}`;
  return `sudo apt-get install -y ${list} (or run \`npx supermachine setup\` as root)`;
}

function run(cmd: string, args: readonly string[], timeoutMs = 20_000): Promise<{ ok: boolean; out: string }> {
  return new Promise((res) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 1 << 20, env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" } }, (err, stdout, stderr) => res({ ok: !err, out: `${stdout}${stderr}` }));
  });
}

/** A helper's name that QEMU builds with qemu/supermachine-rep-string.patch carry (TCG's helper table). */
const REP_STRING_HELPER = "rep_movs64";

/** Whether pools can reuse QEMU processes (docs/qemu-reuse.md), and whether the build has the later patch too. */
function checkQemuReuse(accel: "kvm" | "tcg"): DoctorCheck {
  const title = "QEMU process reuse";
  if (accel === "kvm") return { id: "qemu-reuse", title, status: "ok", required: false, detail: "not used under KVM (there is no translation to keep): one QEMU process per VM" };
  if (process.env.SUPERMACHINE_REUSE_QEMU === "0") return { id: "qemu-reuse", title, status: "ok", required: false, detail: "off (SUPERMACHINE_REUSE_QEMU=0): one QEMU process per VM" };
  let qemu = "";
  let has = false;
  let repString = false;
  let pretranslation = false;
  try {
    qemu = findQemu();
    const bytes = readFileSync(qemu);
    has = bytes.includes(RELOAD_COMMAND);
    repString = bytes.includes(REP_STRING_HELPER);
    pretranslation = bytes.includes(PRETRANSLATE_COMMAND);
  } catch {
    /* reported by the QEMU check */
  }
  const missing = [
    ...(repString ? [] : ["qemu/supermachine-rep-string.patch (the guest's rep movs/stos copy an element at a time)"]),
    ...(pretranslation ? [] : ["qemu/supermachine-pretranslate.patch (a fresh QEMU translates everything itself, docs/pretranslate.md)"]),
  ];
  if (has && missing.length > 0) {
    return {
      id: "qemu-reuse",
      title,
      status: "warn",
      required: false,
      detail: `${qemu} has ${RELOAD_COMMAND} but was built before ${missing.join(" and ")}`,
      fix: "run `sudo npx supermachine setup --qemu` again (in a checkout, `npm run setup`): the build's key covers every patch in qemu/, so it rebuilds (qemu/README.md)",
    };
  }
  if (has) return { id: "qemu-reuse", title, status: "ok", required: false, detail: `${qemu} has ${RELOAD_COMMAND}: pools run each next VM in the previous one's QEMU process (it keeps its translations); a fresh one pretranslates a snapshot's known blocks; rep movs/stos run a page at a time` };
  return {
    id: "qemu-reuse",
    title,
    status: "warn",
    required: false,
    detail: `${qemu} has no ${RELOAD_COMMAND}: under TCG every pool VM starts a QEMU process and translates the guest's code again`,
    fix: "`sudo npx supermachine setup --qemu` builds QEMU with the patches in qemu/ (in a checkout, `npm run setup` does); or point SUPERMACHINE_QEMU at such a build (docs/qemu-reuse.md)",
  };
}

async function checkQemu(): Promise<DoctorCheck> {
  const name = qemuBinaryName();
  let qemu: string;
  try {
    qemu = findQemu();
  } catch (e) {
    const fromEnv = process.env.SUPERMACHINE_QEMU;
    return {
      id: "qemu",
      title: "QEMU",
      status: "fail",
      required: true,
      detail: fromEnv ? (e as Error).message : `${name} is not on PATH`,
      fix: fromEnv ? "point SUPERMACHINE_QEMU at a qemu-system-x86_64 binary, or unset it" : `${aptFix(["qemu-system-x86"], "QEMU (qemu-system-x86_64, 7.2 or newer)")}; or set SUPERMACHINE_QEMU=/path/to/${name}`,
    };
  }
  const [ver, machines] = await Promise.all([run(qemu, ["--version"]), run(qemu, ["-machine", "help"])]);
  const version = ver.out.split("\n")[0]?.trim() || "version unknown";
  if (!ver.ok) return { id: "qemu", title: "QEMU", status: "fail", required: true, detail: `${qemu} does not run: ${version.slice(0, 300)}`, fix: aptFix(["qemu-system-x86"], "a working QEMU") };
  if (!/^microvm\b/m.test(machines.out)) {
    return { id: "qemu", title: "QEMU", status: "fail", required: true, detail: `${qemu} (${version}) has no microvm machine`, fix: `install a QEMU built with the microvm machine: ${aptFix(["qemu-system-x86"], "Debian's or Ubuntu's qemu-system-x86")}` };
  }
  return { id: "qemu", title: "QEMU", status: "ok", required: true, detail: `${qemu} (${version}, microvm machine)` };
}

function checkAssets(cacheDir: string): DoctorCheck {
  const pkg = platformPackageStatus();
  const where = process.env.SUPERMACHINE_KERNEL ? "SUPERMACHINE_KERNEL" : pkg.found ? `${pkg.assets.name} ${pkg.assets.version} (${pkg.assets.dir})` : isCheckout() ? "this checkout's build" : "nowhere";
  try {
    const kernel = locateKernel(cacheDir);
    const agent = locateAgent();
    const kernelFrom = pkg.found && kernel.kernel === pkg.assets.kernel ? `from ${pkg.assets.name}: Debian ${pkg.assets.kernelPackage}` : kernel.id;
    return {
      id: "assets",
      title: "boot assets",
      status: "ok",
      required: true,
      detail: `kernel ${kernel.kernel} (${kernelFrom}), agent ${agent}; found in ${where}`,
    };
  } catch (e) {
    const msg = (e as Error).message;
    return {
      id: "assets",
      title: "boot assets",
      status: "fail",
      required: true,
      detail: pkg.found ? msg : `${msg.split(":")[0]}; platform package: ${pkg.reason}`,
      fix: isCheckout() ? "run `npm run setup` in the checkout" : msg.slice(msg.indexOf(":") + 1).trim(),
    };
  }
}

function groupName(gid: number): string | undefined {
  try {
    for (const line of readFileSync("/etc/group", "utf8").split("\n")) {
      const f = line.split(":");
      if (f.length >= 3 && Number(f[2]) === gid) return f[0];
    }
  } catch {
    /* unknown */
  }
  return undefined;
}

function checkKvm(): DoctorCheck {
  const title = "/dev/kvm";
  if (!existsSync("/dev/kvm")) {
    return {
      id: "kvm",
      title,
      status: "warn",
      required: false,
      detail: "/dev/kvm does not exist: VMs run under TCG emulation",
      fix: "load the kvm module (modprobe kvm_intel or kvm_amd) on a host with hardware virtualization; in a cloud VM, enable nested virtualization",
    };
  }
  const st = statSync("/dev/kvm");
  const group = groupName(st.gid) ?? String(st.gid);
  try {
    accessSync("/dev/kvm", fsc.R_OK | fsc.W_OK);
  } catch {
    let user: string;
    try {
      user = userInfo().username;
    } catch {
      user = process.env.USER ?? `uid ${process.getuid?.()}`;
    }
    const groupRw = (st.mode & 0o060) === 0o060;
    const fix =
      groupRw && st.gid !== 0
        ? `join the ${group} group (sudo usermod -aG ${group} ${user}, then log in again)`
        : `give a group read-write access to /dev/kvm (as most distributions do: sudo groupadd -f kvm && sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm, made permanent by a udev rule), then join it (sudo usermod -aG kvm ${user}, then log in again)`;
    return {
      id: "kvm",
      title,
      status: "warn",
      required: false,
      detail: `/dev/kvm exists (group ${group}, mode ${(st.mode & 0o777).toString(8)}) but this user cannot open it read-write: VMs run under TCG emulation`,
      fix,
    };
  }
  const probe = probeHost();
  if (!probe.kvmUsable) {
    return { id: "kvm", title, status: "warn", required: false, detail: `/dev/kvm does not open (${probe.kvmError})`, fix: "check that the kvm module is loaded and not used exclusively by another hypervisor" };
  }
  return { id: "kvm", title, status: "ok", required: false, detail: `/dev/kvm opens read-write (group ${group})` };
}

function checkCpu(): DoctorCheck {
  let cpuinfo: string | undefined;
  try {
    cpuinfo = readFileSync("/proc/cpuinfo", "latin1");
  } catch {
    cpuinfo = undefined;
  }
  if (cpuHasVirtualization(cpuinfo)) return { id: "cpu-virtualization", title: "hardware virtualization", status: "ok", required: false, detail: "the CPU has vmx/svm" };
  return {
    id: "cpu-virtualization",
    title: "hardware virtualization",
    status: "warn",
    required: false,
    detail: "the CPU shows no vmx/svm flag (typical of a cloud VM without nested virtualization): VMs run under QEMU's TCG emulator, roughly 10x slower",
    fix: "run on bare metal or enable nested virtualization in the hypervisor for KVM; nothing to do to keep TCG",
  };
}

/** Free space where `dir` is, or at its nearest existing parent. */
function checkDisk(dirs: ReadonlyArray<{ label: string; dir: string }>, minFreeMib: number): DoctorCheck {
  const parts: string[] = [];
  let low = false;
  for (const { label, dir } of dirs) {
    let d = resolve(dir);
    while (!existsSync(d) && dirname(d) !== d) d = dirname(d);
    try {
      const s = statfsSync(d);
      const freeMib = Math.floor((Number(s.bavail) * Number(s.bsize)) / (1 << 20));
      if (freeMib < minFreeMib) low = true;
      parts.push(`${label} ${dir}: ${freeMib >= 10240 ? `${(freeMib / 1024).toFixed(0)} GiB` : `${freeMib} MiB`} free`);
    } catch (e) {
      parts.push(`${label} ${dir}: cannot tell (${(e as Error).message})`);
    }
  }
  return low
    ? {
        id: "disk",
        title: "disk space",
        status: "warn",
        required: false,
        detail: `${parts.join("; ")} (less than ${minFreeMib} MiB somewhere: image pulls and snapshots may fail with DiskFullError)`,
        fix: "free space there, or point SUPERMACHINE_CACHE_DIR / SUPERMACHINE_SNAPSHOTS_DIR (or the snapshotsDir option) at a larger filesystem",
      }
    : { id: "disk", title: "disk space", status: "ok", required: false, detail: parts.join("; ") };
}

function checkBusybox(): DoctorCheck {
  const pkg = platformPackageStatus();
  const found = process.env.SUPERMACHINE_BUSYBOX ?? (pkg.found ? pkg.assets.busybox : undefined) ?? ["/bin/busybox", "/usr/bin/busybox"].find((p) => existsSync(p));
  if (found && existsSync(found)) return { id: "busybox", title: "default image", status: "ok", required: false, detail: `busybox ${found}` };
  return {
    id: "busybox",
    title: "default image",
    status: "warn",
    required: false,
    detail: "no static busybox: `supermachine run` without an IMAGE has no default image (images from registries are unaffected)",
    fix: `${aptFix(["busybox-static"], "a static busybox")}, or set SUPERMACHINE_BUSYBOX`,
  };
}

/**
 * Checks this host for everything supermachine needs and returns what it
 * found, with what to do about each problem. Reads only; changes nothing
 * (`supermachine setup` installs).
 */
export async function doctor(o: DoctorOptions = {}): Promise<DoctorReport> {
  const platform = hostPlatform();
  const checks: DoctorCheck[] = [];
  const unsupported = unsupportedHostReason();
  checks.push(
    unsupported
      ? { id: "platform", title: "platform", status: "fail", required: true, detail: unsupported, fix: "use a supported host (see the detail)" }
      : { id: "platform", title: "platform", status: "ok", required: true, detail: `${platform}, Node ${process.versions.node}` },
  );
  if (unsupported) return { ok: false, platform, accelerator: null, checks };
  const cacheDir = o.cacheDir ?? defaultCacheDir();
  const snapshotsDir = o.snapshotsDir ?? process.env.SUPERMACHINE_SNAPSHOTS_DIR ?? resolve(process.env.HOME ?? "/", ".local", "supermachine-snapshots");
  const qemu = await checkQemu();
  checks.push(qemu, checkAssets(cacheDir), checkKvm(), checkCpu());
  let accelerator: AcceleratorChoice | null = null;
  try {
    accelerator = chooseAccelerator();
    checks.push(
      accelerator.accel === "kvm"
        ? { id: "accelerator", title: "accelerator", status: "ok", required: false, detail: `KVM (${accelerator.reason})` }
        : {
            id: "accelerator",
            title: "accelerator",
            status: "warn",
            required: false,
            detail: `TCG emulation (${accelerator.reason})`,
            fix: "VMs work, slower; see /dev/kvm and hardware virtualization above for KVM. SUPERMACHINE_ACCEL=tcg silences the runtime warning",
          },
    );
  } catch (e) {
    checks.push({ id: "accelerator", title: "accelerator", status: "fail", required: true, detail: (e as Error).message, fix: "set SUPERMACHINE_ACCEL to auto, kvm or tcg" });
  }
  if (accelerator && qemu.status === "ok") checks.push(checkQemuReuse(accelerator.accel));
  try {
    const c = await confinement();
    checks.push({
      id: "cgroup",
      title: "cgroup limits",
      status: c.cgroup.active ? "ok" : "warn",
      required: false,
      detail: c.cgroup.detail,
      ...(c.cgroup.active ? {} : { fix: c.nodeIsRoot ? "mount cgroup v2 (unified hierarchy) writable, or set SUPERMACHINE_CGROUP to a delegated cgroup v2 directory" : "set SUPERMACHINE_CGROUP to a cgroup v2 directory delegated to this user (systemd-run --user --scope -p Delegate=yes …), or run as root" }),
    });
    checks.push({
      id: "bubblewrap",
      title: "bubblewrap (namespaces)",
      status: c.namespaces.active ? "ok" : "warn",
      required: false,
      detail: c.namespaces.detail,
      ...(c.namespaces.active ? {} : { fix: hasCommand("bwrap") ? "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1), or run as root; see docs/confinement.md" : aptFix(["bubblewrap"], "bubblewrap") }),
    });
    checks.push({
      id: "setpriv",
      title: "setpriv (QEMU dies with Node)",
      status: c.diesWithNode.active ? "ok" : "warn",
      required: false,
      detail: c.diesWithNode.detail,
      ...(c.diesWithNode.active ? {} : { fix: aptFix(["util-linux"], "setpriv (util-linux)") }),
    });
  } catch (e) {
    checks.push({ id: "cgroup", title: "confinement", status: "fail", required: true, detail: (e as Error).message, fix: "fix or unset SUPERMACHINE_QEMU_USER / SUPERMACHINE_CGROUP (docs/confinement.md)" });
  }
  checks.push(checkDisk([{ label: "cache", dir: cacheDir }, { label: "snapshots", dir: snapshotsDir }], o.minFreeMib ?? 2048), checkBusybox(), checkVolumeTools());
  return { ok: !checks.some((c) => c.required && c.status === "fail"), platform, accelerator, checks };
}

/** qemu-img and mkfs.ext4: only images with volumes or diskMib need them (docs/volumes.md). */
function checkVolumeTools(): DoctorCheck {
  const missing = [
    ...(hasCommand("qemu-img") ? [] : [{ cmd: "qemu-img", pkg: "qemu-utils" }]),
    ...(hasCommand("mkfs.ext4") ? [] : [{ cmd: "mkfs.ext4", pkg: "e2fsprogs" }]),
  ];
  return {
    id: "volumes",
    title: "volumes and diskMib (qemu-img, mkfs.ext4)",
    status: missing.length ? "warn" : "ok",
    required: false,
    detail: missing.length ? `${missing.map((m) => m.cmd).join(" and ")} not found: Image.build with volumes or diskMib fails` : "qemu-img and mkfs.ext4 found",
    ...(missing.length ? { fix: aptFix(missing.map((m) => m.pkg), missing.map((m) => m.cmd).join(" and ")) } : {}),
  };
}

/** The report as text: one line per check, a `fix:` line under each problem, a verdict last. */
export function formatDoctorReport(r: DoctorReport): string {
  const mark: Record<DoctorStatus, string> = { ok: "ok  ", warn: "warn", fail: "FAIL" };
  const lines: string[] = [];
  for (const c of r.checks) {
    lines.push(`${mark[c.status]}  ${c.title}: ${c.detail}`);
    if (c.fix && c.status !== "ok") lines.push(`      fix: ${c.fix}`);
  }
  const failed = r.checks.filter((c) => c.required && c.status === "fail");
  const warned = r.checks.filter((c) => c.status !== "ok" && !(c.required && c.status === "fail"));
  if (failed.length) lines.push(`doctor: cannot run VMs: ${failed.map((c) => c.title).join(", ")} (see the fix lines above)`);
  else lines.push(`doctor: ready${r.accelerator ? ` (accelerator: ${r.accelerator.accel})` : ""}${warned.length ? `; ${warned.length} warning${warned.length > 1 ? "s" : ""}` : ""}`);
  return lines.join("\n");
}
