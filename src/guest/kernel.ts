/**
 * The guest kernel: Debian's generic `linux-image-<arch>` package, fetched
 * with `apt-get download` (no install on the host) and unpacked into a
 * versioned asset cache:
 *
 *   <cache>/kernel/<package version>+m<hash of GUEST_MODULES>/
 *     vmlinux           uncompressed ELF, booted through its PVH entry (no
 *                       in-guest decompression: ~5 s saved under TCG)
 *     vmlinuz           the original compressed image (fallback)
 *     modules/*.ko      the modules the guest needs, and their dependencies
 *     modules/order     their load order, one file name per line
 *     modules/wanted    the GUEST_MODULES this directory was made for: a
 *                       cache made for another set is fetched again
 *     release           `uname -r` of this kernel
 *     complete          written last: the directory is usable
 *   <cache>/kernel/current   the version to use (a one-line file); when it names
 *                            another module set (another copy of the library
 *                            moved it), the newest directory made for ours wins
 */

import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { MissingAssetError } from "../errors.js";
import { GUEST_MODULES, indexModules, resolveModules } from "./modules.js";
import { isCheckout, missingAssetsHint, platformAssets } from "../platform/package.js";

const run = promisify(execFile);

export interface KernelAssets {
  /** Kernel image to boot (vmlinux when available, else bzImage). */
  kernel: string;
  /** Directory of modules + `order`, or undefined when the kernel needs none. */
  modulesDir?: string;
  /** Identifies the kernel for cache keys. */
  id: string;
}

export function kernelCacheRoot(cacheDir: string): string {
  return join(cacheDir, "kernel");
}

function debianArch(): string {
  return process.arch === "arm64" ? "arm64" : "amd64";
}

/**
 * Finds the kernel to boot: an explicit path (option or SUPERMACHINE_KERNEL,
 * with modules from SUPERMACHINE_MODULES), else the installed platform
 * package's, else the cached Debian kernel (a checkout's `npm run setup`).
 */
export function locateKernel(cacheDir: string, explicit?: { kernel?: string; modulesDir?: string }): KernelAssets {
  const kernel = explicit?.kernel ?? process.env.SUPERMACHINE_KERNEL;
  const modulesDir = explicit?.modulesDir ?? process.env.SUPERMACHINE_MODULES;
  if (kernel) {
    if (!existsSync(kernel)) {
      throw new MissingAssetError("kernel", `kernel image ${kernel} (from ${explicit?.kernel ? "the kernel option" : "SUPERMACHINE_KERNEL"}) does not exist.`);
    }
    return { kernel, ...(modulesDir ? { modulesDir } : {}), id: `path:${kernel}:${modulesDir ?? ""}` };
  }
  const pkg = platformAssets();
  if (pkg) return { kernel: pkg.kernel, modulesDir: pkg.modulesDir, id: pkg.kernelId };
  const root = kernelCacheRoot(cacheDir);
  const currentFile = join(root, "current");
  let version = existsSync(currentFile) ? readFileSync(currentFile, "utf8").trim() : undefined;
  // `current` is shared by every copy of the library using this cache; one
  // with another module set (an older or newer version) may have moved it.
  // Prefer a complete directory made for this version's modules.
  if (version && cachedModuleSet(join(root, version)) !== MODULE_SET) {
    const match = matchingKernelDir(root);
    if (match) version = match;
  }
  const dir = version ? join(root, version) : undefined;
  if (!dir || !existsSync(join(dir, "complete"))) {
    if (!isCheckout()) {
      throw new MissingAssetError("kernel", `no guest kernel: ${missingAssetsHint()}`);
    }
    throw new MissingAssetError(
      "kernel",
      `no guest kernel in ${root}. Run \`npm run setup\` (it fetches Debian's linux-image-${debianArch()} with apt-get download), ` +
        `or set SUPERMACHINE_KERNEL=/path/to/vmlinux (and SUPERMACHINE_MODULES=/path/to/lib/modules/<release> when its virtio drivers are modules).`,
    );
  }
  const vmlinux = join(dir, "vmlinux");
  return {
    kernel: existsSync(vmlinux) ? vmlinux : join(dir, "vmlinuz"),
    modulesDir: join(dir, "modules"),
    id: `debian:${version}`,
  };
}

const XZ_MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
const GZIP_MAGIC = Buffer.from([0x1f, 0x8b, 0x08]);
const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);

/**
 * Extracts the uncompressed ELF kernel from a bzImage by finding its payload's
 * compression magic and decompressing with the system tool. Returns false when
 * no ELF came out (the caller boots the bzImage instead).
 */
export async function extractVmlinux(bzImage: string, out: string): Promise<boolean> {
  const img = readFileSync(bzImage);
  const tries: [Buffer, string[]][] = [
    [XZ_MAGIC, ["xz", "-dc", "--single-stream"]],
    [ZSTD_MAGIC, ["zstd", "-dc"]],
    [GZIP_MAGIC, ["gzip", "-dc"]],
  ];
  for (const [magic, cmd] of tries) {
    let at = img.indexOf(magic);
    while (at >= 0) {
      const ok = await new Promise<boolean>((resolve) => {
        const child = execFile(cmd[0]!, cmd.slice(1), { encoding: "buffer", maxBuffer: 512 << 20 }, (err, stdout) => {
          // Trailing data after the stream makes some tools complain; the
          // output is still what we want when it is an ELF.
          const b = stdout as unknown as Buffer;
          if (b && b.length > 64 && b.readUInt32BE(0) === 0x7f454c46) {
            writeFileSync(out, b);
            resolve(true);
          } else {
            void err;
            resolve(false);
          }
        });
        child.stdin?.on("error", () => undefined);
        child.stdin?.end(img.subarray(at));
      });
      if (ok) return true;
      at = img.indexOf(magic, at + 1);
    }
  }
  return false;
}

/** The module set a kernel cache directory was made for (`modules/wanted`). */
const MODULE_SET = GUEST_MODULES.join(",");

/** The newest complete kernel directory made for this library's module set. */
function matchingKernelDir(root: string): string | undefined {
  return (existsSync(root) ? readdirSync(root) : [])
    .filter((d) => !d.startsWith(".") && d !== "current" && existsSync(join(root, d, "complete")) && cachedModuleSet(join(root, d)) === MODULE_SET)
    .sort()
    .pop();
}

function cachedModuleSet(dir: string): string | undefined {
  const f = join(dir, "modules", "wanted");
  return existsSync(f) ? readFileSync(f, "utf8").trim() : undefined;
}

export interface FetchResult {
  version: string;
  dir: string;
  fetched: boolean;
}

/**
 * Ensures a Debian kernel is in the cache. A no-op when one is already
 * there (unless `refresh`). Needs apt-get and dpkg-deb.
 */
export async function fetchDebianKernel(cacheDir: string, opts: { refresh?: boolean; log?: (s: string) => void } = {}): Promise<FetchResult> {
  const log = opts.log ?? (() => undefined);
  const root = kernelCacheRoot(cacheDir);
  const currentFile = join(root, "current");
  if (!opts.refresh && existsSync(currentFile)) {
    const v = readFileSync(currentFile, "utf8").trim();
    // A cache made for another module set (e.g. before virtio_net was
    // added) is fetched again, into a directory of its own: VMs booting
    // from the old one meanwhile keep it.
    if (existsSync(join(root, v, "complete")) && cachedModuleSet(join(root, v)) === MODULE_SET) return { version: v, dir: join(root, v), fetched: false };
    // Another copy of the library moved `current`: ours is still there.
    const ours = matchingKernelDir(root);
    if (ours) return { version: ours, dir: join(root, ours), fetched: false };
  }
  for (const tool of ["apt-get", "apt-cache", "dpkg-deb"]) {
    if (!(await run("sh", ["-c", `command -v ${tool}`]).then(() => true, () => false))) {
      throw new MissingAssetError(
        "kernel",
        `cannot fetch a guest kernel: ${tool} is not available on this host. Provide one: set SUPERMACHINE_KERNEL=/path/to/vmlinux ` +
          `(and SUPERMACHINE_MODULES=/path/to/lib/modules/<release> for its virtio/erofs/overlay modules), or pass the kernel option.`,
      );
    }
  }
  const meta = `linux-image-${debianArch()}`;
  const { stdout: deps } = await run("apt-cache", ["depends", meta]);
  const m = /Depends:\s*(linux-image-\S+)/.exec(deps);
  if (!m) throw new MissingAssetError("kernel", `apt-cache depends ${meta} names no kernel package (run apt-get update?)`);
  const pkg = m[1]!;
  mkdirSync(root, { recursive: true });
  const work = await mkdtemp(join(root, ".fetch-"));
  try {
    log(`fetching ${pkg} with apt-get download`);
    await run("apt-get", ["download", pkg], { cwd: work, maxBuffer: 16 << 20 });
    const deb = readdirSync(work).find((f) => f.endsWith(".deb"));
    if (!deb) throw new MissingAssetError("kernel", `apt-get download ${pkg} produced no .deb`);
    const { stdout: version } = await run("dpkg-deb", ["-f", join(work, deb), "Version"]);
    const v = `${version.trim().replace(/[^A-Za-z0-9.+~_-]/g, "_")}+m${createHash("sha256").update(MODULE_SET).digest("hex").slice(0, 8)}`;
    const unpack = join(work, "x");
    await run("dpkg-deb", ["-x", join(work, deb), unpack]);
    const releases = readdirSync(join(unpack, "lib", "modules"));
    const release = releases[0];
    if (!release) throw new MissingAssetError("kernel", `${pkg} has no lib/modules directory`);
    const boot = join(unpack, "boot");
    const vmlinuz = readdirSync(boot).find((f) => f.startsWith("vmlinuz-"));
    if (!vmlinuz) throw new MissingAssetError("kernel", `${pkg} has no boot/vmlinuz-*`);
    const stage = join(work, "out");
    mkdirSync(join(stage, "modules"), { recursive: true });
    copyFileSync(join(boot, vmlinuz), join(stage, "vmlinuz"));
    const config = readdirSync(boot).find((f) => f.startsWith("config-"));
    if (config) copyFileSync(join(boot, config), join(stage, "config"));
    log("extracting the uncompressed kernel (PVH boot)");
    if (!(await extractVmlinux(join(stage, "vmlinuz"), join(stage, "vmlinux")))) {
      log("no ELF kernel found inside the bzImage; the guest will boot the compressed image");
    }
    const resolved = resolveModules(indexModules(join(unpack, "lib", "modules", release)), GUEST_MODULES);
    for (const [name, p] of resolved.paths) copyFileSync(p, join(stage, "modules", `${name}.ko`));
    writeFileSync(join(stage, "modules", "order"), resolved.order.map((n) => `${n}.ko`).join("\n") + "\n");
    writeFileSync(join(stage, "modules", "wanted"), `${MODULE_SET}\n`);
    writeFileSync(join(stage, "release"), `${release}\n`);
    writeFileSync(join(stage, "complete"), `${pkg} ${version.trim()}\n`);
    const dest = join(root, v);
    rmSync(dest, { recursive: true, force: true });
    renameSync(stage, dest);
    writeFileSync(`${currentFile}.tmp`, `${v}\n`);
    renameSync(`${currentFile}.tmp`, currentFile);
    log(`kernel ${release} (${pkg} ${version.trim()}) cached in ${dest}: modules ${resolved.order.join(", ")}`);
    return { version: v, dir: dest, fetched: true };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** sha256 over files, for cache keys. */
export function hashFiles(paths: readonly string[]): string {
  const h = createHash("sha256");
  for (const p of paths) {
    h.update(p.split("/").pop() ?? p);
    h.update("\0");
    h.update(readFileSync(p));
  }
  return h.digest("hex");
}
