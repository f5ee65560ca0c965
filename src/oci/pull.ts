/**
 * pullImage: from a reference to a manifest, an image config and verified
 * layer blobs in the cache; openLayer: a layer's decompressed tar stream.
 *
 * pullPolicy, as Docker's:
 *   "missing" (default)  use what the cache has; ask the registry only for
 *                        what is missing (a cached image costs no request)
 *   "always"             re-resolve the reference from the registry every
 *                        time (a HEAD, then a GET only for a new manifest);
 *                        blobs already cached are reused by digest
 *   "never"              the cache only; no request is ever made
 *
 * References with a transport prefix (oci:, oci-archive:, docker-archive:)
 * and SUPERMACHINE_IMAGE_SOURCE=docker go through sources.ts and give the
 * same result shape.
 */

import { spawn } from "node:child_process";
import { closeSync, createReadStream, openSync, readSync } from "node:fs";
import { PassThrough, Readable } from "node:stream";
import * as zlib from "node:zlib";
import { AbortError, ImageError, invalidOption, LayerError, MissingAssetError, NotFoundError } from "../errors.js";
import { deferred } from "../deferred.js";
import { defaultCacheDir } from "../paths.js";
import { BlobCache, type IngestResult, type LiveBlob } from "./cache.js";
import type { Credentials } from "./auth.js";
import {
  checkConfigPlatform,
  type Descriptor,
  hostPlatform,
  type ImageConfig,
  type ImageManifest,
  type LayerCompression,
  layerCompression,
  MAX_MANIFEST_BYTES,
  normalizePlatform,
  parseImageConfig,
  parseManifest,
  parsePlatformOption,
  pickManifest,
  type Platform,
} from "./manifest.js";
import { type ImageReference, parseReference } from "./reference.js";
import { RegistryClient } from "./registry.js";
import { pullFromDaemon, pullFromSource } from "./sources.js";
import { limitError, resolveLayerLimits, type LayerLimits, type ResolvedLayerLimits } from "../rootfs/limits.js";

export type PullPolicy = "always" | "missing" | "never";

/** One progress event of one layer. */
export interface PullProgress {
  /** Index of the layer (0 = base). */
  readonly layer: number;
  readonly digest: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  /** "download" while bytes arrive; "cached" when the layer was already there. */
  readonly phase: "download" | "cached";
}

export interface PullOptions {
  /** @default "missing" */
  readonly pullPolicy?: PullPolicy;
  /** @default $SUPERMACHINE_CACHE_DIR, $XDG_CACHE_HOME/supermachine or ~/.cache/supermachine */
  readonly cacheDir?: string;
  /** Registries (host[:port]) reachable over plain HTTP / unverified TLS. Loopback always is. @default [] */
  readonly insecureRegistries?: readonly string[];
  /** "os/arch[/variant]" or an object. @default the host's, e.g. "linux/amd64" */
  readonly platform?: string | Platform;
  readonly signal?: AbortSignal;
  readonly onProgress?: (event: PullProgress) => void;
  /** Inactivity timeout of one registry request, ms. @default 30000 */
  readonly timeoutMs?: number;
  /** Retries on 5xx/429/connection resets, per request. @default 4 */
  readonly retries?: number;
  /** Parallel layer downloads. @default 3 */
  readonly concurrency?: number;
  /** Directory of Docker's config.json. @default $DOCKER_CONFIG or ~/.docker */
  readonly dockerConfigDir?: string;
  /** Credentials to use instead of Docker's config.json, by registry domain. */
  readonly credentials?: (domain: string) => Credentials | undefined;
  /**
   * "registry" pulls over the distribution API; "docker" exports the image
   * from the local Docker daemon. @default "docker" when SUPERMACHINE_IMAGE_SOURCE=docker, else "registry"
   */
  readonly source?: "registry" | "docker";
  /** Docker daemon socket for source "docker". @default $DOCKER_HOST (unix://) or /var/run/docker.sock */
  readonly dockerHost?: string;
  /**
   * Caps on hostile images; pulling checks `maxBlobBytes` against every
   * layer's descriptor before fetching it, unpacking the others (see
   * src/rootfs/limits.ts). @default the environment's, else the defaults
   */
  readonly limits?: LayerLimits;
  /**
   * @internal Called once the manifest and config are known, before any layer
   * is fetched: each layer's blob as it arrives (see {@link EarlyImage}).
   */
  readonly onEarly?: (early: EarlyImage) => void;
}

/** @internal How a layer's blob arrives: a download to follow, or a file in the cache. */
export type LayerArrival = { readonly kind: "file"; readonly path: string } | { readonly kind: "live"; readonly live: LiveBlob };

/**
 * @internal What pullImage knows before it fetches layers: the manifest's
 * digest and, per layer, a promise of its arrival (rejected with the pull's
 * error if the pull fails before the layer arrives).
 */
export interface EarlyImage {
  readonly manifestDigest: string;
  readonly layers: readonly { readonly layer: PulledLayer; readonly arrival: Promise<LayerArrival> }[];
}

/** One layer of a pulled image, in the cache. */
export interface PulledLayer {
  readonly digest: string;
  readonly mediaType: string;
  readonly size: number;
  /** The verified blob in the cache (compressed as `compression` says). */
  readonly path: string;
  readonly compression: LayerCompression;
  /** Digest of the uncompressed tar, from the image config, when it has one. */
  readonly diffId: string | undefined;
}

/** What pullImage (and every offline source) returns. */
export interface PulledImage {
  /** Normalised reference ("docker.io/library/alpine:latest", or "oci:/abs/dir:tag"). */
  readonly ref: string;
  /** Digest of the image manifest (the platform's manifest when the reference names an index). */
  readonly manifestDigest: string;
  /** Digest the reference resolved to (an index or the manifest itself). */
  readonly resolvedDigest: string;
  readonly platform: Platform;
  readonly configDigest: string;
  readonly config: ImageConfig;
  readonly layers: readonly PulledLayer[];
}

const POLICIES: readonly PullPolicy[] = ["always", "missing", "never"];

export interface ValidatedPullOptions {
  readonly pullPolicy: PullPolicy;
  readonly cache: BlobCache;
  readonly platform: Platform;
  readonly concurrency: number;
  readonly limits: ResolvedLayerLimits;
  readonly opts: PullOptions;
}

/** Validates options at the edge (TypeError naming the option). */
export function validatePullOptions(opts: PullOptions): ValidatedPullOptions {
  if (typeof opts !== "object" || opts === null) throw invalidOption("options", "an object", opts);
  const pullPolicy = opts.pullPolicy ?? "missing";
  if (!POLICIES.includes(pullPolicy)) throw invalidOption("pullPolicy", '"always", "missing" or "never"', pullPolicy);
  if (opts.cacheDir !== undefined && (typeof opts.cacheDir !== "string" || opts.cacheDir === "")) throw invalidOption("cacheDir", "a directory path", opts.cacheDir);
  if (opts.insecureRegistries !== undefined && (!Array.isArray(opts.insecureRegistries) || !opts.insecureRegistries.every((h) => typeof h === "string"))) {
    throw invalidOption("insecureRegistries", "an array of host[:port] strings", opts.insecureRegistries);
  }
  if (opts.timeoutMs !== undefined && (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0)) throw invalidOption("timeoutMs", "a positive number", opts.timeoutMs);
  if (opts.retries !== undefined && (!Number.isInteger(opts.retries) || opts.retries < 0 || opts.retries > 20)) throw invalidOption("retries", "an integer 0..20", opts.retries);
  const concurrency = opts.concurrency ?? 3;
  if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 16) throw invalidOption("concurrency", "an integer 1..16", concurrency);
  if (opts.onProgress !== undefined && typeof opts.onProgress !== "function") throw invalidOption("onProgress", "a function", opts.onProgress);
  if (opts.source !== undefined && opts.source !== "registry" && opts.source !== "docker") throw invalidOption("source", '"registry" or "docker"', opts.source);
  const platform = opts.platform === undefined ? hostPlatform() : parsePlatformOption(opts.platform);
  const limits = resolveLayerLimits(opts.limits);
  return { pullPolicy, cache: new BlobCache(opts.cacheDir ?? defaultCacheDir()), platform, concurrency, limits, opts };
}

function emit(opts: PullOptions, e: PullProgress): void {
  if (!opts.onProgress) return;
  try {
    opts.onProgress(e);
  } catch {
    // a progress callback must not break the pull
  }
}

/** Runs `fn` over items with at most `limit` at once; fails fast. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  let failed: unknown;
  const worker = async (): Promise<void> => {
    while (failed === undefined && next < items.length) {
      const i = next++;
      try {
        out[i] = await fn(items[i]!, i);
      } catch (err) {
        failed ??= err;
        throw err;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failed !== undefined) throw failed;
  for (const r of results) if (r.status === "rejected") throw r.reason;
  return out;
}

/**
 * How resolveImage gets what the cache lacks; `undefined` members mean
 * "offline": the thing must already be cached.
 */
export interface ContentFetcher {
  /** A manifest or index by digest, verified; also stores it in the cache. */
  manifest?(digest: string): Promise<Buffer>;
  /** A blob into the cache, verified; `onLive` sees its download start, when this call downloads it. */
  blob?(desc: Descriptor, onBytes: (n: number) => void, what: string, onLive?: (live: LiveBlob) => void): Promise<IngestResult>;
}

/** Context for {@link resolveImage}. */
export interface ResolveContext {
  readonly v: ValidatedPullOptions;
  /** Normalised name for messages and the result. */
  readonly ref: string;
  readonly fetcher: ContentFetcher;
  /** The error to throw when something is not cached and cannot be fetched. */
  readonly notCached: (what: string) => Error;
}

async function loadManifest(ctx: ResolveContext, digest: string): Promise<Buffer> {
  const cached = await ctx.v.cache.readSmall(digest, MAX_MANIFEST_BYTES);
  if (cached) return cached;
  if (!ctx.fetcher.manifest) throw ctx.notCached(`manifest ${digest}`);
  return ctx.fetcher.manifest(digest);
}

/**
 * From the resolved top-level document (index or manifest) to a PulledImage:
 * platform choice, config, layers (cached or fetched, verified).
 */
export async function resolveImage(ctx: ResolveContext, top: { bytes: Buffer; digest: string; contentType: string }): Promise<PulledImage> {
  const { v, ref } = ctx;
  let doc = parseManifest(top.bytes, top.contentType, `manifest of ${ref}`);
  let manifestDigest = top.digest;
  let platform: Platform | undefined;
  for (let depth = 0; doc.kind === "index"; depth++) {
    if (depth >= 4) throw new ImageError(`Image indexes of ${ref} nest more than 4 deep`);
    const chosen = pickManifest(doc, v.platform, ref);
    platform = chosen.platform;
    manifestDigest = chosen.digest;
    const bytes = await loadManifest(ctx, chosen.digest);
    doc = parseManifest(bytes, chosen.mediaType, `manifest ${chosen.digest} of ${ref}`);
  }
  const manifest: ImageManifest = doc;
  const configBytes = await (async () => {
    const cached = await v.cache.readSmall(manifest.config.digest, MAX_MANIFEST_BYTES);
    if (cached) return cached;
    if (!ctx.fetcher.blob) throw ctx.notCached(`image config ${manifest.config.digest}`);
    await ctx.fetcher.blob(manifest.config, () => {}, `image config of ${ref}`);
    const b = await v.cache.readSmall(manifest.config.digest, MAX_MANIFEST_BYTES);
    if (!b) throw new ImageError(`Image config ${manifest.config.digest} of ${ref} vanished from the cache ${v.cache.dir}`);
    return b;
  })();
  const config = parseImageConfig(configBytes, `image config of ${ref}`);
  if (!platform) checkConfigPlatform(config, v.platform, ref);
  if (config.diffIds.length > 0 && config.diffIds.length !== manifest.layers.length) {
    throw new ImageError(`Image ${ref} is inconsistent: its manifest lists ${manifest.layers.length} layers but its config ${config.diffIds.length} diff_ids`);
  }
  const compressions = manifest.layers.map((l) => layerCompression(l.mediaType));
  // Checked before any layer is fetched: a descriptor announcing a huge blob costs nothing.
  manifest.layers.forEach((l, i) => {
    if (l.size > v.limits.maxBlobBytes) {
      throw limitError("maxBlobBytes", v.limits.maxBlobBytes, `layer ${i} (${l.digest}) of ${ref} is ${l.size} bytes`);
    }
  });
  if (manifest.config.size > MAX_MANIFEST_BYTES) throw new ImageError(`Image config ${manifest.config.digest} of ${ref} is ${manifest.config.size} bytes, over the ${MAX_MANIFEST_BYTES}-byte cap`);
  const pulledLayers = manifest.layers.map((desc, i): PulledLayer => ({ digest: desc.digest, mediaType: desc.mediaType, size: desc.size, path: v.cache.blobPath(desc.digest), compression: compressions[i]!, diffId: config.diffIds[i] }));
  const arrivals = pulledLayers.map(() => deferred<LayerArrival>());
  v.opts.onEarly?.({ manifestDigest, layers: pulledLayers.map((layer, i) => ({ layer, arrival: arrivals[i]!.promise })) });
  let layers: PulledLayer[];
  try {
    layers = await mapLimit(manifest.layers, v.concurrency, async (desc, i): Promise<PulledLayer> => {
      const base = { layer: i, digest: desc.digest, bytesTotal: desc.size };
      const layer = pulledLayers[i]!;
      const arrived = (): void => arrivals[i]!.resolve({ kind: "file", path: layer.path });
      if (await v.cache.has(desc.digest, desc.size)) {
        emit(v.opts, { ...base, bytesDone: desc.size, phase: "cached" });
        arrived();
        return layer;
      }
      if (!ctx.fetcher.blob) throw ctx.notCached(`layer ${i} (${desc.digest})`);
      emit(v.opts, { ...base, bytesDone: 0, phase: "download" });
      const onLive = v.opts.onEarly ? (live: LiveBlob) => arrivals[i]!.resolve({ kind: "live", live }) : undefined;
      const r = await ctx.fetcher.blob(desc, (n) => emit(v.opts, { ...base, bytesDone: n, phase: "download" }), `layer ${i} (${desc.digest}) of ${ref}`, onLive);
      if (r.outcome !== "downloaded") emit(v.opts, { ...base, bytesDone: desc.size, phase: r.outcome === "cached" ? "cached" : "download" });
      arrived();
      return layer;
    });
  } catch (err) {
    // Layers not arrived yet never will: whoever waits for them learns why.
    for (const a of arrivals) a.reject(err);
    throw err;
  }
  return {
    ref,
    manifestDigest,
    resolvedDigest: top.digest,
    platform: platform ? normalizePlatform(platform) : {
      os: config.os || v.platform.os,
      architecture: config.architecture || v.platform.architecture,
      ...(config.variant ? { variant: config.variant } : {}),
    },
    configDigest: manifest.config.digest,
    config,
    layers,
  };
}

/** The error for "not in the cache and pullPolicy forbids fetching". */
export function notCachedError(ref: string, policy: PullPolicy, cacheDir: string, what: string, how = "registry"): NotFoundError {
  return new NotFoundError(
    `${ref} is not in the image cache (${cacheDir}: ${what} missing) and pullPolicy is "${policy}", which never contacts the ${how}. ` +
      `Pull it once with pullPolicy "missing" (the default) or "always", or check cacheDir.`,
    ref,
    "cache",
  );
}

/** Cache key of a registry reference. */
export function registryRefKey(ref: ImageReference): string {
  return `registry:${ref.toString()}`;
}

async function pullFromRegistry(ref: ImageReference, v: ValidatedPullOptions): Promise<PulledImage> {
  const { cache, pullPolicy, opts } = v;
  const name = ref.toString();
  const key = registryRefKey(ref);
  let client: RegistryClient | undefined;
  const registry = (): RegistryClient => {
    client ??= new RegistryClient({
      insecureRegistries: opts.insecureRegistries,
      timeoutMs: opts.timeoutMs,
      retries: opts.retries,
      signal: opts.signal,
      dockerConfigDir: opts.dockerConfigDir,
      credentials: opts.credentials,
    });
    return client;
  };
  const online = pullPolicy !== "never";
  const fetcher: ContentFetcher = online
    ? {
        async manifest(digest) {
          const m = await registry().getManifest(ref, digest);
          await cache.putBytes(m.bytes, m.digest);
          return m.bytes;
        },
        async blob(desc, onBytes, what, onLive) {
          const c = registry();
          const urls = (desc.urls ?? []).flatMap((u) => {
            try {
              return [new URL(u)];
            } catch {
              return [];
            }
          });
          return cache.ingest(
            desc.digest,
            async (offset) => {
              try {
                const r = await c.getBlob(ref, desc.digest, offset);
                return { stream: r.body, start: r.start };
              } catch (err) {
                // Foreign layers may live only at their URLs.
                if (!(err instanceof NotFoundError) || urls.length === 0) throw err;
                const r = await c.getUrl(urls[0]!, offset);
                return { stream: r.body, start: r.start };
              }
            },
            { size: desc.size, signal: opts.signal, onProgress: onBytes, retries: c.retries, retryBaseMs: c.retryBaseMs, isRetryable: (e) => c.isRetryableNet(ref.registry, e), what, onLive },
          );
        },
      }
    : {};
  try {
    let top: { bytes: Buffer; digest: string; contentType: string } | undefined;
    // What the cache says the reference is.
    if (pullPolicy !== "always") {
      const digest = ref.digest ?? (await cache.readRef(key))?.digest;
      const bytes = digest ? await cache.readSmall(digest, MAX_MANIFEST_BYTES) : undefined;
      if (digest && bytes) top = { bytes, digest, contentType: "" };
    }
    if (!top) {
      if (!online) throw notCachedError(name, pullPolicy, cache.dir, "manifest");
      const c = registry();
      // HEAD first: a manifest we already hold costs no GET (nor Docker Hub rate limit).
      // A digest reference is HEADed too under "always": the registry is asked every time.
      const head = ref.digest && pullPolicy !== "always" ? { digest: ref.digest } : await c.headManifest(ref, ref.reference);
      if (ref.digest) head.digest = ref.digest;
      const cachedBytes = head.digest ? await cache.readSmall(head.digest, MAX_MANIFEST_BYTES) : undefined;
      if (head.digest && cachedBytes) {
        top = { bytes: cachedBytes, digest: head.digest, contentType: "" };
      } else {
        const m = await c.getManifest(ref, ref.reference);
        await cache.putBytes(m.bytes, m.digest);
        top = { bytes: m.bytes, digest: m.digest, contentType: m.contentType };
      }
      if (!ref.digest) await cache.writeRef(key, top.digest, top.contentType);
    }
    return await resolveImage({ v, ref: name, fetcher, notCached: (what) => notCachedError(name, pullPolicy, cache.dir, what) }, top);
  } finally {
    client?.close();
  }
}

const TRANSPORT = /^(oci|oci-archive|docker-archive|docker-daemon):(?!\d+(?:\/|$))/;

/**
 * Resolves an image reference to a manifest, an image config and verified
 * layer blobs in the cache. See the module comment for `pullPolicy`.
 */
export async function pullImage(ref: string, options: PullOptions = {}): Promise<PulledImage> {
  const v = validatePullOptions(options);
  if (typeof ref !== "string") throw invalidOption("ref", "an image reference string", ref);
  if (options.signal?.aborted) throw new AbortError("The operation was aborted (signal fired)", { cause: options.signal.reason });
  const transport = TRANSPORT.exec(ref);
  if (transport) return pullFromSource(ref, v);
  const source = options.source ?? (process.env.SUPERMACHINE_IMAGE_SOURCE === "docker" ? "docker" : "registry");
  const parsed = parseReference(ref);
  if (source === "docker") return pullFromDaemon(parsed, v);
  return pullFromRegistry(parsed, v);
}

/** What openLayer needs: a blob path, and its media type or known compression. */
export interface LayerBlob {
  readonly path: string;
  readonly mediaType?: string;
  readonly compression?: LayerCompression;
  readonly digest?: string;
}

/** Sniffs gzip / zstd magic bytes at the start of a file. */
export function sniffCompression(head: Uint8Array): LayerCompression | undefined {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head.length >= 4 && head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd) return "zstd";
  return undefined;
}

function readHead(path: string): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(4);
    const n = readSync(fd, b, 0, 4, 0);
    return b.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

/**
 * Opens a layer blob as its decompressed tar stream: gzip through zlib, zstd
 * through zlib when Node has it or else the `zstd -dc` command (Debian
 * package zstd), plain tar as is. The compression is taken from the bytes
 * themselves (magic numbers), the media type deciding only for plain tar.
 * Errors arrive on the stream as LayerError (or MissingAssetError for zstd).
 */
export function openLayer(layer: LayerBlob): Readable {
  const what = layer.digest ? `layer ${layer.digest}` : `layer ${layer.path}`;
  const out = new PassThrough({ highWaterMark: 256 * 1024 });
  let head: Buffer;
  try {
    head = readHead(layer.path);
  } catch (err) {
    process.nextTick(() => out.destroy(new LayerError(`Cannot open ${what}: ${(err as Error).message}`, {}, { cause: err })));
    return out;
  }
  decodeLayer(layer, what, head, () => createReadStream(layer.path, { highWaterMark: 256 * 1024 }), out);
  return out;
}

/**
 * @internal Like {@link openLayer}, for a layer that may still be
 * downloading (pullImage's `onEarly`): its decompressed tar stream as the
 * bytes arrive. The stream ends only once the blob is verified; it errors with
 * the download's error when that fails. A zstd layer this Node cannot
 * decompress itself (the `zstd` command reads a file) waits for the blob.
 */
export function openArrivingLayer(layer: PulledLayer, arrival: Promise<LayerArrival>): Readable {
  const what = `layer ${layer.digest}`;
  const out = new PassThrough({ highWaterMark: 256 * 1024 });
  void (async () => {
    const a = await arrival;
    const fromFile = (path: string): void => {
      const inner = openLayer({ ...layer, path });
      inner.on("error", (e) => out.destroy(e)).pipe(out);
      out.on("close", () => inner.destroy());
    };
    if (a.kind === "file") return fromFile(a.path);
    const it = a.live.read()[Symbol.asyncIterator]();
    const first: Buffer[] = [];
    let got = 0;
    while (got < 4) {
      const r = await it.next();
      if (r.done) break;
      first.push(r.value);
      got += r.value.length;
    }
    const head = Buffer.concat(first);
    if (out.destroyed || (sniffCompression(head) === "zstd" && !nodeZstd())) {
      await it.return(undefined);
      if (out.destroyed) return;
      return fromFile(await a.live.path());
    }
    const rest = { [Symbol.asyncIterator]: () => it };
    decodeLayer(layer, what, head, () => Readable.from((async function* () {
      yield* first;
      yield* rest;
    })()), out);
  })().catch((err: unknown) => {
    if (!out.destroyed) out.destroy(err instanceof Error ? err : new Error(String(err)));
  });
  return out;
}

/** Node's own zstd decompressor, when this Node has one (else the `zstd` command decompresses a file). */
function nodeZstd(): (() => import("node:stream").Transform) | undefined {
  const f = (zlib as unknown as { createZstdDecompress?: () => import("node:stream").Transform }).createZstdDecompress;
  return typeof f === "function" ? f : undefined;
}

/** Pipes the blob's bytes (`open`, whose first bytes are `head`) through its decompressor into `out`. */
function decodeLayer(layer: LayerBlob, what: string, head: Buffer, open: () => Readable, out: PassThrough): void {
  const declared = layer.compression ?? (layer.mediaType ? layerCompression(layer.mediaType) : undefined);
  const compression = sniffCompression(head) ?? (declared === "gzip" || declared === "zstd" ? declared : "tar");
  const fail = (err: unknown, how: string): void => {
    if (out.destroyed) return;
    out.destroy(err instanceof LayerError || err instanceof MissingAssetError ? err : new LayerError(`Cannot ${how} ${what}: ${(err as Error).message}`, {}, { cause: err }));
  };
  const src = open();
  src.on("error", (e) => fail(e, "read"));
  if (compression === "tar") {
    src.pipe(out);
    out.on("close", () => src.destroy());
    return;
  }
  if (compression === "gzip") {
    // Large output chunks: each chunk is a thread-pool round trip (16 KiB by default).
    const gunzip = zlib.createGunzip({ chunkSize: 256 * 1024 });
    gunzip.on("error", (e) => fail(e, "decompress (gzip)"));
    src.pipe(gunzip).pipe(out);
    out.on("close", () => {
      src.destroy();
      gunzip.destroy();
    });
    return;
  }
  const zstdStream = nodeZstd();
  if (zstdStream) {
    const dec = zstdStream();
    dec.on("error", (e) => fail(e, "decompress (zstd)"));
    src.pipe(dec).pipe(out);
    out.on("close", () => {
      src.destroy();
      dec.destroy();
    });
    return;
  }
  src.destroy();
  const child = spawn("zstd", ["-d", "-c", "-q", "--no-progress", "--", layer.path], { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (b: Buffer) => {
    if (stderr.length < 4096) stderr += b.toString("utf8");
  });
  child.on("error", (err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") {
      fail(new MissingAssetError("zstd", `${what} is zstd-compressed and this Node has no zstd: install the zstd command (Debian package "zstd")`, { cause: err }), "");
    } else fail(err, "decompress (zstd)");
  });
  child.stdout.pipe(out, { end: false });
  child.on("close", (code, signal) => {
    if (out.destroyed) return;
    if (code === 0) out.end();
    else fail(new LayerError(`Cannot decompress (zstd) ${what}: zstd exited with ${signal ?? code}: ${stderr.trim().slice(0, 500)}`), "");
  });
  out.on("close", () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
}

