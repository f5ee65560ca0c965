/**
 * The snapshot format: a directory
 *
 *   manifest.json   this file's record (written last; its presence marks a
 *                   complete snapshot)
 *   ram             guest memory (sparse), mapped copy-on-write by restores
 *   state           QEMU device state (migration stream without RAM)
 *   rootfs.erofs    the root filesystem image the VM's disk points at
 *   disk.img        (diskMib) the writable layer's ext4 image, raw, sparse
 *   vol-NAME.img    (volumes) each volume's ext4 image, raw, sparse
 *   tb-hints        (optional, TCG) block keys for pretranslation, written
 *                   after the fact by a restore; not in the manifest, read
 *                   with checks of its own (src/vmm/pretranslate.ts)
 *
 * A snapshot is validated in one place ({@link readManifest}) before QEMU
 * sees it, Firecracker-style: the directory is ours and not writable by
 * others; the four files are regular files (lstat: no symlinks, no devices
 * or fifos) owned by us and not writable by others; the manifest is under a
 * size cap, of our format and version, of the right shape, with counts and
 * sizes in range (RAM exactly memoryMib MiB); every file's size matches the
 * manifest and the state's checksum is verified (the "quick" check of a
 * cache hit); `verify: "full"` checks every file's sha256 (what
 * Image.fromSnapshot does). Snapshots are written 0700 / 0600.
 */

import { lstat, readFile, realpath } from "node:fs/promises";
import type { Stats } from "node:fs";
import { join } from "node:path";
import { SnapshotError } from "../errors.js";
import { isCpuModelName } from "../vmm/qemu.js";
import type { GuestConfig } from "../vm/vm.js";
import { sha256File, sparseSha256File } from "./files.js";
import { diskFileName, MAX_VOLUME_MIB, MAX_VOLUMES } from "../volumes/spec.js";

export const SNAPSHOT_FORMAT = "supermachine-snapshot";
/** 4: the RAM file's record holds its sparseSha256 (files.ts), not a plain sha256. */
export const SNAPSHOT_VERSION = 4;
const MAX_MANIFEST = 1 << 20;
/** Caps on what a manifest may announce (well above anything we write). */
const MAX_MEMORY_MIB = 1 << 20;
const MAX_VCPUS = 1024;
const MAX_STATE_BYTES = 1 << 30;
const MAX_ROOTFS_BYTES = 2 ** 44;
const MAX_DISKS = MAX_VOLUMES + 1;
/** Mode bits for snapshot directories and files. */
export const SNAPSHOT_DIR_MODE = 0o700;
export const SNAPSHOT_FILE_MODE = 0o600;

export interface SnapshotFile {
  size: number;
  sha256: string;
}

/** The guest RAM file: its digest skips the all-zero chunks (sparseSha256File). */
export interface RamFile {
  size: number;
  sparseSha256: string;
}

/** A disk of the snapshot's VM (docs/volumes.md): its raw image is `diskFileName(d)`. */
export interface SnapshotDisk extends SnapshotFile {
  role: "disk" | "volume";
  /** The volume's name ("disk" for the writable layer). */
  name: string;
  sizeMib: number;
  /** Volumes: where the guest mounted it; null for the writable layer. */
  mountPoint: string | null;
}

export interface WorkloadSpec {
  argv: string[];
  env: string[];
  cwd?: string;
  user?: string;
  /** Started before the snapshot (listenerRequired) or after each restore. */
  startAt: "bake" | "restore";
}

/**
 * A mount the snapshotted VM had. Its content is not in the snapshot; a
 * restore mounts it again at guestPath. hostPath is where it was (a
 * default for Image.fromSnapshot), not part of the cache key.
 */
export interface SnapshotMount {
  guestTag: string;
  symlinks: "deny" | "opaque" | "follow";
  readOnly: boolean;
  hostPath: string;
  guestPath?: string;
}

export interface SnapshotManifest {
  format: typeof SNAPSHOT_FORMAT;
  version: number;
  /** Cache key: hash of everything that changes the snapshot. */
  key: string;
  name: string;
  createdAt: string;
  accel: "kvm" | "tcg";
  arch: string;
  qemuVersion: string;
  /** TCG's guest CPU model at bake; restores use the same. Absent: DEFAULT_TCG_CPU. */
  cpuModel?: string;
  /** The VM has the stream ring disk (docs/protocol.md, "Stream ring"); restores attach one too. */
  streamRing?: boolean;
  memoryMib: number;
  vcpus: number;
  image: { ref: string; digest: string };
  config: GuestConfig;
  workload: WorkloadSpec | null;
  guestPort: number;
  listenerRequired: boolean;
  /** What went into the key, for humans. */
  inputs: Record<string, unknown>;
  files: { ram: RamFile; state: SnapshotFile; rootfs: SnapshotFile };
  /** Volumes and the writable layer, in the VM's device order. @default [] */
  disks?: SnapshotDisk[];
  /** Mounts to attach on restore (absent: none). */
  mounts?: SnapshotMount[];
}

/** The disks of a manifest (none before they existed). */
export function manifestDisks(m: SnapshotManifest): SnapshotDisk[] {
  return m.disks ?? [];
}

function fail(dir: string, why: string): never {
  throw new SnapshotError(`${dir} is not a usable supermachine snapshot: ${why}. Rebuild it with Image.build (or delete the directory).`);
}

function isStr(v: unknown): v is string {
  return typeof v === "string";
}

function isRamFile(v: unknown): v is RamFile {
  const f = v as RamFile;
  return typeof v === "object" && v !== null && Number.isSafeInteger(f.size) && f.size >= 0 && isStr(f.sparseSha256) && /^[0-9a-f]{64}$/.test(f.sparseSha256);
}

function isFile(v: unknown): v is SnapshotFile {
  const f = v as SnapshotFile;
  return typeof v === "object" && v !== null && Number.isSafeInteger(f.size) && f.size >= 0 && isStr(f.sha256) && /^[0-9a-f]{64}$/.test(f.sha256);
}

function uid(): number | undefined {
  return typeof process.getuid === "function" ? process.getuid() : undefined;
}

/** Owned by us, not writable by group or others: nobody else can swap what we checked. */
function checkTrusted(dir: string, what: string, st: Stats): void {
  const me = uid();
  if (me !== undefined && st.uid !== me) fail(dir, `${what} is owned by uid ${st.uid}, not by this process (uid ${me}); only snapshots this user wrote are used`);
  if ((st.mode & 0o022) !== 0) fail(dir, `${what} is writable by ${st.mode & 0o002 ? "others" : "its group"} (mode ${(st.mode & 0o7777).toString(8)}); chmod go-w it or rebuild the snapshot`);
}

/** A regular file (lstat: a symlink is refused, not followed), and trusted. */
function checkRegular(dir: string, name: string, st: Stats): void {
  if (st.isSymbolicLink()) fail(dir, `${name} is a symlink; snapshot files must be regular files`);
  if (!st.isFile()) fail(dir, `${name} is not a regular file`);
  checkTrusted(dir, name, st);
}

/** Validates a parsed manifest's shape; throws SnapshotError naming the problem. */
export function checkManifest(dir: string, m: unknown): SnapshotManifest {
  if (typeof m !== "object" || m === null) fail(dir, "manifest.json is not an object");
  const x = m as Partial<SnapshotManifest>;
  if (x.format !== SNAPSHOT_FORMAT) fail(dir, `manifest.json has format ${JSON.stringify(x.format)}, expected ${SNAPSHOT_FORMAT}`);
  if (x.version !== SNAPSHOT_VERSION) fail(dir, `snapshot format version ${JSON.stringify(x.version)}; this library reads version ${SNAPSHOT_VERSION}`);
  if (!isStr(x.key) || !/^[0-9a-f]{64}$/.test(x.key)) fail(dir, "bad key");
  if (!isStr(x.name)) fail(dir, "bad name");
  if (x.accel !== "kvm" && x.accel !== "tcg") fail(dir, "bad accel");
  if (!isStr(x.arch) || !isStr(x.qemuVersion) || !isStr(x.createdAt)) fail(dir, "bad arch, qemuVersion or createdAt");
  if (x.cpuModel !== undefined && !isCpuModelName(x.cpuModel)) fail(dir, "bad cpuModel");
  if (x.streamRing !== undefined && typeof x.streamRing !== "boolean") fail(dir, "bad streamRing");
  if (!Number.isInteger(x.memoryMib) || x.memoryMib! < 1 || !Number.isInteger(x.vcpus) || x.vcpus! < 1) fail(dir, "bad memoryMib or vcpus");
  if (typeof x.image !== "object" || x.image === null || !isStr(x.image.ref) || !isStr(x.image.digest)) fail(dir, "bad image");
  if (typeof x.config !== "object" || x.config === null) fail(dir, "bad config");
  if (x.config.env !== undefined && (!Array.isArray(x.config.env) || !x.config.env.every(isStr))) fail(dir, "bad config.env");
  if (x.workload !== null) {
    const w = x.workload as WorkloadSpec | undefined;
    if (!w || !Array.isArray(w.argv) || !w.argv.every(isStr) || !Array.isArray(w.env) || !w.env.every(isStr) || (w.startAt !== "bake" && w.startAt !== "restore")) {
      fail(dir, "bad workload");
    }
  }
  if (!Number.isInteger(x.guestPort) || typeof x.listenerRequired !== "boolean") fail(dir, "bad guestPort or listenerRequired");
  if (x.mounts !== undefined) {
    if (!Array.isArray(x.mounts) || x.mounts.length > 64) fail(dir, "bad mounts");
    for (const m of x.mounts) {
      const ok =
        typeof m === "object" &&
        m !== null &&
        isStr(m.guestTag) &&
        /^[A-Za-z0-9][A-Za-z0-9._-]{0,35}$/.test(m.guestTag) &&
        (m.symlinks === "deny" || m.symlinks === "opaque" || m.symlinks === "follow") &&
        typeof m.readOnly === "boolean" &&
        isStr(m.hostPath) &&
        !m.hostPath.includes("\0") &&
        (m.guestPath === undefined || (isStr(m.guestPath) && m.guestPath.startsWith("/") && m.guestPath.length <= 4096 && !m.guestPath.includes("\0")));
      if (!ok) fail(dir, "bad mounts entry");
    }
  }
  const f = x.files;
  if (!f || !isRamFile(f.ram) || !isFile(f.state) || !isFile(f.rootfs)) fail(dir, "bad files record");
  if (x.memoryMib! > MAX_MEMORY_MIB || x.vcpus! > MAX_VCPUS) fail(dir, `memoryMib ${x.memoryMib} or vcpus ${x.vcpus} out of range`);
  if (f.ram.size !== x.memoryMib! * 1024 * 1024) fail(dir, `the manifest's ram size ${f.ram.size} is not memoryMib (${x.memoryMib}) MiB`);
  if (f.state.size > MAX_STATE_BYTES) fail(dir, `the manifest's state size ${f.state.size} is over the ${MAX_STATE_BYTES}-byte cap`);
  if (f.rootfs.size > MAX_ROOTFS_BYTES) fail(dir, `the manifest's rootfs size ${f.rootfs.size} is over the ${MAX_ROOTFS_BYTES}-byte cap`);
  if (x.disks !== undefined) {
    if (!Array.isArray(x.disks) || x.disks.length > MAX_DISKS) fail(dir, `bad disks (an array of at most ${MAX_DISKS})`);
    const names = new Set<string>();
    x.disks.forEach((d: unknown, i) => {
      const k = d as SnapshotDisk;
      if (!isFile(d) || (k.role !== "disk" && k.role !== "volume") || !isStr(k.name) || !Number.isInteger(k.sizeMib) || k.sizeMib < 1 || k.sizeMib > MAX_VOLUME_MIB) fail(dir, `bad disks[${i}]`);
      // The name becomes a file name: it must be what validateDisks allows.
      if (k.role === "volume" ? !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(k.name) || !isStr(k.mountPoint) || !k.mountPoint.startsWith("/") : k.name !== "disk" || k.mountPoint !== null) fail(dir, `bad disks[${i}] name or mountPoint`);
      const file = diskFileName(k);
      if (names.has(file)) fail(dir, `disks[${i}] repeats ${file}`);
      names.add(file);
      if (k.size !== k.sizeMib * 1024 * 1024) fail(dir, `disks[${i}] size ${k.size} is not its sizeMib (${k.sizeMib}) MiB`);
    });
    if (x.disks.filter((d) => d.role === "disk").length > 1) fail(dir, "more than one writable-layer disk");
  }
  return x as SnapshotManifest;
}

/**
 * Reads and validates a snapshot directory. "quick" checks the manifest, the
 * files' sizes and the state's checksum (cheap: a cache hit must stay fast);
 * "full" checks every file's sha256.
 */
export async function readManifest(dir: string, verify: "quick" | "full"): Promise<SnapshotManifest> {
  // The path given may be a symlink (the user's choice); what it resolves to must be ours.
  const real = await realpath(dir).catch(() => undefined);
  if (real === undefined) throw new SnapshotError(`snapshot ${dir} does not exist (check the path, or build the image first)`);
  const dst = await lstat(real);
  if (!dst.isDirectory()) fail(dir, "it is not a directory");
  checkTrusted(dir, "the directory", dst);
  const mpath = join(dir, "manifest.json");
  const st = await lstat(mpath).catch(() => undefined);
  if (!st) fail(dir, "manifest.json is missing (an interrupted build leaves no manifest)");
  checkRegular(dir, "manifest.json", st);
  if (st.size > MAX_MANIFEST) fail(dir, `manifest.json is ${st.size} bytes, over the ${MAX_MANIFEST}-byte cap`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(mpath, "utf8"));
  } catch (e) {
    fail(dir, `manifest.json is not valid JSON (${(e as Error).message})`);
  }
  const m = checkManifest(dir, parsed);
  for (const name of ["ram", "state", "rootfs"] as const) {
    const file = join(dir, name === "rootfs" ? "rootfs.erofs" : name);
    const fst = await lstat(file).catch(() => undefined);
    if (!fst) fail(dir, `${name} file is missing`);
    checkRegular(dir, name, fst);
    if (fst.size !== m.files[name].size) fail(dir, `${name} is ${fst.size} bytes, the manifest says ${m.files[name].size}`);
  }
  for (const d of manifestDisks(m)) {
    const name = diskFileName(d);
    const fst = await lstat(join(dir, name)).catch(() => undefined);
    if (!fst) fail(dir, `${name} file is missing`);
    checkRegular(dir, name, fst);
    if (fst.size !== d.size) fail(dir, `${name} is ${fst.size} bytes, the manifest says ${d.size}`);
  }
  const check = verify === "full" ? (["state", "ram", "rootfs"] as const) : (["state"] as const);
  for (const name of check) {
    const file = join(dir, name === "rootfs" ? "rootfs.erofs" : name);
    const f = m.files[name];
    const [sum, want] = "sparseSha256" in f ? [await sparseSha256File(file), f.sparseSha256] : [await sha256File(file), f.sha256];
    if (sum !== want) fail(dir, `${name} does not match its checksum (corrupt or changed after the snapshot was taken)`);
  }
  if (verify === "full") {
    for (const d of manifestDisks(m)) {
      const name = diskFileName(d);
      if ((await sha256File(join(dir, name))) !== d.sha256) fail(dir, `${name} does not match its checksum (corrupt or changed after the snapshot was taken)`);
    }
  }
  return m;
}
