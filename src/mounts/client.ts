/**
 * A tiny FUSE "kernel" for tests and benchmarks: builds requests exactly as
 * the guest kernel writes them (wire.ts) and decodes the server's replies.
 * Not part of the public API; the agent-side tests can drive a server with
 * it (or replay its bytes) too.
 */

import type { FuseServer } from "./server.js";
import {
  ENTRY_OUT_SIZE,
  FUSE_ROOT_ID,
  Op,
  cstr,
  encodeRequest,
  parseDirents,
  parseReply,
  readAttr,
  struct,
  type DecodedDirent,
  type FuseAttr,
  type FuseReply,
} from "./wire.js";

export const ROOT = FUSE_ROOT_ID;
export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;

export interface Entry {
  readonly nodeid: bigint;
  readonly attr: FuseAttr;
}

/** Thrown by the typed helpers when the server answers with an error. */
export class FuseCallError extends Error {
  constructor(
    readonly op: string,
    readonly errno: number,
  ) {
    super(`${op} failed with errno ${errno}`);
  }
}

export class FuseClient {
  private unique = 1n;
  constructor(readonly server: FuseServer) {}

  /** Sends one raw request; returns the parsed reply (asserting it matches the request). */
  async call(opcode: number, nodeid: bigint, ...parts: Buffer[]): Promise<FuseReply> {
    const unique = this.unique++;
    const raw = await this.server.handle(encodeRequest({ opcode, unique, nodeid }, ...parts));
    if (raw === null) throw new Error(`opcode ${opcode} got no reply`);
    const reply = parseReply(raw);
    if (reply.unique !== unique) throw new Error(`reply to ${unique} came back as ${reply.unique}`);
    return reply;
  }

  /** As call, but throws FuseCallError on an error reply and returns the body. */
  async ok(name: string, opcode: number, nodeid: bigint, ...parts: Buffer[]): Promise<Buffer> {
    const r = await this.call(opcode, nodeid, ...parts);
    if (r.error !== 0) throw new FuseCallError(name, -r.error);
    return r.body;
  }

  /** errno of a call (0 on success). */
  async errno(opcode: number, nodeid: bigint, ...parts: Buffer[]): Promise<number> {
    return 0 - (await this.call(opcode, nodeid, ...parts)).error;
  }

  async init(minor = 37, flags = 0xffff_ffff): Promise<Buffer> {
    return this.ok("INIT", Op.INIT, 0n, struct([4, 7], [4, minor], [4, 128 * 1024], [4, flags], [4, 0]), Buffer.alloc(44));
  }

  static entry(body: Buffer): Entry {
    if (body.length < ENTRY_OUT_SIZE) throw new Error(`entry reply of ${body.length} bytes`);
    return { nodeid: body.readBigUInt64LE(0), attr: readAttr(body, 40) };
  }

  async lookup(parent: bigint, name: string | Buffer): Promise<Entry> {
    return FuseClient.entry(await this.ok("LOOKUP", Op.LOOKUP, parent, cstr(name)));
  }

  async getattr(node: bigint): Promise<FuseAttr> {
    return readAttr(await this.ok("GETATTR", Op.GETATTR, node, struct([4, 0], [4, 0], [8, 0])), 16);
  }

  async forget(node: bigint, nlookup = 1n): Promise<void> {
    const raw = await this.server.handle(encodeRequest({ opcode: Op.FORGET, unique: this.unique++, nodeid: node }, struct([8, nlookup])));
    if (raw !== null) throw new Error("FORGET got a reply");
  }

  async open(node: bigint, flags = O_RDONLY): Promise<bigint> {
    return (await this.ok("OPEN", Op.OPEN, node, struct([4, flags], [4, 0]))).readBigUInt64LE(0);
  }

  async create(parent: bigint, name: string | Buffer, mode = 0o100644, flags = O_RDWR | O_CREAT): Promise<Entry & { fh: bigint }> {
    const body = await this.ok("CREATE", Op.CREATE, parent, struct([4, flags], [4, mode], [4, 0o022], [4, 0]), cstr(name));
    return { ...FuseClient.entry(body), fh: body.readBigUInt64LE(ENTRY_OUT_SIZE) };
  }

  readBody(fh: bigint, offset: number, size: number): Buffer {
    return struct([8, fh], [8, offset], [4, size], [4, 0], [8, 0], [4, 0], [4, 0]);
  }

  async read(node: bigint, fh: bigint, offset: number, size: number): Promise<Buffer> {
    return this.ok("READ", Op.READ, node, this.readBody(fh, offset, size));
  }

  async write(node: bigint, fh: bigint, offset: number, data: Buffer): Promise<number> {
    const body = await this.ok("WRITE", Op.WRITE, node, struct([8, fh], [8, offset], [4, data.length], [4, 0], [8, 0], [4, 0], [4, 0]), data);
    return body.readUInt32LE(0);
  }

  async release(node: bigint, fh: bigint, dir = false): Promise<void> {
    await this.ok("RELEASE", dir ? Op.RELEASEDIR : Op.RELEASE, node, struct([8, fh], [4, 0], [4, 0], [8, 0]));
  }

  /** Reads a whole file through OPEN/READ/RELEASE. */
  async readFile(node: bigint): Promise<Buffer> {
    const fh = await this.open(node);
    try {
      const chunks: Buffer[] = [];
      for (let off = 0; ; ) {
        const b = await this.read(node, fh, off, 64 * 1024);
        if (b.length === 0) break;
        chunks.push(b);
        off += b.length;
      }
      return Buffer.concat(chunks);
    } finally {
      await this.release(node, fh);
    }
  }

  async mkdir(parent: bigint, name: string | Buffer, mode = 0o755): Promise<Entry> {
    return FuseClient.entry(await this.ok("MKDIR", Op.MKDIR, parent, struct([4, mode], [4, 0o022]), cstr(name)));
  }

  async mknod(parent: bigint, name: string | Buffer, mode: number): Promise<Entry> {
    return FuseClient.entry(await this.ok("MKNOD", Op.MKNOD, parent, struct([4, mode], [4, 0], [4, 0o022], [4, 0]), cstr(name)));
  }

  async symlink(parent: bigint, name: string | Buffer, target: string | Buffer): Promise<Entry> {
    return FuseClient.entry(await this.ok("SYMLINK", Op.SYMLINK, parent, cstr(name), cstr(target)));
  }

  async readlink(node: bigint): Promise<Buffer> {
    return this.ok("READLINK", Op.READLINK, node);
  }

  async unlink(parent: bigint, name: string | Buffer): Promise<void> {
    await this.ok("UNLINK", Op.UNLINK, parent, cstr(name));
  }

  async rmdir(parent: bigint, name: string | Buffer): Promise<void> {
    await this.ok("RMDIR", Op.RMDIR, parent, cstr(name));
  }

  async rename(parent: bigint, name: string, newParent: bigint, newName: string, flags?: number): Promise<void> {
    if (flags === undefined) await this.ok("RENAME", Op.RENAME, parent, struct([8, newParent]), cstr(name), cstr(newName));
    else await this.ok("RENAME2", Op.RENAME2, parent, struct([8, newParent], [4, flags], [4, 0]), cstr(name), cstr(newName));
  }

  async link(oldNode: bigint, newParent: bigint, newName: string): Promise<Entry> {
    return FuseClient.entry(await this.ok("LINK", Op.LINK, newParent, struct([8, oldNode]), cstr(newName)));
  }

  setattrBody(fields: { valid: number; fh?: bigint; size?: number; atime?: number; mtime?: number; mode?: number; uid?: number; gid?: number }): Buffer {
    return struct(
      [4, fields.valid],
      [4, 0],
      [8, fields.fh ?? 0n],
      [8, fields.size ?? 0],
      [8, 0],
      [8, fields.atime ?? 0],
      [8, fields.mtime ?? 0],
      [8, 0],
      [4, 0],
      [4, 0],
      [4, 0],
      [4, fields.mode ?? 0],
      [4, 0],
      [4, fields.uid ?? 0],
      [4, fields.gid ?? 0],
      [4, 0],
    );
  }

  async setattr(node: bigint, fields: Parameters<FuseClient["setattrBody"]>[0]): Promise<FuseAttr> {
    return readAttr(await this.ok("SETATTR", Op.SETATTR, node, this.setattrBody(fields)), 16);
  }

  /** OPENDIR + READDIR(PLUS) until empty + RELEASEDIR. */
  async readdir(node: bigint, plus = false, size = 4096): Promise<DecodedDirent[]> {
    const fh = (await this.ok("OPENDIR", Op.OPENDIR, node, struct([4, 0], [4, 0]))).readBigUInt64LE(0);
    try {
      const all: DecodedDirent[] = [];
      let off = 0n;
      for (;;) {
        const body = await this.ok(plus ? "READDIRPLUS" : "READDIR", plus ? Op.READDIRPLUS : Op.READDIR, node, struct([8, fh], [8, off], [4, size], [4, 0], [8, 0], [4, 0], [4, 0]));
        const ents = parseDirents(body, plus);
        if (ents.length === 0) break;
        all.push(...ents);
        off = ents[ents.length - 1]!.off;
      }
      return all;
    } finally {
      await this.release(node, fh, true);
    }
  }
}

/** Number of file descriptors this process has open (to check that a server leaves none behind). */
export async function openFdCount(): Promise<number> {
  const { readdir } = await import("node:fs/promises");
  return (await readdir("/proc/self/fd")).length;
}
