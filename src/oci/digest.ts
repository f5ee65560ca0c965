/**
 * Content digests ("sha256:<64 hex>", "sha512:<128 hex>"): parsing, and
 * hashing while streaming.
 */

import { createHash, type Hash } from "node:crypto";

export type DigestAlgorithm = "sha256" | "sha512";

export interface ParsedDigest {
  readonly algorithm: DigestAlgorithm;
  /** Lower-case hex. */
  readonly hex: string;
  /** `algorithm:hex`. */
  readonly digest: string;
}

const HEX_LENGTH: Record<DigestAlgorithm, number> = { sha256: 64, sha512: 128 };

/**
 * Parses a digest, accepting only sha256 and sha512 with lower-case hex of the
 * right length. Throws a TypeError otherwise. The hex of a parsed digest is
 * safe to use as a file name.
 */
export function parseDigest(digest: unknown): ParsedDigest {
  if (typeof digest !== "string") throw new TypeError(`Invalid digest: expected a string, received ${typeof digest}`);
  const colon = digest.indexOf(":");
  const shown = JSON.stringify(digest.length > 160 ? `${digest.slice(0, 160)}…` : digest);
  if (colon < 0) throw new TypeError(`Invalid digest ${shown}: expected algorithm:hex`);
  const algorithm = digest.slice(0, colon);
  const hex = digest.slice(colon + 1);
  if (algorithm !== "sha256" && algorithm !== "sha512") {
    throw new TypeError(`Unsupported digest algorithm in ${shown}: only sha256 and sha512 are supported`);
  }
  const want = HEX_LENGTH[algorithm];
  if (hex.length !== want || !/^[a-f0-9]+$/.test(hex)) {
    throw new TypeError(`Invalid digest ${shown}: ${algorithm} needs ${want} lower-case hex digits`);
  }
  return { algorithm, hex, digest };
}

/** True when `digest` parses (see {@link parseDigest}). */
export function isDigest(digest: unknown): digest is string {
  try {
    parseDigest(digest);
    return true;
  } catch {
    return false;
  }
}

/** Hashes bytes with the algorithm of `like` (a digest) and returns `alg:hex`. */
export function digestOf(bytes: Uint8Array, algorithm: DigestAlgorithm = "sha256"): string {
  return `${algorithm}:${createHash(algorithm).update(bytes).digest("hex")}`;
}

/** A streaming digester. */
export class Digester {
  readonly algorithm: DigestAlgorithm;
  private hash: Hash;
  bytes = 0;
  constructor(algorithm: DigestAlgorithm = "sha256") {
    this.algorithm = algorithm;
    this.hash = createHash(algorithm);
  }
  update(chunk: Uint8Array): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
  }
  /** Finishes and returns `alg:hex`; the digester can't be used afterwards. */
  digest(): string {
    return `${this.algorithm}:${this.hash.digest("hex")}`;
  }
}
