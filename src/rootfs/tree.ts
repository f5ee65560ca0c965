/**
 * An in-memory filesystem tree: the common model between the sources (image
 * layers, a host directory) and the image writer (erofs).
 *
 * Names and symlink targets are byte strings. They are held as JS strings in
 * 'latin1' encoding (one char = one byte, 0..255), so names that are not
 * UTF-8 round-trip exactly, and comparing two such strings with `<` is the
 * same as comparing the bytes. Use {@link nameFromBytes} / {@link nameToBytes}.
 *
 * A hard link is several directory entries holding the *same* node object;
 * link counts are derived by walking the tree ({@link countLinks}). File
 * contents are not held in memory: a {@link ContentRef} points at a byte range
 * of a host file (a spool file filled from a layer, or an original file).
 */

import { ImageError } from "../errors.js";

/** A byte range of a host file holding a regular file's contents. */
export interface ContentRef {
  /** Host path of the file holding the bytes (a Buffer for non-UTF-8 host paths). */
  readonly path: string | Buffer;
  /** Byte offset of the first content byte in that file. */
  readonly offset: number;
  /** Number of content bytes; equals the file node's `size`. */
  readonly size: number;
}

/** Metadata every node carries. */
export interface NodeMeta {
  /** Permission bits including setuid/setgid/sticky (`mode & 0o7777`); no file type bits. */
  mode: number;
  uid: number;
  gid: number;
  /** Modification time, whole seconds since the epoch (never negative here). */
  mtimeSec: number;
  /** Nanoseconds part of the modification time, 0..999_999_999. */
  mtimeNsec: number;
  /** Extended attributes: full name ("user.foo", "security.capability") → value. */
  xattrs: Map<string, Buffer>;
}

export interface DirNode extends NodeMeta {
  readonly kind: "dir";
  /** Entries by latin1 name; never contains "." or "..". */
  readonly children: Map<string, Node>;
}

export interface FileNode extends NodeMeta {
  readonly kind: "file";
  size: number;
  /** Where the bytes are; null only when size is 0. */
  content: ContentRef | null;
}

export interface SymlinkNode extends NodeMeta {
  readonly kind: "symlink";
  /** Link target as a latin1 byte string, not interpreted. */
  target: string;
}

export interface DeviceNode extends NodeMeta {
  readonly kind: "chardev" | "blockdev";
  major: number;
  minor: number;
}

export interface SpecialNode extends NodeMeta {
  readonly kind: "fifo" | "socket";
}

export type Node = DirNode | FileNode | SymlinkNode | DeviceNode | SpecialNode;
export type NodeKind = Node["kind"];

/** Largest name component erofs (and Linux) accepts, in bytes. */
export const NAME_MAX = 255;

/** Metadata defaults: root-owned, epoch mtime, no xattrs. */
function meta(partial: Partial<NodeMeta> | undefined, defaultMode: number): NodeMeta {
  return {
    mode: (partial?.mode ?? defaultMode) & 0o7777,
    uid: partial?.uid ?? 0,
    gid: partial?.gid ?? 0,
    mtimeSec: partial?.mtimeSec ?? 0,
    mtimeNsec: partial?.mtimeNsec ?? 0,
    xattrs: partial?.xattrs ?? new Map(),
  };
}

/** Creates a directory node (default mode 0755, root:root). */
export function makeDir(m?: Partial<NodeMeta>): DirNode {
  return { kind: "dir", children: new Map(), ...meta(m, 0o755) };
}

/** Creates a regular file node (default mode 0644). */
export function makeFile(size: number, content: ContentRef | null, m?: Partial<NodeMeta>): FileNode {
  return { kind: "file", size, content, ...meta(m, 0o644) };
}

/** Creates a symlink node; `target` is a latin1 byte string (default mode 0777). */
export function makeSymlink(target: string, m?: Partial<NodeMeta>): SymlinkNode {
  return { kind: "symlink", target, ...meta(m, 0o777) };
}

/** Creates a character or block device node (default mode 0600). */
export function makeDevice(kind: "chardev" | "blockdev", major: number, minor: number, m?: Partial<NodeMeta>): DeviceNode {
  return { kind, major, minor, ...meta(m, 0o600) };
}

/** Creates a fifo or socket node (default mode 0644). */
export function makeSpecial(kind: "fifo" | "socket", m?: Partial<NodeMeta>): SpecialNode {
  return { kind, ...meta(m, 0o644) };
}

/** A name as raw bytes → the latin1 string form used in the tree. */
export function nameFromBytes(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("latin1");
}

/** The latin1 string form used in the tree → raw bytes. */
export function nameToBytes(name: string): Buffer {
  return Buffer.from(name, "latin1");
}

/** Shows a latin1 byte string for messages: UTF-8 if valid, else with \xNN escapes. */
export function showName(name: string): string {
  const bytes = nameToBytes(name);
  const text = bytes.toString("utf8");
  if (Buffer.from(text, "utf8").equals(bytes) && !/[\u0000-\u001f\u007f]/.test(text)) return JSON.stringify(text);
  let out = "";
  for (const b of bytes) out += b >= 0x20 && b < 0x7f && b !== 0x22 && b !== 0x5c ? String.fromCharCode(b) : `\\x${b.toString(16).padStart(2, "0")}`;
  return `"${out}"`;
}

/** The whole tree: a root directory. */
export class FsTree {
  readonly root: DirNode;

  constructor(root?: DirNode) {
    this.root = root ?? makeDir();
  }

  /**
   * Looks a path up without following any symlink. `components` are latin1
   * names (no "", ".", ".."). Returns undefined when a component is missing
   * or a non-final component is not a directory.
   */
  lookup(components: readonly string[]): Node | undefined {
    let node: Node = this.root;
    for (const name of components) {
      if (node.kind !== "dir") return undefined;
      const next: Node | undefined = node.children.get(name);
      if (next === undefined) return undefined;
      node = next;
    }
    return node;
  }

  /**
   * Visits every directory entry depth-first, parents before children,
   * children in byte order. Throws {@link ImageError} if a directory is
   * reachable twice (a hard-linked directory, or a cycle).
   */
  *entries(): Generator<{ path: readonly string[]; node: Node; parent: DirNode }> {
    const seenDirs = new Set<DirNode>([this.root]);
    const stack: Array<{ dir: DirNode; path: string[] }> = [{ dir: this.root, path: [] }];
    while (stack.length > 0) {
      const { dir, path } = stack.pop()!;
      const names = [...dir.children.keys()].sort(compareNames);
      const subdirs: Array<{ dir: DirNode; path: string[] }> = [];
      for (const name of names) {
        const node = dir.children.get(name)!;
        const childPath = [...path, name];
        yield { path: childPath, node, parent: dir };
        if (node.kind === "dir") {
          if (seenDirs.has(node)) throw new ImageError(`Directory /${childPath.map((c) => nameToBytes(c).toString("utf8")).join("/")} is linked twice in the tree`);
          seenDirs.add(node);
          subdirs.push({ dir: node, path: childPath });
        }
      }
      for (let i = subdirs.length - 1; i >= 0; i--) stack.push(subdirs[i]!);
    }
  }
}

/** Bytewise order of two latin1 names (what erofs and strcmp use). */
export function compareNames(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Counts links per node: for a non-directory the number of directory entries
 * naming it; for a directory 2 + its subdirectories. Throws
 * {@link ImageError} if a directory is linked twice.
 */
export function countLinks(tree: FsTree): Map<Node, number> {
  const counts = new Map<Node, number>();
  counts.set(tree.root, 2);
  for (const { node, parent } of tree.entries()) {
    if (node.kind === "dir") {
      counts.set(node, 2);
      counts.set(parent, (counts.get(parent) ?? 2) + 1);
    } else {
      counts.set(node, (counts.get(node) ?? 0) + 1);
    }
  }
  return counts;
}

/** Totals over a tree, for logs and tests. */
export interface TreeStats {
  /** Distinct nodes including the root (what an image will hold as inodes). */
  inodes: number;
  /** Sum of distinct regular file sizes in bytes. */
  fileBytes: number;
}

/** Counts distinct nodes and file bytes. */
export function treeStats(tree: FsTree): TreeStats {
  const seen = new Set<Node>([tree.root]);
  let fileBytes = 0;
  for (const { node } of tree.entries()) {
    if (seen.has(node)) continue;
    seen.add(node);
    if (node.kind === "file") fileBytes += node.size;
  }
  return { inodes: seen.size, fileBytes };
}
