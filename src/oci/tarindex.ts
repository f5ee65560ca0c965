/**
 * A random-access index of a tar archive on disk (oci-archive and
 * docker-archive files): member name → offset and size, so that single
 * members can be read or streamed straight from the archive without
 * extracting it. (Streaming layer contents is rootfs/tar.ts's job; this only
 * locates the members of an archive *of* blobs.)
 *
 * Understands ustar (with prefix), GNU long names/links ('L', 'K') and PAX
 * headers ('x': path, linkpath, size). Header checksums are verified; sizes,
 * counts and meta data are bounded. Names are normalised ("./a//b" → "a/b");
 * names with ".." are ignored. Symbolic and hard links between members are
 * resolved on lookup (docker save links shared layers).
 */

import { createReadStream } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { Readable } from "node:stream";
import { ImageError } from "../errors.js";

export interface TarMember {
  readonly name: string;
  readonly type: "file" | "dir" | "symlink" | "hardlink" | "other";
  /** Byte offset of the member's data in the archive. */
  readonly offset: number;
  readonly size: number;
  readonly linkname: string;
}

const BLOCK = 512;
const MAX_MEMBERS = 200_000;
const MAX_META = 1024 * 1024;

/**
 * Normalises a member name ("./a//b/" → "a/b"). With `resolveDots`, ".."
 * removes the previous component (for link targets); otherwise, and when it
 * would climb above the archive's root, the name is refused (undefined).
 */
export function normalizeMemberName(name: string, resolveDots = false): string | undefined {
  const parts: string[] = [];
  for (const p of name.split("/")) {
    if (p === "" || p === ".") continue;
    if (p === "..") {
      if (!resolveDots || parts.length === 0) return undefined;
      parts.pop();
      continue;
    }
    parts.push(p);
  }
  return parts.join("/");
}

function cstring(buf: Buffer, start: number, len: number): string {
  const slice = buf.subarray(start, start + len);
  const nul = slice.indexOf(0);
  return (nul < 0 ? slice : slice.subarray(0, nul)).toString("utf8");
}

function parseNumber(buf: Buffer, start: number, len: number, what: string): number {
  const field = buf.subarray(start, start + len);
  if (field[0] !== undefined && field[0] & 0x80) {
    // base-256 (GNU): big-endian, first byte's high bit is the marker
    let n = field[0] & 0x7f;
    for (let i = 1; i < field.length; i++) {
      n = n * 256 + field[i]!;
      if (n > Number.MAX_SAFE_INTEGER) throw new Error(`${what} too large`);
    }
    return n;
  }
  const text = cstring(buf, start, len).trim();
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text)) throw new Error(`bad octal ${what} ${JSON.stringify(text)}`);
  return parseInt(text, 8);
}

function checksumOk(h: Buffer): boolean {
  let stored: number;
  try {
    stored = parseNumber(h, 148, 8, "checksum");
  } catch {
    return false;
  }
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : h[i]!;
    unsigned += b;
    signed += b > 127 ? b - 256 : b;
  }
  return stored === unsigned || stored === signed;
}

function parsePax(data: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  let pos = 0;
  while (pos < data.length) {
    const space = data.indexOf(0x20, pos);
    if (space < 0) break;
    const len = Number(data.subarray(pos, space).toString("ascii"));
    if (!Number.isSafeInteger(len) || len <= 0 || pos + len > data.length) break;
    const record = data.subarray(space + 1, pos + len - 1).toString("utf8");
    const eq = record.indexOf("=");
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    pos += len;
  }
  return out;
}

export class TarIndex {
  private constructor(
    readonly path: string,
    private readonly members: Map<string, TarMember>,
  ) {}

  /** Indexes the archive at `path`. Malformed archives → ImageError naming `what`. */
  static async open(path: string, what: string): Promise<TarIndex> {
    let fh: FileHandle;
    try {
      fh = await open(path, "r");
    } catch (err) {
      throw new ImageError(`Cannot open ${what}: ${(err as Error).message}`, { cause: err });
    }
    const members = new Map<string, TarMember>();
    try {
      const size = (await fh.stat()).size;
      const header = Buffer.alloc(BLOCK);
      let pos = 0;
      let longName: string | undefined;
      let longLink: string | undefined;
      let pax: Map<string, string> | undefined;
      let count = 0;
      const readData = async (offset: number, len: number): Promise<Buffer> => {
        if (len > MAX_META) throw new Error(`meta data entry of ${len} bytes`);
        const b = Buffer.alloc(len);
        const { bytesRead } = await fh.read(b, 0, len, offset);
        if (bytesRead !== len) throw new Error("archive ends inside an entry");
        return b;
      };
      while (pos + BLOCK <= size) {
        const { bytesRead } = await fh.read(header, 0, BLOCK, pos);
        if (bytesRead !== BLOCK) break;
        if (header.every((b) => b === 0)) break;
        if (!checksumOk(header)) throw new Error(`bad header checksum at byte ${pos}`);
        if (++count > MAX_MEMBERS) throw new Error(`more than ${MAX_MEMBERS} entries`);
        const type = String.fromCharCode(header[156]!);
        let entrySize = parseNumber(header, 124, 12, "size");
        if (pax?.has("size")) {
          const s = Number(pax.get("size"));
          if (Number.isSafeInteger(s) && s >= 0) entrySize = s;
        }
        const dataOffset = pos + BLOCK;
        if (dataOffset + entrySize > size) throw new Error(`entry at byte ${pos} runs past the end of the archive`);
        const next = dataOffset + Math.ceil(entrySize / BLOCK) * BLOCK;
        if (type === "L" || type === "K") {
          const text = cstring(await readData(dataOffset, entrySize), 0, entrySize);
          if (type === "L") longName = text;
          else longLink = text;
          pos = next;
          continue;
        }
        if (type === "x") {
          pax = parsePax(await readData(dataOffset, entrySize));
          pos = next;
          continue;
        }
        if (type === "g") {
          pos = next;
          continue;
        }
        const magic = cstring(header, 257, 6);
        const prefix = magic.startsWith("ustar") ? cstring(header, 345, 155) : "";
        let name = cstring(header, 0, 100);
        if (prefix) name = `${prefix}/${name}`;
        if (longName !== undefined) name = longName;
        if (pax?.has("path")) name = pax.get("path")!;
        let linkname = cstring(header, 157, 100);
        if (longLink !== undefined) linkname = longLink;
        if (pax?.has("linkpath")) linkname = pax.get("linkpath")!;
        longName = longLink = pax = undefined;
        const kind: TarMember["type"] =
          type === "0" || type === "\0" || type === "7" ? "file" : type === "5" ? "dir" : type === "2" ? "symlink" : type === "1" ? "hardlink" : "other";
        const norm = normalizeMemberName(name);
        if (norm !== undefined && norm !== "") {
          members.set(norm, { name: norm, type: kind, offset: dataOffset, size: kind === "file" ? entrySize : 0, linkname });
        }
        pos = next;
      }
    } catch (err) {
      throw new ImageError(`${what} is not a valid tar archive: ${(err as Error).message}`, { cause: err });
    } finally {
      await fh.close();
    }
    return new TarIndex(path, members);
  }

  /** Member names (normalised). */
  names(): string[] {
    return [...this.members.keys()];
  }

  /** Looks a regular file up, following symlinks and hard links inside the archive. */
  get(name: string): TarMember | undefined {
    let current = normalizeMemberName(name);
    for (let hops = 0; current !== undefined && hops < 16; hops++) {
      const m = this.members.get(current);
      if (!m) return undefined;
      if (m.type === "file") return m;
      if (m.type === "hardlink") {
        current = normalizeMemberName(m.linkname);
        continue;
      }
      if (m.type === "symlink") {
        const base = m.linkname.startsWith("/") ? "" : current.split("/").slice(0, -1).join("/");
        current = normalizeMemberName(`${base}/${m.linkname}`, true);
        continue;
      }
      return undefined;
    }
    return undefined;
  }

  /** Reads a whole small member; undefined when absent; ImageError when over `max`. */
  async readSmall(name: string, max: number, what: string): Promise<Buffer | undefined> {
    const m = this.get(name);
    if (!m) return undefined;
    if (m.size > max) throw new ImageError(`${what}: ${name} is ${m.size} bytes, more than the ${max} allowed`);
    const fh = await open(this.path, "r");
    try {
      const b = Buffer.alloc(m.size);
      const { bytesRead } = await fh.read(b, 0, m.size, m.offset);
      if (bytesRead !== m.size) throw new ImageError(`${what}: ${name} is truncated`);
      return b;
    } finally {
      await fh.close();
    }
  }

  /** Streams a member's bytes from `from` (an offset inside the member). */
  stream(member: TarMember, from = 0): Readable {
    if (member.size - from <= 0) return Readable.from([]);
    return createReadStream(this.path, { start: member.offset + from, end: member.offset + member.size - 1 });
  }
}
