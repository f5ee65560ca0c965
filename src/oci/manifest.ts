/**
 * Manifests, image indexes, image configs and platforms.
 *
 * Accepted: OCI image index and Docker manifest list (a platform is picked),
 * OCI image manifest and Docker schema 2 manifest, and their image configs.
 * Every document comes from an untrusted source: sizes are bounded by the
 * caller, shapes are checked here field by field, digests are parsed (so
 * they are safe as file names), counts are bounded.
 */

import { ImageError, PlatformError } from "../errors.js";
import { parseDigest } from "./digest.js";

export const MEDIA_TYPES = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  dockerSchema1: "application/vnd.docker.distribution.manifest.v1+json",
  dockerSchema1Signed: "application/vnd.docker.distribution.manifest.v1+prettyjws",
} as const;

/** The Accept header for manifest requests. */
export const MANIFEST_ACCEPT = [MEDIA_TYPES.ociIndex, MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerList, MEDIA_TYPES.dockerManifest].join(", ");

/** Bound on manifests, indexes and image configs. */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/** Bound on the number of layers of an image and of manifests of an index. */
export const MAX_LAYERS = 1000;
const MAX_INDEX_ENTRIES = 4096;

/** How a layer blob is compressed. */
export type LayerCompression = "tar" | "gzip" | "zstd";

const LAYER_MEDIA_TYPES: ReadonlyMap<string, LayerCompression> = new Map([
  ["application/vnd.oci.image.layer.v1.tar", "tar"],
  ["application/vnd.oci.image.layer.v1.tar+gzip", "gzip"],
  ["application/vnd.oci.image.layer.v1.tar+zstd", "zstd"],
  ["application/vnd.oci.image.layer.nondistributable.v1.tar", "tar"],
  ["application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"],
  ["application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd"],
  ["application/vnd.docker.image.rootfs.diff.tar", "tar"],
  ["application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"],
  ["application/vnd.docker.image.rootfs.diff.tar.zstd", "zstd"],
  ["application/vnd.docker.image.rootfs.foreign.diff.tar", "tar"],
  ["application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip"],
]);

/** The compression a layer media type implies; throws ImageError for unknown types. */
export function layerCompression(mediaType: string): LayerCompression {
  const c = LAYER_MEDIA_TYPES.get(mediaType);
  if (c === undefined) {
    throw new ImageError(
      `Unsupported layer media type ${JSON.stringify(mediaType.slice(0, 200))}: supported are OCI tar, tar+gzip and tar+zstd layers ` +
        `(also non-distributable) and Docker rootfs.diff / foreign layers. Is this an artifact rather than a container image?`,
    );
  }
  return c;
}

/** A content descriptor (digest, size, media type, and optional extras). */
export interface Descriptor {
  readonly mediaType: string;
  readonly digest: string;
  readonly size: number;
  readonly urls?: readonly string[];
  readonly annotations?: Readonly<Record<string, string>>;
  readonly platform?: Platform;
}

/** A platform: os/architecture[/variant]. */
export interface Platform {
  readonly os: string;
  readonly architecture: string;
  readonly variant?: string;
}

export interface ImageIndex {
  readonly kind: "index";
  readonly mediaType: string;
  readonly manifests: readonly Descriptor[];
}

export interface ImageManifest {
  readonly kind: "manifest";
  readonly mediaType: string;
  readonly config: Descriptor;
  readonly layers: readonly Descriptor[];
}

/** The parts of an image config that running it needs. */
export interface ImageConfig {
  readonly architecture: string;
  readonly os: string;
  readonly variant: string | undefined;
  /** ENTRYPOINT, or null when unset. */
  readonly entrypoint: readonly string[] | null;
  /** CMD, or null when unset. */
  readonly cmd: readonly string[] | null;
  /** Environment, "KEY=value" entries in image order. */
  readonly env: readonly string[];
  /** WORKDIR; "" when unset (meaning "/"). */
  readonly workingDir: string;
  /** USER; "" when unset (meaning root). */
  readonly user: string;
  /** EXPOSE'd ports, e.g. ["80/tcp"], sorted. */
  readonly exposedPorts: readonly string[];
  readonly labels: Readonly<Record<string, string>>;
  readonly stopSignal: string | undefined;
  /** Digests of the uncompressed layers, base first. */
  readonly diffIds: readonly string[];
}

function bad(what: string, why: string): ImageError {
  return new ImageError(`Malformed ${what}: ${why}`);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Parses JSON bytes into an object, or throws ImageError naming `what`. */
export function parseJsonObject(bytes: Buffer, what: string): Record<string, unknown> {
  if (bytes.length > MAX_MANIFEST_BYTES) throw bad(what, `larger than ${MAX_MANIFEST_BYTES} bytes`);
  let json: unknown;
  try {
    json = JSON.parse(bytes.toString("utf8"));
  } catch (err) {
    throw bad(what, `not JSON (${(err as Error).message})`);
  }
  if (!isObject(json)) throw bad(what, "not a JSON object");
  return json;
}

function stringMap(v: unknown, what: string): Record<string, string> | undefined {
  if (v === undefined || v === null) return undefined;
  if (!isObject(v)) throw bad(what, "expected an object of strings");
  for (const [k, val] of Object.entries(v)) {
    if (typeof val !== "string") throw bad(what, `value of ${JSON.stringify(k)} is not a string`);
  }
  // fromEntries defines own properties: a "__proto__" key stays a plain key.
  return Object.fromEntries(Object.entries(v)) as Record<string, string>;
}

function parsePlatform(v: unknown, what: string): Platform | undefined {
  if (v === undefined || v === null) return undefined;
  if (!isObject(v)) throw bad(what, "platform is not an object");
  const { os, architecture, variant } = v;
  if (typeof os !== "string" || typeof architecture !== "string") throw bad(what, "platform needs os and architecture strings");
  if (variant !== undefined && typeof variant !== "string") throw bad(what, "platform variant is not a string");
  return { os, architecture, ...(variant ? { variant } : {}) };
}

/** Validates one descriptor. */
export function parseDescriptor(v: unknown, what: string): Descriptor {
  if (!isObject(v)) throw bad(what, "descriptor is not an object");
  const { mediaType, digest, size, urls, annotations, platform } = v;
  if (typeof mediaType !== "string" || mediaType.length > 256) throw bad(what, "descriptor mediaType missing or not a string");
  let parsed: string;
  try {
    parsed = parseDigest(digest).digest;
  } catch (err) {
    throw bad(what, (err as Error).message);
  }
  if (typeof size !== "number" || !Number.isSafeInteger(size) || size < 0) throw bad(what, `descriptor ${parsed} has no valid size`);
  let urlList: string[] | undefined;
  if (urls !== undefined && urls !== null) {
    if (!Array.isArray(urls) || urls.length > 16 || !urls.every((u) => typeof u === "string")) throw bad(what, "descriptor urls is not a list of strings");
    urlList = urls as string[];
  }
  const ann = stringMap(annotations, what);
  const plat = parsePlatform(platform, what);
  return {
    mediaType,
    digest: parsed,
    size,
    ...(urlList ? { urls: urlList } : {}),
    ...(ann ? { annotations: ann } : {}),
    ...(plat ? { platform: plat } : {}),
  };
}

/**
 * Parses a manifest or an index. The media type comes from the document's
 * `mediaType` field, else from the Content-Type, else from its shape (OCI
 * allows both to be absent).
 */
export function parseManifest(bytes: Buffer, contentType = "", what = "manifest"): ImageIndex | ImageManifest {
  const json = parseJsonObject(bytes, what);
  if (json.schemaVersion === 1) {
    throw new ImageError(
      `The ${what} is a Docker schema 1 manifest, which is deprecated and not supported; re-push the image with a current Docker or buildah`,
    );
  }
  if (json.schemaVersion !== 2) throw bad(what, `schemaVersion is ${JSON.stringify(json.schemaVersion)}, expected 2`);
  let mediaType = typeof json.mediaType === "string" ? json.mediaType : contentType;
  if (!mediaType || mediaType === "application/json" || mediaType === "application/octet-stream") {
    mediaType = Array.isArray(json.manifests) ? MEDIA_TYPES.ociIndex : MEDIA_TYPES.ociManifest;
  }
  if (mediaType === MEDIA_TYPES.ociIndex || mediaType === MEDIA_TYPES.dockerList) {
    if (!Array.isArray(json.manifests)) throw bad(what, "index has no manifests list");
    if (json.manifests.length > MAX_INDEX_ENTRIES) throw bad(what, `index has more than ${MAX_INDEX_ENTRIES} entries`);
    const manifests = json.manifests.map((m, i) => parseDescriptor(m, `${what} (entry ${i})`));
    return { kind: "index", mediaType, manifests };
  }
  if (mediaType === MEDIA_TYPES.ociManifest || mediaType === MEDIA_TYPES.dockerManifest) {
    const config = parseDescriptor(json.config, `${what} (config)`);
    if (!Array.isArray(json.layers)) throw bad(what, "manifest has no layers list");
    if (json.layers.length > MAX_LAYERS) throw bad(what, `more than ${MAX_LAYERS} layers`);
    const layers = json.layers.map((l, i) => parseDescriptor(l, `${what} (layer ${i})`));
    if (config.size > MAX_MANIFEST_BYTES) throw bad(what, `image config is ${config.size} bytes, more than ${MAX_MANIFEST_BYTES}`);
    return { kind: "manifest", mediaType, config, layers };
  }
  if (mediaType === MEDIA_TYPES.dockerSchema1 || mediaType === MEDIA_TYPES.dockerSchema1Signed) {
    throw new ImageError(`The ${what} is a Docker schema 1 manifest, which is not supported; re-push the image with a current Docker`);
  }
  throw new ImageError(`Unsupported ${what} media type ${JSON.stringify(mediaType.slice(0, 200))}: expected an OCI or Docker v2 image manifest or index`);
}

function stringList(v: unknown, what: string, field: string): string[] | null {
  if (v === undefined || v === null) return null;
  if (!Array.isArray(v) || !v.every((s) => typeof s === "string")) throw bad(what, `${field} is not a list of strings`);
  return v as string[];
}

/** Parses an image config blob (OCI or Docker: the same JSON). */
export function parseImageConfig(bytes: Buffer, what = "image config"): ImageConfig {
  const json = parseJsonObject(bytes, what);
  const c = json.config === undefined || json.config === null ? {} : json.config;
  if (!isObject(c)) throw bad(what, "config is not an object");
  const env = stringList(c.Env, what, "Env") ?? [];
  const exposed = c.ExposedPorts;
  let exposedPorts: string[] = [];
  if (exposed !== undefined && exposed !== null) {
    if (!isObject(exposed)) throw bad(what, "ExposedPorts is not an object");
    exposedPorts = Object.keys(exposed).sort();
  }
  const rootfs = json.rootfs;
  let diffIds: string[] = [];
  if (rootfs !== undefined && rootfs !== null) {
    if (!isObject(rootfs)) throw bad(what, "rootfs is not an object");
    if (rootfs.diff_ids !== undefined && rootfs.diff_ids !== null) {
      if (!Array.isArray(rootfs.diff_ids) || rootfs.diff_ids.length > MAX_LAYERS) throw bad(what, "rootfs.diff_ids is not a list");
      diffIds = rootfs.diff_ids.map((d) => {
        try {
          return parseDigest(d).digest;
        } catch (err) {
          throw bad(what, `rootfs.diff_ids: ${(err as Error).message}`);
        }
      });
    }
  }
  const str = (v: unknown, field: string): string => {
    if (v === undefined || v === null) return "";
    if (typeof v !== "string") throw bad(what, `${field} is not a string`);
    return v;
  };
  return {
    architecture: str(json.architecture, "architecture"),
    os: str(json.os, "os"),
    variant: str(json.variant, "variant") || undefined,
    entrypoint: stringList(c.Entrypoint, what, "Entrypoint"),
    cmd: stringList(c.Cmd, what, "Cmd"),
    env,
    workingDir: str(c.WorkingDir, "WorkingDir"),
    user: str(c.User, "User"),
    exposedPorts,
    labels: stringMap(c.Labels, what) ?? {},
    stopSignal: str(c.StopSignal, "StopSignal") || undefined,
    diffIds,
  };
}

/** "linux/arm64/v8". */
export function formatPlatform(p: Platform): string {
  return `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ""}`;
}

const ARCH_ALIASES: Record<string, string> = {
  x86_64: "amd64",
  "x86-64": "amd64",
  aarch64: "arm64",
  armhf: "arm",
  armel: "arm",
  i386: "386",
  i686: "386",
  x86: "386",
};

/** Normalises architecture names and default variants (arm64 → v8, arm → v7). */
export function normalizePlatform(p: Platform): Platform {
  const os = p.os.toLowerCase();
  let architecture = p.architecture.toLowerCase();
  let variant = p.variant?.toLowerCase() || undefined;
  if (p.architecture.toLowerCase() === "armhf") variant ??= "v7";
  if (p.architecture.toLowerCase() === "armel") variant ??= "v6";
  architecture = ARCH_ALIASES[architecture] ?? architecture;
  if (architecture === "arm64") {
    if (variant === undefined || variant === "8") variant = "v8";
  } else if (architecture === "arm") {
    if (variant === undefined) variant = "v7";
    else if (/^\d$/.test(variant)) variant = `v${variant}`;
  } else if (architecture === "amd64") {
    if (variant === "v1") variant = undefined;
  }
  return { os, architecture, ...(variant ? { variant } : {}) };
}

/**
 * Parses "os/arch[/variant]" (or takes a {@link Platform}) and normalises it.
 * Throws a TypeError naming the value when it is malformed.
 */
export function parsePlatformOption(value: string | Platform): Platform {
  if (typeof value === "object" && value !== null) {
    if (typeof value.os !== "string" || typeof value.architecture !== "string" || !value.os || !value.architecture) {
      throw new TypeError(`Invalid option platform: expected {os, architecture}, received ${JSON.stringify(value)}`);
    }
    return normalizePlatform(value);
  }
  if (typeof value !== "string") throw new TypeError(`Invalid option platform: expected "os/arch[/variant]", received ${typeof value}`);
  const parts = value.split("/");
  if (parts.length < 2 || parts.length > 3 || parts.some((s) => !/^[A-Za-z0-9_.-]+$/.test(s))) {
    throw new TypeError(`Invalid option platform: expected "os/arch[/variant]" like "linux/amd64", received ${JSON.stringify(value)}`);
  }
  return normalizePlatform({ os: parts[0]!, architecture: parts[1]!, ...(parts[2] ? { variant: parts[2] } : {}) });
}

/** The platform of this host (Linux; the architecture Node runs on). */
export function hostPlatform(): Platform {
  const map: Record<string, string> = { x64: "amd64", arm64: "arm64", arm: "arm", ia32: "386", ppc64: "ppc64le", s390x: "s390x", riscv64: "riscv64", loong64: "loong64", mips64el: "mips64le" };
  const architecture = map[process.arch] ?? process.arch;
  let variant: string | undefined;
  if (architecture === "arm") {
    const v = (process.config.variables as Record<string, unknown>).arm_version;
    variant = typeof v === "string" || typeof v === "number" ? `v${v}` : "v7";
  }
  return normalizePlatform({ os: "linux", architecture, ...(variant ? { variant } : {}) });
}

function matches(want: Platform, have: Platform): boolean {
  const h = normalizePlatform(have);
  if (h.os !== want.os || h.architecture !== want.architecture) return false;
  if (want.variant === undefined) return h.variant === undefined;
  if (h.variant === want.variant) return true;
  // A v7 arm host runs v6 and v5 images; prefer exact matches (see pickManifest).
  if (want.architecture === "arm" && h.variant && /^v[5-8]$/.test(h.variant) && /^v[5-8]$/.test(want.variant)) {
    return Number(h.variant.slice(1)) <= Number(want.variant.slice(1));
  }
  // amd64 microarchitecture levels: a v3 host runs v2 and v1 (= no variant) images.
  const hv = h.variant ?? (want.architecture === "amd64" ? "v1" : undefined);
  if (want.architecture === "amd64" && hv && /^v[1-4]$/.test(hv) && /^v[1-4]$/.test(want.variant)) {
    return Number(hv.slice(1)) <= Number(want.variant.slice(1));
  }
  return false;
}

function variantRank(p: Platform | undefined): number {
  const v = p?.variant;
  return v && /^v\d$/.test(v) ? Number(v.slice(1)) : 0;
}

/**
 * Picks the manifest for `want` from an index. Exact variant first, then the
 * best compatible one. Attestation entries ("unknown/unknown") are ignored.
 * No match → PlatformError listing what the image offers.
 */
export function pickManifest(index: ImageIndex, want: Platform, imageName: string): Descriptor {
  const candidates = index.manifests.filter(
    (m) => m.mediaType !== MEDIA_TYPES.ociIndex && m.mediaType !== MEDIA_TYPES.dockerList && m.platform && matches(want, m.platform),
  );
  if (candidates.length > 0) {
    const exact = candidates.find((m) => normalizePlatform(m.platform!).variant === want.variant);
    if (exact) return exact;
    return [...candidates].sort((a, b) => variantRank(b.platform) - variantRank(a.platform))[0]!;
  }
  const available = [
    ...new Set(
      index.manifests
        .filter((m) => m.platform && !(m.platform.os === "unknown" && m.platform.architecture === "unknown"))
        .map((m) => formatPlatform(m.platform!)),
    ),
  ];
  const wanted = formatPlatform(want);
  throw new PlatformError(
    `No manifest for platform ${wanted} in ${imageName}; it offers ${available.length ? available.join(", ") : "no platforms"}. ` +
      `Pick another image, or pass the platform option (e.g. platform: "${available[0] ?? "linux/amd64"}") if this host can run it.`,
    wanted,
    available,
  );
}

/** Throws PlatformError when a single-platform image's config declares another platform. */
export function checkConfigPlatform(config: ImageConfig, want: Platform, imageName: string): void {
  if (!config.os || !config.architecture) return;
  const have = normalizePlatform({ os: config.os, architecture: config.architecture, ...(config.variant ? { variant: config.variant } : {}) });
  if (have.os === want.os && have.architecture === want.architecture) return;
  const h = formatPlatform(have);
  throw new PlatformError(
    `${imageName} is built for ${h}, not ${formatPlatform(want)}; pass the platform option (platform: "${h}") if this host can run it, or use a multi-platform image`,
    formatPlatform(want),
    [h],
  );
}
