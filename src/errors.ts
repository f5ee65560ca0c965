/**
 * The typed error hierarchy of supermachine.
 *
 * Every error the library throws on purpose is a {@link SupermachineError}
 * with a stable, literal `code`. `instanceof` works across duplicate copies of
 * the library (two versions in one node_modules tree) because the check is by
 * a global symbol brand, not by prototype identity alone.
 *
 * Messages say what to change: the option, the environment variable or the
 * command that fixes the problem.
 */

import { guestText } from "./guest-text.js";

const BRAND = Symbol.for("@supermachine/core.error");

export type ErrorCode =
  | "ERR_SM_CLOSED"
  | "ERR_SM_GUEST_DIED"
  | "ERR_SM_PROTOCOL"
  | "ERR_SM_TIMEOUT"
  | "ERR_SM_ABORTED"
  | "ERR_SM_MISSING_ASSET"
  | "ERR_SM_QEMU"
  | "ERR_SM_AGENT"
  | "ERR_SM_FILE_TOO_LARGE"
  | "ERR_SM_OUTPUT_LIMIT"
  | "ERR_SM_IMAGE"
  | "ERR_SM_REGISTRY"
  | "ERR_SM_AUTH"
  | "ERR_SM_PROXY"
  | "ERR_SM_NOT_FOUND"
  | "ERR_SM_DIGEST_MISMATCH"
  | "ERR_SM_PLATFORM"
  | "ERR_SM_LAYER"
  | "ERR_SM_LAYER_LIMIT"
  | "ERR_SM_UNSAFE_PATH"
  | "ERR_SM_DISK_FULL"
  | "ERR_SM_SNAPSHOT"
  | "ERR_SM_POOL"
  | "ERR_SM_RESOURCE_LIMIT"
  | "ERR_SM_CONFINEMENT"
  | "ERR_SM_MOUNT"
  | "ERR_SM_UNSUPPORTED_PLATFORM";

export interface SupermachineErrorOptions {
  cause?: unknown;
}

export class SupermachineError extends Error {
  /** Stable machine-readable code; never changes between releases. */
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: SupermachineErrorOptions) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    Object.defineProperty(this, BRAND, { value: true });
  }

  override get name(): string {
    return this.constructor.name;
  }

  static override [Symbol.hasInstance](value: unknown): boolean {
    if (typeof value !== "object" || value === null) return false;
    if (!(value as Record<symbol, unknown>)[BRAND]) return false;
    // For subclasses, fall back to the prototype chain *and* the class name so
    // that copies of the library still agree on what a ClosedError is.
    if (this === SupermachineError) return true;
    let proto = Object.getPrototypeOf(value) as { constructor?: { name?: string } } | null;
    while (proto) {
      if (proto.constructor === this || proto.constructor?.name === this.name) return true;
      proto = Object.getPrototypeOf(proto) as typeof proto;
    }
    return false;
  }
}

/** The VM (or pool, or forwarder) was closed or destroyed; create a new one. */
export class ClosedError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_CLOSED", message, options);
  }
}

/**
 * The guest stopped: QEMU exited or the agent stopped answering. The message
 * and console tail are guest-influenced: both are stripped of control
 * characters and bounded (see guest-text.ts).
 */
export class GuestDiedError extends SupermachineError {
  /** The last lines the guest kernel and QEMU printed, for diagnosis (sanitized, ≤ 8 KiB). */
  readonly consoleTail: string;
  constructor(message: string, consoleTail = "", options?: SupermachineErrorOptions) {
    const tail = guestText(consoleTail, { maxChars: 8192, keep: "tail" });
    const text = guestText(message);
    super("ERR_SM_GUEST_DIED", tail ? `${text}\n--- guest console (tail) ---\n${tail}` : text, options);
    this.consoleTail = tail;
  }
}

/** The guest sent something the protocol does not allow; the VM was killed. */
export class ProtocolError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_PROTOCOL", message, options);
  }
}

/** An operation took longer than its deadline. The message names the option. */
export class TimeoutError extends SupermachineError {
  readonly timeoutMs: number;
  constructor(message: string, timeoutMs: number, options?: SupermachineErrorOptions) {
    super("ERR_SM_TIMEOUT", message, options);
    this.timeoutMs = timeoutMs;
  }
}

/** The caller's AbortSignal fired. `cause` holds the signal's reason. */
export class AbortError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_ABORTED", message, options);
  }
}

/** A host-side prerequisite is missing: kernel, agent, QEMU, a tool. */
export class MissingAssetError extends SupermachineError {
  readonly asset: string;
  constructor(asset: string, message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_MISSING_ASSET", message, options);
    this.asset = asset;
  }
}

/** QEMU refused to start or reported an error through QMP. */
export class QemuError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_QEMU", message, options);
  }
}

/**
 * QEMU's confinement could not be set up as configured
 * (SUPERMACHINE_QEMU_USER, SUPERMACHINE_CGROUP): the message names the
 * variable to change. See docs/confinement.md.
 */
export class ConfinementError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_CONFINEMENT", message, options);
  }
}

/**
 * The guest agent reported an error for one request (the VM stays usable).
 * The message comes from the guest: stripped of control characters and bounded.
 */
export class AgentError extends SupermachineError {
  /** The agent's wire error code, see docs/protocol.md. */
  readonly agentCode: number;
  constructor(agentCode: number, message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_AGENT", guestText(message), options);
    this.agentCode = agentCode;
  }
}

/** A file transfer exceeded the 4 MiB cap of writeFile/readFile/stageFiles. */
export class FileTooLargeError extends SupermachineError {
  readonly size: number;
  readonly limit: number;
  constructor(message: string, size: number, limit: number, options?: SupermachineErrorOptions) {
    super("ERR_SM_FILE_TOO_LARGE", message, options);
    this.size = size;
    this.limit = limit;
  }
}

/** exec() collected more output than maxOutputBytes; the process was killed. */
export class OutputLimitError extends SupermachineError {
  readonly stdout: Buffer;
  readonly stderr: Buffer;
  readonly limit: number;
  constructor(message: string, stdout: Buffer, stderr: Buffer, limit: number) {
    super("ERR_SM_OUTPUT_LIMIT", message);
    this.stdout = stdout;
    this.stderr = stderr;
    this.limit = limit;
  }
}

/** An image could not be resolved, read or turned into a root filesystem. */
export class ImageError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_IMAGE", message, options);
  }
}

/** A snapshot is missing, foreign, corrupt or could not be written. */
export class SnapshotError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_SNAPSHOT", message, options);
  }
}

/** A pool operation failed (e.g. acquire after shutdown). */
export class PoolError extends SupermachineError {
  constructor(message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_POOL", message, options);
  }
}

/**
 * A mount (`mounts[]`) cannot be served: its hostPath does not exist, is not
 * a directory, or cannot be opened. `option` names the field to change.
 */
export class MountError extends SupermachineError {
  readonly option: string;
  constructor(message: string, option: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_MOUNT", message, options);
    this.option = option;
  }
}

/** Validation helper: throws a TypeError naming the option and the value received. */
export function invalidOption(option: string, expected: string, received: unknown): TypeError {
  let shown: string;
  try {
    shown = typeof received === "string" ? JSON.stringify(received) : typeof received === "bigint" ? `${received}n` : String(JSON.stringify(received) ?? String(received));
  } catch {
    shown = Object.prototype.toString.call(received);
  }
  if (shown.length > 200) shown = `${shown.slice(0, 200)}…`;
  return new TypeError(`Invalid option ${option}: expected ${expected}, received ${shown}`);
}

/**
 * An image layer (a tar stream) is malformed or tries something the root
 * filesystem builder refuses (escaping the root, writing through a symlink,
 * hard-linking a missing file). `layer` is the layer's index in the image
 * (0 = base), `entry` the offending tar entry name when known.
 */
export class LayerError extends SupermachineError {
  readonly layer: number | undefined;
  readonly entry: string | undefined;
  constructor(message: string, details?: { layer?: number; entry?: string }, options?: SupermachineErrorOptions, code: "ERR_SM_LAYER" | "ERR_SM_LAYER_LIMIT" = "ERR_SM_LAYER") {
    super(code, message, options);
    this.layer = details?.layer;
    this.entry = details?.entry;
  }
}

/**
 * An image (its layers or blobs) crossed one of the caps of
 * src/rootfs/limits.ts: too many entries, too many uncompressed bytes, a
 * path too deep, PAX/xattr data too large, a blob too large. Reading stopped
 * at the crossing and nothing was left on disk. `limit` names the option
 * (`limits.<limit>`), `env` the environment variable that raises it.
 * Also an instance of {@link LayerError}.
 */
export class LayerLimitError extends LayerError {
  /** Which cap: "maxEntries", "maxBytes", "maxPathDepth", "maxPaxBytes", "maxXattrsPerEntry", "maxXattrBytes", "maxBlobBytes". */
  readonly limit: string;
  /** The cap's value that was crossed. */
  readonly max: number;
  constructor(message: string, limit: string, max: number, details?: { layer?: number; entry?: string }, options?: SupermachineErrorOptions) {
    super(message, details, options, "ERR_SM_LAYER_LIMIT");
    this.limit = limit;
    this.max = max;
  }
}

/**
 * A file or directory the host trusts (the runtime directory, a snapshot
 * directory and its files) is not what it must be: owned by another user,
 * writable by others, a symlink, not a regular file. `path` is the offender.
 */
export class UnsafePathError extends SupermachineError {
  readonly path: string;
  constructor(message: string, path: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_UNSAFE_PATH", message, options);
    this.path = path;
  }
}

/** The disk filled up (ENOSPC/EDQUOT) while writing `path`; free space and retry. */
export class DiskFullError extends SupermachineError {
  readonly path: string;
  constructor(message: string, path: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_DISK_FULL", message, options);
    this.path = path;
  }
}

/**
 * A registry answered with an error, could not be reached, or sent something
 * malformed. `registry` is the host[:port] that was asked, `status` the HTTP
 * status when there was one.
 */
export class RegistryError extends SupermachineError {
  readonly registry: string;
  readonly status: number | undefined;
  constructor(message: string, registry: string, status?: number, options?: SupermachineErrorOptions) {
    super("ERR_SM_REGISTRY", message, options);
    this.registry = registry;
    this.status = status;
  }
}

/**
 * A registry refused our credentials, or wanted some and we had none.
 * `credentialSource` says where credentials were looked for and which were
 * used: "none", "config.json auths (<path>)", "credential helper <name>", …
 */
export class AuthError extends SupermachineError {
  readonly registry: string;
  readonly credentialSource: string;
  constructor(message: string, registry: string, credentialSource: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_AUTH", message, options);
    this.registry = registry;
    this.credentialSource = credentialSource;
  }
}

/**
 * The HTTP proxy taken from the environment (`HTTPS_PROXY`, `HTTP_PROXY`,
 * `ALL_PROXY`, lower-case forms first) could not be used: unreachable,
 * refused the tunnel (e.g. 407 without or with wrong credentials), or is of
 * a kind we do not speak. `variable` names the environment variable to fix;
 * `proxy` is its URL without credentials.
 */
export class ProxyError extends SupermachineError {
  readonly proxy: string;
  readonly variable: string;
  /** The proxy's HTTP status when it answered (407, 403, 502, …). */
  readonly status: number | undefined;
  constructor(message: string, proxy: string, variable: string, status?: number, options?: SupermachineErrorOptions) {
    super("ERR_SM_PROXY", message, options);
    this.proxy = proxy;
    this.variable = variable;
    this.status = status;
  }
}

/** An image, tag, manifest or blob does not exist where it was looked for. */
export class NotFoundError extends SupermachineError {
  /** The image reference (or source) that was asked for. */
  readonly ref: string;
  /** The registry host, or the source ("oci:DIR", "cache", "docker daemon"). */
  readonly where: string;
  constructor(message: string, ref: string, where: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_NOT_FOUND", message, options);
    this.ref = ref;
    this.where = where;
  }
}

/** Content did not hash to the digest that names it; the bytes were discarded. */
export class DigestMismatchError extends SupermachineError {
  readonly expected: string;
  readonly actual: string;
  constructor(message: string, expected: string, actual: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_DIGEST_MISMATCH", message, options);
    this.expected = expected;
    this.actual = actual;
  }
}

/** No manifest of an image index matches the wanted platform. */
export class PlatformError extends SupermachineError {
  /** The platform that was wanted, e.g. "linux/amd64". */
  readonly wanted: string;
  /** The platforms the image offers, e.g. ["linux/arm64/v8", "linux/s390x"]. */
  readonly available: readonly string[];
  constructor(message: string, wanted: string, available: readonly string[], options?: SupermachineErrorOptions) {
    super("ERR_SM_PLATFORM", message, options);
    this.wanted = wanted;
    this.available = available;
  }
}

/**
 * A host resource budget was reached (docs/protocol.md, "Host limits"). When
 * the guest caused it (it stopped reading its channel while the host had to
 * write), the VM was ended; when the caller did (too many operations in
 * flight on one VM), only that request was refused. `resource` names the
 * budget, `limit` its value; the message names the option that raises it.
 */
export class ResourceLimitError extends SupermachineError {
  readonly resource: string;
  readonly limit: number;
  constructor(message: string, resource: string, limit: number, options?: SupermachineErrorOptions) {
    super("ERR_SM_RESOURCE_LIMIT", message, options);
    this.resource = resource;
    this.limit = limit;
  }
}

/**
 * This host cannot run supermachine for Linux: macOS, Windows, or a Linux on
 * another CPU than x86-64. Thrown on first use (Vm.boot, Image.build,
 * Image.fromSnapshot), never at import or install. The message says what to
 * use instead (for macOS: the original `@supermachine/core`).
 */
export class UnsupportedPlatformError extends SupermachineError {
  /** This host, as `<process.platform>-<process.arch>`, e.g. "darwin-arm64". */
  readonly platform: string;
  /** The hosts this build supports, e.g. ["linux-x64"]. */
  readonly supported: readonly string[];
  constructor(message: string, platform: string, supported: readonly string[], options?: SupermachineErrorOptions) {
    super("ERR_SM_UNSUPPORTED_PLATFORM", message, options);
    this.platform = platform;
    this.supported = supported;
  }
}
