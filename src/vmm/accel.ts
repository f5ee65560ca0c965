/**
 * Accelerator choice: KVM where the host really has hardware virtualization,
 * QEMU's TCG emulator elsewhere, and say which.
 *
 * `/dev/kvm` alone proves nothing: paravirtual KVM (kvm_pvm) exposes it on
 * hosts whose CPU has no vmx/svm, and a stock kernel hangs there. So `auto`
 * needs both a usable /dev/kvm and the CPU flag.
 */

import { closeSync, openSync, readFileSync, constants as fsc } from "node:fs";
import { MissingAssetError, invalidOption } from "../errors.js";

export type Accelerator = "kvm" | "tcg";
export type AcceleratorOption = Accelerator | "auto";

export interface AcceleratorChoice {
  accel: Accelerator;
  /** Why this accelerator was chosen, for logs and errors. */
  reason: string;
}

export interface HostProbe {
  /** Contents of /proc/cpuinfo (or undefined when unreadable). */
  cpuinfo?: string;
  /** Whether /dev/kvm opens read-write. */
  kvmUsable: boolean;
  kvmError?: string;
}

export function probeHost(): HostProbe {
  let cpuinfo: string | undefined;
  try {
    cpuinfo = readFileSync("/proc/cpuinfo", "latin1");
  } catch {
    cpuinfo = undefined;
  }
  try {
    const fd = openSync("/dev/kvm", fsc.O_RDWR);
    closeSync(fd);
    return { cpuinfo, kvmUsable: true };
  } catch (e) {
    return { cpuinfo, kvmUsable: false, kvmError: (e as NodeJS.ErrnoException).code ?? String(e) };
  }
}

export function cpuHasVirtualization(cpuinfo: string | undefined): boolean {
  if (!cpuinfo) return false;
  for (const line of cpuinfo.split("\n")) {
    if (!/^flags\s*:/.test(line)) continue;
    const flags = line.slice(line.indexOf(":") + 1).trim().split(/\s+/);
    if (flags.includes("vmx") || flags.includes("svm")) return true;
  }
  return false;
}

function parseOption(value: unknown, source: string): AcceleratorOption | undefined {
  if (value === undefined || value === "") return undefined;
  if (value === "kvm" || value === "tcg" || value === "auto") return value;
  throw invalidOption(source, '"kvm", "tcg" or "auto"', value);
}

/**
 * Resolves the accelerator. Precedence: the `accel` option, then
 * SUPERMACHINE_ACCEL, then auto-detection.
 */
export function chooseAccelerator(
  option?: AcceleratorOption,
  env: NodeJS.ProcessEnv = process.env,
  probe: () => HostProbe = probeHost,
): AcceleratorChoice {
  const requested = parseOption(option, "accel") ?? parseOption(env.SUPERMACHINE_ACCEL, "SUPERMACHINE_ACCEL") ?? "auto";
  if (requested === "tcg") return { accel: "tcg", reason: "requested" };
  const host = probe();
  const hw = cpuHasVirtualization(host.cpuinfo);
  if (requested === "kvm") {
    if (!host.kvmUsable) {
      throw new MissingAssetError(
        "/dev/kvm",
        `KVM was requested but /dev/kvm cannot be opened (${host.kvmError}). Load the kvm module and give this user access to /dev/kvm, or use accel: "tcg" / SUPERMACHINE_ACCEL=tcg.`,
      );
    }
    return { accel: "kvm", reason: hw ? "requested" : "requested (the CPU shows no vmx/svm flag)" };
  }
  if (host.kvmUsable && hw) return { accel: "kvm", reason: "auto: /dev/kvm usable and the CPU has hardware virtualization" };
  const why = !hw
    ? "the CPU shows no hardware virtualization (no vmx/svm flag)"
    : `/dev/kvm is not usable (${host.kvmError})`;
  return { accel: "tcg", reason: `auto: ${why}` };
}

let warned = false;

/** Emits the one-time warning that VMs run under emulation. */
export function warnTcgOnce(choice: AcceleratorChoice): void {
  if (warned || choice.accel !== "tcg" || choice.reason === "requested") return;
  warned = true;
  process.emitWarning(
    `supermachine: running VMs under QEMU TCG emulation because ${choice.reason.replace(/^auto: /, "")}; expect ~10x slower guests. Set SUPERMACHINE_ACCEL=tcg to silence this warning.`,
    { code: "SUPERMACHINE_TCG" },
  );
}
