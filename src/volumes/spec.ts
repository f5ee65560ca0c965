/**
 * Block volumes and the disk-backed writable layer: option validation and
 * the names everything else derives from (device serials, snapshot file
 * names, the kernel command line). See docs/volumes.md.
 */

import { invalidOption } from "../errors.js";

/** A block-device volume: an ext4 filesystem on its own virtio-blk disk. */
export interface VolumeSpec {
  /** Letters, digits, '.', '_', '-' (≤ 64); names the volume's file in the snapshot. */
  readonly name: string;
  /** Size of the volume in MiB (8 ≤ sizeMib ≤ 1048576): what `df` shows, less ext4's overhead. */
  readonly sizeMib: number;
  /** Absolute guest path the volume is mounted at (created if missing). */
  readonly mountPoint: string;
}

/** Smallest volume (MiB): ext4 needs room for its metadata and a journal. */
export const MIN_VOLUME_MIB = 8;
/** Largest volume or disk (MiB): 1 TiB (sparse: only written blocks cost host disk). */
export const MAX_VOLUME_MIB = 1 << 20;
/** Smallest writable layer (diskMib). */
export const MIN_DISK_MIB = 64;
/** Volumes per VM (virtio-mmio transports are limited; each volume takes one). */
export const MAX_VOLUMES = 8;
const MAX_MOUNT_POINT = 128;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
// The mount point rides on the kernel command line (sm.vol=): no spaces,
// quotes or other characters the kernel's parser would split or eat.
const MOUNT_POINT_RE = /^\/[A-Za-z0-9._@+=/-]*$/;
const RESERVED = ["/proc", "/sys", "/dev"];

/** One disk of a VM besides its root filesystem. */
export interface DiskPlan {
  /** "disk": the writable layer (diskMib); "volume": a mounted volume. */
  readonly role: "disk" | "volume";
  /** The volume's name ("disk" for the writable layer). */
  readonly name: string;
  readonly sizeMib: number;
  /** Volumes only. */
  readonly mountPoint: string | null;
}

/** The virtio-blk serial the guest finds a disk by (≤ 20 bytes). */
export function diskSerial(d: DiskPlan, index: number): string {
  return d.role === "disk" ? "sm-disk" : `sm-vol-${index}`;
}

/** The disk's file name in a snapshot directory. */
export function diskFileName(d: Pick<DiskPlan, "role" | "name">): string {
  return d.role === "disk" ? "disk.img" : `vol-${d.name}.img`;
}

/** Serial of the root filesystem's disk. */
export const ROOT_SERIAL = "sm-root";

/**
 * Validates `volumes` and `diskMib` (BuildOptions) into disk plans: the
 * writable layer first, then the volumes in the order given.
 *
 * @throws {TypeError} naming the option (`volumes[1].sizeMib`, `diskMib`, ...)
 */
export function validateDisks(volumes: unknown, diskMib: unknown): DiskPlan[] {
  const out: DiskPlan[] = [];
  if (diskMib !== undefined) {
    if (typeof diskMib !== "number" || !Number.isInteger(diskMib) || diskMib < MIN_DISK_MIB || diskMib > MAX_VOLUME_MIB) {
      throw invalidOption("diskMib", `an integer number of MiB in ${MIN_DISK_MIB}..${MAX_VOLUME_MIB} (the writable layer's size; leave it out for a tmpfs layer)`, diskMib);
    }
    out.push({ role: "disk", name: "disk", sizeMib: diskMib, mountPoint: null });
  }
  if (volumes === undefined) return out;
  if (!Array.isArray(volumes)) throw invalidOption("volumes", "an array of { name, sizeMib, mountPoint }", volumes);
  if (volumes.length > MAX_VOLUMES) throw invalidOption("volumes", `at most ${MAX_VOLUMES} volumes`, `${volumes.length} volumes`);
  const names = new Set<string>();
  const points = new Set<string>();
  volumes.forEach((v: unknown, i) => {
    const at = `volumes[${i}]`;
    if (typeof v !== "object" || v === null) throw invalidOption(at, "{ name, sizeMib, mountPoint }", v);
    const { name, sizeMib, mountPoint } = v as Record<string, unknown>;
    if (typeof name !== "string" || !NAME_RE.test(name)) throw invalidOption(`${at}.name`, "letters, digits, '.', '_', '-' (1..64, not starting with '.', '_' or '-')", name);
    if (names.has(name)) throw invalidOption(`${at}.name`, "a name no other volume has", name);
    if (typeof sizeMib !== "number" || !Number.isInteger(sizeMib)) throw invalidOption(`${at}.sizeMib`, "an integer number of MiB", sizeMib);
    if (sizeMib < MIN_VOLUME_MIB) throw invalidOption(`${at}.sizeMib`, `at least ${MIN_VOLUME_MIB} (MiB): smaller, ext4 has no room for its metadata and journal`, sizeMib);
    if (sizeMib > MAX_VOLUME_MIB) throw invalidOption(`${at}.sizeMib`, `at most ${MAX_VOLUME_MIB} (MiB, 1 TiB)`, sizeMib);
    if (typeof mountPoint !== "string" || !mountPoint.startsWith("/")) throw invalidOption(`${at}.mountPoint`, "an absolute guest path", mountPoint);
    const norm = mountPoint.length > 1 ? mountPoint.replace(/\/+$/, "") : mountPoint;
    if (norm.length > MAX_MOUNT_POINT || !MOUNT_POINT_RE.test(norm)) {
      throw invalidOption(`${at}.mountPoint`, `an absolute path of at most ${MAX_MOUNT_POINT} characters from A-Z a-z 0-9 . _ @ + = - /`, mountPoint);
    }
    const parts = norm.split("/").slice(1);
    if (norm === "/" || parts.some((p) => p === "" || p === "." || p === "..")) throw invalidOption(`${at}.mountPoint`, "a path below / without empty, '.' or '..' components", mountPoint);
    if (RESERVED.some((r) => norm === r || norm.startsWith(`${r}/`))) throw invalidOption(`${at}.mountPoint`, "a path outside /proc, /sys and /dev", mountPoint);
    if (points.has(norm)) throw invalidOption(`${at}.mountPoint`, "a mount point no other volume has", mountPoint);
    names.add(name);
    points.add(norm);
    out.push({ role: "volume", name, sizeMib, mountPoint: norm });
  });
  return out;
}

/**
 * The kernel command line words that tell the guest's init about its disks:
 * `sm.disk=<serial>` (the writable layer), `sm.vol=<serial>:<mountPoint>`.
 */
export function diskCmdline(disks: readonly DiskPlan[]): string[] {
  return disks.map((d, i) => (d.role === "disk" ? `sm.disk=${diskSerial(d, i)}` : `sm.vol=${diskSerial(d, i)}:${d.mountPoint}`));
}
