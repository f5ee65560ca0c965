/**
 * From an image reference to what a VM boots: the image is pulled (or read
 * from an offline source), its layers are applied into an erofs root
 * filesystem image cached by manifest digest, and its config becomes the
 * guest's environment, working directory and user.
 */

import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, unlink } from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { AbortError, ImageError } from "../errors.js";
import { acquireLock } from "../oci/lock.js";
import { openArrivingLayer, openLayer, pullImage, type PulledImage, type PullOptions, type PullProgress } from "../oci/pull.js";
import type { ImageConfig } from "../oci/manifest.js";
import { tracedProgress } from "../diagnostics.js";
import { defaultCacheDir } from "../paths.js";
import { buildRootfsImage } from "../rootfs/index.js";
import { recordImageUse } from "./cache-admin.js";
import type { GuestConfig } from "../vm/vm.js";

export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/**
 * Progress of pulling, unpacking and baking one image: `pull` per layer
 * (bytes), `unpack` per layer (uncompressed bytes applied), `pack` when the
 * erofs image is written, `rootfs-cached` when it already was; Image.build
 * adds `bake` phases (boot, warmup, snapshot, done) or `snapshot-cached`.
 */
export type ImageProgress =
  | ({ stage: "pull" } & PullProgress)
  | { stage: "unpack"; layer: number; layers: number; bytes: number }
  | { stage: "pack" }
  | { stage: "rootfs-cached" }
  | { stage: "bake"; phase: "boot" | "warmup" | "snapshot" | "done"; name: string }
  | { stage: "snapshot-cached"; name: string };

export interface ResolveImageOptions extends Omit<PullOptions, "onProgress"> {
  onProgress?: (p: ImageProgress) => void;
}

export interface ResolvedImage {
  /** The normalised reference. */
  ref: string;
  /** Digest of the platform manifest (the image's identity). */
  manifestDigest: string;
  /** erofs root filesystem image, read-only, shared by every VM of the image. */
  rootfsImage: string;
  /** Environment, working directory and user for the guest. */
  config: GuestConfig;
  /** The full OCI image config (Entrypoint, Cmd, ExposedPorts, ...). */
  imageConfig: ImageConfig;
}

/** The OCI config as the guest's defaults; PATH added when the image has none (as Docker does). */
export function guestConfigOf(c: ImageConfig): GuestConfig {
  const env = [...c.env];
  if (!env.some((e) => e.startsWith("PATH="))) env.unshift(`PATH=${DEFAULT_PATH}`);
  return {
    env,
    ...(c.workingDir ? { workingDir: c.workingDir } : {}),
    ...(c.user ? { user: c.user } : {}),
  };
}

/**
 * Pulls `ref` and returns a bootable root filesystem image for it. The layers
 * are unpacked while they download (pullImage's `onEarly`): as soon as the
 * manifest is known, the root filesystem build starts on layer 0's bytes as
 * they arrive, so download, decompression and unpacking overlap. A layer's
 * stream ends only once its blob is verified, so the image is never published
 * from bytes that did not match their digest. Sources that report no early
 * layers (the Docker daemon) build after the pull.
 */
export async function resolveImage(ref: string, o: ResolveImageOptions = {}): Promise<ResolvedImage> {
  const cacheDir = o.cacheDir ?? defaultCacheDir();
  const { onProgress: userProgress, signal: userSignal, ...pullOpts } = o;
  const onProgress = tracedProgress(userProgress);
  // A failed build stops the pull (and a stopped caller both).
  const stop = new AbortController();
  const onUserAbort = (): void => stop.abort(userSignal?.reason);
  if (userSignal?.aborted) onUserAbort();
  else userSignal?.addEventListener("abort", onUserAbort, { once: true });
  const build = (manifestDigest: string, layers: number, open: (i: number) => Readable): Promise<string> =>
    buildRootfs(manifestDigest, layers, open, { cacheDir, limits: o.limits, signal: stop.signal, onProgress });
  let early: Promise<string> | undefined;
  try {
    const pulling = pullImage(ref, {
      ...pullOpts,
      cacheDir,
      signal: stop.signal,
      ...(onProgress ? { onProgress: (p: PullProgress) => onProgress({ stage: "pull", ...p }) } : {}),
      // SUPERMACHINE_PULL_OVERLAP=0 (internal, for comparisons): unpack after the pull.
      onEarly: process.env.SUPERMACHINE_PULL_OVERLAP === "0" ? undefined : (e) => {
        early = build(e.manifestDigest, e.layers.length, (i) => openArrivingLayer(e.layers[i]!.layer, e.layers[i]!.arrival));
        // A failed build stops the pull; the error is thrown below.
        early.catch(() => stop.abort(new AbortError("the image build failed")));
      },
    });
    let pulled: PulledImage;
    try {
      pulled = await pulling;
    } catch (err) {
      const built = early ? await early.then(() => undefined, (e: unknown) => e) : undefined;
      // The build's error when it stopped the pull; else the pull's own.
      if (built !== undefined && !userSignal?.aborted && err instanceof AbortError) throw built;
      throw err;
    }
    const out = await (early ?? build(pulled.manifestDigest, pulled.layers.length, (i) => openLayer(pulled.layers[i]!)));
    await recordImageUse(out, {
      ref: pulled.ref,
      digest: pulled.manifestDigest,
      blobs: pulled.layers.map((l) => ({ digest: l.digest, size: l.size, path: l.path })),
      cacheDir,
    });
    return {
      ref: pulled.ref,
      manifestDigest: pulled.manifestDigest,
      rootfsImage: out,
      config: guestConfigOf(pulled.config),
      imageConfig: pulled.config,
    };
  } finally {
    userSignal?.removeEventListener("abort", onUserAbort);
  }
}

/** The erofs image of the manifest `manifestDigest` in the cache: built from its layers unless already there. */
async function buildRootfs(
  manifestDigest: string,
  layers: number,
  open: (i: number) => Readable,
  o: { cacheDir: string; limits: ResolveImageOptions["limits"]; signal: AbortSignal; onProgress: ((p: ImageProgress) => void) | undefined },
): Promise<string> {
  const { onProgress } = o;
  const hex = manifestDigest.replace(/^sha256:/, "").replace(/[^0-9a-f]/g, "");
  if (hex.length < 32) throw new ImageError(`unexpected manifest digest ${manifestDigest}`);
  const dir = join(o.cacheDir, "rootfs");
  const out = join(dir, `${hex}.erofs`);
  if (existsSync(out)) {
    onProgress?.({ stage: "rootfs-cached" });
    return out;
  }
  await mkdir(dir, { recursive: true });
  // One builder per image across processes; others wait for its result.
  const lock = await acquireLock(`${out}.lock`, { until: async () => existsSync(out), signal: o.signal });
  try {
    if (!existsSync(out)) {
      const spoolPath = join(dir, `.spool-${process.pid}-${randomBytes(4).toString("hex")}`);
      try {
        await buildRootfsImage({
          source: { kind: "layers", layers: Array.from({ length: layers }, (_, i) => () => open(i)), spoolPath },
          out,
          ...(o.limits ? { limits: o.limits } : {}),
          signal: o.signal,
          ...(onProgress ? { onProgress: (p) => onProgress({ stage: "unpack", layer: p.layer, layers, bytes: p.bytes }), onPack: () => onProgress({ stage: "pack" }) } : {}),
        });
      } finally {
        await unlink(spoolPath).catch(() => undefined);
      }
    }
  } finally {
    await lock?.release();
  }
  return out;
}

/** For the CLI: IMAGE → root filesystem image + config, with progress lines. */
export async function resolveRootfs(ref: string, o: { onProgress?: (message: string) => void } = {}): Promise<{ rootfsImage: string; config: GuestConfig; imageConfig: ImageConfig }> {
  let last = "";
  const say = (m: string) => {
    if (m !== last) o.onProgress?.(m);
    last = m;
  };
  const r = await resolveImage(ref, {
    onProgress: (p) => {
      if (p.stage === "pull" && p.bytesDone === p.bytesTotal) say(`layer ${p.layer + 1} ${p.digest.slice(7, 19)}: ${p.phase === "cached" ? "cached" : `${p.bytesTotal} bytes pulled`}`);
      else if (p.stage === "unpack" && p.bytes === 0) say(`unpacking layer ${p.layer + 1}/${p.layers}`);
    },
  });
  return { rootfsImage: r.rootfsImage, config: r.config, imageConfig: r.imageConfig };
}
