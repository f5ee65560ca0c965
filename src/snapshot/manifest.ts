/**
 * The snapshot format: a directory
 *
 *   manifest.json   this file's record (written last; its presence marks a
 *                   complete snapshot)
 *   ram             guest memory (sparse), mapped copy-on-write by restores
 *   state           QEMU device state (migration stream without RAM)
 *   rootfs.erofs    the root filesystem image the VM's disk points at
 *
 * A manifest is validated in one place ({@link readManifest}): format name,
 * version, size cap, shape, and the files' sizes; `verify: "full"` also checks
 * every file's sha256 (what Image.fromSnapshot does).
 */

import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { SnapshotError } from "../errors.js";
import type { GuestConfig } from "../vm/vm.js";
import { sha256File } from "./files.js";

export const SNAPSHOT_FORMAT = "supermachine-snapshot";
export const SNAPSHOT_VERSION = 1;
const MAX_MANIFEST = 1 << 20;

export interface SnapshotFile {
  size: number;
  sha256: string;
}

export interface WorkloadSpec {
  argv: string[];
  env: string[];
  cwd?: string;
  user?: string;
  /** Started before the snapshot (listenerRequired) or after each restore. */
  startAt: "bake" | "restore";
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
  memoryMib: number;
  vcpus: number;
  image: { ref: string; digest: string };
  config: GuestConfig;
  workload: WorkloadSpec | null;
  guestPort: number;
  listenerRequired: boolean;
  /** What went into the key, for humans. */
  inputs: Record<string, unknown>;
  files: { ram: SnapshotFile; state: SnapshotFile; rootfs: SnapshotFile };
}

function fail(dir: string, why: string): never {
  throw new SnapshotError(`${dir} is not a usable supermachine snapshot: ${why}. Rebuild it with Image.build (or delete the directory).`);
}

function isStr(v: unknown): v is string {
  return typeof v === "string";
}

function isFile(v: unknown): v is SnapshotFile {
  const f = v as SnapshotFile;
  return typeof v === "object" && v !== null && Number.isSafeInteger(f.size) && f.size >= 0 && isStr(f.sha256) && /^[0-9a-f]{64}$/.test(f.sha256);
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
  const f = x.files;
  if (!f || !isFile(f.ram) || !isFile(f.state) || !isFile(f.rootfs)) fail(dir, "bad files record");
  return x as SnapshotManifest;
}

/**
 * Reads and validates a snapshot directory. "quick" checks the manifest, the
 * files' sizes and the state's checksum (cheap: a cache hit must stay fast);
 * "full" checks every file's sha256.
 */
export async function readManifest(dir: string, verify: "quick" | "full"): Promise<SnapshotManifest> {
  const mpath = join(dir, "manifest.json");
  const st = await stat(mpath).catch(() => undefined);
  if (!st) {
    const d = await stat(dir).catch(() => undefined);
    if (!d) throw new SnapshotError(`snapshot ${dir} does not exist (check the path, or build the image first)`);
    fail(dir, "manifest.json is missing (an interrupted build leaves no manifest)");
  }
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
    const fst = await stat(file).catch(() => undefined);
    if (!fst) fail(dir, `${name} file is missing`);
    if (fst.size !== m.files[name].size) fail(dir, `${name} is ${fst.size} bytes, the manifest says ${m.files[name].size}`);
  }
  const check = verify === "full" ? (["state", "ram", "rootfs"] as const) : (["state"] as const);
  for (const name of check) {
    const file = join(dir, name === "rootfs" ? "rootfs.erofs" : name);
    const sum = await sha256File(file);
    if (sum !== m.files[name].sha256) fail(dir, `${name} does not match its checksum (corrupt or changed after the snapshot was taken)`);
  }
  return m;
}
