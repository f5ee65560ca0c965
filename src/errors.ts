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
  | "ERR_SM_NOT_FOUND"
  | "ERR_SM_DIGEST_MISMATCH"
  | "ERR_SM_PLATFORM"
  | "ERR_SM_LAYER"
  | "ERR_SM_DISK_FULL"
  | "ERR_SM_SNAPSHOT"
  | "ERR_SM_POOL";

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

  static [Symbol.hasInstance](value: unknown): boolean {
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

/** The guest stopped: QEMU exited or the agent stopped answering. */
export class GuestDiedError extends SupermachineError {
  /** The last lines the guest kernel and QEMU printed, for diagnosis. */
  readonly consoleTail: string;
  constructor(message: string, consoleTail = "", options?: SupermachineErrorOptions) {
    super("ERR_SM_GUEST_DIED", consoleTail ? `${message}\n--- guest console (tail) ---\n${consoleTail}` : message, options);
    this.consoleTail = consoleTail;
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

/** The guest agent reported an error for one request (the VM stays usable). */
export class AgentError extends SupermachineError {
  /** The agent's wire error code, see docs/protocol.md. */
  readonly agentCode: number;
  constructor(agentCode: number, message: string, options?: SupermachineErrorOptions) {
    super("ERR_SM_AGENT", message, options);
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
