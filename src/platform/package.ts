/**
 * The platform package: the prebuilt native part of an installed
 * supermachine, as the seed ships its own (`@supermachine/core-darwin-arm64`
 * in optionalDependencies). Ours is `@supermachine/core-linux-x64-gnu` and
 * carries what a checkout builds from source:
 *
 *   package.json        name, version (= the main package's), os/cpu, and a
 *                       `supermachine` section naming the files below
 *   agent/supermachine-agent     the static guest agent (PID 1)
 *   kernel/vmlinux               Debian's kernel, uncompressed (PVH boot)
 *   kernel/modules/*.ko, order   the modules the guest loads, in order
 *   busybox/busybox              Debian's static busybox (the default image)
 *   README.md, COPYING           the GPL source pointer
 *
 * It is built by scripts/build-packages.mjs. A package of that name that is
 * not ours (another version, no `supermachine` section: the name is also
 * used on npm by the macOS original's author) is ignored, and
 * {@link platformPackageStatus} says why.
 */

import { closeSync, existsSync, fstatSync, openSync, readSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, isAbsolute, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { GUEST_MODULES } from "../guest/modules.js";

/** Format of the `supermachine` section of the platform package's package.json. */
export const PLATFORM_ASSETS_FORMAT = 1;

/** Root of the main package (where package.json and dist/ live). */
const MAIN_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

/**
 * The platform package's name for a host, in the seed's (napi-rs) style:
 * `@supermachine/core-<platform>-<arch>[-<abi>]`. Linux x64 is
 * `core-linux-x64-gnu`, the name the seed's roadmap gives it.
 */
export function platformPackageName(platform: string = process.platform, arch: string = process.arch): string | undefined {
  if (platform === "linux" && arch === "x64") return "@supermachine/core-linux-x64-gnu";
  return undefined;
}

/** What an installed platform package provides, paths absolute. */
export interface PlatformAssets {
  readonly name: string;
  readonly version: string;
  /** The package's directory. */
  readonly dir: string;
  readonly agent: string;
  readonly kernel: string;
  readonly modulesDir: string;
  /** Cache-key id of the kernel (same as a checkout's cache of the same Debian kernel). */
  readonly kernelId: string;
  /** `uname -r` of the kernel. */
  readonly kernelRelease: string;
  /** Debian binary and source package of the kernel, for the GPL source pointer. */
  readonly kernelPackage: string;
  readonly busybox?: string;
}

export type PlatformPackageStatus =
  | { readonly found: true; readonly assets: PlatformAssets }
  | { readonly found: false; readonly name: string | undefined; readonly reason: string };

/** Reads at most `max` bytes of a file (package.json is small; a huge one is refused). */
function readBounded(path: string, max: number): string {
  const fd = openSync(path, "r");
  try {
    const size = fstatSync(fd).size;
    if (size > max) throw new Error(`${path} is ${size} bytes (more than ${max})`);
    const b = Buffer.alloc(size);
    let off = 0;
    while (off < size) {
      const n = readSync(fd, b, off, size - off, off);
      if (n === 0) break;
      off += n;
    }
    return b.toString("utf8", 0, off);
  } finally {
    closeSync(fd);
  }
}

let mainVersionMemo: string | undefined;

/** The main package's version (the platform package must have the same). */
export function mainPackageVersion(): string {
  if (mainVersionMemo === undefined) {
    const pkg = JSON.parse(readBounded(join(MAIN_ROOT, "package.json"), 1 << 20)) as { version?: unknown };
    mainVersionMemo = typeof pkg.version === "string" ? pkg.version : "0.0.0";
  }
  return mainVersionMemo;
}

/** A path inside `dir` named by the package's manifest: relative, no `..`. */
function inside(dir: string, rel: unknown, what: string): string {
  if (typeof rel !== "string" || rel === "" || isAbsolute(rel) || rel.length > 256) throw new Error(`its ${what} is not a relative path`);
  const n = normalize(rel);
  if (n === ".." || n.startsWith(`..${sep}`)) throw new Error(`its ${what} leaves the package`);
  const p = join(dir, n);
  if (!existsSync(p)) throw new Error(`its ${what} (${rel}) is missing`);
  return p;
}

const str = (v: unknown, what: string): string => {
  if (typeof v !== "string" || v === "" || v.length > 256) throw new Error(`its ${what} is not a string`);
  return v;
};

let memo: { key: string; status: PlatformPackageStatus } | undefined;

/**
 * Finds the platform package the way Node resolves a dependency of the main
 * package (`require.resolve("<name>/package.json")` from the main package),
 * and checks that it is ours and of the main package's version.
 *
 * @param from - the directory to resolve from.
 * @default from: the main package's directory
 */
export function platformPackageStatus(from: string = MAIN_ROOT): PlatformPackageStatus {
  const name = platformPackageName();
  const key = `${from}\0${name}`;
  if (memo?.key === key) return memo.status;
  const status = findPlatformPackage(from, name);
  // A package not found now may be installed later in this process; only a hit is kept.
  if (status.found) memo = { key, status };
  return status;
}

function findPlatformPackage(from: string, name: string | undefined): PlatformPackageStatus {
  if (!name) return { found: false, name, reason: `no platform package exists for ${process.platform}-${process.arch}` };
  let pkgJson: string;
  try {
    pkgJson = createRequire(join(from, "package.json")).resolve(`${name}/package.json`);
  } catch {
    return { found: false, name, reason: `${name} is not installed` };
  }
  const dir = dirname(pkgJson);
  try {
    const pkg = JSON.parse(readBounded(pkgJson, 64 * 1024)) as Record<string, unknown>;
    if (pkg.name !== name) throw new Error(`its package.json names ${JSON.stringify(pkg.name)}`);
    const want = mainPackageVersion();
    if (pkg.version !== want) throw new Error(`it is version ${JSON.stringify(pkg.version)}, not ${want} (the main package's); install the same version of both`);
    const sm = pkg.supermachine as Record<string, unknown> | undefined;
    if (typeof sm !== "object" || sm === null) throw new Error("it has no `supermachine` section (not a supermachine-for-Linux asset package)");
    if (sm.assetsFormat !== PLATFORM_ASSETS_FORMAT) throw new Error(`its assets format is ${JSON.stringify(sm.assetsFormat)}, this version reads ${PLATFORM_ASSETS_FORMAT}`);
    const k = sm.kernel as Record<string, unknown> | undefined;
    if (typeof k !== "object" || k === null) throw new Error("it names no kernel");
    // The modules the guest loads must be the ones this version's guest wants.
    if (k.guestModules !== GUEST_MODULES.join(",")) throw new Error(`its kernel modules are made for ${JSON.stringify(k.guestModules)}, this version's guest loads ${GUEST_MODULES.join(",")}`);
    const assets: PlatformAssets = {
      name,
      version: want,
      dir,
      agent: inside(dir, sm.agent, "agent"),
      kernel: inside(dir, k.image, "kernel image"),
      modulesDir: inside(dir, k.modules, "kernel modules directory"),
      kernelId: str(k.id, "kernel id"),
      kernelRelease: str(k.release, "kernel release"),
      kernelPackage: `${str(k.package, "kernel package")} ${str(k.version, "kernel version")} (source: ${str(k.source, "kernel source package")})`,
      ...(sm.busybox !== undefined ? { busybox: inside(dir, sm.busybox, "busybox") } : {}),
    };
    return { found: true, assets };
  } catch (e) {
    return { found: false, name, reason: `${name} in ${dir} is not usable: ${(e as Error).message}` };
  }
}

/** The installed platform package's assets, or undefined (see {@link platformPackageStatus} for why). */
export function platformAssets(): PlatformAssets | undefined {
  const s = platformPackageStatus();
  return s.found ? s.assets : undefined;
}

/** Whether the main package runs from a git checkout (it has the agent's sources). */
export function isCheckout(): boolean {
  return existsSync(join(MAIN_ROOT, "agent", "Cargo.toml")) && existsSync(join(MAIN_ROOT, "scripts", "setup.mjs"));
}

/** The main package's directory. */
export function mainPackageRoot(): string {
  return MAIN_ROOT;
}


/** What to do when the prebuilt assets are missing: a checkout builds them, an install has the platform package. */
export function missingAssetsHint(): string {
  if (isCheckout()) {
    return "run `npm run setup` in the checkout (it builds agent/ with cargo and fetches the kernel), or set SUPERMACHINE_AGENT / SUPERMACHINE_KERNEL (+ SUPERMACHINE_MODULES).";
  }
  const s = platformPackageStatus();
  const why = s.found ? "" : ` (${s.reason})`;
  return (
    `the platform package${why} provides it: reinstall @supermachine/core without omitting optional dependencies (no --omit=optional / --no-optional), ` +
    "or install the platform package of the same version; `npx supermachine doctor` checks everything. Or set SUPERMACHINE_AGENT / SUPERMACHINE_KERNEL (+ SUPERMACHINE_MODULES)."
  );
}

/** @internal For tests: forget the cached lookup. */
export function resetPlatformPackageCache(): void {
  memo = undefined;
  mainVersionMemo = undefined;
}
