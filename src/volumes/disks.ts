/**
 * The host side of a VM's disks (volumes and the writable layer): an empty
 * ext4 image made without root (mkfs.ext4 on a sparse file), the per-VM
 * qcow2 overlay every VM writes to (over an empty image for a bake, over the
 * snapshot's baked image for a restore), and the raw image a snapshot keeps
 * (the overlay flattened with `qemu-img convert`, sparse). See
 * docs/volumes.md.
 */

import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { chmod, open, readFile, rm, stat, writeFile } from "node:fs/promises";
import { delimiter, join, resolve } from "node:path";
import { promisify } from "node:util";
import { MissingAssetError, QemuError } from "../errors.js";
import { diskFileName, diskSerial, type DiskPlan } from "./spec.js";

const execFileP = promisify(execFile);
const TOOL_TIMEOUT_MS = 10 * 60_000;

function which(cmd: string, extra: readonly string[] = []): string | undefined {
  for (const dir of [...(process.env.PATH ?? "/usr/bin:/bin").split(delimiter), ...extra]) {
    const p = join(dir, cmd);
    if (existsSync(p)) return p;
  }
  return undefined;
}

const memo = new Map<string, string>();
function tool(cmd: "mkfs.ext4" | "qemu-img", pkg: string): string {
  const hit = memo.get(cmd);
  if (hit) return hit;
  const p = which(cmd, ["/usr/sbin", "/sbin"]);
  if (!p) throw new MissingAssetError(cmd, `${cmd} is not installed; volumes and diskMib need it. Run \`npm run setup\` (Debian/Ubuntu: apt-get install ${pkg}).`);
  memo.set(cmd, p);
  return p;
}

async function run(cmd: "mkfs.ext4" | "qemu-img", pkg: string, args: string[]): Promise<void> {
  const bin = tool(cmd, pkg);
  try {
    await execFileP(bin, args, { timeout: TOOL_TIMEOUT_MS, maxBuffer: 1 << 20, env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", LC_ALL: "C" } });
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new QemuError(`${cmd} ${args.join(" ")} failed: ${(err.stderr || err.message).trim().slice(0, 1000)}`, { cause: e });
  }
}

/** Checks up front that the tools the disks need are installed. */
export function checkDiskTools(): void {
  tool("mkfs.ext4", "e2fsprogs");
  tool("qemu-img", "qemu-utils");
}

/**
 * Writes an empty ext4 filesystem of `sizeMib` into a new sparse file:
 * inode tables written now (the guest's lazy-init thread would otherwise
 * write them in every VM), the journal left as holes (zeros), root-owned
 * root directory whoever runs this, no reserved blocks.
 */
export async function makeExt4(path: string, sizeMib: number, label: string): Promise<void> {
  const f = await open(path, "wx", 0o600);
  try {
    try {
      await f.truncate(sizeMib * 1024 * 1024);
    } finally {
      await f.close();
    }
    await run("mkfs.ext4", "e2fsprogs", ["-q", "-F", "-m", "0", "-L", label.slice(0, 16), "-E", "lazy_itable_init=0,lazy_journal_init=1,root_owner=0:0,nodiscard", path]);
  } catch (e) {
    await rm(path, { force: true });
    throw e;
  }
}

/**
 * A fresh overlay's bytes depend only on its backing file's path and size:
 * restores of one snapshot reuse the first one's (a write instead of a
 * qemu-img run on every restore). Bounded.
 */
const templates = new Map<string, Buffer>();
const MAX_TEMPLATES = 64;

/** A qcow2 overlay at `path` whose reads fall through to the raw image `base` (never written). */
export async function makeOverlay(path: string, base: string): Promise<void> {
  const key = `${base}\0${(await stat(base)).size}`;
  const t = templates.get(key);
  try {
    if (t) {
      await writeFile(path, t, { flag: "wx", mode: 0o600 });
      return;
    }
    await run("qemu-img", "qemu-utils", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", base, "-F", "raw", path]);
    await chmod(path, 0o600);
    const bytes = await readFile(path);
    // qemu-img writes only a header, tables and refcounts for an empty overlay.
    if (bytes.length <= 4 << 20) {
      if (templates.size >= MAX_TEMPLATES) templates.delete(templates.keys().next().value as string);
      templates.set(key, bytes);
    }
  } catch (e) {
    await rm(path, { force: true });
    throw e;
  }
}

const QCOW2_MAGIC = 0x514649fb;
/** Incompatible-feature bits we accept in an overlay: only "dirty" (lazy refcounts). */
const QCOW2_INCOMPAT_OK = 1n;

/**
 * Checks a VM's overlay before a host tool reads it. QEMU wrote it, and QEMU
 * runs the guest: a QEMU the guest took over could point the header at a
 * host file (a backing file or an external data file) for the unconfined
 * `qemu-img` to copy into the snapshot. The header must be qcow2 v3 with no
 * incompatible feature but "dirty", and name `base` as its backing file
 * (which the flattening passes explicitly anyway).
 */
export async function checkOverlayHeader(overlay: string, base: string): Promise<void> {
  const f = await open(overlay, "r");
  try {
    const h = Buffer.alloc(104);
    const { bytesRead } = await f.read(h, 0, h.length, 0);
    const bad = (why: string) => new QemuError(`the VM's disk overlay ${overlay} is not the one this library made (${why}); refusing to read it`);
    if (bytesRead < h.length || h.readUInt32BE(0) !== QCOW2_MAGIC) throw bad("no qcow2 header");
    if (h.readUInt32BE(4) !== 3) throw bad(`qcow2 version ${h.readUInt32BE(4)}`);
    const incompat = h.readBigUInt64BE(72);
    if ((incompat & ~QCOW2_INCOMPAT_OK) !== 0n) throw bad(`incompatible features 0x${incompat.toString(16)}`);
    const off = h.readBigUInt64BE(8);
    const len = h.readUInt32BE(16);
    const want = Buffer.from(base);
    if (len !== want.length || off > 65536n) throw bad("another backing file");
    const name = Buffer.alloc(len);
    await f.read(name, 0, len, Number(off));
    if (!name.equals(want)) throw bad("another backing file");
  } finally {
    await f.close();
  }
}

/**
 * Flattens an overlay (with the raw image `base` it reads through to) into a
 * new sparse raw image at `dest`. The VM must be stopped: `-U` reads past
 * QEMU's lock. The header is checked first, and the backing file and its
 * format are given explicitly, not taken from the header.
 */
export async function flattenOverlay(overlay: string, base: string, dest: string): Promise<void> {
  overlay = resolve(overlay);
  base = resolve(base);
  await checkOverlayHeader(overlay, base);
  const spec = {
    driver: "qcow2",
    file: { driver: "file", filename: overlay },
    backing: { driver: "raw", file: { driver: "file", filename: base } },
  };
  try {
    await run("qemu-img", "qemu-utils", ["convert", "-U", "-O", "raw", "-S", "4k", `json:${JSON.stringify(spec)}`, dest]);
  } catch (e) {
    await rm(dest, { force: true });
    throw e;
  }
}

/** One disk as QEMU opens it. */
export interface QemuDisk {
  serial: string;
  /** The file QEMU opens (a qcow2 overlay, or a raw image read-only). */
  file: string;
  format: "qcow2" | "raw";
  readOnly: boolean;
  /** Files the overlay reads through to (bound read-only into QEMU's namespace). */
  backing: string[];
}

/** The overlay file of disk `d` in a VM's runtime directory. */
export function overlayPath(runtimeDir: string, d: DiskPlan): string {
  return join(runtimeDir, `${diskFileName(d)}.qcow2`);
}

/** The empty ext4 image under a bake's (or boot's) overlay of disk `d`. */
export function emptyImagePath(runtimeDir: string, d: DiskPlan): string {
  return join(runtimeDir, `${diskFileName(d)}.empty`);
}

/**
 * Creates a VM's disks in its runtime directory: for each disk an overlay
 * over `bases[i]` (the snapshot's image), or over a fresh empty ext4 image
 * in the runtime directory when `bases` is absent (a bake or a boot).
 */
export async function prepareDisks(runtimeDir: string, disks: readonly DiskPlan[], bases?: readonly string[]): Promise<QemuDisk[]> {
  const out: QemuDisk[] = [];
  for (const [i, d] of disks.entries()) {
    let base = bases?.[i] !== undefined ? resolve(bases[i]!) : undefined;
    if (!base) {
      base = emptyImagePath(runtimeDir, d);
      await makeExt4(base, d.sizeMib, d.role === "disk" ? "sm-disk" : d.name);
    }
    const file = overlayPath(runtimeDir, d);
    await makeOverlay(file, base);
    out.push({ serial: diskSerial(d, i), file, format: "qcow2", readOnly: false, backing: [base] });
  }
  return out;
}
