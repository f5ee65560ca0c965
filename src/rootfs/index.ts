/**
 * rootfs/: from image layers (or a host directory) to a read-only erofs root
 * filesystem image the guest mounts from a virtio-blk disk. Layer contents
 * never become host paths: tar entries go into an in-memory tree, file bytes
 * into one spool file, and the tree is written out as erofs. See README.md.
 */

import type { Readable } from "node:stream";
import { invalidOption } from "../errors.js";
import { treeFromDirectory } from "./directory.js";
import { writeErofs, writeErofsInPlace } from "./erofs.js";
import { applyLayer, type LayerProgress, type LayerStats } from "./layers.js";
import { LayerBudget, resolveLayerLimits, type LayerLimits } from "./limits.js";
import { Spool, SPOOL_ALIGN } from "./spool.js";
import { FsTree } from "./tree.js";

export * from "./tree.js";
export { readTar, type TarEntry, type TarEntryType, type ReadTarOptions } from "./tar.js";
export { applyLayer, normalizePath, PATH_MAX, type ApplyLayerOptions, type LayerProgress, type LayerStats } from "./layers.js";
export { Spool, SPOOL_ALIGN } from "./spool.js";
export { DEFAULT_LAYER_LIMITS, LAYER_LIMIT_ENV, LayerBudget, resolveLayerLimits, type LayerLimits, type ResolvedLayerLimits } from "./limits.js";
export { treeFromDirectory, type TreeFromDirectoryOptions } from "./directory.js";
export { writeErofs, writeErofsInPlace, xattrSupported, EROFS_MAGIC, type ErofsImage, type WriteErofsOptions } from "./erofs.js";

/** One layer: an uncompressed tar stream, or a function opening it when its turn comes. */
export type LayerSource = Readable | AsyncIterable<Uint8Array> | (() => Readable | AsyncIterable<Uint8Array> | Promise<Readable | AsyncIterable<Uint8Array>>);

/** Where the root filesystem comes from. */
export type RootfsSource =
  | {
      readonly kind: "directory";
      /** Host directory to copy (never modified). */
      readonly path: string;
      /** Record all files as root:root. @default false */
      readonly ownerRoot?: boolean;
    }
  | {
      readonly kind: "layers";
      /** Layers in order, base first, already decompressed. */
      readonly layers: readonly LayerSource[];
      /** Spool file for file contents (created; removed afterwards unless keepSpool). */
      readonly spoolPath: string;
      /** @default false */
      readonly keepSpool?: boolean;
    };

/** Options of {@link buildRootfsImage}. */
export interface BuildRootfsOptions {
  readonly source: RootfsSource;
  /** Path of the erofs image to write (atomically replaced). */
  readonly out: string;
  /** Per-layer progress: bytes of tar read so far in layer `layer`. */
  readonly onProgress?: (progress: LayerProgress) => void;
  /** Called once when every layer is applied and the erofs image is being written. */
  readonly onPack?: () => void;
  readonly signal?: AbortSignal;
  /** 16-byte volume UUID. @default all zero (reproducible images) */
  readonly uuid?: Buffer;
  /** Caps on what the layers may cost (see src/rootfs/README.md, "Limits"). @default the environment's, else the defaults */
  readonly limits?: LayerLimits;
}

/** The image {@link buildRootfsImage} wrote. */
export interface RootfsImage {
  readonly path: string;
  readonly sizeBytes: number;
  readonly inodes: number;
  /** The layers' spool became the image (no second copy of the file bytes); false when copied. */
  readonly inPlace: boolean;
}

function isReadableLike(v: unknown): v is Readable | AsyncIterable<Uint8Array> {
  return typeof v === "object" && v !== null && typeof (v as AsyncIterable<unknown>)[Symbol.asyncIterator] === "function";
}

function destroyLater(layers: readonly LayerSource[], from: number): void {
  for (let i = from; i < layers.length; i++) {
    const l = layers[i];
    if (isReadableLike(l) && typeof (l as Readable).destroy === "function") (l as Readable).destroy();
  }
}

/**
 * Applies layers in order onto a fresh tree, file contents into `spool`.
 *
 * @throws {LayerError} naming the layer index and entry when a layer breaks a rule
 */
export async function treeFromLayers(
  layers: readonly LayerSource[],
  spool: Spool,
  options: { onProgress?: (p: LayerProgress) => void; signal?: AbortSignal; limits?: LayerLimits } = {},
): Promise<{ tree: FsTree; stats: LayerStats[] }> {
  const tree = new FsTree();
  const stats: LayerStats[] = [];
  let budget: LayerBudget;
  try {
    // One budget for the whole image: the caps hold over all its layers.
    budget = new LayerBudget(resolveLayerLimits(options.limits));
  } catch (err) {
    destroyLater(layers, 0);
    throw err;
  }
  let i = 0;
  try {
    for (; i < layers.length; i++) {
      const l = layers[i]!;
      const input = isReadableLike(l) ? l : await l();
      stats.push(await applyLayer(tree, input, spool, { layer: i, onProgress: options.onProgress, signal: options.signal, budget }));
    }
  } catch (err) {
    destroyLater(layers, i + 1);
    throw err;
  }
  return { tree, stats };
}

/**
 * Builds the erofs root filesystem image of an image: from its layers
 * (uncompressed tar streams plus a spool path) or from a host directory.
 *
 * @returns the image path, its size in bytes and its inode count
 * @throws {LayerError} a layer is malformed or breaks a security rule
 * @throws {LayerLimitError} the layers cross a cap of `limits` (nothing is left on disk)
 * @throws {DiskFullError} the disk filled up (spool or image)
 * @throws {ImageError} a source cannot be read, or the tree cannot be stored
 * @throws {AbortError} `signal` fired
 * @throws {TypeError} invalid options
 */
export async function buildRootfsImage(options: BuildRootfsOptions): Promise<RootfsImage> {
  const { source, out } = options;
  if (typeof out !== "string" || out === "") throw invalidOption("out", "a file path", out);
  if (options.uuid !== undefined && (!Buffer.isBuffer(options.uuid) || options.uuid.length !== 16)) throw invalidOption("uuid", "a 16-byte Buffer", options.uuid);
  if (typeof source !== "object" || source === null) throw invalidOption("source", "{ kind: 'directory' | 'layers', ... }", source);
  const writeOpts = { signal: options.signal, uuid: options.uuid };

  if (source.kind === "directory") {
    if (typeof source.path !== "string" || source.path === "") throw invalidOption("source.path", "a directory path", source.path);
    const tree = await treeFromDirectory(source.path, { ownerRoot: source.ownerRoot, signal: options.signal });
    const img = await writeErofs(tree, out, writeOpts);
    return { path: img.path, sizeBytes: img.sizeBytes, inodes: img.inodes, inPlace: false };
  }
  if (source.kind !== "layers") throw invalidOption("source.kind", "'directory' or 'layers'", (source as { kind: unknown }).kind);
  if (!Array.isArray(source.layers)) throw invalidOption("source.layers", "an array of tar streams", source.layers);
  if (typeof source.spoolPath !== "string" || source.spoolPath === "") throw invalidOption("source.spoolPath", "a file path", source.spoolPath);
  const limits = resolveLayerLimits(options.limits);

  let spool: Spool;
  try {
    // Block 0 stays free: the spool may become the image (writeErofsInPlace).
    spool = await Spool.create(source.spoolPath, { reserve: SPOOL_ALIGN });
  } catch (err) {
    destroyLater(source.layers, 0);
    throw err;
  }
  try {
    const { tree } = await treeFromLayers(source.layers, spool, { onProgress: options.onProgress, signal: options.signal, limits });
    await spool.close();
    options.onPack?.();
    // The spool becomes the image unless it is to be kept or holds too many
    // bytes no file uses any more; then the files are copied.
    const img = (source.keepSpool === true ? undefined : await writeErofsInPlace(tree, spool.path, spool.size, out, writeOpts)) ?? (await writeErofs(tree, out, writeOpts));
    return { path: img.path, sizeBytes: img.sizeBytes, inodes: img.inodes, inPlace: img.inPlace };
  } finally {
    // Cleanup must not hide the error that got us here.
    if (source.keepSpool === true) await spool.close().catch(() => undefined);
    else await spool.remove().catch(() => undefined);
  }
}
