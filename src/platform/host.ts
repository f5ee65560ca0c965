/**
 * Which hosts supermachine for Linux runs on, and the error the others get.
 *
 * Only x86-64 Linux: the VM is QEMU's `microvm` machine (x86 only) booted
 * through the kernel's PVH entry (x86 only). An arm64 Linux host would need
 * QEMU's `virt` machine, a device tree and an arm64 kernel and agent: not
 * built, so refused with a clear error rather than half working.
 *
 * The check runs on first use (Vm.boot, Image.build, Image.fromSnapshot),
 * never at import or install, as the seed does for its unsupported hosts.
 */

import { UnsupportedPlatformError } from "../errors.js";

/** The hosts this build runs on, as `<platform>-<arch>`. */
export const SUPPORTED_HOSTS: readonly string[] = ["linux-x64"];

/** The package of the macOS original, for the error macOS users get. */
export const MACOS_ORIGINAL = "@supermachine/core (the macOS original, with its @supermachine/core-darwin-arm64 native part)";

/** `<process.platform>-<process.arch>`, e.g. "linux-x64". */
export function hostPlatform(platform: string = process.platform, arch: string = process.arch): string {
  return `${platform}-${arch}`;
}

/**
 * Why this host cannot run VMs, or undefined when it can. Pure: the platform
 * and arch are parameters so every branch is testable on any host.
 */
export function unsupportedHostReason(platform: string = process.platform, arch: string = process.arch): string | undefined {
  const host = hostPlatform(platform, arch);
  if (SUPPORTED_HOSTS.includes(host)) return undefined;
  if (platform === "darwin") {
    return (
      `supermachine for Linux does not run on macOS (${host}): it drives QEMU with KVM or TCG on a Linux host. ` +
      `On a Mac with Apple Silicon, install ${MACOS_ORIGINAL} from npm instead: same API, Apple's Hypervisor.framework.`
    );
  }
  if (platform === "win32") {
    return `supermachine for Linux does not run on Windows (${host}). Run it inside WSL 2 (an x86-64 Linux with QEMU; /dev/kvm where nested virtualization is on), or on a Linux host.`;
  }
  if (platform === "linux") {
    return (
      `supermachine for Linux runs on x86-64 only, not on ${host}: its VMs are QEMU's microvm machine booted through the kernel's PVH entry, which exist only for x86. ` +
      `Use an x86-64 Linux host (or, on an arm64 Mac, ${MACOS_ORIGINAL}).`
    );
  }
  return `supermachine for Linux does not run on ${host}; it needs an x86-64 Linux host with QEMU.`;
}

/**
 * Throws {@link UnsupportedPlatformError} on a host this build cannot run
 * VMs on (see {@link SUPPORTED_HOSTS}).
 */
export function assertSupportedHost(platform: string = process.platform, arch: string = process.arch): void {
  const why = unsupportedHostReason(platform, arch);
  if (why !== undefined) throw new UnsupportedPlatformError(why, hostPlatform(platform, arch), SUPPORTED_HOSTS);
}
