/**
 * A tree from a host directory (the default busybox image, `--rootfs DIR`).
 *
 * The walk uses lstat and never follows symlinks below the root. Regular files
 * reference the original file (offset 0): nothing is copied until the image
 * is written. Symlink targets are read as bytes. Hard links are detected by
 * (dev, ino), so they stay hard links in the image.
 *
 * Not read: extended attributes. Node has no getxattr/listxattr without a
 * native addon, so files get no xattrs (file capabilities, SELinux labels and
 * ACLs of the directory are lost). Build from a layer tarball with PAX xattrs
 * when they matter.
 */

import { lstat, readdir, readlink, stat } from "node:fs/promises";
import type { BigIntStats } from "node:fs";
import { AbortError, ImageError } from "../errors.js";
import { FsTree, makeDevice, makeDir, makeFile, makeSpecial, makeSymlink, nameFromBytes, type DirNode, type Node, type NodeMeta } from "./tree.js";

/** Options of {@link treeFromDirectory}. */
export interface TreeFromDirectoryOptions {
  /**
   * Record every file as owned by root:root (uid 0, gid 0), for trees
   * prepared by an unprivileged user.
   * @default false
   */
  readonly ownerRoot?: boolean;
  readonly signal?: AbortSignal;
}

const SLASH = Buffer.from("/");
const BATCH = 64;

/** A host path for fs calls: a string when it is valid UTF-8, else the bytes. */
function hostPath(bytes: Buffer): string | Buffer {
  const s = bytes.toString("utf8");
  return Buffer.from(s, "utf8").equals(bytes) ? s : bytes;
}

function show(p: Buffer): string {
  return JSON.stringify(p.toString("utf8"));
}

function metaOf(st: BigIntStats, ownerRoot: boolean): Partial<NodeMeta> {
  const ns = st.mtimeNs < 0n ? 0n : st.mtimeNs;
  return {
    mode: Number(st.mode & 0o7777n),
    uid: ownerRoot ? 0 : Number(st.uid),
    gid: ownerRoot ? 0 : Number(st.gid),
    mtimeSec: Number(ns / 1_000_000_000n),
    mtimeNsec: Number(ns % 1_000_000_000n),
  };
}

/** Linux userspace dev_t → (major, minor), as glibc's gnu_dev_major/minor. */
function splitDev(rdev: bigint): { major: number; minor: number } {
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  return { major, minor };
}

/**
 * Builds a tree from the directory `root` (itself may be a symlink to a
 * directory; nothing below it is followed).
 *
 * @throws {ImageError} if `root` is not a directory or something cannot be read
 * @throws {AbortError} when `options.signal` fires
 */
export async function treeFromDirectory(root: string, options: TreeFromDirectoryOptions = {}): Promise<FsTree> {
  const ownerRoot = options.ownerRoot ?? false;
  let rootStat: BigIntStats;
  try {
    rootStat = await stat(root, { bigint: true });
  } catch (err) {
    throw new ImageError(`Cannot read the root filesystem directory ${JSON.stringify(root)}: ${(err as Error).message}`, { cause: err });
  }
  if (!rootStat.isDirectory()) throw new ImageError(`Root filesystem source ${JSON.stringify(root)} is not a directory`);
  const tree = new FsTree(makeDir(metaOf(rootStat, ownerRoot)));
  const links = new Map<string, Node>();
  const stack: Array<{ path: Buffer; dir: DirNode }> = [{ path: Buffer.from(root), dir: tree.root }];

  while (stack.length > 0) {
    if (options.signal?.aborted) throw new AbortError("Reading the root filesystem directory was aborted", { cause: options.signal.reason });
    const { path, dir } = stack.pop()!;
    let names: Buffer[];
    try {
      names = await readdir(hostPath(path), { encoding: "buffer" });
    } catch (err) {
      throw new ImageError(`Cannot list ${show(path)}: ${(err as Error).message}`, { cause: err });
    }
    for (let i = 0; i < names.length; i += BATCH) {
      const batch = names.slice(i, i + BATCH);
      const nodes = await Promise.all(
        batch.map(async (name) => {
          const childPath = Buffer.concat([path, SLASH, name]);
          try {
            return { name, childPath, ...(await nodeFor(childPath, ownerRoot)) };
          } catch (err) {
            if (err instanceof ImageError) throw err;
            throw new ImageError(`Cannot read ${show(childPath)}: ${(err as Error).message}`, { cause: err });
          }
        }),
      );
      for (const { name, childPath, key, node: fresh } of nodes) {
        // Hard links: the first entry seen for a (dev, ino) wins; done here,
        // after the batch, so parallel lstats cannot race.
        let node = fresh;
        if (key !== undefined) {
          const seen = links.get(key);
          if (seen !== undefined) node = seen;
          else links.set(key, node);
        }
        dir.children.set(nameFromBytes(name), node);
        if (node.kind === "dir") stack.push({ path: childPath, dir: node });
      }
    }
  }
  return tree;
}

/** lstat → node; `key` is set for non-directories with several links. */
async function nodeFor(p: Buffer, ownerRoot: boolean): Promise<{ node: Node; key: string | undefined }> {
  const hp = hostPath(p);
  const st = await lstat(hp, { bigint: true });
  const key = !st.isDirectory() && st.nlink > 1n ? `${st.dev}:${st.ino}` : undefined;
  const m = metaOf(st, ownerRoot);
  let node: Node;
  if (st.isDirectory()) node = makeDir(m);
  else if (st.isFile()) {
    const size = Number(st.size);
    node = makeFile(size, size === 0 ? null : { path: hp, offset: 0, size }, m);
  } else if (st.isSymbolicLink()) node = makeSymlink(nameFromBytes(await readlink(hp, { encoding: "buffer" })), m);
  else if (st.isCharacterDevice() || st.isBlockDevice()) {
    const { major, minor } = splitDev(st.rdev);
    node = makeDevice(st.isCharacterDevice() ? "chardev" : "blockdev", major, minor, m);
  } else if (st.isFIFO()) node = makeSpecial("fifo", m);
  else if (st.isSocket()) node = makeSpecial("socket", m);
  else throw new ImageError(`${show(p)} has an unknown file type`);
  return { node, key };
}
