/**
 * File helpers for snapshots: a sparse copy (guest RAM files are mostly
 * holes), hashing, and the stub kernel restores boot.
 */

import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, mkdir, open, rename, stat, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { locateAgent } from "../guest/assets.js";
import { hashOffThread } from "./hash-thread.js";

const execFileP = promisify(execFile);
const CHUNK = 4 << 20;

/**
 * Makes a snapshot directory private before it is published: the directory
 * 0700 and its files (the four, and its disk images) 0600, whatever the umask and whoever wrote them
 * (QEMU wrote the state; rootfs.erofs may be a hard link of the cache's
 * image). readManifest refuses group/other-writable snapshots.
 */
export async function sealSnapshotDir(dir: string, diskFiles: readonly string[] = []): Promise<void> {
  for (const f of ["ram", "state", "rootfs.erofs", "manifest.json", ...diskFiles]) await chmod(join(dir, f), 0o600);
  await chmod(dir, 0o700);
}

/** The chunk size of sparseSha256File. */
const SPARSE_CHUNK = 1 << 20;

/**
 * The digest of a file that is mostly zeros (a snapshot's guest RAM): the
 * sha256 of a tag, the file's size, and, for each 1 MiB chunk that is not
 * all zeros, its index and its own sha256. Any change to any byte changes it,
 * as a plain sha256 would, but the zero chunks (two thirds of a Python
 * guest's 256 MiB) are compared, not hashed, and the chunks the file's data
 * extents do not reach (its holes: see {@link dataExtents}) are not even
 * read. A fresh copy's holes cost the host a zeroed page-cache page per 4 KiB
 * read: in a bake the hash took 0.30–0.31 s reading them, 0.12–0.15 s without.
 */
export async function sparseSha256File(path: string): Promise<string> {
  const size = (await stat(path)).size;
  return hashOffThread({ op: "sparse", path, size, extents: await dataExtents(path, size) });
}

/** sparseSha256File's digest taken on this thread, over the data `extents` of a file of `size` bytes (undefined: all of it). */
export async function sparseSha256Here(path: string, size: number, extents: [number, number][] | undefined): Promise<string> {
  const f = await open(path, "r");
  try {
    if ((await f.stat()).size !== size) throw new Error(`${path} changed size while it was hashed`);
    const outer = createHash("sha256").update("supermachine-sparse-sha256-v1\0");
    const u64 = Buffer.alloc(8);
    u64.writeBigUInt64LE(BigInt(size));
    outer.update(u64);
    const zero = Buffer.alloc(SPARSE_CHUNK);
    const buf = Buffer.allocUnsafe(CHUNK);
    for (const [from, to] of chunkRuns(extents, size)) {
      for (let off = from; off < to; ) {
        const want = Math.min(CHUNK, to - off);
        // Whole reads (a short one is read on), so chunks start at multiples of SPARSE_CHUNK.
        let bytesRead = 0;
        while (bytesRead < want) {
          const r = await f.read(buf, bytesRead, want - bytesRead, off + bytesRead);
          if (r.bytesRead === 0) throw new Error(`${path} ended at ${off + bytesRead} of ${size} bytes while it was hashed`);
          bytesRead += r.bytesRead;
        }
        for (let b = 0; b < bytesRead; b += SPARSE_CHUNK) {
          const c = buf.subarray(b, Math.min(b + SPARSE_CHUNK, bytesRead));
          if (c.equals(zero.subarray(0, c.length))) continue;
          u64.writeBigUInt64LE(BigInt((off + b) / SPARSE_CHUNK));
          outer.update(u64);
          outer.update(createHash("sha256").update(c).digest());
        }
        off += bytesRead;
      }
    }
    if ((await f.stat()).size !== size) throw new Error(`${path} changed size while it was hashed`);
    return outer.digest("hex");
  } finally {
    await f.close();
  }
}

/**
 * The runs of whole SPARSE_CHUNK chunks, [from, to) in bytes, that hold some
 * of `extents` (all of the file when they are unknown).
 */
function chunkRuns(extents: readonly (readonly [number, number])[] | undefined, size: number): [number, number][] {
  if (!extents) return size > 0 ? [[0, size]] : [];
  const runs: [number, number][] = [];
  for (const [d, h] of extents) {
    const from = Math.floor(d / SPARSE_CHUNK) * SPARSE_CHUNK;
    const to = Math.min(size, Math.ceil(h / SPARSE_CHUNK) * SPARSE_CHUNK);
    const last = runs[runs.length - 1];
    if (last && from <= last[1]) last[1] = Math.max(last[1], to);
    else runs.push([from, to]);
  }
  return runs;
}

/** Most output `--data-extents` may print (a line per extent): more, and the whole file is read. */
const MAX_EXTENT_BYTES = 8 << 20;

/**
 * The data extents of a file of `size` bytes, as [start, end) byte ranges in
 * order, from lseek's SEEK_DATA/SEEK_HOLE (run by the agent binary:
 * `--data-extents`; Node has no lseek). Outside them the file reads as
 * zeros. undefined when they cannot be had (no agent binary, another size
 * by now, an answer that does not add up): the caller then reads it all.
 */
export async function dataExtents(path: string, size: number): Promise<[number, number][] | undefined> {
  let agent: string;
  try {
    agent = locateAgent();
  } catch {
    return undefined;
  }
  try {
    const { stdout } = await execFileP(agent, ["--data-extents", path], { maxBuffer: MAX_EXTENT_BYTES, timeout: 30_000, encoding: "utf8" });
    return parseExtents(stdout, size);
  } catch {
    return undefined;
  }
}

/** Parses `--data-extents` output: the size, then `start end` lines, in order, inside the size. */
export function parseExtents(text: string, size: number): [number, number][] | undefined {
  const lines = text.split("\n");
  if (lines.pop() !== "") return undefined;
  if (lines.length === 0 || !/^\d{1,16}$/.test(lines[0]!) || Number(lines[0]) !== size) return undefined;
  const out: [number, number][] = [];
  let prev = 0;
  for (const line of lines.slice(1)) {
    const m = /^(\d{1,16}) (\d{1,16})$/.exec(line);
    if (!m) return undefined;
    const d = Number(m[1]);
    const h = Number(m[2]);
    if (d < prev || h <= d || h > size) return undefined;
    out.push([d, h]);
    prev = h;
  }
  return out;
}

/**
 * A file's sha256, read into one reused buffer: a read stream (4 MiB chunks)
 * allocates and copies each chunk, and hashed a Python bake's 173 MB root
 * image in 397–981 ms of CPU against 204–209 ms this way (three runs each,
 * on the CPU a bake's boot needs at the same time).
 */
export function sha256File(path: string): Promise<string> {
  return hashOffThread({ op: "sha256", path });
}

/** sha256File's digest taken on this thread. */
export async function sha256FileHere(path: string): Promise<string> {
  const h = createHash("sha256");
  const f = await open(path, "r");
  try {
    const buf = Buffer.allocUnsafe(CHUNK);
    for (let off = 0; ; ) {
      const { bytesRead } = await f.read(buf, 0, CHUNK, off);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      off += bytesRead;
    }
  } finally {
    await f.close();
  }
  return h.digest("hex");
}

/**
 * A tiny ELF with a PVH entry note, booted in place of the kernel when a VM
 * is restored: the guest's memory comes from the snapshot, QEMU does not copy
 * a kernel into RAM during an incoming migration, and parsing the real 60+ MB
 * vmlinux would only slow every restore down.
 */
export function stubKernel(): Buffer {
  const note = Buffer.alloc(20);
  note.writeUInt32LE(4, 0); // namesz
  note.writeUInt32LE(4, 4); // descsz
  note.writeUInt32LE(18, 8); // XEN_ELFNOTE_PHYS32_ENTRY
  note.write("Xen\0", 12, "latin1");
  note.writeUInt32LE(0x1000000, 16);
  const phoff = 64;
  const noteOff = phoff + 56 * 2;
  const codeOff = noteOff + note.length;
  const code = Buffer.alloc(16, 0xf4); // hlt
  const hdr = Buffer.alloc(64);
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]).copy(hdr, 0);
  hdr.writeUInt16LE(2, 16); // ET_EXEC
  hdr.writeUInt16LE(process.arch === "arm64" ? 0xb7 : 0x3e, 18);
  hdr.writeUInt32LE(1, 20);
  hdr.writeBigUInt64LE(0x1000000n, 24); // entry
  hdr.writeBigUInt64LE(BigInt(phoff), 32);
  hdr.writeUInt16LE(64, 52); // ehsize
  hdr.writeUInt16LE(56, 54); // phentsize
  hdr.writeUInt16LE(2, 56); // phnum
  hdr.writeUInt16LE(64, 58); // shentsize
  const ph = (type: number, flags: number, off: number, vaddr: bigint, paddr: bigint, size: number, align: bigint): Buffer => {
    const b = Buffer.alloc(56);
    b.writeUInt32LE(type, 0);
    b.writeUInt32LE(flags, 4);
    b.writeBigUInt64LE(BigInt(off), 8);
    b.writeBigUInt64LE(vaddr, 16);
    b.writeBigUInt64LE(paddr, 24);
    b.writeBigUInt64LE(BigInt(size), 32);
    b.writeBigUInt64LE(BigInt(size), 40);
    b.writeBigUInt64LE(align, 48);
    return b;
  };
  const load = ph(1, 5, codeOff, 0xffffffff81000000n, 0x1000000n, code.length, 0x1000n);
  const pnote = ph(4, 4, noteOff, 0n, 0n, note.length, 4n);
  const elf = Buffer.concat([hdr, load, pnote, note, code]);
  // QEMU's x86 loader also reads an 8 KiB bzImage header: pad past it.
  return Buffer.concat([elf, Buffer.alloc(65536 - elf.length)]);
}

/**
 * Where coreutils' cp is looked for: by absolute path, since the user's PATH
 * may hold nothing but node and QEMU (test/package/install.test.ts).
 */
const CP_PATHS = ["/usr/bin/cp", "/bin/cp"];

/**
 * Copies `src` to `dst` (created; it must not exist) keeping its holes.
 * coreutils' cp finds the data with SEEK_DATA/SEEK_HOLE: a mostly untouched
 * RAM file copies in milliseconds. Without it (or when it refuses
 * `--sparse`, as busybox's does), {@link sparseCopyByReading} does the same
 * by reading everything, ≈ 10× slower. `o.cp` is for tests.
 */
export async function sparseCopy(src: string, dst: string, o: { cp?: string | null } = {}): Promise<void> {
  const cp = o.cp === undefined ? CP_PATHS.find((p) => existsSync(p)) : o.cp;
  if (cp) {
    try {
      await execFileP(cp, ["--sparse=always", "--", src, dst]);
      return;
    } catch {
      await unlink(dst).catch(() => undefined);
    }
  }
  await sparseCopyByReading(src, dst);
}

/** Copies `src` to `dst` (created), writing only its 4 KiB blocks that are not all zeros. */
export async function sparseCopyByReading(src: string, dst: string): Promise<void> {
  const BLOCK = 4096;
  const zero = Buffer.alloc(BLOCK);
  const rf = await open(src, "r");
  try {
    const wf = await open(dst, "wx", 0o600);
    try {
      const size = (await rf.stat()).size;
      const buf = Buffer.allocUnsafe(CHUNK);
      for (let off = 0; off < size; ) {
        const { bytesRead } = await rf.read(buf, 0, Math.min(CHUNK, size - off), off);
        if (bytesRead === 0) break;
        // Runs of non-zero blocks go to their offsets; zero runs stay holes.
        let runStart = -1;
        for (let b = 0; b <= bytesRead; b += BLOCK) {
          const end = Math.min(b + BLOCK, bytesRead);
          const isData = b < bytesRead && !buf.subarray(b, end).equals(zero.subarray(0, end - b));
          if (isData && runStart < 0) runStart = b;
          if (!isData && runStart >= 0) {
            await wf.write(buf, runStart, b - runStart, off + runStart);
            runStart = -1;
          }
        }
        off += bytesRead;
      }
      await wf.truncate(size);
    } finally {
      await wf.close();
    }
  } finally {
    await rf.close();
  }
}

/** Flushes a file's data to disk. */
export async function fsyncFile(path: string): Promise<void> {
  const f = await open(path, "r");
  try {
    await f.sync();
  } finally {
    await f.close();
  }
}

/** Size and sha256 of a file. */
export async function fileRecord(path: string): Promise<{ size: number; sha256: string }> {
  return { size: (await stat(path)).size, sha256: await sha256File(path) };
}

/** A snapshot RAM file's record: its size and sparseSha256File digest. */
export async function ramRecord(path: string): Promise<{ size: number; sparseSha256: string }> {
  return { size: (await stat(path)).size, sparseSha256: await sparseSha256File(path) };
}

/** Path of the restore stub kernel in the cache, written once. */
export async function stubKernelPath(cacheDir: string): Promise<string> {
  const dir = join(cacheDir, "restore");
  const p = join(dir, "stub-kernel-v1.elf");
  if (existsSync(p)) return p;
  await mkdir(dir, { recursive: true });
  // Unique per call: concurrent first restores (a pool filling on a fresh
  // cache) each write their own file; the last rename wins, all equal.
  const tmp = `${p}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`;
  try {
    await writeFile(tmp, stubKernel());
    await rename(tmp, p);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
  return p;
}
