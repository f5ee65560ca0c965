/**
 * The default image: a root filesystem directory built locally from Debian's
 * busybox-static (no registry, no network), so the demo and `supermachine
 * run` work offline.
 */

import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { chmod, copyFile, mkdir, rename, rm, symlink, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { MissingAssetError } from "../errors.js";
import { platformAssets } from "../platform/package.js";
import { defaultCacheDir } from "../paths.js";

/** Bumped when the layout below changes. */
const VERSION = 1;

export function defaultImageDir(cacheDir: string): string {
  return join(cacheDir, "images", `busybox-v${VERSION}`, "rootfs");
}

function findBusybox(): string {
  // SUPERMACHINE_BUSYBOX, else the platform package's (static), else the host's.
  const candidates = [process.env.SUPERMACHINE_BUSYBOX, platformAssets()?.busybox, "/bin/busybox", "/usr/bin/busybox"].filter((p): p is string => !!p);
  for (const c of candidates) if (existsSync(c)) return c;
  throw new MissingAssetError(
    "busybox",
    "the default image is built from a static busybox: run `npm run setup` (Debian: apt-get install busybox-static) or set SUPERMACHINE_BUSYBOX to a static busybox binary.",
  );
}

/** True for an ELF64 executable without a PT_INTERP program header. */
export function isStaticElf(b: Buffer): boolean {
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 || b[5] !== 1) return false;
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > b.length) return false;
    if (b.readUInt32LE(off) === 3) return false;
  }
  return true;
}

/**
 * Returns the default image's root directory, building it once. The busybox
 * must be static (it runs inside the guest, with no libc there).
 */
export async function ensureDefaultImage(cacheDir: string): Promise<string> {
  const dir = defaultImageDir(cacheDir);
  if (existsSync(join(dir, ".complete"))) return dir;
  const busybox = findBusybox();
  if (!isStaticElf(readFileSync(busybox))) {
    throw new MissingAssetError("busybox", `${busybox} is not statically linked; install Debian's busybox-static (apt-get install busybox-static) or set SUPERMACHINE_BUSYBOX.`);
  }
  const stage = `${dir}.${process.pid}.tmp`;
  await rm(stage, { recursive: true, force: true });
  for (const d of ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run", "var/tmp", "home"]) {
    await mkdir(join(stage, d), { recursive: true });
  }
  await chmod(join(stage, "tmp"), 0o1777);
  await chmod(join(stage, "root"), 0o700);
  await copyFile(busybox, join(stage, "bin", "busybox"));
  await chmod(join(stage, "bin", "busybox"), 0o755);
  const applets = execFileSync(busybox, ["--list-full"], { encoding: "utf8" })
    .split("\n")
    .map((s) => s.trim())
    .filter((s) => s && s !== "bin/busybox" && /^[a-z0-9/._\[-]+$/.test(s));
  for (const a of applets) {
    const target = join(stage, a);
    await mkdir(dirname(target), { recursive: true });
    const depth = a.split("/").length - 1;
    await symlink(`${"../".repeat(depth)}bin/busybox`, target).catch(() => undefined);
  }
  await writeFile(join(stage, "etc", "passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n");
  await writeFile(join(stage, "etc", "group"), "root:x:0:\nnogroup:x:65534:\n");
  await writeFile(join(stage, "etc", "hosts"), "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
  await writeFile(join(stage, "etc", "os-release"), 'NAME="supermachine busybox"\nID=busybox\n');
  await writeFile(join(stage, ".complete"), `busybox image v${VERSION}\n`);
  await mkdir(dirname(dir), { recursive: true });
  await rm(dir, { recursive: true, force: true });
  await rename(stage, dir);
  return dir;
}

/** The image config of the default image. */
export const DEFAULT_IMAGE_CONFIG = {
  env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
  workingDir: "/",
};

/**
 * (extension) A reference to the default image for `Image.build({ ref })`:
 * `dir:<path>` of the busybox root filesystem built locally from the host's
 * static busybox (built on first use; no registry, no network). The examples
 * use it where the seed names a registry image.
 * @param options.cacheDir Where the image is built. @default ~/.cache/supermachine (or SUPERMACHINE_CACHE_DIR)
 */
export async function defaultImageRef(options: { readonly cacheDir?: string } = {}): Promise<string> {
  return `dir:${await ensureDefaultImage(options.cacheDir ?? defaultCacheDir())}`;
}
