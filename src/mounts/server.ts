/**
 * FuseServer: the host half of a mount. It answers raw FUSE requests (as the
 * guest kernel wrote them on /dev/fuse and the agent forwarded them) with raw
 * FUSE replies, serving one host directory, and it is the security boundary
 * of the mount: nothing the guest sends ever becomes a host path string.
 *
 * The resolution rule (see docs/mounts.md): every node the guest knows is an
 * O_PATH file descriptor opened by this server; a child is reached only as
 * `/proc/self/fd/<parent fd>/<one name>` with O_NOFOLLOW, and its type is
 * verified with fstat on the descriptor that was opened (never on the path
 * again). Names are single components. A node's descriptor is closed only
 * when the guest forgot it *and* no request is using it, so a descriptor
 * number is never reused under an in-flight request.
 */

import * as fs from "node:fs";
import { constants as osConstants } from "node:os";
import { promisify } from "node:util";
import { MountError, invalidOption } from "../errors.js";
import {
  Errno,
  Fattr,
  FSYNC_FDATASYNC,
  FUSE_KERNEL_VERSION,
  FUSE_MAX_MINOR,
  FUSE_MIN_MINOR,
  FUSE_ROOT_ID,
  ENTRY_OUT_SIZE,
  INIT_OUT_SIZE,
  InitFlag,
  Op,
  RENAME_NOREPLACE,
  S_IFDIR,
  S_IFLNK,
  S_IFMT,
  S_IFREG,
  direntSize,
  direntType,
  encodeAttrOut,
  encodeEntryOut,
  encodeError,
  encodeNotifyInvalEntry,
  encodeReply,
  parseRequest,
  writeDirent,
  writeEntryOut,
  type FuseAttr,
  type FuseRequest,
} from "./wire.js";

/** How the server treats symbolic links; the seed's table, see docs/mounts.md. */
export type SymlinkPolicy = "deny" | "opaque" | "follow";

/** One host directory shared with the guest. */
export interface MountSpec {
  /** Host directory to share (must exist and be a directory). */
  readonly hostPath: string;
  /** The tag the guest mounts it by (`mount -t virtiofs <guestTag> <dir>`). */
  readonly guestTag: string;
  /**
   * Symlink policy: "deny" (no symlinks at all), "opaque" (guest symlinks
   * stored verbatim, never resolved by the host), "follow" (host resolves
   * symlinks: trusted trees only).
   * @default "opaque"
   */
  readonly symlinks?: SymlinkPolicy;
  /** Refuse every change from the guest with EROFS. @default false */
  readonly readOnly?: boolean;
  /** (extension) Guest directory the agent mounts it on, on every VM. @default undefined (not mounted automatically) */
  readonly guestPath?: string;
}

/** Tuning and limits of one server (extension; the defaults suit a VM's mount). */
export interface FuseServerOptions {
  /**
   * How long the guest kernel may cache names and attributes. A host-side
   * edit is seen by the guest's next stat after at most this long (file
   * contents are re-read on every open regardless).
   * @default 500
   */
  readonly cacheTimeoutMs?: number;
  /** Most nodes (inodes) the guest may hold at once; beyond it LOOKUP fails with ENFILE. @default 8192 */
  readonly maxNodes?: number;
  /** Most open files and directories at once; beyond it OPEN fails with EMFILE. @default 1024 */
  readonly maxHandles?: number;
  /**
   * Most entries one directory listing holds; beyond it READDIR fails with
   * EOVERFLOW. Listings open at once hold at most 4 × this many entries
   * together (beyond: ENOMEM).
   * @default 262144
   */
  readonly maxDirEntries?: number;
  /**
   * Requests of this mount served at once; more wait in order. Host file
   * operations share Node's small libuv thread pool with everything else in
   * the process: this keeps one guest from taking all of it.
   * @default 16
   */
  readonly maxInFlight?: number;
  /** Guest uid reported for files the Node process's user owns (others show as 65534). @default 0 */
  readonly uid?: number;
  /** Guest gid reported for files the Node process's group owns (others show as 65534). @default 0 */
  readonly gid?: number;
}

/** Largest WRITE the server accepts and announces in INIT (max_write). */
export const MAX_WRITE_BYTES = 128 * 1024;
/** Pages per request announced in INIT (128 KiB with 4 KiB pages). */
export const MAX_PAGES = 32;
/** Largest READ / READDIR the server answers: a reply must fit one 1 MiB protocol frame. */
export const MAX_READ_BYTES = 1024 * 1024 - 64 * 1024;
/** Longest symlink target accepted from the guest (PATH_MAX - 1). */
export const MAX_SYMLINK_TARGET = 4095;
/** Longest name component (NAME_MAX). */
export const NAME_MAX = 255;
/** Owner reported for host files that are not the Node user's. */
export const OVERFLOW_ID = 65534;

const O_PATH = 0o10000000;
const { O_NOFOLLOW, O_DIRECTORY, O_CREAT, O_EXCL, O_TRUNC, O_APPEND, O_RDONLY, O_WRONLY, O_RDWR, O_SYNC, O_DSYNC } = fs.constants;
const O_ACCMODE = 3;
const S_ISUID = 0o4000;
const S_ISGID = 0o2000;
/** Mode bits the guest may set: permissions and sticky, never set-id (the host files belong to the Node user). */
const GUEST_MODE_MASK = 0o1777;

const openAsync = promisify(fs.open);
const closeAsync = promisify(fs.close);
const fstatAsync = promisify(fs.fstat) as (fd: number, opts: { bigint: true }) => Promise<fs.BigIntStats>;
const readAsync = promisify(fs.read);
function writeAsync(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
const ftruncateAsync = promisify(fs.ftruncate);
const fsyncAsync = promisify(fs.fsync);
const fdatasyncAsync = promisify(fs.fdatasync);
const fchmodAsync = promisify(fs.fchmod);
const fsp = fs.promises;

/*
 * The hot metadata path (resolving a name for LOOKUP, adopting a node just
 * created, GETATTR) is synchronous: an O_PATH open, fstat and close take
 * microseconds on a local file system, while each trip through libuv's
 * thread pool waits for the event loop too. Measured on 2026-11-30, single
 * runs under load: LOOKUP of a new node in-process 78 → 57 µs p50, GETATTR
 * 41 → 31 µs; a LOOKUP's handler inside a TCG VM's mount 239 → 158–191 µs.
 * Everything else (data, directory listings, mutations) stays asynchronous.
 */
function fstatNow(fd: number): fs.BigIntStats {
  return fs.fstatSync(fd, { bigint: true });
}
function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // Already closed or never valid: nothing to release.
  }
}

/** An errno answer to the guest. */
class FuseErr extends Error {
  constructor(readonly errno: number) {
    super(`errno ${errno}`);
  }
}

function fail(errno: number): never {
  throw new FuseErr(errno);
}

/** errno of a thrown value: ours, a Node system error, or EIO. */
function errnoOf(err: unknown): number {
  if (err instanceof FuseErr) return err.errno;
  const e = err as NodeJS.ErrnoException | undefined;
  if (e && typeof e.errno === "number" && e.errno !== 0) return Math.abs(e.errno);
  if (e && typeof e.code === "string") {
    const n = (osConstants.errno as Record<string, number | undefined>)[e.code];
    if (typeof n === "number") return n;
  }
  return Errno.EIO;
}

type NodeKind = "dir" | "file" | "symlink" | "other";

interface Node {
  readonly id: bigint;
  readonly fd: number;
  readonly kind: NodeKind;
  readonly key: string;
  readonly ino: bigint;
  readonly dev: bigint;
  /** Lookups the guest has not forgotten yet. */
  nlookup: bigint;
  /** Requests (and open handles) using `fd` right now. */
  pins: number;
  /** Removed from the table; `fd` is closed when `pins` drops to 0. */
  dead: boolean;
  /** Where the node was last seen: the parent's nodeid and the name in it (READLINK, LINK, eviction). */
  parent: bigint;
  name: Buffer;
  /** Eviction was already asked for this node. */
  evictAsked: boolean;
}

/** A node found by a lookup, with the attributes read from the descriptor that found it. */
interface Resolved {
  readonly node: Node;
  readonly attr: FuseAttr;
}

/** All directory listings held at once stay under maxDirEntries × this. */
const LISTING_BUDGET_FACTOR = 4;

/** Lookups one READDIRPLUS runs at once. */
const READDIRPLUS_LANES = 8;

interface DirEntry {
  readonly name: Buffer;
  readonly type: number;
}

interface Handle {
  readonly fh: bigint;
  readonly node: Node;
  /** An fd opened for I/O (files), or -1 (directories: listed through the node's fd). */
  readonly fd: number;
  readonly dir: boolean;
  pins: number;
  dead: boolean;
  entries?: DirEntry[];
}

function kindOf(st: fs.BigIntStats): NodeKind {
  if (st.isDirectory()) return "dir";
  if (st.isFile()) return "file";
  if (st.isSymbolicLink()) return "symlink";
  return "other";
}

function procPath(fd: number, name?: Buffer): Buffer {
  const base = Buffer.from(`/proc/self/fd/${fd}`);
  return name === undefined ? base : Buffer.concat([base, Buffer.from("/"), name]);
}

/** Reads the NUL-terminated name at `off`; validates it as one path component. Returns the name and the offset after the NUL. */
function readName(body: Buffer, off: number): [Buffer, number] {
  const nul = body.indexOf(0, off);
  if (nul < 0) fail(Errno.EINVAL);
  const name = body.subarray(off, nul);
  checkName(name);
  return [Buffer.from(name), nul + 1];
}

/** A guest name must be one component: not empty, not "." or "..", no "/" (NUL cannot occur: it ends the name), at most NAME_MAX bytes. */
function checkName(name: Buffer): void {
  if (name.length === 0) fail(Errno.ENOENT);
  if (name.length > NAME_MAX) fail(Errno.ENAMETOOLONG);
  if (name.includes(0x2f) || name.includes(0)) fail(Errno.EINVAL);
  if (name[0] === 0x2e && (name.length === 1 || (name.length === 2 && name[1] === 0x2e))) fail(Errno.EINVAL);
}

function need(body: Buffer, size: number): void {
  if (body.length < size) fail(Errno.EINVAL);
}

function toPosition(offset: bigint): number | bigint {
  if (offset > 0x7fff_ffff_ffff_ffffn) fail(Errno.EINVAL);
  return offset <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(offset) : offset;
}

/**
 * Serves one host directory to a guest over raw FUSE messages. VM-free: the
 * agent transport calls {@link FuseServer.handle} for each request and writes
 * the result back; {@link FuseServer.onNotify} receives notifications the
 * server wants pushed to the guest kernel.
 */
export class FuseServer {
  /** The mount this server serves (validated). */
  readonly spec: Readonly<Required<Pick<MountSpec, "hostPath" | "guestTag" | "symlinks" | "readOnly">>> & { readonly guestPath: string | undefined };
  /**
   * Called with raw notification messages (fuse_out_header with unique 0,
   * error = notify code) to write to the guest's /dev/fuse. The server sends
   * FUSE_NOTIFY_INVAL_ENTRY to make the guest kernel forget old nodes when
   * its node table fills up. Must not throw; must not wait for replies of
   * requests in flight (write it from a path that cannot block replies).
   */
  onNotify: ((message: Buffer) => void) | undefined;

  private readonly cacheTimeoutMs: number;
  private readonly maxNodes: number;
  private readonly maxHandles: number;
  private readonly maxDirEntries: number;
  private readonly guestUid: number;
  private readonly guestGid: number;
  private readonly hostUid: number;
  private readonly hostGid: number;
  /** nodeid → node, in least-recently-used order (a use moves it to the end). */
  private readonly nodes = new Map<bigint, Node>();
  /** "dev:ino" → node: one nodeid per host inode while the guest knows it. */
  private readonly byKey = new Map<string, Node>();
  private readonly handles = new Map<bigint, Handle>();
  private nextId = 2n;
  private nextFh = 1n;
  private initialized = false;
  private lastEvictionMs = 0;
  private pendingHandles = 0;
  private listedEntries = 0;
  private readonly maxInFlight: number;
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  private closed = false;

  private constructor(spec: FuseServer["spec"], root: { fd: number; st: fs.BigIntStats }, options: FuseServerOptions) {
    this.spec = spec;
    this.onNotify = undefined;
    this.cacheTimeoutMs = options.cacheTimeoutMs ?? 500;
    this.maxNodes = options.maxNodes ?? 8192;
    this.maxHandles = options.maxHandles ?? 1024;
    this.maxDirEntries = options.maxDirEntries ?? 262_144;
    this.maxInFlight = options.maxInFlight ?? 16;
    this.guestUid = options.uid ?? 0;
    this.guestGid = options.gid ?? 0;
    this.hostUid = process.getuid?.() ?? 0;
    this.hostGid = process.getgid?.() ?? 0;
    const rootNode: Node = {
      id: FUSE_ROOT_ID,
      fd: root.fd,
      kind: "dir",
      key: `${root.st.dev}:${root.st.ino}`,
      ino: root.st.ino,
      dev: root.st.dev,
      nlookup: 1n,
      pins: 1, // the root is never closed before close()
      dead: false,
      parent: 0n,
      name: Buffer.alloc(0),
      evictAsked: false,
    };
    this.nodes.set(FUSE_ROOT_ID, rootNode);
    this.byKey.set(rootNode.key, rootNode);
  }

  /**
   * Validates a mount and opens its root. Throws a TypeError naming the bad
   * option, or a {@link MountError} when hostPath does not exist or is not a
   * directory.
   */
  static async open(spec: MountSpec, options: FuseServerOptions = {}): Promise<FuseServer> {
    if (typeof spec !== "object" || spec === null) throw invalidOption("mounts[]", "an object { hostPath, guestTag }", spec);
    if (typeof spec.hostPath !== "string" || spec.hostPath.length === 0 || spec.hostPath.includes("\0")) {
      throw invalidOption("mounts[].hostPath", "a non-empty path string", spec.hostPath);
    }
    if (typeof spec.guestTag !== "string" || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,35}$/.test(spec.guestTag)) {
      throw invalidOption("mounts[].guestTag", "1-36 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)", spec.guestTag);
    }
    const symlinks = spec.symlinks ?? "opaque";
    if (symlinks !== "deny" && symlinks !== "opaque" && symlinks !== "follow") {
      throw invalidOption("mounts[].symlinks", '"deny", "opaque" or "follow"', spec.symlinks);
    }
    if (spec.readOnly !== undefined && typeof spec.readOnly !== "boolean") throw invalidOption("mounts[].readOnly", "a boolean", spec.readOnly);
    if (spec.guestPath !== undefined && (typeof spec.guestPath !== "string" || !spec.guestPath.startsWith("/") || spec.guestPath.includes("\0"))) {
      throw invalidOption("mounts[].guestPath", "an absolute guest path", spec.guestPath);
    }
    for (const [name, value, min] of [
      ["cacheTimeoutMs", options.cacheTimeoutMs, 0],
      ["maxNodes", options.maxNodes, 2],
      ["maxHandles", options.maxHandles, 1],
      ["maxDirEntries", options.maxDirEntries, 1],
      ["maxInFlight", options.maxInFlight, 1],
      ["uid", options.uid, 0],
      ["gid", options.gid, 0],
    ] as const) {
      if (value !== undefined && (!Number.isSafeInteger(value) || value < min || value > 0xffff_ffff)) {
        throw invalidOption(name, `an integer >= ${min}`, value);
      }
    }
    let fd: number;
    try {
      // The root itself may be reached through symlinks: the user named it. From here on nothing is followed.
      fd = await openAsync(spec.hostPath, O_PATH | O_DIRECTORY);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why =
        code === "ENOENT" ? "does not exist" : code === "ENOTDIR" ? "is not a directory" : code === "EACCES" ? "is not accessible to this user" : `cannot be opened (${code ?? String(err)})`;
      throw new MountError(`mounts[].hostPath ${JSON.stringify(spec.hostPath)} ${why}: give an existing host directory`, "hostPath", { cause: err });
    }
    let st: fs.BigIntStats;
    try {
      st = await fstatAsync(fd, { bigint: true });
    } catch (err) {
      await closeAsync(fd).catch(() => undefined);
      throw new MountError(`mounts[].hostPath ${JSON.stringify(spec.hostPath)} cannot be read`, "hostPath", { cause: err });
    }
    return new FuseServer(
      { hostPath: spec.hostPath, guestTag: spec.guestTag, symlinks, readOnly: spec.readOnly ?? false, guestPath: spec.guestPath },
      { fd, st },
      options,
    );
  }

  /** Nodes the guest holds right now (the root included). */
  get nodeCount(): number {
    return this.nodes.size;
  }

  /** Open file and directory handles right now. */
  get handleCount(): number {
    return this.handles.size;
  }

  /**
   * Answers one raw FUSE request. Returns the raw reply, or null for the
   * requests that have none (FORGET, BATCH_FORGET, INTERRUPT) and for bytes
   * too short to carry a request header. Never throws for anything the guest
   * sends; requests are independent and may be in flight together.
   */
  async handle(request: Buffer): Promise<Buffer | null> {
    let req: FuseRequest;
    try {
      req = parseRequest(request);
    } catch {
      return request.length >= 16 ? encodeError(request.readBigUInt64LE(8), Errno.EINVAL) : null;
    }
    if (req.opcode === Op.FORGET || req.opcode === Op.BATCH_FORGET || req.opcode === Op.INTERRUPT) {
      if (!this.closed) this.forgetRequest(req);
      return null;
    }
    if (this.active < this.maxInFlight) this.active++;
    else await new Promise<void>((resolve) => this.waiting.push(resolve)); // the finishing request hands its slot over
    try {
      if (this.closed) return encodeError(req.unique, Errno.ENOTCONN);
      const payload = await this.dispatch(req);
      return encodeReply(req.unique, payload);
    } catch (err) {
      return encodeError(req.unique, errnoOf(err));
    } finally {
      const next = this.waiting.shift();
      if (next !== undefined) next();
      else this.active--;
    }
  }

  /** Closes every descriptor. Requests still running finish with errors; later ones get ENOTCONN. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const fds: number[] = [];
    for (const h of this.handles.values()) {
      h.dead = true;
      if (h.pins === 0) {
        if (h.fd >= 0) fds.push(h.fd);
        h.node.pins--;
      }
    }
    this.handles.clear();
    for (const n of this.nodes.values()) {
      n.dead = true;
      if (n.id === FUSE_ROOT_ID) n.pins--;
      if (n.pins <= 0) fds.push(n.fd);
    }
    this.nodes.clear();
    this.byKey.clear();
    await Promise.all(fds.map((fd) => closeAsync(fd).catch(() => undefined)));
  }

  // ---------------------------------------------------------------- dispatch

  private async dispatch(req: FuseRequest): Promise<Buffer | undefined> {
    if (req.opcode === Op.INIT) return this.init(req);
    if (!this.initialized) fail(Errno.EIO);
    switch (req.opcode) {
      case Op.LOOKUP:
        return this.withNode(req.nodeid, (p) => this.lookup(p, readName(req.body, 0)[0]));
      case Op.GETATTR:
        return this.withNode(req.nodeid, async (n) => encodeAttrOut(await this.attrOf(n), this.cacheTimeoutMs));
      case Op.SETATTR:
        return this.withNode(req.nodeid, (n) => this.setattr(n, req.body));
      case Op.READLINK:
        return this.withNode(req.nodeid, (n) => this.readlink(n));
      case Op.SYMLINK:
        return this.mutating(req, (p) => this.symlink(p, req.body));
      case Op.MKNOD:
        return this.mutating(req, (p) => this.mknod(p, req.body));
      case Op.MKDIR:
        return this.mutating(req, (p) => this.mkdir(p, req.body));
      case Op.UNLINK:
        return this.mutating(req, (p) => this.remove(p, req.body, false));
      case Op.RMDIR:
        return this.mutating(req, (p) => this.remove(p, req.body, true));
      case Op.RENAME:
        return this.mutating(req, (p) => this.rename(p, req.body, false));
      case Op.RENAME2:
        return this.mutating(req, (p) => this.rename(p, req.body, true));
      case Op.LINK:
        return this.mutating(req, (p) => this.link(p, req.body));
      case Op.OPEN:
        return this.withNode(req.nodeid, (n) => this.open(n, req.body));
      case Op.READ:
        return this.read(req.body);
      case Op.WRITE:
        if (this.spec.readOnly) fail(Errno.EROFS);
        return this.write(req.body);
      case Op.STATFS:
        return this.withNode(req.nodeid, (n) => this.statfs(n));
      case Op.RELEASE:
      case Op.RELEASEDIR:
        return this.release(req.body);
      case Op.FLUSH:
        need(req.body, 8);
        this.handleOf(req.body.readBigUInt64LE(0));
        return undefined;
      case Op.FSYNC:
        return this.fsync(req.body);
      case Op.FSYNCDIR:
        return this.withNode(req.nodeid, (n) => this.fsyncdir(n));
      case Op.OPENDIR:
        return this.withNode(req.nodeid, (n) => this.opendir(n));
      case Op.READDIR:
        return this.readdir(req.body, false);
      case Op.READDIRPLUS:
        return this.readdir(req.body, true);
      case Op.ACCESS:
        return this.withNode(req.nodeid, async (n) => {
          need(req.body, 4);
          if (this.spec.readOnly && (req.body.readUInt32LE(0) & 2) !== 0 && n.kind !== "symlink") fail(Errno.EROFS);
          return undefined;
        });
      case Op.CREATE:
        return this.mutating(req, (p) => this.create(p, req.body));
      case Op.DESTROY:
        return undefined;
      default:
        // xattrs, locks (the guest kernel keeps them locally), ioctl, poll,
        // fallocate, lseek, copy_file_range, …: the guest kernel falls back.
        fail(Errno.ENOSYS);
    }
  }

  private async mutating(req: FuseRequest, fn: (parent: Node) => Promise<Buffer | undefined>): Promise<Buffer | undefined> {
    if (this.spec.readOnly) fail(Errno.EROFS);
    return this.withNode(req.nodeid, fn);
  }

  private init(req: FuseRequest): Buffer {
    need(req.body, 16);
    const major = req.body.readUInt32LE(0);
    const minor = req.body.readUInt32LE(4);
    const maxReadahead = req.body.readUInt32LE(8);
    const flags = req.body.readUInt32LE(12);
    const out = Buffer.alloc(INIT_OUT_SIZE);
    out.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
    out.writeUInt32LE(FUSE_MAX_MINOR, 4);
    // A newer major: answer with ours alone, the kernel retries with 7.x.
    if (major > FUSE_KERNEL_VERSION) return out;
    if (major < FUSE_KERNEL_VERSION || minor < FUSE_MIN_MINOR) fail(Errno.EPROTO);
    const wanted =
      InitFlag.ASYNC_READ |
      InitFlag.BIG_WRITES |
      InitFlag.AUTO_INVAL_DATA |
      InitFlag.DO_READDIRPLUS |
      InitFlag.READDIRPLUS_AUTO |
      InitFlag.PARALLEL_DIROPS |
      InitFlag.MAX_PAGES;
    out.writeUInt32LE(Math.min(minor, FUSE_MAX_MINOR), 4);
    out.writeUInt32LE(Math.min(maxReadahead, MAX_WRITE_BYTES), 8);
    out.writeUInt32LE((flags & wanted) >>> 0, 12);
    out.writeUInt16LE(64, 16); // max_background
    out.writeUInt16LE(48, 18); // congestion_threshold
    out.writeUInt32LE(MAX_WRITE_BYTES, 20);
    out.writeUInt32LE(1, 24); // time_gran: nanoseconds
    out.writeUInt16LE(MAX_PAGES, 28);
    this.initialized = true;
    return out;
  }

  // ------------------------------------------------------------ node table

  /** Runs `fn` with the node pinned (its fd cannot be closed meanwhile). */
  private async withNode<T>(id: bigint, fn: (n: Node) => Promise<T>): Promise<T> {
    const n = this.nodes.get(id);
    if (n === undefined || n.dead) fail(Errno.ESTALE);
    this.touch(n);
    n.pins++;
    try {
      return await fn(n);
    } finally {
      this.unpin(n);
    }
  }

  private touch(n: Node): void {
    if (n.id === FUSE_ROOT_ID) return;
    this.nodes.delete(n.id);
    this.nodes.set(n.id, n);
    n.evictAsked = false;
  }

  private unpin(n: Node): void {
    n.pins--;
    if (n.pins === 0 && n.dead) void closeAsync(n.fd).catch(() => undefined);
  }

  private dirOf(n: Node): Node {
    if (n.kind !== "dir") fail(Errno.ENOTDIR);
    return n;
  }

  /**
   * Takes ownership of `fd` (an O_PATH descriptor opened by this server) as
   * the node for its inode, counting one lookup. Synchronous, so concurrent
   * lookups of one inode agree on one node. `force` admits the node past
   * maxNodes (for files the guest just created: refusing would leave them
   * made but unknown).
   */
  private adopt(fd: number, st: fs.BigIntStats, parent: bigint, name: Buffer, force: boolean): { node: Node; extraFd: number } {
    const key = `${st.dev}:${st.ino}`;
    const existing = this.byKey.get(key);
    if (existing !== undefined && !existing.dead) {
      existing.nlookup++;
      if (existing.id !== FUSE_ROOT_ID) {
        existing.parent = parent;
        existing.name = name;
      }
      this.touch(existing);
      return { node: existing, extraFd: fd };
    }
    if (this.closed) fail(Errno.ENOTCONN);
    if (!force && this.nodes.size >= this.maxNodes) {
      this.askEviction(true);
      fail(Errno.ENFILE);
    }
    const node: Node = {
      id: this.nextId++,
      fd,
      kind: kindOf(st),
      key,
      ino: st.ino,
      dev: st.dev,
      nlookup: 1n,
      pins: 0,
      dead: false,
      parent,
      name,
      evictAsked: false,
    };
    this.nodes.set(node.id, node);
    this.byKey.set(key, node);
    if (this.nodes.size > this.highWater) this.askEviction(false);
    return { node, extraFd: -1 };
  }

  /** Above this many nodes the server asks the guest kernel to forget some, and READDIRPLUS stops looking entries up. */
  private get highWater(): number {
    return Math.floor((this.maxNodes * 3) / 4);
  }

  /**
   * Asks the guest kernel (FUSE_NOTIFY_INVAL_ENTRY) to drop the dentries of
   * the least recently used nodes, down to half the table (from 3/4 full on); it answers with
   * FORGETs for the inodes nothing in the guest still uses. At most every
   * 20 ms unless the table is full.
   */
  private askEviction(full: boolean): void {
    const notify = this.onNotify;
    if (notify === undefined) return;
    const now = Date.now();
    if (!full && now - this.lastEvictionMs < 20) return;
    this.lastEvictionMs = now;
    let budget = Math.max(1, this.nodes.size - Math.floor(this.maxNodes / 2));
    for (const n of this.nodes.values()) {
      if (budget === 0) break;
      if (n.id === FUSE_ROOT_ID || n.evictAsked || n.name.length === 0) continue;
      const parent = this.nodes.get(n.parent);
      if (parent === undefined || parent.dead) continue;
      n.evictAsked = true;
      budget--;
      try {
        notify(encodeNotifyInvalEntry(n.parent, n.name));
      } catch {
        // The transport's problem; the table stays bounded by ENFILE.
      }
    }
  }

  private forget(id: bigint, count: bigint): void {
    const n = this.nodes.get(id);
    if (n === undefined || n.id === FUSE_ROOT_ID) return;
    n.nlookup -= count;
    if (n.nlookup > 0n) return;
    n.dead = true;
    this.nodes.delete(id);
    if (this.byKey.get(n.key) === n) this.byKey.delete(n.key);
    if (n.pins === 0) void closeAsync(n.fd).catch(() => undefined);
  }

  private forgetRequest(req: FuseRequest): void {
    if (req.opcode === Op.FORGET) {
      if (req.body.length >= 8) this.forget(req.nodeid, req.body.readBigUInt64LE(0));
    } else if (req.opcode === Op.BATCH_FORGET) {
      if (req.body.length < 8) return;
      const count = Math.min(req.body.readUInt32LE(0), Math.floor((req.body.length - 8) / 16));
      for (let i = 0; i < count; i++) {
        const off = 8 + i * 16;
        this.forget(req.body.readBigUInt64LE(off), req.body.readBigUInt64LE(off + 8));
      }
    }
  }

  /**
   * The resolution rule: opens `name` inside the directory `parent` without
   * following a symlink, checks what was opened, applies the symlink policy
   * (only `follow` ever resolves one), and adopts it as a node.
   */
  private async resolveChild(parent: Node, name: Buffer, follow: boolean, force: boolean): Promise<Resolved> {
    this.dirOf(parent);
    const path = procPath(parent.fd, name);
    let fd = fs.openSync(path, O_PATH | O_NOFOLLOW);
    try {
      let st = fstatNow(fd);
      if (st.isSymbolicLink() && follow) {
        if (this.spec.symlinks === "deny") fail(Errno.EACCES);
        if (this.spec.symlinks === "follow") {
          // Trusted tree: let the host kernel resolve it (relative targets from `parent`).
          let target = -1;
          try {
            target = fs.openSync(path, O_PATH);
          } catch {
            // Dangling or looping: the guest sees the symlink itself (and can remove it).
          }
          if (target >= 0) {
            try {
              const tst = fstatNow(target);
              closeQuietly(fd);
              fd = target;
              st = tst;
            } catch (err) {
              closeQuietly(target);
              throw err;
            }
          }
        }
      }
      // A full table is ENFILE at once. Waiting for FORGETs here would deadlock: the guest
      // kernel holds the parent directory's lock during this LOOKUP, and the INVAL_ENTRY
      // notifications that make it forget siblings need that lock.
      const { node, extraFd } = this.adopt(fd, st, parent.id, name, force);
      fd = extraFd;
      return { node, attr: this.attrFrom(st) };
    } finally {
      if (fd >= 0) closeQuietly(fd);
    }
  }

  /** The node for a descriptor this server just opened on a new file (reopened O_PATH through its own fd: race-free). */
  private async adoptOpened(ioFd: number, parent: Node, name: Buffer): Promise<Resolved> {
    let fd = fs.openSync(procPath(ioFd), O_PATH);
    try {
      const st = fstatNow(fd);
      const { node, extraFd } = this.adopt(fd, st, parent.id, name, true);
      fd = extraFd;
      return { node, attr: this.attrFrom(st) };
    } finally {
      if (fd >= 0) closeQuietly(fd);
    }
  }

  private attrFrom(st: fs.BigIntStats): FuseAttr {
    const uid = Number(st.uid);
    const gid = Number(st.gid);
    return {
      ino: st.ino,
      size: st.size,
      blocks: st.blocks,
      atimeNs: st.atimeNs,
      mtimeNs: st.mtimeNs,
      ctimeNs: st.ctimeNs,
      mode: Number(st.mode),
      nlink: Number(st.nlink),
      uid: uid === this.hostUid ? this.guestUid : OVERFLOW_ID,
      gid: gid === this.hostGid ? this.guestGid : OVERFLOW_ID,
      rdev: 0,
      blksize: Number(st.blksize) || 4096,
    };
  }

  private async attrOf(n: Node): Promise<FuseAttr> {
    return this.attrFrom(fstatNow(n.fd));
  }

  private entryOf(r: Resolved): Buffer {
    return encodeEntryOut(r.node.id, r.attr, this.cacheTimeoutMs, this.cacheTimeoutMs);
  }

  // ------------------------------------------------------------ operations

  private async lookup(parent: Node, name: Buffer): Promise<Buffer> {
    return this.entryOf(await this.resolveChild(parent, name, true, false));
  }

  private async readlink(n: Node): Promise<Buffer> {
    if (n.kind !== "symlink") fail(Errno.EINVAL);
    // An O_PATH descriptor of a symlink cannot be read without readlinkat(fd, ""):
    // read it by its last known name in its (verified) parent and check it is the same inode.
    return this.withNode(n.parent, async (parent) => {
      this.dirOf(parent);
      const path = procPath(parent.fd, n.name);
      const target = await fsp.readlink(path, { encoding: "buffer" });
      const st = await fsp.lstat(path, { bigint: true });
      if (st.ino !== n.ino || st.dev !== n.dev) fail(Errno.ESTALE);
      return target;
    });
  }

  private async setattr(n: Node, body: Buffer): Promise<Buffer> {
    need(body, 88);
    if (this.spec.readOnly) fail(Errno.EROFS);
    const valid = body.readUInt32LE(0);
    const fh = body.readBigUInt64LE(8);
    const size = body.readBigUInt64LE(16);
    const atime = body.readBigUInt64LE(32);
    const mtime = body.readBigUInt64LE(40);
    const atimensec = body.readUInt32LE(56);
    const mtimensec = body.readUInt32LE(60);
    const mode = body.readUInt32LE(68);
    // uid/gid changes are ignored: the files belong to the user running Node.
    if (n.kind === "other") fail(Errno.EPERM);
    if (valid & Fattr.MODE && n.kind !== "symlink") {
      await fsp.chmod(procPath(n.fd), mode & GUEST_MODE_MASK);
    }
    if (valid & Fattr.SIZE) {
      if (n.kind === "dir") fail(Errno.EISDIR);
      if (n.kind !== "file") fail(Errno.EINVAL);
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) fail(Errno.EFBIG);
      const h = valid & Fattr.FH ? this.handles.get(fh) : undefined;
      if (h !== undefined && !h.dead && !h.dir && h.node === n) {
        h.pins++;
        try {
          await ftruncateAsync(h.fd, Number(size));
        } finally {
          this.unpinHandle(h);
        }
      } else {
        const fd = await openAsync(procPath(n.fd), O_WRONLY);
        try {
          await ftruncateAsync(fd, Number(size));
        } finally {
          await closeAsync(fd).catch(() => undefined);
        }
      }
    }
    if (valid & (Fattr.ATIME | Fattr.MTIME | Fattr.ATIME_NOW | Fattr.MTIME_NOW) && n.kind !== "symlink") {
      const st = await fstatAsync(n.fd, { bigint: true });
      const now = Date.now() / 1000;
      const seconds = (s: bigint, ns: number): number => Number(s) + Math.min(ns, 999_999_999) / 1e9;
      const a = valid & Fattr.ATIME_NOW ? now : valid & Fattr.ATIME ? seconds(atime, atimensec) : Number(st.atimeNs) / 1e9;
      const m = valid & Fattr.MTIME_NOW ? now : valid & Fattr.MTIME ? seconds(mtime, mtimensec) : Number(st.mtimeNs) / 1e9;
      await fsp.utimes(procPath(n.fd), a, m);
    }
    return encodeAttrOut(await this.attrOf(n), this.cacheTimeoutMs);
  }

  private async symlink(parent: Node, body: Buffer): Promise<Buffer> {
    if (this.spec.symlinks === "deny") fail(Errno.EPERM);
    this.dirOf(parent);
    const [name, off] = readName(body, 0);
    const nul = body.indexOf(0, off);
    if (nul < 0) fail(Errno.EINVAL);
    const target = Buffer.from(body.subarray(off, nul));
    if (target.length === 0) fail(Errno.ENOENT);
    if (target.length > MAX_SYMLINK_TARGET) fail(Errno.ENAMETOOLONG);
    // The target is stored verbatim: it is data, never resolved here.
    await fsp.symlink(target, procPath(parent.fd, name));
    return this.entryOf(await this.resolveChild(parent, name, false, true));
  }

  private async createFile(parent: Node, name: Buffer, mode: number, flags: number, exclusive: boolean): Promise<{ fd: number; created: boolean }> {
    const type = mode & S_IFMT;
    if (type !== 0 && type !== S_IFREG) fail(Errno.EPERM);
    const path = procPath(parent.fd, name);
    const base = O_NOFOLLOW | (flags & (O_ACCMODE | O_APPEND | O_SYNC | O_DSYNC));
    try {
      const fd = await openAsync(path, base | O_CREAT | O_EXCL | (flags & O_TRUNC), 0o600);
      try {
        await fchmodAsync(fd, mode & GUEST_MODE_MASK);
      } catch (err) {
        await closeAsync(fd).catch(() => undefined);
        throw err;
      }
      return { fd, created: true };
    } catch (err) {
      if (exclusive || errnoOf(err) !== Errno.EEXIST) throw err;
    }
    // It exists: look at what it is before opening it for I/O (a host FIFO or device is never opened).
    const pathFd = await openAsync(path, O_PATH | O_NOFOLLOW);
    let fd: number;
    try {
      const st = await fstatAsync(pathFd, { bigint: true });
      if (st.isDirectory()) fail(Errno.EISDIR);
      if (st.isSymbolicLink()) fail(Errno.ELOOP);
      if (!st.isFile()) fail(Errno.EACCES);
      fd = await openAsync(procPath(pathFd), (base & ~O_NOFOLLOW) | (flags & O_TRUNC));
    } finally {
      await closeAsync(pathFd).catch(() => undefined);
    }
    return { fd, created: false };
  }

  private async mknod(parent: Node, body: Buffer): Promise<Buffer> {
    need(body, 16);
    this.dirOf(parent);
    const mode = body.readUInt32LE(0);
    const [name] = readName(body, 16);
    if ((mode & S_IFMT) !== S_IFREG) fail(Errno.EPERM);
    const { fd } = await this.createFile(parent, name, mode, O_WRONLY, true);
    try {
      return this.entryOf(await this.adoptOpened(fd, parent, name));
    } finally {
      await closeAsync(fd).catch(() => undefined);
    }
  }

  private async mkdir(parent: Node, body: Buffer): Promise<Buffer> {
    need(body, 8);
    this.dirOf(parent);
    const mode = body.readUInt32LE(0);
    const [name] = readName(body, 8);
    const path = procPath(parent.fd, name);
    await fsp.mkdir(path, 0o700);
    // O_DIRECTORY|O_NOFOLLOW: whatever now has that name, we only ever take a directory inside `parent`.
    let fd = await openAsync(path, O_PATH | O_NOFOLLOW | O_DIRECTORY);
    try {
      await fsp.chmod(procPath(fd), mode & GUEST_MODE_MASK);
      const st = await fstatAsync(fd, { bigint: true });
      const { node, extraFd } = this.adopt(fd, st, parent.id, name, true);
      fd = extraFd;
      return this.entryOf({ node, attr: this.attrFrom(st) });
    } finally {
      if (fd >= 0) await closeAsync(fd).catch(() => undefined);
    }
  }

  private async remove(parent: Node, body: Buffer, dir: boolean): Promise<undefined> {
    this.dirOf(parent);
    const [name] = readName(body, 0);
    const path = procPath(parent.fd, name);
    if (dir) await fsp.rmdir(path);
    else await fsp.unlink(path);
    return undefined;
  }

  private async rename(parent: Node, body: Buffer, v2: boolean): Promise<undefined> {
    const head = v2 ? 16 : 8;
    need(body, head);
    const newdir = body.readBigUInt64LE(0);
    const flags = v2 ? body.readUInt32LE(8) : 0;
    if ((flags & ~RENAME_NOREPLACE) !== 0) fail(Errno.EINVAL);
    const [oldName, off] = readName(body, head);
    const [newName] = readName(body, off);
    this.dirOf(parent);
    return this.withNode(newdir, async (target) => {
      this.dirOf(target);
      const from = procPath(parent.fd, oldName);
      const to = procPath(target.fd, newName);
      if (flags & RENAME_NOREPLACE) {
        // Node has no renameat2: check, then rename (a name appearing in between is replaced; no path leaves the mount either way).
        const exists = await fsp.lstat(to).then(
          () => true,
          (err: unknown) => {
            if (errnoOf(err) === Errno.ENOENT) return false;
            throw err;
          },
        );
        if (exists) fail(Errno.EEXIST);
      }
      await fsp.rename(from, to);
      const st = await fsp.lstat(to, { bigint: true }).catch(() => undefined);
      const moved = st === undefined ? undefined : this.byKey.get(`${st.dev}:${st.ino}`);
      if (moved !== undefined && moved.id !== FUSE_ROOT_ID) {
        moved.parent = target.id;
        moved.name = newName;
      }
      return undefined;
    });
  }

  private async link(parent: Node, body: Buffer): Promise<Buffer> {
    need(body, 8);
    const oldId = body.readBigUInt64LE(0);
    const [newName] = readName(body, 8);
    this.dirOf(parent);
    return this.withNode(oldId, async (old) => {
      if (old.kind === "dir") fail(Errno.EPERM);
      // link(2) cannot take a descriptor here (no linkat(AT_EMPTY_PATH) in Node): link the
      // node's last known name in its verified parent directory, after checking it is still
      // that inode. Whatever the name holds by then, it is an entry of a directory inside the mount.
      return this.withNode(old.parent, async (oldParent) => {
        this.dirOf(oldParent);
        const from = procPath(oldParent.fd, old.name);
        const st = await fsp.lstat(from, { bigint: true }).catch(() => undefined);
        if (st === undefined || st.ino !== old.ino || st.dev !== old.dev) fail(Errno.EXDEV);
        await fsp.link(from, procPath(parent.fd, newName));
        return this.entryOf(await this.resolveChild(parent, newName, false, true));
      });
    }).catch((err: unknown) => {
      // An unknown old node (forgotten parent) reads as "cannot link here"; callers such as cp/git fall back to copying.
      if (errnoOf(err) === Errno.ESTALE) fail(Errno.EXDEV);
      throw err;
    });
  }

  /** Takes a handle slot before the descriptor is opened (so requests in flight cannot overshoot maxHandles); give it back with unreserveHandle. */
  private reserveHandle(): void {
    if (this.handles.size + this.pendingHandles >= this.maxHandles) fail(Errno.EMFILE);
    this.pendingHandles++;
  }

  private unreserveHandle(): void {
    this.pendingHandles--;
  }

  private addHandle(node: Node, fd: number, dir: boolean): bigint {
    const fh = this.nextFh++;
    node.pins++; // the handle keeps the node's fd open (READDIRPLUS, SETATTR through fh)
    this.handles.set(fh, { fh, node, fd, dir, pins: 0, dead: false });
    return fh;
  }

  private openOut(fh: bigint, flags: number): Buffer {
    const out = Buffer.alloc(16);
    out.writeBigUInt64LE(fh, 0);
    out.writeUInt32LE(flags, 8);
    return out;
  }

  private hostOpenFlags(flags: number): number {
    const acc = flags & O_ACCMODE;
    if (acc !== O_RDONLY && acc !== O_WRONLY && acc !== O_RDWR) fail(Errno.EINVAL);
    if (this.spec.readOnly && (acc !== O_RDONLY || flags & O_TRUNC)) fail(Errno.EROFS);
    return acc | (flags & (O_APPEND | O_SYNC | O_DSYNC | O_TRUNC));
  }

  private async open(n: Node, body: Buffer): Promise<Buffer> {
    need(body, 8);
    const flags = this.hostOpenFlags(body.readUInt32LE(0));
    if (n.kind === "dir") fail(Errno.EISDIR);
    if (n.kind === "symlink") fail(Errno.ELOOP);
    if (n.kind !== "file") fail(Errno.EACCES); // FIFOs, sockets and devices of the host are not opened
    this.reserveHandle();
    try {
      // Reopening through the node's own descriptor: no path is resolved again.
      const fd = await openAsync(procPath(n.fd), flags);
      if (this.closed) {
        await closeAsync(fd).catch(() => undefined);
        fail(Errno.ENOTCONN);
      }
      // No FOPEN_KEEP_CACHE: the guest drops its cached pages on every open, so host edits are read.
      return this.openOut(this.addHandle(n, fd, false), 0);
    } finally {
      this.unreserveHandle();
    }
  }

  private async create(parent: Node, body: Buffer): Promise<Buffer> {
    need(body, 16);
    this.dirOf(parent);
    const flags = body.readUInt32LE(0);
    const mode = body.readUInt32LE(4);
    const [name] = readName(body, 16);
    this.hostOpenFlags(flags);
    this.reserveHandle();
    let fd: number;
    try {
      fd = (await this.createFile(parent, name, mode, flags, (flags & O_EXCL) !== 0)).fd;
    } catch (err) {
      this.unreserveHandle();
      throw err;
    }
    let created: Resolved;
    try {
      created = await this.adoptOpened(fd, parent, name);
      if (this.closed) fail(Errno.ENOTCONN);
    } catch (err) {
      await closeAsync(fd).catch(() => undefined);
      throw err;
    } finally {
      this.unreserveHandle();
    }
    const fh = this.addHandle(created.node, fd, false);
    const out = Buffer.alloc(ENTRY_OUT_SIZE + 16);
    this.entryOf(created).copy(out, 0);
    this.openOut(fh, 0).copy(out, ENTRY_OUT_SIZE);
    return out;
  }

  private handleOf(fh: bigint): Handle {
    const h = this.handles.get(fh);
    if (h === undefined || h.dead) fail(Errno.EBADF);
    return h;
  }

  private async withHandle<T>(fh: bigint, dir: boolean, fn: (h: Handle) => Promise<T>): Promise<T> {
    const h = this.handleOf(fh);
    if (h.dir !== dir) fail(Errno.EBADF);
    h.pins++;
    try {
      return await fn(h);
    } finally {
      this.unpinHandle(h);
    }
  }

  private unpinHandle(h: Handle): void {
    h.pins--;
    if (h.pins === 0 && h.dead) this.closeHandle(h);
  }

  private closeHandle(h: Handle): void {
    if (h.entries !== undefined) {
      this.listedEntries -= h.entries.length;
      h.entries = undefined;
    }
    if (h.fd >= 0) void closeAsync(h.fd).catch(() => undefined);
    this.unpin(h.node);
  }

  private release(body: Buffer): undefined {
    need(body, 8);
    const h = this.handles.get(body.readBigUInt64LE(0));
    if (h === undefined) return undefined;
    this.handles.delete(h.fh);
    h.dead = true;
    if (h.pins === 0) this.closeHandle(h);
    return undefined;
  }

  private async read(body: Buffer): Promise<Buffer> {
    need(body, 24);
    const fh = body.readBigUInt64LE(0);
    const offset = body.readBigUInt64LE(8);
    const size = body.readUInt32LE(16);
    if (size > MAX_READ_BYTES) fail(Errno.EINVAL);
    const position = toPosition(offset);
    return this.withHandle(fh, false, async (h) => {
      const buf = Buffer.allocUnsafe(size);
      let got = 0;
      // A short read means end of file to the guest's page cache: read until full or EOF.
      while (got < size) {
        const pos = typeof position === "bigint" ? position + BigInt(got) : position + got;
        const { bytesRead } = await readAsync(h.fd, buf, got, size - got, pos as number);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      return buf.subarray(0, got);
    });
  }

  private async write(body: Buffer): Promise<Buffer> {
    need(body, 40);
    const fh = body.readBigUInt64LE(0);
    const offset = body.readBigUInt64LE(8);
    const size = body.readUInt32LE(16);
    if (size > MAX_WRITE_BYTES || body.length < 40 + size) fail(Errno.EINVAL);
    if (offset + BigInt(size) > BigInt(Number.MAX_SAFE_INTEGER)) fail(Errno.EFBIG);
    const data = body.subarray(40, 40 + size);
    return this.withHandle(fh, false, async (h) => {
      let done = 0;
      while (done < size) {
        const n = await writeAsync(h.fd, data, done, size - done, Number(offset) + done);
        if (n <= 0) fail(Errno.EIO);
        done += n;
      }
      const out = Buffer.alloc(8);
      out.writeUInt32LE(done, 0);
      return out;
    });
  }

  private async fsync(body: Buffer): Promise<undefined> {
    need(body, 12);
    const fh = body.readBigUInt64LE(0);
    const flags = body.readUInt32LE(8);
    return this.withHandle(fh, false, async (h) => {
      if (flags & FSYNC_FDATASYNC) await fdatasyncAsync(h.fd);
      else await fsyncAsync(h.fd);
      return undefined;
    });
  }

  private async fsyncdir(n: Node): Promise<undefined> {
    this.dirOf(n);
    const fd = await openAsync(procPath(n.fd), O_RDONLY | O_DIRECTORY);
    try {
      await fsyncAsync(fd);
    } finally {
      await closeAsync(fd).catch(() => undefined);
    }
    return undefined;
  }

  private async statfs(n: Node): Promise<Buffer> {
    const s = await fsp.statfs(procPath(n.fd), { bigint: true });
    const out = Buffer.alloc(80);
    out.writeBigUInt64LE(s.blocks, 0);
    out.writeBigUInt64LE(s.bfree, 8);
    out.writeBigUInt64LE(s.bavail, 16);
    out.writeBigUInt64LE(s.files, 24);
    out.writeBigUInt64LE(s.ffree, 32);
    const bsize = Number(s.bsize) >>> 0;
    out.writeUInt32LE(bsize, 40);
    out.writeUInt32LE(NAME_MAX, 44);
    out.writeUInt32LE(bsize, 48);
    return out;
  }

  private async opendir(n: Node): Promise<Buffer> {
    this.dirOf(n);
    if (this.handles.size + this.pendingHandles >= this.maxHandles) fail(Errno.EMFILE);
    return this.openOut(this.addHandle(n, -1, true), 0);
  }

  /** Lists a directory through its node's descriptor: ".", "..", then the entries (bounded). */
  private async listDir(n: Node): Promise<DirEntry[]> {
    const entries: DirEntry[] = [
      { name: Buffer.from("."), type: S_IFDIR >>> 12 },
      { name: Buffer.from(".."), type: S_IFDIR >>> 12 },
    ];
    const dir = await fsp.opendir(procPath(n.fd) as unknown as string, { encoding: "buffer" as BufferEncoding, bufferSize: 256 });
    try {
      for (;;) {
        const d = await dir.read();
        if (d === null) break;
        if (entries.length >= this.maxDirEntries + 2) fail(Errno.EOVERFLOW);
        const name = d.name as unknown as Buffer;
        const type = d.isDirectory()
          ? S_IFDIR
          : d.isFile()
            ? S_IFREG
            : d.isSymbolicLink()
              ? S_IFLNK
              : d.isFIFO()
                ? 0o010000
                : d.isSocket()
                  ? 0o140000
                  : d.isCharacterDevice()
                    ? 0o020000
                    : d.isBlockDevice()
                      ? 0o060000
                      : 0;
        entries.push({ name, type: direntType(type) });
      }
    } finally {
      await dir.close().catch(() => undefined);
    }
    return entries;
  }

  private async readdir(body: Buffer, plus: boolean): Promise<Buffer> {
    need(body, 24);
    const fh = body.readBigUInt64LE(0);
    const offset = body.readBigUInt64LE(8);
    const size = Math.min(body.readUInt32LE(16), MAX_READ_BYTES);
    return this.withHandle(fh, true, async (h) => {
      // A listing is taken at offset 0 and served from memory until the next rewind.
      if (offset === 0n || h.entries === undefined) {
        // Listings are held in memory per handle: all of them together stay under a budget.
        if (this.listedEntries >= this.maxDirEntries * LISTING_BUDGET_FACTOR) fail(Errno.ENOMEM);
        const listing = await this.listDir(h.node);
        if (h.dead) return Buffer.alloc(0);
        this.listedEntries += listing.length - (h.entries?.length ?? 0);
        h.entries = listing;
      }
      const entries = h.entries;
      // Which entries fit, first (sizes do not depend on lookups), so no lookup is counted for an entry not sent.
      const start = offset > BigInt(entries.length) ? entries.length : Number(offset);
      let end = start;
      let total = 0;
      while (end < entries.length) {
        const need = (plus ? ENTRY_OUT_SIZE : 0) + direntSize(entries[end]!.name.length);
        if (total + need > size) break;
        total += need;
        end++;
      }
      const found: Array<Resolved | undefined> = new Array(end - start).fill(undefined);
      // Above the high-water mark READDIRPLUS lists without looking up (nodeid 0), so a
      // listing does not flood the table; the guest looks up what it uses.
      if (plus && this.nodes.get(h.node.id) === h.node && this.nodes.size < this.highWater) {
        // Look entries up a few at a time ("." and ".." never: the kernel does not link them).
        let next = start;
        const lane = async (): Promise<void> => {
          while (next < end) {
            const i = next++;
            if (i < 2) continue;
            found[i - start] = await this.resolveChild(h.node, entries[i]!.name, true, false).catch(() => undefined);
          }
        };
        await Promise.all(Array.from({ length: Math.min(READDIRPLUS_LANES, end - start) }, lane));
      }
      const out = Buffer.alloc(total);
      let used = 0;
      for (let i = start; i < end; i++) {
        const e = entries[i]!;
        // d_ino: readdir does not give the host inode; report the position (never 0, which some libcs skip).
        let ino = BigInt(i + 1);
        let type = e.type;
        if (plus) {
          const r = found[i - start];
          if (r !== undefined) {
            writeEntryOut(out, used, r.node.id, r.attr, this.cacheTimeoutMs, this.cacheTimeoutMs);
            ino = r.attr.ino;
            type = direntType(r.attr.mode); // under "follow" a host symlink shows as what it points to
          } else {
            out.fill(0, used, used + ENTRY_OUT_SIZE); // nodeid 0: listed, not looked up
          }
          used += ENTRY_OUT_SIZE;
        }
        used += writeDirent(out, used, ino, BigInt(i + 1), type, e.name);
      }
      return out.subarray(0, used);
    });
  }
}
