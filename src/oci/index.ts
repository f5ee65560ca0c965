/**
 * src/oci: from an image reference to verified, cached layer blobs and a
 * parsed image config. The public face of the folder.
 *
 *   const image = await pullImage("alpine:latest", { pullPolicy: "missing" });
 *   for (const layer of image.layers) openLayer(layer).pipe(…) // decompressed tar
 */

export { pullImage, openLayer, sniffCompression, validatePullOptions } from "./pull.js";
export type { PullOptions, PullPolicy, PullProgress, PulledImage, PulledLayer, LayerBlob } from "./pull.js";
export { parseReference, familiarName, isDockerHub, DOCKER_HUB_DOMAIN, DOCKER_HUB_REGISTRY } from "./reference.js";
export type { ImageReference } from "./reference.js";
export { parseDigest, isDigest, digestOf } from "./digest.js";
export type { ParsedDigest, DigestAlgorithm } from "./digest.js";
export {
  MEDIA_TYPES,
  MANIFEST_ACCEPT,
  parseManifest,
  parseImageConfig,
  pickManifest,
  hostPlatform,
  formatPlatform,
  normalizePlatform,
  parsePlatformOption,
  layerCompression,
} from "./manifest.js";
export type { Descriptor, ImageConfig, ImageIndex, ImageManifest, LayerCompression, Platform } from "./manifest.js";
export { BlobCache, defaultCacheDir } from "./cache.js";
export type { IngestResult, RefRecord } from "./cache.js";
export { RegistryClient } from "./registry.js";
export type { RegistryClientOptions } from "./registry.js";
export {
  loadDockerConfig,
  loadContainersAuth,
  containersAuthPath,
  resolveCredentials,
  dockerConfigDir,
  normalizeAuthKey,
  parseWwwAuthenticate,
  clearTokenCache,
} from "./auth.js";
export type { Credentials, DockerConfig, ResolvedCredentials, Challenge } from "./auth.js";
export { dockerSocketPath } from "./sources.js";
