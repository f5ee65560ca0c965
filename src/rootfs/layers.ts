/**
 * Applying OCI image layers (tar changesets) onto an in-memory tree.
 *
 * Semantics follow the OCI image spec (layer.md): entries apply in order; a
 * later entry replaces an earlier one at the same path, except that a
 * directory over a directory only updates the metadata; `.wh.NAME` deletes
 * NAME from the lower layers; `.wh..wh..opq` hides every lower-layer child of
 * its directory; whiteouts never hide entries of their own layer, wherever
 * they appear in the tar. Hard links share the node of an entry already in
 * the tree. Missing parent directories are created (0755, root:root, mtime 0).
 *
 * Security rules (a layer is hostile; nothing here ever touches a host path
 * built from an entry name — contents go to the spool file only):
 * - Names are normalised lexically: "", "." components, repeated and
 *   trailing slashes vanish; a leading "/" is dropped (absolute names are
 *   relative to the image root, as `tar -x` and Docker treat them).
 * - A ".." component removes the previous one (lexically: symlinks are not
 *   consulted). A ".." that would climb above the root rejects the layer.
 * - Symlinks in the tree are never followed: an entry (or whiteout, or hard
 *   link target) whose parent path crosses a symlink, or a non-directory,
 *   rejects the layer. Replacing the symlink itself by an entry of its own
 *   name is allowed (that is an ordinary replacement).
 * - Hard links must name an existing non-directory of the tree.
 * - Names longer than 4096 bytes, components longer than 255 bytes, and
 *   whiteouts of "", "." or ".." reject the layer.
 * - Device nodes, fifos and setuid bits are kept as tree data only.
 * - xattrs that erofs cannot store (other namespaces than user., trusted.,
 *   security. and the two POSIX ACLs; names over 255 bytes; values over
 *   65535 bytes) are dropped.
 */

import type { Readable } from "node:stream";
import { LayerError, LayerLimitError } from "../errors.js";
import { xattrSupported } from "./erofs.js";
import { DEFAULT_LAYER_LIMITS, LayerBudget, limitError, resolveLayerLimits, type LayerLimits } from "./limits.js";
import { readTar, type TarEntry } from "./tar.js";
import type { Spool } from "./spool.js";
import { FsTree, makeDevice, makeDir, makeFile, makeSpecial, makeSymlink, NAME_MAX, showName, type DirNode, type Node, type NodeMeta } from "./tree.js";

/** Longest entry name accepted, in bytes (Linux PATH_MAX). */
export const PATH_MAX = 4096;

const WH_PREFIX = ".wh.";
const WH_OPAQUE = ".wh..wh..opq";

/** Progress of one layer: bytes of (decompressed) tar read so far. */
export interface LayerProgress {
  readonly layer: number;
  readonly bytes: number;
}

/** Options of {@link applyLayer}. */
export interface ApplyLayerOptions {
  /** Index of this layer in the image (0 = base), used in errors and progress. @default 0 */
  readonly layer?: number;
  /** Called as bytes are read (at most once per MiB, and once at the end). */
  readonly onProgress?: (progress: LayerProgress) => void;
  readonly signal?: AbortSignal;
  /**
   * What the image's earlier layers used of its caps; pass the same budget
   * for every layer of one image. Takes precedence over `limits`.
   * @default a fresh budget with `limits`
   */
  readonly budget?: LayerBudget;
  /** Caps (see limits.ts). @default the environment's, else the defaults */
  readonly limits?: LayerLimits;
}

/** What one layer did. */
export interface LayerStats {
  /** Tar entries applied (whiteouts included). */
  entries: number;
  /** Tar bytes read. */
  bytes: number;
  /** Bytes of file content appended to the spool. */
  contentBytes: number;
}

/**
 * Splits and normalises an entry name into components (latin1), following
 * the rules in this module's header. Returns [] for the root itself.
 *
 * @throws {LayerError} if the name climbs above the root, or is too long
 */
export function normalizePath(raw: string, maxDepth: number = DEFAULT_LAYER_LIMITS.maxPathDepth): string[] {
  if (raw.length > PATH_MAX) throw new LayerError(`name is ${raw.length} bytes long, over the ${PATH_MAX}-byte limit`);
  const out: string[] = [];
  for (const c of raw.split("/")) {
    if (c === "" || c === ".") continue;
    if (c !== ".." && out.length >= maxDepth) throw limitError("maxPathDepth", maxDepth, `name ${showName(raw.slice(0, 200))}${raw.length > 200 ? "…" : ""} is more than ${maxDepth} directories deep`);
    if (c === "..") {
      if (out.length === 0) throw new LayerError(`name ${showName(raw)} climbs above the root with ".."`);
      out.pop();
      continue;
    }
    if (c.length > NAME_MAX) throw new LayerError(`name ${showName(raw)} has a component longer than ${NAME_MAX} bytes`);
    out.push(c);
  }
  return out;
}

/** Per-layer bookkeeping of what this layer itself put in the tree. */
class LayerScope {
  /** Names (per directory) created or replaced by this layer. */
  private readonly own = new Map<DirNode, Set<string>>();
  /** Directories holding (at any depth) something this layer created. */
  private readonly holdsOwn = new Set<DirNode>();

  mark(chain: readonly DirNode[], parent: DirNode, name: string): void {
    let names = this.own.get(parent);
    if (names === undefined) this.own.set(parent, (names = new Set()));
    names.add(name);
    for (const d of chain) this.holdsOwn.add(d);
  }

  /** Removes what lower layers put at dir/name, keeping this layer's entries. */
  hideLower(dir: DirNode, name: string): void {
    const stack: Array<[DirNode, string]> = [[dir, name]];
    while (stack.length > 0) {
      const [d, n] = stack.pop()!;
      const node = d.children.get(n);
      if (node === undefined) continue;
      const own = this.own.get(d)?.has(n) === true;
      if (!own && !(node.kind === "dir" && this.holdsOwn.has(node))) {
        d.children.delete(n);
      } else if (node.kind === "dir") {
        for (const child of node.children.keys()) stack.push([node, child]);
      }
    }
  }
}

/** The xattr map of every node without xattrs (never mutated). */
const NO_XATTRS = new Map<string, Buffer>();
/** Fixed heap cost charged per stored xattr (Map entry, Buffer object). */
const XATTR_OVERHEAD = 256;

function metaOf(e: TarEntry, budget: LayerBudget): Partial<NodeMeta> {
  // A set shared by many entries (a global PAX header's) is filtered and
  // charged once, and its nodes share the result.
  let xattrs = e.xattrs.size === 0 ? NO_XATTRS : budget.charged.get(e.xattrs);
  if (xattrs === undefined) {
    xattrs = new Map();
    let bytes = 0;
    for (const [k, v] of e.xattrs) {
      if (!xattrSupported(k, v)) continue;
      xattrs.set(k, v);
      bytes += k.length + v.length + XATTR_OVERHEAD;
    }
    budget.addXattrBytes(bytes, showName(e.path));
    if (xattrs.size === 0) xattrs = NO_XATTRS;
    budget.charged.set(e.xattrs, xattrs);
  }
  return { mode: e.mode, uid: e.uid, gid: e.gid, mtimeSec: e.mtimeSec, mtimeNsec: e.mtimeNsec, xattrs };
}

/**
 * Walks to the directory that holds `components`' last name, never following
 * symlinks. Missing directories are created when `create` is set (and marked
 * as this layer's); otherwise undefined is returned for a missing one.
 */
function walkParent(tree: FsTree, components: readonly string[], scope: LayerScope, create: boolean): { parent: DirNode; chain: DirNode[] } | undefined {
  let dir = tree.root;
  const chain: DirNode[] = [dir];
  for (let i = 0; i < components.length - 1; i++) {
    const name = components[i]!;
    let next: Node | undefined = dir.children.get(name);
    if (next === undefined) {
      if (!create) return undefined;
      next = makeDir();
      dir.children.set(name, next);
      scope.mark(chain, dir, name);
    } else if (next.kind !== "dir") {
      const where = components.slice(0, i + 1).join("/");
      const what = next.kind === "symlink" ? "a symlink (symlinks are never followed while building the image)" : `a ${next.kind}, not a directory`;
      throw new LayerError(`parent ${showName(where)} is ${what}`);
    }
    dir = next;
    chain.push(dir);
  }
  return { parent: dir, chain };
}

/** Places a node, replacing what is there, except dir over dir (metadata merge). */
function place(parent: DirNode, name: string, node: Node): void {
  const old = parent.children.get(name);
  if (old !== undefined && old.kind === "dir" && node.kind === "dir") {
    Object.assign(old, { mode: node.mode, uid: node.uid, gid: node.gid, mtimeSec: node.mtimeSec, mtimeNsec: node.mtimeNsec, xattrs: node.xattrs });
    return;
  }
  parent.children.set(name, node);
}

async function applyEntry(tree: FsTree, e: TarEntry, spool: Spool, scope: LayerScope, stats: LayerStats, budget: LayerBudget): Promise<void> {
  const depth = budget.limits.maxPathDepth;
  const components = normalizePath(e.path, depth);
  const base = components[components.length - 1];

  if (base !== undefined && base.startsWith(WH_PREFIX)) {
    const found = walkParent(tree, components, scope, false);
    if (base === WH_OPAQUE) {
      if (found === undefined) return;
      for (const name of [...found.parent.children.keys()]) scope.hideLower(found.parent, name);
      return;
    }
    if (base.startsWith(WH_PREFIX + WH_PREFIX)) return; // other AUFS meta files: not content
    const target = base.slice(WH_PREFIX.length);
    if (target === "" || target === "." || target === "..") throw new LayerError(`whiteout ${showName(e.path)} names no file`);
    if (found !== undefined) scope.hideLower(found.parent, target);
    return;
  }

  if (base === undefined) {
    // The root itself ("./"): only metadata can change.
    if (e.type !== "dir") throw new LayerError(`entry for the root directory is a ${e.type}, not a directory`);
    Object.assign(tree.root, metaOf(e, budget));
    return;
  }

  let node: Node;
  switch (e.type) {
    case "dir":
      node = makeDir(metaOf(e, budget));
      break;
    case "file": {
      walkParent(tree, components, scope, true); // validate before spending disk on the body
      const ref = await spool.append(e.body(), e.size);
      stats.contentBytes += e.size;
      node = makeFile(e.size, ref, metaOf(e, budget));
      break;
    }
    case "symlink":
      if (e.linkpath.length === 0 || e.linkpath.length >= PATH_MAX) throw new LayerError(`symlink target is ${e.linkpath.length} bytes; Linux needs 1..${PATH_MAX - 1}`);
      node = makeSymlink(e.linkpath, metaOf(e, budget));
      break;
    case "chardev":
    case "blockdev":
      node = makeDevice(e.type, e.devmajor, e.devminor, metaOf(e, budget));
      break;
    case "fifo":
      node = makeSpecial("fifo", metaOf(e, budget));
      break;
    case "hardlink": {
      const targetPath = normalizePath(e.linkpath, depth);
      const t = walkParent(tree, targetPath, scope, false);
      const last = targetPath[targetPath.length - 1];
      const target = t === undefined || last === undefined ? undefined : t.parent.children.get(last);
      if (target === undefined) throw new LayerError(`hard link target ${showName(e.linkpath)} does not exist in the tree`);
      if (target.kind === "dir") throw new LayerError(`hard link target ${showName(e.linkpath)} is a directory`);
      node = target;
      break;
    }
  }
  const { parent, chain } = walkParent(tree, components, scope, true)!;
  place(parent, base, node);
  scope.mark(chain, parent, base);
}

/**
 * Applies one layer (an uncompressed tar stream) onto `tree`, streaming file
 * contents into `spool`. The spool is flushed before this returns, so the
 * tree's content references are readable.
 *
 * @throws {LayerError} naming the layer index and entry for anything the
 *   rules in this module reject, or malformed tar data
 * @throws {AbortError} when `options.signal` fires
 * Errors from the input stream itself (e.g. a digest or gzip error) pass through.
 */
export async function applyLayer(tree: FsTree, input: Readable | AsyncIterable<Uint8Array>, spool: Spool, options: ApplyLayerOptions = {}): Promise<LayerStats> {
  const layer = options.layer ?? 0;
  const stats: LayerStats = { entries: 0, bytes: 0, contentBytes: 0 };
  const scope = new LayerScope();
  const budget = options.budget ?? new LayerBudget(resolveLayerLimits(options.limits));
  let lastReported = 0;
  const onBytes = (n: number): void => {
    // Charged chunk by chunk: a decompression bomb stops at the chunk that crosses the cap.
    budget.addBytes(n - stats.bytes);
    stats.bytes = n;
    if (options.onProgress && n - lastReported >= 1 << 20) {
      lastReported = n;
      options.onProgress({ layer, bytes: n });
    }
  };
  let current: TarEntry | undefined;
  try {
    const tarOpts = { onBytes, signal: options.signal, maxPaxBytes: budget.limits.maxPaxBytes, maxXattrsPerEntry: budget.limits.maxXattrsPerEntry };
    for await (const e of readTar(input, tarOpts)) {
      current = e;
      budget.addEntry();
      await applyEntry(tree, e, spool, scope, stats, budget);
      current = undefined;
      stats.entries++;
    }
    current = undefined;
    await spool.flush();
  } catch (err) {
    if (typeof (input as Readable).destroy === "function") (input as Readable).destroy();
    if (err instanceof LayerError) {
      const entry = current === undefined ? err.entry : showName(current.path);
      const where = current === undefined ? "" : ` (entry ${showName(current.path)} at byte ${current.offset})`;
      if (err instanceof LayerLimitError) throw new LayerLimitError(`Layer ${layer}${where}: ${err.message}`, err.limit, err.max, { layer, entry }, { cause: err });
      throw new LayerError(`Layer ${layer}${where}: ${err.message}`, { layer, entry }, { cause: err });
    }
    throw err;
  }
  options.onProgress?.({ layer, bytes: stats.bytes });
  return stats;
}
