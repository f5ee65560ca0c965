/**
 * The FUSE wire format (the kernel's include/uapi/linux/fuse.h), little
 * endian, as the guest kernel reads and writes it on /dev/fuse: constants,
 * the request parser the file server uses, reply/notification encoders, and a
 * request encoder for tests (and for the agent-side tests, which replay the
 * same bytes). Pure: no I/O.
 */

/** The protocol major version every Linux kernel speaks. */
export const FUSE_KERNEL_VERSION = 7;
/** The highest minor version this server negotiates (Debian 12's 6.1 kernel speaks 7.37). */
export const FUSE_MAX_MINOR = 37;
/** The lowest minor version this server accepts (Linux 5.2). */
export const FUSE_MIN_MINOR = 31;
/** nodeid of the mount's root directory. */
export const FUSE_ROOT_ID = 1n;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
export const INIT_OUT_SIZE = 64;
export const DIRENT_HEADER_SIZE = 24;

export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  GETLK: 31,
  SETLK: 32,
  SETLKW: 33,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  BMAP: 37,
  DESTROY: 38,
  IOCTL: 39,
  POLL: 40,
  NOTIFY_REPLY: 41,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  READDIRPLUS: 44,
  RENAME2: 45,
  LSEEK: 46,
  COPY_FILE_RANGE: 47,
} as const;

export const NotifyCode = {
  INVAL_INODE: 2,
  INVAL_ENTRY: 3,
} as const;

/** fuse_init_in/out flags. */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  POSIX_LOCKS: 1 << 1,
  ATOMIC_O_TRUNC: 1 << 3,
  EXPORT_SUPPORT: 1 << 4,
  BIG_WRITES: 1 << 5,
  DONT_MASK: 1 << 6,
  AUTO_INVAL_DATA: 1 << 12,
  DO_READDIRPLUS: 1 << 13,
  READDIRPLUS_AUTO: 1 << 14,
  ASYNC_DIO: 1 << 15,
  WRITEBACK_CACHE: 1 << 16,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
} as const;

/** fuse_setattr_in.valid bits. */
export const Fattr = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  FH: 1 << 6,
  ATIME_NOW: 1 << 7,
  MTIME_NOW: 1 << 8,
  LOCKOWNER: 1 << 9,
  CTIME: 1 << 10,
  KILL_SUIDGID: 1 << 11,
} as const;

export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;
export const RENAME_NOREPLACE = 1;
export const FSYNC_FDATASYNC = 1;

/** Linux errno values used in replies (positive; replies carry them negated). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EEXIST: 17,
  EXDEV: 18,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  EMLINK: 31,
  ERANGE: 34,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENOTEMPTY: 39,
  ELOOP: 40,
  ENODATA: 61,
  EOVERFLOW: 75,
  EOPNOTSUPP: 95,
  EDQUOT: 122,
  ESTALE: 116,
  EPROTO: 71,
  ENOTCONN: 107,
} as const;

/** File type bits of st_mode. */
export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFDIR = 0o040000;
export const S_IFLNK = 0o120000;

/** Directory entry types (DT_*) for fuse_dirent.type. */
export function direntType(mode: number): number {
  return (mode & S_IFMT) >>> 12;
}

/** The parsed fuse_in_header; `body` is everything after it (a view, not a copy). */
export interface FuseRequest {
  readonly len: number;
  readonly opcode: number;
  readonly unique: bigint;
  readonly nodeid: bigint;
  readonly uid: number;
  readonly gid: number;
  readonly pid: number;
  readonly body: Buffer;
}

/** Parses a request's header; throws RangeError on a buffer that is not one request. */
export function parseRequest(buf: Buffer): FuseRequest {
  if (buf.length < IN_HEADER_SIZE) throw new RangeError(`FUSE request of ${buf.length} bytes is shorter than its ${IN_HEADER_SIZE}-byte header`);
  const len = buf.readUInt32LE(0);
  if (len !== buf.length) throw new RangeError(`FUSE request says ${len} bytes but ${buf.length} arrived`);
  return {
    len,
    opcode: buf.readUInt32LE(4),
    unique: buf.readBigUInt64LE(8),
    nodeid: buf.readBigUInt64LE(16),
    uid: buf.readUInt32LE(24),
    gid: buf.readUInt32LE(28),
    pid: buf.readUInt32LE(32),
    body: buf.subarray(IN_HEADER_SIZE),
  };
}

/** A reply: fuse_out_header (error 0) + payload. */
export function encodeReply(unique: bigint, payload?: Buffer): Buffer {
  const size = OUT_HEADER_SIZE + (payload?.length ?? 0);
  const out = Buffer.allocUnsafe(size);
  out.writeUInt32LE(size, 0);
  out.writeInt32LE(0, 4);
  out.writeBigUInt64LE(unique, 8);
  if (payload) payload.copy(out, OUT_HEADER_SIZE);
  return out;
}

/** An error reply: fuse_out_header alone, error = -errno. */
export function encodeError(unique: bigint, errno: number): Buffer {
  const out = Buffer.alloc(OUT_HEADER_SIZE);
  out.writeUInt32LE(OUT_HEADER_SIZE, 0);
  out.writeInt32LE(-Math.abs(errno), 4);
  out.writeBigUInt64LE(unique, 8);
  return out;
}

/** A parsed reply (for tests and the agent side). */
export interface FuseReply {
  readonly len: number;
  /** 0 or a negative errno. */
  readonly error: number;
  readonly unique: bigint;
  readonly body: Buffer;
}

export function parseReply(buf: Buffer): FuseReply {
  if (buf.length < OUT_HEADER_SIZE) throw new RangeError(`FUSE reply of ${buf.length} bytes is shorter than its header`);
  const len = buf.readUInt32LE(0);
  if (len !== buf.length) throw new RangeError(`FUSE reply says ${len} bytes but is ${buf.length}`);
  return { len, error: buf.readInt32LE(4), unique: buf.readBigUInt64LE(8), body: buf.subarray(OUT_HEADER_SIZE) };
}

/** Attributes as the server reports them (fuse_attr). */
export interface FuseAttr {
  ino: bigint;
  size: bigint;
  blocks: bigint;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  blksize: number;
}

const NS = 1_000_000_000n;

function clampU64(v: bigint): bigint {
  return v < 0n ? 0n : v > 0xffff_ffff_ffff_ffffn ? 0xffff_ffff_ffff_ffffn : v;
}

function clampU32(v: number): number {
  return v < 0 || !Number.isFinite(v) ? 0 : v > 0xffff_ffff ? 0xffff_ffff : Math.trunc(v);
}

export function writeAttr(out: Buffer, off: number, a: FuseAttr): void {
  out.writeBigUInt64LE(clampU64(a.ino), off);
  out.writeBigUInt64LE(clampU64(a.size), off + 8);
  out.writeBigUInt64LE(clampU64(a.blocks), off + 16);
  const times = [a.atimeNs, a.mtimeNs, a.ctimeNs];
  for (let i = 0; i < 3; i++) {
    const t = times[i]!;
    const s = t >= 0n ? t / NS : 0n;
    const ns = t >= 0n ? t % NS : 0n;
    out.writeBigUInt64LE(clampU64(s), off + 24 + i * 8);
    out.writeUInt32LE(Number(ns), off + 48 + i * 4);
  }
  out.writeUInt32LE(clampU32(a.mode), off + 60);
  out.writeUInt32LE(clampU32(a.nlink), off + 64);
  out.writeUInt32LE(clampU32(a.uid), off + 68);
  out.writeUInt32LE(clampU32(a.gid), off + 72);
  out.writeUInt32LE(clampU32(a.rdev), off + 76);
  out.writeUInt32LE(clampU32(a.blksize), off + 80);
  out.writeUInt32LE(0, off + 84);
}

export function readAttr(buf: Buffer, off: number): FuseAttr {
  return {
    ino: buf.readBigUInt64LE(off),
    size: buf.readBigUInt64LE(off + 8),
    blocks: buf.readBigUInt64LE(off + 16),
    atimeNs: buf.readBigUInt64LE(off + 24) * NS + BigInt(buf.readUInt32LE(off + 48)),
    mtimeNs: buf.readBigUInt64LE(off + 32) * NS + BigInt(buf.readUInt32LE(off + 52)),
    ctimeNs: buf.readBigUInt64LE(off + 40) * NS + BigInt(buf.readUInt32LE(off + 56)),
    mode: buf.readUInt32LE(off + 60),
    nlink: buf.readUInt32LE(off + 64),
    uid: buf.readUInt32LE(off + 68),
    gid: buf.readUInt32LE(off + 72),
    rdev: buf.readUInt32LE(off + 76),
    blksize: buf.readUInt32LE(off + 80),
  };
}

/** Splits a cache timeout in milliseconds into (seconds, nanoseconds). */
function timeout(ms: number): [bigint, number] {
  const whole = Math.floor(ms / 1000);
  return [BigInt(whole), Math.round((ms - whole * 1000) * 1_000_000)];
}

/** fuse_entry_out into `out` at `off`. */
export function writeEntryOut(out: Buffer, off: number, nodeid: bigint, attr: FuseAttr, entryTtlMs: number, attrTtlMs: number): void {
  const [es, ens] = timeout(entryTtlMs);
  const [as, ans] = timeout(attrTtlMs);
  out.writeBigUInt64LE(nodeid, off);
  out.writeBigUInt64LE(0n, off + 8);
  out.writeBigUInt64LE(es, off + 16);
  out.writeBigUInt64LE(as, off + 24);
  out.writeUInt32LE(ens, off + 32);
  out.writeUInt32LE(ans, off + 36);
  writeAttr(out, off + 40, attr);
}

export function encodeEntryOut(nodeid: bigint, attr: FuseAttr, entryTtlMs: number, attrTtlMs: number): Buffer {
  const out = Buffer.alloc(ENTRY_OUT_SIZE);
  writeEntryOut(out, 0, nodeid, attr, entryTtlMs, attrTtlMs);
  return out;
}

export function encodeAttrOut(attr: FuseAttr, attrTtlMs: number): Buffer {
  const out = Buffer.alloc(ATTR_OUT_SIZE);
  const [s, ns] = timeout(attrTtlMs);
  out.writeBigUInt64LE(s, 0);
  out.writeUInt32LE(ns, 8);
  writeAttr(out, 16, attr);
  return out;
}

/** Size of one fuse_dirent with a name of `nameLen` bytes, padded to 8. */
export function direntSize(nameLen: number): number {
  return (DIRENT_HEADER_SIZE + nameLen + 7) & ~7;
}

export function writeDirent(out: Buffer, off: number, ino: bigint, nextOff: bigint, type: number, name: Buffer): number {
  const size = direntSize(name.length);
  out.writeBigUInt64LE(ino, off);
  out.writeBigUInt64LE(nextOff, off + 8);
  out.writeUInt32LE(name.length, off + 16);
  out.writeUInt32LE(type, off + 20);
  name.copy(out, off + DIRENT_HEADER_SIZE);
  out.fill(0, off + DIRENT_HEADER_SIZE + name.length, off + size);
  return size;
}

/** One entry decoded from a READDIR or READDIRPLUS reply. */
export interface DecodedDirent {
  readonly ino: bigint;
  readonly off: bigint;
  readonly type: number;
  readonly name: Buffer;
  /** READDIRPLUS only: the entry's nodeid (0 = not looked up) and attributes. */
  readonly nodeid?: bigint;
  readonly attr?: FuseAttr;
}

export function parseDirents(body: Buffer, plus: boolean): DecodedDirent[] {
  const out: DecodedDirent[] = [];
  let off = 0;
  while (off < body.length) {
    let nodeid: bigint | undefined;
    let attr: FuseAttr | undefined;
    if (plus) {
      nodeid = body.readBigUInt64LE(off);
      attr = readAttr(body, off + 40);
      off += ENTRY_OUT_SIZE;
    }
    const namelen = body.readUInt32LE(off + 16);
    const entry: DecodedDirent = {
      ino: body.readBigUInt64LE(off),
      off: body.readBigUInt64LE(off + 8),
      type: body.readUInt32LE(off + 20),
      name: Buffer.from(body.subarray(off + DIRENT_HEADER_SIZE, off + DIRENT_HEADER_SIZE + namelen)),
      ...(plus ? { nodeid: nodeid!, attr: attr! } : {}),
    };
    out.push(entry);
    off += direntSize(namelen);
  }
  return out;
}

/** FUSE_NOTIFY_INVAL_ENTRY: the guest kernel drops its dentry `name` under `parent`. */
export function encodeNotifyInvalEntry(parent: bigint, name: Buffer): Buffer {
  const size = OUT_HEADER_SIZE + 16 + name.length + 1;
  const out = Buffer.alloc(size);
  out.writeUInt32LE(size, 0);
  out.writeInt32LE(NotifyCode.INVAL_ENTRY, 4);
  out.writeBigUInt64LE(0n, 8);
  out.writeBigUInt64LE(parent, 16);
  out.writeUInt32LE(name.length, 24);
  out.writeUInt32LE(0, 28);
  name.copy(out, 32);
  return out;
}

/** FUSE_NOTIFY_INVAL_INODE: the guest kernel drops cached attributes and data (off 0, len -1 = all). */
export function encodeNotifyInvalInode(nodeid: bigint, off = 0n, len = -1n): Buffer {
  const size = OUT_HEADER_SIZE + 24;
  const out = Buffer.alloc(size);
  out.writeUInt32LE(size, 0);
  out.writeInt32LE(NotifyCode.INVAL_INODE, 4);
  out.writeBigUInt64LE(0n, 8);
  out.writeBigUInt64LE(nodeid, 16);
  out.writeBigInt64LE(off, 24);
  out.writeBigInt64LE(len, 32);
  return out;
}

/** Header fields of a request built by {@link encodeRequest}. */
export interface RequestHeader {
  readonly opcode: number;
  readonly unique: bigint;
  readonly nodeid: bigint;
  readonly uid?: number;
  readonly gid?: number;
  readonly pid?: number;
}

/** Builds a raw request as the kernel writes it: fuse_in_header + body parts. */
export function encodeRequest(h: RequestHeader, ...parts: Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  const out = Buffer.alloc(IN_HEADER_SIZE + body.length);
  out.writeUInt32LE(out.length, 0);
  out.writeUInt32LE(h.opcode, 4);
  out.writeBigUInt64LE(h.unique, 8);
  out.writeBigUInt64LE(h.nodeid, 16);
  out.writeUInt32LE(h.uid ?? 0, 24);
  out.writeUInt32LE(h.gid ?? 0, 28);
  out.writeUInt32LE(h.pid ?? 1, 32);
  body.copy(out, IN_HEADER_SIZE);
  return out;
}

/** Little helper to build fixed-layout structs: fields of 4 or 8 bytes in order. */
export function struct(...fields: Array<[4 | 8 | 2, number | bigint]>): Buffer {
  const size = fields.reduce((n, [w]) => n + w, 0);
  const out = Buffer.alloc(size);
  let off = 0;
  for (const [w, v] of fields) {
    if (w === 8) out.writeBigUInt64LE(BigInt(v), off);
    else if (w === 4) out.writeUInt32LE(Number(v) >>> 0, off);
    else out.writeUInt16LE(Number(v) & 0xffff, off);
    off += w;
  }
  return out;
}

/** A NUL-terminated name as FUSE carries it. */
export function cstr(name: string | Buffer): Buffer {
  const b = typeof name === "string" ? Buffer.from(name) : name;
  return Buffer.concat([b, Buffer.from([0])]);
}
