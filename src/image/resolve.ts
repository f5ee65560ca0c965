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
import { ImageError } from "../errors.js";
import { acquireLock } from "../oci/lock.js";
import { openLayer, pullImage, type PullOptions, type PullProgress } from "../oci/pull.js";
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

/** Pulls `ref` and returns a bootable root filesystem image for it. */
export async function resolveImage(ref: string, o: ResolveImageOptions = {}): Promise<ResolvedImage> {
  const cacheDir = o.cacheDir ?? defaultCacheDir();
  const { onProgress: userProgress, ...pullOpts } = o;
  const onProgress = tracedProgress(userProgress);
  const pulled = await pullImage(ref, {
    ...pullOpts,
    cacheDir,
    ...(onProgress ? { onProgress: (p: PullProgress) => onProgress({ stage: "pull", ...p }) } : {}),
  });
  const hex = pulled.manifestDigest.replace(/^sha256:/, "").replace(/[^0-9a-f]/g, "");
  if (hex.length < 32) throw new ImageError(`unexpected manifest digest ${pulled.manifestDigest} for ${ref}`);
  const dir = join(cacheDir, "rootfs");
  const out = join(dir, `${hex}.erofs`);
  if (existsSync(out)) {
    onProgress?.({ stage: "rootfs-cached" });
  } else {
    await mkdir(dir, { recursive: true });
    // One builder per image across processes; others wait for its result.
    const lock = await acquireLock(`${out}.lock`, { until: async () => existsSync(out), ...(o.signal ? { signal: o.signal } : {}) });
    try {
      if (!existsSync(out)) {
        const spoolPath = join(dir, `.spool-${process.pid}-${randomBytes(4).toString("hex")}`);
        try {
          await buildRootfsImage({
            source: { kind: "layers", layers: pulled.layers.map((l) => () => openLayer(l)), spoolPath },
            out,
            ...(o.limits ? { limits: o.limits } : {}),
            ...(o.signal ? { signal: o.signal } : {}),
            ...(onProgress ? { onProgress: (p) => onProgress({ stage: "unpack", layer: p.layer, layers: pulled.layers.length, bytes: p.bytes }), onPack: () => onProgress({ stage: "pack" }) } : {}),
          });
        } finally {
          await unlink(spoolPath).catch(() => undefined);
        }
      }
    } finally {
      await lock?.release();
    }
  }
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
