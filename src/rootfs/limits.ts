/**
 * Caps on what one image's layers may cost the host. Layers are hostile: a
 * few kilobytes of gzip can expand to terabytes, announce millions of
 * entries, nest paths thousands deep or carry megabytes of PAX records that
 * would apply to every entry. Every cap below is checked while the stream is
 * read, as soon as it is crossed; the build stops with a
 * {@link LayerLimitError} naming the option and the environment variable
 * that raise it, and leaves nothing on disk (see README.md, "Limits").
 *
 * Precedence: an explicit option, then the environment variable, then the
 * default.
 */

import { invalidOption, LayerLimitError } from "../errors.js";

/** Caps of one image build (all layers together, unless said otherwise). */
export interface LayerLimits {
  /**
   * Tar entries over all layers (whiteouts and meta headers not counted as
   * entries, but every file, directory, link, device).
   * Env: SUPERMACHINE_LAYER_MAX_ENTRIES.
   * @default 1000000
   */
  readonly maxEntries?: number;
  /**
   * Uncompressed tar bytes over all layers: a gzip or zstd stream that
   * expands past this is stopped where it crosses it.
   * Env: SUPERMACHINE_LAYER_MAX_BYTES.
   * @default 34359738368 (32 GiB)
   */
  readonly maxBytes?: number;
  /**
   * Components of one entry path (`a/b/c` is 3).
   * Env: SUPERMACHINE_LAYER_MAX_DEPTH.
   * @default 256
   */
  readonly maxPathDepth?: number;
  /**
   * One PAX header ('x' or 'g'), the meta data pending for one entry, and the
   * global PAX state, each in bytes.
   * Env: SUPERMACHINE_LAYER_MAX_PAX_BYTES.
   * @default 1048576 (1 MiB)
   */
  readonly maxPaxBytes?: number;
  /**
   * xattrs of one entry (global PAX xattrs included).
   * Env: SUPERMACHINE_LAYER_MAX_XATTRS_PER_ENTRY.
   * @default 256
   */
  readonly maxXattrsPerEntry?: number;
  /**
   * xattr data kept in the tree over the whole image: names + values + a
   * fixed 256-byte overhead per xattr, a set shared by many entries (a
   * global PAX header's) counted once.
   * Env: SUPERMACHINE_LAYER_MAX_XATTR_BYTES.
   * @default 67108864 (64 MiB)
   */
  readonly maxXattrBytes?: number;
  /**
   * Size of one blob (a layer as downloaded, compressed) as its descriptor
   * announces it; checked before any byte is fetched.
   * Env: SUPERMACHINE_BLOB_MAX_BYTES.
   * @default 17179869184 (16 GiB)
   */
  readonly maxBlobBytes?: number;
}

/** {@link LayerLimits} with every cap filled in. */
export type ResolvedLayerLimits = { readonly [K in keyof LayerLimits]-?: number };

/** The default caps. */
export const DEFAULT_LAYER_LIMITS: ResolvedLayerLimits = Object.freeze({
  maxEntries: 1_000_000,
  maxBytes: 32 * 1024 ** 3,
  maxPathDepth: 256,
  maxPaxBytes: 1 << 20,
  maxXattrsPerEntry: 256,
  maxXattrBytes: 64 << 20,
  maxBlobBytes: 16 * 1024 ** 3,
});

/** Environment variable of each cap. */
export const LAYER_LIMIT_ENV: { readonly [K in keyof ResolvedLayerLimits]: string } = Object.freeze({
  maxEntries: "SUPERMACHINE_LAYER_MAX_ENTRIES",
  maxBytes: "SUPERMACHINE_LAYER_MAX_BYTES",
  maxPathDepth: "SUPERMACHINE_LAYER_MAX_DEPTH",
  maxPaxBytes: "SUPERMACHINE_LAYER_MAX_PAX_BYTES",
  maxXattrsPerEntry: "SUPERMACHINE_LAYER_MAX_XATTRS_PER_ENTRY",
  maxXattrBytes: "SUPERMACHINE_LAYER_MAX_XATTR_BYTES",
  maxBlobBytes: "SUPERMACHINE_BLOB_MAX_BYTES",
});

/**
 * Fills in every cap: option, else environment variable, else default.
 *
 * @throws {TypeError} an option or environment variable that is not a positive safe integer
 */
export function resolveLayerLimits(limits: LayerLimits | ResolvedLayerLimits | undefined, env: NodeJS.ProcessEnv = process.env): ResolvedLayerLimits {
  if (limits !== undefined && (typeof limits !== "object" || limits === null)) throw invalidOption("limits", "an object of caps", limits);
  const out: Record<string, number> = {};
  for (const key of Object.keys(DEFAULT_LAYER_LIMITS) as Array<keyof ResolvedLayerLimits>) {
    const given = limits?.[key];
    if (given !== undefined) {
      if (!Number.isSafeInteger(given) || given < 1) throw invalidOption(`limits.${key}`, "a positive integer", given);
      out[key] = given;
      continue;
    }
    const raw = env[LAYER_LIMIT_ENV[key]];
    if (raw !== undefined && raw !== "") {
      const n = Number(raw);
      if (!/^[0-9]+$/.test(raw) || !Number.isSafeInteger(n) || n < 1) throw invalidOption(`${LAYER_LIMIT_ENV[key]} (environment)`, "a positive integer", raw);
      out[key] = n;
      continue;
    }
    out[key] = DEFAULT_LAYER_LIMITS[key];
  }
  return out as ResolvedLayerLimits;
}

/** The error for a crossed cap: names the option and the environment variable. */
export function limitError(key: keyof ResolvedLayerLimits, max: number, what: string, entry?: string): LayerLimitError {
  return new LayerLimitError(
    `${what}, over the cap of ${max} (limits.${key}; raise it with the ${key} option or ${LAYER_LIMIT_ENV[key]} if the image is trusted)`,
    key,
    max,
    entry === undefined ? undefined : { entry },
  );
}

/**
 * What the layers of one image have used so far; shared by every layer of a
 * build so that the caps hold for the image, not per layer.
 */
export class LayerBudget {
  entries = 0;
  bytes = 0;
  xattrBytes = 0;
  /** xattr maps already charged (a shared set is charged once). */
  readonly charged = new WeakMap<ReadonlyMap<string, Buffer>, Map<string, Buffer>>();

  constructor(readonly limits: ResolvedLayerLimits) {}

  /** Charges `n` more uncompressed bytes; throws as soon as the cap is crossed. */
  addBytes(n: number): void {
    this.bytes += n;
    if (this.bytes > this.limits.maxBytes) throw limitError("maxBytes", this.limits.maxBytes, `the image's layers expand to more than ${this.limits.maxBytes} bytes of tar`);
  }

  /** Charges one entry. */
  addEntry(entry?: string): void {
    this.entries++;
    if (this.entries > this.limits.maxEntries) throw limitError("maxEntries", this.limits.maxEntries, `the image's layers hold more than ${this.limits.maxEntries} entries`, entry);
  }

  /** Charges xattr data kept in the tree. */
  addXattrBytes(n: number, entry?: string): void {
    this.xattrBytes += n;
    if (this.xattrBytes > this.limits.maxXattrBytes) throw limitError("maxXattrBytes", this.limits.maxXattrBytes, `the image's xattrs take more than ${this.limits.maxXattrBytes} bytes`, entry);
  }
}
