/**
 * A writer for the cpio "newc" format the Linux kernel unpacks as its
 * initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
 */

export interface CpioEntry {
  /** Path inside the archive, without a leading "/". */
  name: string;
  /** Full st_mode: type bits and permissions. */
  mode: number;
  data?: Buffer;
  /** For device nodes. */
  rdevMajor?: number;
  rdevMinor?: number;
  mtime?: number;
}

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFCHR = 0o020000;
export const S_IFLNK = 0o120000;

function hex8(n: number): string {
  return (n >>> 0).toString(16).padStart(8, "0");
}

function pad4(n: number): Buffer {
  const r = (4 - (n % 4)) % 4;
  return Buffer.alloc(r);
}

/** Builds a newc archive (with its TRAILER!!! entry). Deterministic. */
export function buildCpio(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const all = [...entries, { name: "TRAILER!!!", mode: 0 } as CpioEntry];
  for (const e of all) {
    const name = Buffer.from(`${e.name}\0`, "utf8");
    const data = e.data ?? Buffer.alloc(0);
    const isTrailer = e.name === "TRAILER!!!";
    const header =
      "070701" +
      hex8(isTrailer ? 0 : ino++) +
      hex8(e.mode) +
      hex8(0) + // uid
      hex8(0) + // gid
      hex8((e.mode & 0o170000) === S_IFDIR ? 2 : 1) + // nlink
      hex8(e.mtime ?? 0) +
      hex8(data.length) +
      hex8(0) + // devmajor
      hex8(0) + // devminor
      hex8(e.rdevMajor ?? 0) +
      hex8(e.rdevMinor ?? 0) +
      hex8(name.length) +
      hex8(0); // check
    const h = Buffer.from(header, "latin1");
    parts.push(h, name, pad4(h.length + name.length), data, pad4(data.length));
  }
  return Buffer.concat(parts);
}
