/**
 * Offline image sources, each giving the same result as a registry pull
 * (blobs copied into the cache and verified by digest where digests exist):
 *
 *   oci:DIR[:tag]               an OCI image layout directory; the tag is
 *                               matched against org.opencontainers.image.ref.name
 *   oci-archive:FILE[:tag]      a tar of such a layout
 *   docker-archive:FILE[:ref]   a `docker save` tarball (manifest.json and
 *                               the legacy layout; "@N" picks the N-th image)
 *   docker-daemon:REF, or SUPERMACHINE_IMAGE_SOURCE=docker
 *                               the local Docker daemon's `GET /images/{name}/get`
 *                               (a docker-save tarball) over its unix socket
 *
 * Local files (oci:, oci-archive:, docker-archive:) are always read: they
 * are local, so pullPolicy has nothing to save. The daemon honours
 * pullPolicy like a registry ("never" and a cached "missing" don't ask it).
 */

import { randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readFile, stat, unlink } from "node:fs/promises";
import * as http from "node:http";
import { join, resolve } from "node:path";
import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { DigestMismatchError, ImageError, NotFoundError } from "../errors.js";
import { digestOf, parseDigest } from "./digest.js";
import { bodyExcerpt } from "./http.js";
import {
  checkConfigPlatform,
  type Descriptor,
  MAX_LAYERS,
  MAX_MANIFEST_BYTES,
  MEDIA_TYPES,
  parseImageConfig,
  parseJsonObject,
  parseManifest,
} from "./manifest.js";
import {
  type ContentFetcher,
  mapLimit,
  notCachedError,
  type PulledImage,
  type PulledLayer,
  resolveImage,
  sniffCompression,
  type ValidatedPullOptions,
} from "./pull.js";
import { type ImageReference, parseReference } from "./reference.js";
import { TarIndex } from "./tarindex.js";

const REF_NAME = "org.opencontainers.image.ref.name";

/** Files of an OCI layout, in a directory or inside a tar. */
interface LayoutFiles {
  /** "oci:/abs/dir" or "oci-archive:/abs/file", for messages. */
  readonly where: string;
  readSmall(rel: string, max: number): Promise<Buffer | undefined>;
  open(rel: string, offset: number): Promise<{ stream: Readable; start: number }>;
}

function dirLayout(dir: string): LayoutFiles {
  const where = `oci:${dir}`;
  return {
    where,
    async readSmall(rel, max) {
      const p = join(dir, rel);
      try {
        const st = await stat(p);
        if (st.size > max) throw new ImageError(`${where}: ${rel} is ${st.size} bytes, more than the ${max} allowed`);
        return await readFile(p);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
        throw err;
      }
    },
    async open(rel, offset) {
      const p = join(dir, rel);
      try {
        await stat(p);
      } catch {
        throw new NotFoundError(`${where} lacks ${rel}: the layout is incomplete`, where, where);
      }
      return { stream: createReadStream(p, { start: offset }), start: offset };
    },
  };
}

function tarLayout(index: TarIndex, file: string): LayoutFiles {
  const where = `oci-archive:${file}`;
  return {
    where,
    readSmall: (rel, max) => index.readSmall(rel, max, where),
    async open(rel, offset) {
      const m = index.get(rel);
      if (!m) throw new NotFoundError(`${where} lacks ${rel}: the layout is incomplete`, where, where);
      return { stream: index.stream(m, offset), start: offset };
    },
  };
}

function blobRel(digest: string): string {
  const { algorithm, hex } = parseDigest(digest);
  return `blobs/${algorithm}/${hex}`;
}

/** Splits "PATH[:rest]" at the first colon. */
function splitPathTag(rest: string): [string, string | undefined] {
  const colon = rest.indexOf(":");
  return colon < 0 ? [rest, undefined] : [rest.slice(0, colon), rest.slice(colon + 1) || undefined];
}

function sameRef(a: string, b: string): boolean {
  if (a === b) return true;
  try {
    return parseReference(a).toString() === parseReference(b).toString();
  } catch {
    return false;
  }
}

async function importLayout(files: LayoutFiles, tag: string | undefined, v: ValidatedPullOptions, displayRef: string): Promise<PulledImage> {
  const layoutFile = await files.readSmall("oci-layout", 64 * 1024);
  if (!layoutFile) throw new ImageError(`${files.where} is not an OCI image layout (no oci-layout file)`);
  const layoutJson = parseJsonObject(layoutFile, `${files.where}/oci-layout`);
  if (typeof layoutJson.imageLayoutVersion !== "string" || !layoutJson.imageLayoutVersion.startsWith("1.")) {
    throw new ImageError(`${files.where}: unsupported imageLayoutVersion ${JSON.stringify(layoutJson.imageLayoutVersion)}`);
  }
  const indexBytes = await files.readSmall("index.json", MAX_MANIFEST_BYTES);
  if (!indexBytes) throw new ImageError(`${files.where} is not an OCI image layout (no index.json)`);
  const index = parseManifest(indexBytes, MEDIA_TYPES.ociIndex, `${files.where}/index.json`);
  if (index.kind !== "index") throw new ImageError(`${files.where}/index.json is not an image index`);
  const tags = index.manifests.map((d) => d.annotations?.[REF_NAME]).filter((t): t is string => !!t);
  let chosen: Descriptor | undefined;
  if (tag !== undefined) {
    chosen = index.manifests.find((d) => d.annotations?.[REF_NAME] === tag) ?? index.manifests.find((d) => {
      const t = d.annotations?.[REF_NAME];
      return t !== undefined && sameRef(t, tag);
    });
    if (!chosen) {
      throw new NotFoundError(
        `${files.where} has no image tagged ${JSON.stringify(tag)}; it has ${tags.length ? tags.map((t) => JSON.stringify(t)).join(", ") : "no tagged images"}`,
        displayRef,
        files.where,
      );
    }
  } else if (index.manifests.length === 1) {
    chosen = index.manifests[0]!;
  } else {
    throw new ImageError(
      `${files.where} holds ${index.manifests.length} images; name one as ${files.where}:TAG (tags: ${tags.length ? tags.join(", ") : "none"})`,
    );
  }
  const readVerified = async (digest: string): Promise<Buffer> => {
    const bytes = await files.readSmall(blobRel(digest), MAX_MANIFEST_BYTES);
    if (!bytes) throw new NotFoundError(`${files.where} lacks ${blobRel(digest)}: the layout is incomplete`, displayRef, files.where);
    await v.cache.putBytes(bytes, digest); // verifies
    return bytes;
  };
  const top = await readVerified(chosen.digest);
  const fetcher: ContentFetcher = {
    manifest: readVerified,
    blob: (desc, onBytes, what) =>
      v.cache.ingest(desc.digest, (offset) => files.open(blobRel(desc.digest), offset), { size: desc.size, signal: v.opts.signal, onProgress: onBytes, what }),
  };
  return resolveImage(
    { v, ref: displayRef, fetcher, notCached: (what) => new NotFoundError(`${files.where}: ${what} is missing`, displayRef, files.where) },
    { bytes: top, digest: chosen.digest, contentType: chosen.mediaType },
  );
}

interface DockerArchiveEntry {
  readonly Config: string;
  readonly RepoTags: readonly string[];
  readonly Layers: readonly string[];
}

function parseDockerManifest(bytes: Buffer, where: string): DockerArchiveEntry[] {
  let json: unknown;
  try {
    json = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new ImageError(`${where}: manifest.json is not JSON`);
  }
  if (!Array.isArray(json) || json.length === 0 || json.length > 4096) throw new ImageError(`${where}: manifest.json is not a non-empty list`);
  return json.map((e, i) => {
    const o = (typeof e === "object" && e !== null ? e : {}) as Record<string, unknown>;
    if (typeof o.Config !== "string") throw new ImageError(`${where}: manifest.json entry ${i} has no Config`);
    if (!Array.isArray(o.Layers) || !o.Layers.every((l) => typeof l === "string") || o.Layers.length > MAX_LAYERS) {
      throw new ImageError(`${where}: manifest.json entry ${i} has no valid Layers list`);
    }
    const tags = Array.isArray(o.RepoTags) ? o.RepoTags.filter((t): t is string => typeof t === "string") : [];
    return { Config: o.Config, RepoTags: tags, Layers: o.Layers as string[] };
  });
}

/** The digest a docker-archive member path implies ("<hex>.json", "blobs/sha256/<hex>", "<hex>/layer.tar" does not). */
function digestFromPath(name: string): string | undefined {
  const m = /^(?:blobs\/sha256\/([a-f0-9]{64})|([a-f0-9]{64})\.json)$/.exec(name.replace(/^\.\//, ""));
  const hex = m?.[1] ?? m?.[2];
  return hex ? `sha256:${hex}` : undefined;
}

/** Imports a docker-save tarball (see the module comment). */
export async function importDockerArchive(file: string, refArg: string | undefined, v: ValidatedPullOptions, displayRef: string): Promise<PulledImage> {
  const where = `docker-archive:${file}`;
  const index = await TarIndex.open(file, where);
  const manifestBytes = await index.readSmall("manifest.json", MAX_MANIFEST_BYTES, where);
  if (!manifestBytes) throw new ImageError(`${where} is not a docker-save archive (no manifest.json)`);
  const entries = parseDockerManifest(manifestBytes, where);
  let entry: DockerArchiveEntry | undefined;
  if (refArg !== undefined && /^@\d+$/.test(refArg)) {
    entry = entries[Number(refArg.slice(1))];
    if (!entry) throw new NotFoundError(`${where} has ${entries.length} images; ${refArg} is out of range`, displayRef, where);
  } else if (refArg !== undefined) {
    entry = entries.find((e) => e.RepoTags.some((t) => sameRef(t, refArg)));
    if (!entry) {
      const all = entries.flatMap((e) => e.RepoTags);
      throw new NotFoundError(`${where} has no image ${JSON.stringify(refArg)}; it has ${all.length ? all.join(", ") : "only untagged images (use @0, @1, …)"}`, displayRef, where);
    }
  } else if (entries.length === 1) {
    entry = entries[0]!;
  } else {
    throw new ImageError(`${where} holds ${entries.length} images; name one as ${where}:REF or ${where}:@N (tags: ${entries.flatMap((e) => e.RepoTags).join(", ")})`);
  }
  const configBytes = await index.readSmall(entry.Config, MAX_MANIFEST_BYTES, where);
  if (!configBytes) throw new ImageError(`${where} lacks its image config ${entry.Config}`);
  const configDigest = digestOf(configBytes);
  const namedConfig = digestFromPath(entry.Config);
  if (namedConfig && namedConfig !== configDigest) {
    throw new DigestMismatchError(`${where}: image config ${entry.Config} hashes to ${configDigest}; it was not imported`, namedConfig, configDigest);
  }
  const config = parseImageConfig(configBytes, `image config in ${where}`);
  checkConfigPlatform(config, v.platform, displayRef);
  if (config.diffIds.length !== entry.Layers.length) {
    throw new ImageError(`${where} is inconsistent: manifest.json lists ${entry.Layers.length} layers, the image config ${config.diffIds.length} diff_ids`);
  }
  await v.cache.putBytes(configBytes, configDigest);
  const layers = await mapLimit(entry.Layers, v.concurrency, async (name, i): Promise<PulledLayer> => {
    const member = index.get(name);
    if (!member) throw new ImageError(`${where} lacks layer ${i} (${name})`);
    const first = await readFirst(index, member);
    const compression = sniffCompression(first) ?? "tar";
    const expected = digestFromPath(name) ?? (compression === "tar" ? config.diffIds[i] : undefined);
    const progress = (n: number): void => {
      if (!v.opts.onProgress) return;
      try {
        v.opts.onProgress({ layer: i, digest: expected ?? "", bytesDone: n, bytesTotal: member.size, phase: "download" });
      } catch {
        // ignore
      }
    };
    const r = expected
      ? await v.cache.ingest(expected, async (offset) => ({ stream: index.stream(member, offset), start: offset }), {
          size: member.size,
          signal: v.opts.signal,
          onProgress: progress,
          what: `layer ${i} (${name}) of ${where}`,
        })
      : await v.cache.ingestUnknown(index.stream(member), { signal: v.opts.signal, onProgress: progress });
    const mediaType = compression === "gzip" ? "application/vnd.oci.image.layer.v1.tar+gzip" : compression === "zstd" ? "application/vnd.oci.image.layer.v1.tar+zstd" : "application/vnd.oci.image.layer.v1.tar";
    return { digest: r.digest, mediaType, size: r.size, path: r.path, compression, diffId: config.diffIds[i] };
  });
  // A docker-save archive has no distribution manifest: describe it with an OCI one.
  const manifest = {
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.ociManifest,
    config: { mediaType: MEDIA_TYPES.ociConfig, digest: configDigest, size: configBytes.length },
    layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
  };
  const manifestDigest = await v.cache.putBytes(Buffer.from(JSON.stringify(manifest)));
  return {
    ref: displayRef,
    manifestDigest,
    resolvedDigest: manifestDigest,
    platform: { os: config.os || v.platform.os, architecture: config.architecture || v.platform.architecture, ...(config.variant ? { variant: config.variant } : {}) },
    configDigest,
    config,
    layers,
  };
}

async function readFirst(index: TarIndex, member: { offset: number; size: number }): Promise<Buffer> {
  const fh = await open(index.path, "r");
  try {
    const b = Buffer.alloc(Math.min(4, member.size));
    await fh.read(b, 0, b.length, member.offset);
    return b;
  } finally {
    await fh.close();
  }
}

/** Entry point for references with a transport prefix. */
export async function pullFromSource(ref: string, v: ValidatedPullOptions): Promise<PulledImage> {
  const colon = ref.indexOf(":");
  const transport = ref.slice(0, colon);
  const rest = ref.slice(colon + 1);
  if (transport === "docker-daemon") return pullFromDaemon(parseReference(rest), v);
  const [rawPath, tag] = splitPathTag(rest);
  if (!rawPath) throw new TypeError(`Invalid image reference ${JSON.stringify(ref)}: no path after "${transport}:"`);
  const path = resolve(rawPath);
  const displayRef = `${transport}:${path}${tag !== undefined ? `:${tag}` : ""}`;
  if (transport === "oci") {
    try {
      const st = await stat(path);
      if (!st.isDirectory()) throw new ImageError(`oci:${path} is not a directory; for a tar of a layout use oci-archive:`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") throw new NotFoundError(`oci:${path} does not exist`, displayRef, `oci:${path}`);
      throw err;
    }
    return importLayout(dirLayout(path), tag, v, displayRef);
  }
  if (transport === "oci-archive") {
    await statFile(path, displayRef, transport);
    const index = await TarIndex.open(path, `oci-archive:${path}`);
    return importLayout(tarLayout(index, path), tag, v, displayRef);
  }
  await statFile(path, displayRef, transport);
  return importDockerArchive(path, tag, v, displayRef);
}

async function statFile(path: string, displayRef: string, transport: string): Promise<void> {
  try {
    const st = await stat(path);
    if (!st.isFile()) throw new ImageError(`${transport}:${path} is not a file`);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") throw new NotFoundError(`${transport}:${path} does not exist`, displayRef, `${transport}:${path}`);
    throw err;
  }
}

/** The Docker daemon's unix socket: option, $DOCKER_HOST (unix://), or /var/run/docker.sock. */
export function dockerSocketPath(option?: string, env: NodeJS.ProcessEnv = process.env): string {
  const raw = option ?? env.DOCKER_HOST ?? "unix:///var/run/docker.sock";
  if (raw.startsWith("unix://")) return raw.slice("unix://".length);
  if (raw.startsWith("/")) return raw;
  throw new ImageError(
    `Docker host ${JSON.stringify(raw)} is not a unix socket; only unix:// daemons are supported for SUPERMACHINE_IMAGE_SOURCE=docker. ` +
      `Unset SUPERMACHINE_IMAGE_SOURCE to pull from the registry directly.`,
  );
}

/**
 * Exports `ref` from the local Docker daemon (GET /images/{name}/get) into
 * the cache, through a temporary docker-save tarball.
 */
export async function pullFromDaemon(ref: ImageReference, v: ValidatedPullOptions): Promise<PulledImage> {
  const socket = dockerSocketPath(v.opts.dockerHost);
  const name = ref.toString();
  const key = `docker-daemon:${name}`;
  const displayRef = name;
  if (v.pullPolicy !== "always") {
    const rec = await v.cache.readRef(key);
    const bytes = rec ? await v.cache.readSmall(rec.digest, MAX_MANIFEST_BYTES) : undefined;
    if (rec && bytes) {
      try {
        return await resolveImage(
          { v, ref: displayRef, fetcher: {}, notCached: (what) => notCachedError(displayRef, v.pullPolicy, v.cache.dir, what, "Docker daemon") },
          { bytes, digest: rec.digest, contentType: rec.mediaType },
        );
      } catch (err) {
        if (!(err instanceof NotFoundError) || v.pullPolicy === "never") throw err;
      }
    }
    if (v.pullPolicy === "never") throw notCachedError(displayRef, v.pullPolicy, v.cache.dir, "manifest", "Docker daemon");
  }
  const tmpDir = join(v.cache.dir, "tmp");
  await mkdir(tmpDir, { recursive: true });
  const tmp = join(tmpDir, `docker-save.${process.pid}.${randomBytes(6).toString("hex")}.tar`);
  try {
    const res = await new Promise<http.IncomingMessage>((ok, fail) => {
      const req = http.request({ socketPath: socket, path: `/images/${encodeURIComponent(name)}/get`, method: "GET", headers: { host: "docker" }, signal: v.opts.signal });
      req.setTimeout(v.opts.timeoutMs ?? 30_000, () => req.destroy(Object.assign(new Error("no answer"), { code: "ETIMEDOUT" })));
      req.on("response", ok);
      req.on("error", fail);
      req.end();
    }).catch((err: NodeJS.ErrnoException) => {
      if (err.name === "AbortError") throw err;
      const why = err.code === "ENOENT" ? "no such socket: is the Docker daemon running?" : err.code === "ECONNREFUSED" ? "connection refused: the daemon is not running" : `${err.code ?? ""} ${err.message}`.trim();
      throw new ImageError(
        `SUPERMACHINE_IMAGE_SOURCE=docker: cannot reach the Docker daemon at unix://${socket} (${why}). ` +
          `Start the daemon or set DOCKER_HOST, or unset SUPERMACHINE_IMAGE_SOURCE to pull ${name} from its registry directly (no daemon needed).`,
        { cause: err },
      );
    });
    if (res.statusCode === 404) {
      const detail = await bodyExcerpt(res);
      throw new NotFoundError(`The Docker daemon has no image ${name}${detail ? ` (${detail})` : ""}; run \`docker pull ${name}\` first`, name, "docker daemon");
    }
    if (res.statusCode !== 200) {
      const detail = await bodyExcerpt(res);
      throw new ImageError(`The Docker daemon answered ${res.statusCode} exporting ${name}${detail ? `: ${detail}` : ""}`);
    }
    const fh = await open(tmp, "wx", 0o600);
    try {
      await pipeline(res, fh.createWriteStream());
    } finally {
      await fh.close().catch(() => {});
    }
    // An image asked for by digest is saved without tags: take the only one.
    const image = await importDockerArchive(tmp, ref.digest ? undefined : name, v, displayRef);
    await v.cache.writeRef(key, image.manifestDigest, MEDIA_TYPES.ociManifest);
    return image;
  } finally {
    await unlink(tmp).catch(() => {});
  }
}
