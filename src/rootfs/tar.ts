/**
 * A streaming tar reader for image layers (already decompressed).
 *
 * Formats: POSIX ustar (with the 155-byte prefix), old V7 headers, GNU
 * long names ('L') and long link names ('K'), base-256 numeric fields, PAX
 * extended headers ('x') and global headers ('g') with path, linkpath, size,
 * uid, gid, mtime (with a fraction) and xattrs (SCHILY.xattr.*, and
 * LIBARCHIVE.xattr.* whose names are %-escaped and values base64).
 *
 * The input is hostile. Every header checksum is verified; numeric fields
 * must parse; meta data (PAX records, long names) is bounded; a stream that
 * ends inside an entry is a {@link LayerError}, as is an entry type we do not
 * support (GNU sparse and multi-volume files, unknown types). Nothing is
 * buffered beyond one header and the chunk the stream handed us: file bodies
 * are passed through chunk by chunk.
 *
 * Names and link targets are returned as latin1 byte strings (see tree.ts),
 * exactly as stored, not normalised: that is layers.ts's job.
 */

import type { Readable } from "node:stream";
import { AbortError, LayerError } from "../errors.js";
import { DEFAULT_LAYER_LIMITS, limitError } from "./limits.js";
import { showName } from "./tree.js";

/** Entry kinds yielded by {@link readTar}; meta entries (x, g, L, K, V) are consumed. */
export type TarEntryType = "file" | "hardlink" | "symlink" | "chardev" | "blockdev" | "dir" | "fifo";

/** One tar entry: header fields after PAX/GNU overrides, plus its body. */
export interface TarEntry {
  readonly type: TarEntryType;
  /** Raw entry name (latin1 byte string), as stored: may be absolute, hold "..", etc. */
  readonly path: string;
  /** Raw link target (latin1) for hard links and symlinks, "" otherwise. */
  readonly linkpath: string;
  /** Permission bits, `mode & 0o7777`. */
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  /** Body size in bytes (0 for everything but regular files). */
  readonly size: number;
  /** mtime seconds; times before 1970 are clamped to 0. */
  readonly mtimeSec: number;
  readonly mtimeNsec: number;
  readonly devmajor: number;
  readonly devminor: number;
  /**
   * xattrs from PAX records; names are latin1 byte strings. Entries without
   * xattrs of their own share one Map (a global PAX header's set): never
   * mutate it.
   */
  readonly xattrs: ReadonlyMap<string, Buffer>;
  /** Index of the entry's header block in the archive (for messages). */
  readonly offset: number;
  /**
   * The body, chunk by chunk. Must be consumed before asking for the next
   * entry or not at all (then it is skipped). Chunks may be views of the
   * stream's buffers: copy them if kept.
   */
  body(): AsyncIterable<Buffer>;
}

/** Options of {@link readTar}. */
export interface ReadTarOptions {
  /** Called with the total number of bytes read so far, after each chunk. */
  readonly onBytes?: (totalBytes: number) => void;
  readonly signal?: AbortSignal;
  /**
   * Largest PAX extended header (and sum of pending meta data per entry).
   * @default 1048576 (1 MiB)
   */
  readonly maxPaxBytes?: number;
  /**
   * Most xattrs one entry may carry (global PAX xattrs included).
   * @default 256
   */
  readonly maxXattrsPerEntry?: number;
  /**
   * Largest GNU long name / long link body.
   * @default 65536
   */
  readonly maxLongNameBytes?: number;
}

const BLOCK = 512;

/** Pulls exact byte counts out of an async chunk iterator, holding little. */
class ByteSource {
  private readonly it: AsyncIterator<unknown>;
  private chunk: Buffer = Buffer.alloc(0);
  private pos = 0;
  private ended = false;
  total = 0;

  /** Stream offset of the next unread byte. */
  get offset(): number {
    return this.total - (this.chunk.length - this.pos);
  }

  constructor(input: AsyncIterable<unknown>, private readonly onBytes?: (n: number) => void) {
    this.it = input[Symbol.asyncIterator]();
  }

  /** Returns false at end of stream. */
  private async pull(): Promise<boolean> {
    while (this.pos >= this.chunk.length) {
      if (this.ended) return false;
      const r = await this.it.next();
      if (r.done) {
        this.ended = true;
        return false;
      }
      const v = r.value;
      if (!(v instanceof Uint8Array)) throw new TypeError("tar input must yield Buffers (do not set an encoding on the stream)");
      this.chunk = Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
      this.pos = 0;
      this.total += v.byteLength;
      this.onBytes?.(this.total);
    }
    return true;
  }

  /** Up to `max` bytes (at least 1), or null at end of stream. */
  async some(max: number): Promise<Buffer | null> {
    if (!(await this.pull())) return null;
    const n = Math.min(max, this.chunk.length - this.pos);
    const out = this.chunk.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  /** Exactly n bytes (copied if they span chunks), or null if the stream ends first. */
  async exact(n: number): Promise<Buffer | null> {
    if (!(await this.pull())) return null;
    if (this.chunk.length - this.pos >= n) {
      const out = this.chunk.subarray(this.pos, this.pos + n);
      this.pos += n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const part = await this.some(n - filled);
      if (part === null) return null;
      part.copy(out, filled);
      filled += part.length;
    }
    return out;
  }

  /** Skips n bytes; returns false if the stream ends first. */
  async skip(n: number): Promise<boolean> {
    while (n > 0) {
      const part = await this.some(n);
      if (part === null) return false;
      n -= part.length;
    }
    return true;
  }

  /** Ends the input early (its iterator's return: a Readable is destroyed). */
  async close(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    try {
      await this.it.return?.();
    } catch {
      // the input's own error is already on its way
    }
  }

  /** Reads and discards everything left. */
  async drain(): Promise<void> {
    while ((await this.some(Number.MAX_SAFE_INTEGER)) !== null);
  }
}

function fail(message: string, entry?: string): never {
  throw new LayerError(message, entry === undefined ? undefined : { entry });
}

/** A NUL-terminated string field as latin1. */
function str(block: Buffer, start: number, len: number): string {
  const end = block.indexOf(0, start);
  return block.toString("latin1", start, end === -1 || end > start + len ? start + len : end);
}

/** Parses an octal or base-256 numeric field; `allowNegative` only for times. */
function num(block: Buffer, start: number, len: number, field: string, at: number): number {
  const first = block[start]!;
  if (first & 0x80) {
    // GNU base-256: big-endian two's complement over the whole field.
    const negative = first === 0xff;
    let v = 0n;
    for (let i = 0; i < len; i++) v = (v << 8n) | BigInt(i === 0 ? first & 0x7f : block[start + i]!);
    if (negative) v -= 1n << BigInt(len * 8 - 1);
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < -BigInt(Number.MAX_SAFE_INTEGER)) fail(`tar header at byte ${at}: ${field} field out of range`);
    return Number(v);
  }
  let i = start;
  const end = start + len;
  while (i < end && (block[i] === 0x20 || block[i] === 0)) i++;
  let v = 0;
  let digits = 0;
  for (; i < end; i++) {
    const c = block[i]!;
    if (c === 0x20 || c === 0) break;
    if (c < 0x30 || c > 0x37) fail(`tar header at byte ${at}: ${field} field is not octal`);
    v = v * 8 + (c - 0x30);
    digits++;
  }
  for (; i < end; i++) if (block[i] !== 0x20 && block[i] !== 0) fail(`tar header at byte ${at}: ${field} field has trailing garbage`);
  if (digits > 18) fail(`tar header at byte ${at}: ${field} field out of range`);
  return v;
}

function checksumOk(block: Buffer, at: number): boolean {
  const stored = num(block, 148, 8, "checksum", at);
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : block[i]!;
    unsigned += b;
    signed += b > 127 ? b - 256 : b;
  }
  return stored === unsigned || stored === signed;
}

/** PAX records of one 'x' or 'g' header: key → raw value bytes. */
function parsePax(buf: Buffer, at: number): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let pos = 0;
  while (pos < buf.length) {
    if (buf[pos] === 0) break; // some writers pad with NULs
    const space = buf.indexOf(0x20, pos);
    if (space === -1 || space - pos > 8) fail(`PAX header at byte ${at}: malformed record length`);
    const lenText = buf.toString("latin1", pos, space);
    if (!/^[0-9]+$/.test(lenText)) fail(`PAX header at byte ${at}: malformed record length`);
    const len = Number(lenText);
    const end = pos + len;
    if (len < lenText.length + 3 || end > buf.length || buf[end - 1] !== 0x0a) fail(`PAX header at byte ${at}: record overruns the header`);
    const eq = buf.indexOf(0x3d, space + 1);
    if (eq === -1 || eq >= end - 1 || eq === space + 1) fail(`PAX header at byte ${at}: record without key=value`);
    const key = buf.toString("latin1", space + 1, eq);
    out.set(key, Buffer.from(buf.subarray(eq + 1, end - 1)));
    pos = end;
  }
  return out;
}

function paxInt(v: Buffer, key: string, max: number, at: number): number {
  const s = v.toString("latin1");
  if (!/^[0-9]{1,16}$/.test(s) || Number(s) > max) fail(`PAX header before byte ${at}: bad ${key} value ${JSON.stringify(s.slice(0, 40))}`);
  return Number(s);
}

function paxTime(v: Buffer, at: number): { sec: number; nsec: number } {
  const s = v.toString("latin1");
  const m = /^(-?)([0-9]{1,16})(?:\.([0-9]*))?$/.exec(s);
  if (!m) fail(`PAX header before byte ${at}: bad mtime value ${JSON.stringify(s.slice(0, 40))}`);
  if (m[1] === "-") return { sec: 0, nsec: 0 };
  const sec = Number(m[2]);
  if (sec > Number.MAX_SAFE_INTEGER) fail(`PAX header before byte ${at}: mtime out of range`);
  const nsec = Number(((m[3] ?? "") + "000000000").slice(0, 9));
  return { sec, nsec };
}

/** %XX-decoding of LIBARCHIVE.xattr names, to a latin1 byte string. */
function unescapeName(s: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    if (s[i] === "%" && /^[0-9a-fA-F]{2}$/.test(s.slice(i + 1, i + 3))) {
      bytes.push(parseInt(s.slice(i + 1, i + 3), 16));
      i += 2;
    } else bytes.push(s.charCodeAt(i) & 0xff);
  }
  return Buffer.from(bytes).toString("latin1");
}

/** The PAX keys that override header fields, parsed. */
interface PaxValues {
  path?: string;
  linkpath?: string;
  size?: number;
  uid?: number;
  gid?: number;
  mtime?: { sec: number; nsec: number };
  devmajor?: number;
  devminor?: number;
}

/** PAX records of a header set, parsed once. */
interface PaxFields {
  readonly values: Readonly<PaxValues>;
  /** Keys given an empty value (which unsets a global record). */
  readonly unset: ReadonlySet<keyof PaxValues>;
  readonly xattrs: ReadonlyMap<string, Buffer>;
  readonly xattrUnset: ReadonlySet<string>;
  readonly sparse: boolean;
}

const NO_PAX: PaxFields = { values: {}, unset: new Set(), xattrs: new Map(), xattrUnset: new Set(), sparse: false };

const PAX_KEYS: Record<string, keyof PaxValues> = { path: "path", linkpath: "linkpath", size: "size", uid: "uid", gid: "gid", mtime: "mtime", "SCHILY.devmajor": "devmajor", "SCHILY.devminor": "devminor" };

function paxFields(recs: ReadonlyMap<string, Buffer>, at: number): PaxFields {
  if (recs.size === 0) return NO_PAX;
  const values: PaxValues = {};
  const unset = new Set<keyof PaxValues>();
  const xattrs = new Map<string, Buffer>();
  const xattrUnset = new Set<string>();
  let sparse = false;
  for (const [k, v] of recs) {
    const field = PAX_KEYS[k];
    let xname: string | undefined;
    if (k.startsWith("SCHILY.xattr.")) xname = k.slice(13);
    else if (k.startsWith("LIBARCHIVE.xattr.")) xname = unescapeName(k.slice(17));
    if (v.length === 0) {
      if (field !== undefined) unset.add(field);
      if (xname !== undefined) xattrUnset.add(xname);
      continue;
    }
    if (field === "path") values.path = v.toString("latin1");
    else if (field === "linkpath") values.linkpath = v.toString("latin1");
    else if (field === "size") values.size = paxInt(v, k, Number.MAX_SAFE_INTEGER, at);
    else if (field === "uid" || field === "gid" || field === "devmajor" || field === "devminor") values[field] = paxInt(v, k, 0xffffffff, at);
    else if (field === "mtime") values.mtime = paxTime(v, at);
    else if (xname !== undefined) xattrs.set(xname, k.startsWith("L") ? Buffer.from(v.toString("latin1"), "base64") : v);
    else if (k.startsWith("GNU.sparse.")) sparse = true;
    // Others (atime, ctime, uname, gname, comment, charset, ...) do not matter here.
  }
  return { values, unset, xattrs, xattrUnset, sparse };
}

const TYPES: Record<string, TarEntryType> = {
  "0": "file",
  "\0": "file",
  "7": "file",
  "1": "hardlink",
  "2": "symlink",
  "3": "chardev",
  "4": "blockdev",
  "5": "dir",
  "6": "fifo",
  D: "dir",
};

/** Types whose size field does not announce a body (as Go's archive/tar reads them). */
const HEADER_ONLY = new Set(["1", "2", "3", "4", "5", "6"]);

/**
 * Reads a tar stream entry by entry.
 *
 * @param input a Readable (without encoding) or any async iterable of Buffers
 * @throws {LayerError} on a checksum mismatch, malformed field, oversized
 *   meta data, unsupported entry type or truncated archive
 * @throws {AbortError} when `options.signal` fires
 */
export async function* readTar(input: Readable | AsyncIterable<Uint8Array>, options: ReadTarOptions = {}): AsyncGenerator<TarEntry, void, undefined> {
  const src = new ByteSource(input as AsyncIterable<unknown>, options.onBytes);
  try {
    yield* entries(src, options);
  } finally {
    // On an error, or a consumer that stops early: release the input now
    // (a decompressor behind it must not be left holding its file).
    await src.close();
  }
}

async function* entries(src: ByteSource, options: ReadTarOptions): AsyncGenerator<TarEntry, void, undefined> {
  const maxPax = options.maxPaxBytes ?? DEFAULT_LAYER_LIMITS.maxPaxBytes;
  const maxLong = options.maxLongNameBytes ?? 1 << 16;
  const maxXattrs = options.maxXattrsPerEntry ?? DEFAULT_LAYER_LIMITS.maxXattrsPerEntry;
  const globals = new Map<string, Buffer>();
  let globalFields: PaxFields = NO_PAX;
  let globalBytes = 0;
  let pax = new Map<string, Buffer>();
  let pendingBytes = 0;
  let longName: string | undefined;
  let longLink: string | undefined;

  for (;;) {
    if (options.signal?.aborted) throw new AbortError("Reading the layer was aborted", { cause: options.signal.reason });
    const at = src.offset;
    const block = await src.exact(BLOCK);
    if (block === null) {
      if (src.offset !== at) fail(`tar archive truncated inside a header (byte ${at})`);
      if (at === 0) fail("tar archive is empty");
      if (pax.size > 0 || longName !== undefined || longLink !== undefined) fail(`tar archive truncated after a meta header (byte ${at})`);
      // Missing end-of-archive blocks: tolerated, like GNU tar does.
      return;
    }
    if (block.every((b) => b === 0)) {
      // End of archive. Read what follows so the producer (and any digest
      // check wrapped around it) sees the whole stream.
      await src.drain();
      return;
    }
    if (!checksumOk(block, at)) fail(`tar header at byte ${at}: checksum mismatch (not a tar archive, or corrupt)`);

    const magic = block.toString("latin1", 257, 263);
    const posix = magic === "ustar\0";
    let name = str(block, 0, 100);
    if (posix) {
      const prefix = str(block, 345, 155);
      if (prefix !== "") name = `${prefix}/${name}`;
    }
    const flag = String.fromCharCode(block[156]!);
    const headerSize = num(block, 124, 12, "size", at);
    if (headerSize < 0) fail(`tar header at byte ${at}: negative size`, showName(name));

    if (flag === "x" || flag === "g" || flag === "L" || flag === "K") {
      const limit = flag === "L" || flag === "K" ? maxLong : maxPax;
      if (headerSize > limit) {
        if (flag === "L" || flag === "K") fail(`tar meta header '${flag}' at byte ${at} is ${headerSize} bytes, over the ${limit}-byte limit`);
        throw limitError("maxPaxBytes", limit, `tar meta header '${flag}' at byte ${at} is ${headerSize} bytes`);
      }
      const body = headerSize === 0 ? Buffer.alloc(0) : await src.exact(headerSize);
      if (body === null || !(await src.skip((BLOCK - (headerSize % BLOCK)) % BLOCK))) fail(`tar archive truncated inside meta header at byte ${at}`);
      if (flag === "L" || flag === "K") {
        pendingBytes += headerSize;
        const nul = body.indexOf(0);
        const value = body.toString("latin1", 0, nul === -1 ? body.length : nul);
        if (flag === "L") longName = value;
        else longLink = value;
      } else if (flag === "x") {
        pendingBytes += headerSize;
        for (const [k, v] of parsePax(body, at)) pax.set(k, v);
      } else {
        for (const [k, v] of parsePax(body, at)) {
          if (v.length === 0) globals.delete(k);
          else globals.set(k, v);
        }
        globalBytes = 0;
        for (const [k, v] of globals) globalBytes += k.length + v.length;
        if (globalBytes > maxPax) throw limitError("maxPaxBytes", maxPax, `PAX global headers hold more than ${maxPax} bytes (byte ${at})`);
        // Parsed once here; every later entry shares the result.
        globalFields = paxFields(globals, at);
        if (globalFields.xattrs.size > maxXattrs) throw limitError("maxXattrsPerEntry", maxXattrs, `the PAX global header at byte ${at} gives every entry ${globalFields.xattrs.size} xattrs`);
      }
      if (pendingBytes > maxPax) throw limitError("maxPaxBytes", maxPax, `tar meta headers before byte ${at} hold more than ${maxPax} bytes`);
      continue;
    }

    // A real entry: header fields, then the global PAX fields, then this
    // entry's own records (an empty value unsets a global one).
    const local = paxFields(pax, at);
    pax = new Map();
    pendingBytes = 0;
    if (longName !== undefined) name = longName;
    let linkpath = longLink ?? str(block, 157, 100);
    longName = longLink = undefined;

    let size = headerSize;
    let uid = num(block, 108, 8, "uid", at);
    let gid = num(block, 116, 8, "gid", at);
    const rawMtime = num(block, 136, 12, "mtime", at);
    let mtimeSec = Math.max(0, rawMtime);
    let mtimeNsec = 0;
    let devmajor = 0;
    let devminor = 0;
    if (posix || magic === "ustar ") {
      devmajor = num(block, 329, 8, "devmajor", at);
      devminor = num(block, 337, 8, "devminor", at);
    }
    const f: PaxValues = { ...globalFields.values };
    for (const k of local.unset) delete f[k];
    Object.assign(f, local.values);
    if (globalFields.sparse || local.sparse) fail(`tar entry at byte ${at} is a GNU sparse file, which is not supported`, showName(f.path ?? name));
    if (f.path !== undefined) name = f.path;
    if (f.linkpath !== undefined) linkpath = f.linkpath;
    if (f.size !== undefined) size = f.size;
    if (f.uid !== undefined) uid = f.uid;
    if (f.gid !== undefined) gid = f.gid;
    if (f.mtime !== undefined) ({ sec: mtimeSec, nsec: mtimeNsec } = f.mtime);
    if (f.devmajor !== undefined) devmajor = f.devmajor;
    if (f.devminor !== undefined) devminor = f.devminor;
    // The global xattr set is shared by every entry that adds none of its
    // own: never copied per entry.
    let xattrs: ReadonlyMap<string, Buffer> = globalFields.xattrs;
    if (local.xattrs.size > 0 || local.xattrUnset.size > 0) {
      const merged = new Map(globalFields.xattrs);
      for (const k of local.xattrUnset) merged.delete(k);
      for (const [k, v] of local.xattrs) merged.set(k, v);
      if (merged.size > maxXattrs) throw limitError("maxXattrsPerEntry", maxXattrs, `tar entry at byte ${at} has ${merged.size} xattrs`, showName(name));
      xattrs = merged;
    }
    if (uid < 0 || uid > 0xffffffff || gid < 0 || gid > 0xffffffff) fail(`tar entry at byte ${at}: uid/gid out of range`, showName(name));
    if (devmajor < 0 || devminor < 0 || devmajor > 0xfff || devminor > 0xfffff) fail(`tar entry at byte ${at}: device number ${devmajor}:${devminor} out of range`, showName(name));

    let type = TYPES[flag];
    if (type === undefined) {
      if (flag === "V") {
        // GNU volume label: not a file.
        if (!(await src.skip(size + ((BLOCK - (size % BLOCK)) % BLOCK)))) fail(`tar archive truncated inside entry at byte ${at}`);
        continue;
      }
      const what = flag === "S" ? "a GNU sparse file" : flag === "M" ? "a multi-volume continuation" : `of unknown type ${JSON.stringify(flag)}`;
      fail(`tar entry ${showName(name)} at byte ${at} is ${what}, which is not supported`, showName(name));
    }
    if (flag === "\0" && name.endsWith("/")) type = "dir"; // old archives mark directories by the slash
    if (name.includes("\0") || linkpath.includes("\0")) fail(`tar entry at byte ${at}: name contains a NUL byte`, showName(name));

    const bodyBytes = HEADER_ONLY.has(flag) ? 0 : size;
    const padding = (BLOCK - (bodyBytes % BLOCK)) % BLOCK;
    if (type !== "file") size = 0;
    const state = { left: bodyBytes };
    const entry: TarEntry = {
      type,
      path: name,
      linkpath: type === "hardlink" || type === "symlink" ? linkpath : "",
      mode: num(block, 100, 8, "mode", at) & 0o7777,
      uid,
      gid,
      size,
      mtimeSec,
      mtimeNsec,
      devmajor,
      devminor,
      xattrs,
      offset: at,
      body: () => ({
        async *[Symbol.asyncIterator]() {
          while (state.left > 0) {
            if (options.signal?.aborted) throw new AbortError("Reading the layer was aborted", { cause: options.signal.reason });
            const part = await src.some(state.left);
            if (part === null) fail(`tar archive truncated inside ${showName(name)} (${state.left} bytes missing)`, showName(name));
            state.left -= part.length;
            yield part;
          }
        },
      }),
    };
    yield entry;
    if (!(await src.skip(state.left + padding))) fail(`tar archive truncated inside ${showName(name)}`, showName(name));
    state.left = 0;
  }
}
