/**
 * ExecOptions and their validation at the edge: bad input becomes a
 * TypeError (or FileTooLargeError) naming the option and the value.
 */

import { FileTooLargeError, invalidOption } from "../errors.js";
import { FILE_LIMIT } from "../protocol/constants.js";

/** A file staged into the guest with an explicit mode. */
export interface StagedFileMode {
  /** Absolute path in the guest. */
  readonly path: string;
  /** Content (≤ 4 MiB). `bytes` is accepted as an alias. */
  readonly data?: Uint8Array;
  readonly bytes?: Uint8Array;
  /** Permission bits, e.g. 0o755 for scripts. */
  readonly mode: number;
}

export interface Winsize {
  readonly cols: number;
  readonly rows: number;
}

export interface ExecOptions {
  /** Program and arguments; argv[0] is resolved through PATH inside the guest. Strings or raw bytes. */
  readonly argv: readonly (string | Uint8Array)[];
  /** Files to drop into the guest before the exec (mode 0o644). @default {} */
  readonly stageFiles?: Readonly<Record<string, Uint8Array>>;
  /** Like stageFiles, with explicit per-file modes. */
  readonly stageFilesMode?: readonly StagedFileMode[];
  /**
   * Hard wall-clock kill of the whole process tree; exitCode is then -1.
   * 0 disables it. @default 60000 for exec(); none for spawn()
   */
  readonly timeoutMs?: number;
  /** Per-exec environment, merged over the image's. @default {} */
  readonly env?: Readonly<Record<string, string>>;
  /** Working directory inside the guest. @default the image's WorkingDir, else "/" */
  readonly cwd?: string;
  /** Run only if argv exits 0 (saves a round trip). */
  readonly chain?: readonly (string | Uint8Array)[];
  /** Allocate a pty; stdout and stderr merge onto stdout. @default false */
  readonly tty?: boolean;
  /** Initial pty size (tty only). @default {cols: 80, rows: 24} */
  readonly winsize?: Winsize;
  /** (extension) User to run as: name or uid[:gid]. @default the image's User, else root */
  readonly user?: string;
  /**
   * (extension) Run the process tree in a cgroup of its own: a timeout or kill
   * reaches every process, daemons that left the session included, and
   * peakRssKib is the whole tree's peak. Costs ~2 ms per exec under TCG.
   * Without it, kills reach the process group and session, and peakRssKib is
   * the largest single process's peak. @default false for exec(), true for spawn()
   */
  readonly isolateTree?: boolean;
  /** (extension) Kills the process when aborted; the call rejects with AbortError. */
  readonly signal?: AbortSignal;
  /**
   * (extension) exec() only: the most stdout+stderr bytes kept. Past it the
   * process is killed and exec rejects with OutputLimitError holding what
   * arrived. @default 67108864 (64 MiB)
   */
  readonly maxOutputBytes?: number;
}

export interface ExecOutput {
  stdout: Buffer;
  stderr: Buffer;
  /** Exit status; -1 if killed by a signal or the timeout. */
  exitCode: number;
  /** (extension) The timeout killed the process. */
  timedOut: boolean;
  /** (extension) Peak memory of the process tree (KiB), from the guest kernel. */
  peakRssKib: number | null;
  /**
   * (extension) The signal that killed the process (exitCode is then -1), or
   * null when it exited on its own. A shell reports such a death as 128 +
   * signal (143 for SIGTERM), and so does `supermachine run`.
   */
  signal: number | null;
}

export interface ExecWaitResult {
  /** Exit status; -1 if killed by a signal or the timeout. */
  exitCode: number;
  timedOut: boolean;
  peakRssKib: number | null;
  /** (extension) The signal that killed the process, or null (see ExecOutput.signal). */
  signal: number | null;
}

export const DEFAULT_EXEC_TIMEOUT_MS = 60_000;
export const DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024;

export interface ValidExec {
  argv: Uint8Array[];
  env: Uint8Array[];
  cwd?: Uint8Array;
  timeoutMs: number;
  chain?: Uint8Array[];
  tty?: { cols: number; rows: number };
  user?: string;
  files: { path: Uint8Array; data: Uint8Array; mode: number }[];
  signal?: AbortSignal;
  maxOutputBytes: number;
  isolateTree?: boolean;
}

function bytesArg(v: unknown, name: string): Uint8Array {
  if (typeof v === "string") {
    if (v.includes("\0")) throw invalidOption(name, "a string without NUL characters", v);
    return Buffer.from(v, "utf8");
  }
  if (v instanceof Uint8Array) {
    if (v.includes(0)) throw invalidOption(name, "bytes without NUL", "<bytes with a NUL>");
    return v;
  }
  throw invalidOption(name, "a string or a Buffer", v);
}

function argvArg(v: unknown, name: string): Uint8Array[] {
  if (!Array.isArray(v) || v.length === 0) throw invalidOption(name, "a non-empty array of strings", v);
  return v.map((a, i) => bytesArg(a, `${name}[${i}]`));
}

function guestPath(p: unknown, name: string): Uint8Array {
  if (typeof p !== "string" || !p.startsWith("/") || p.includes("\0")) throw invalidOption(name, "an absolute guest path", p);
  return Buffer.from(p, "utf8");
}

function fileData(v: unknown, name: string): Uint8Array {
  if (!(v instanceof Uint8Array)) throw invalidOption(name, "a Buffer or Uint8Array", v);
  if (v.length > FILE_LIMIT) {
    throw new FileTooLargeError(`${name} is ${v.length} bytes, over the ${FILE_LIMIT}-byte (4 MiB) limit of staged files; stage a smaller file or split it`, v.length, FILE_LIMIT);
  }
  return v;
}

export function validTimeout(v: unknown, name: string, dflt: number): number {
  if (v === undefined) return dflt;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > 2 ** 40) throw invalidOption(name, "a non-negative integer number of milliseconds", v);
  return v;
}

function winsizeArg(v: unknown): { cols: number; rows: number } {
  if (v === undefined) return { cols: 80, rows: 24 };
  const w = v as Winsize;
  if (typeof v !== "object" || v === null || !Number.isInteger(w.cols) || !Number.isInteger(w.rows) || w.cols < 1 || w.rows < 1 || w.cols > 65535 || w.rows > 65535) {
    throw invalidOption("winsize", "{cols, rows} with integers in 1..65535", v);
  }
  return { cols: w.cols, rows: w.rows };
}

/** Validates ExecOptions; `defaultTimeout` differs between exec and spawn. */
export function validateExec(o: unknown, defaultTimeout: number): ValidExec {
  if (typeof o !== "object" || o === null) throw invalidOption("options", "an ExecOptions object", o);
  const x = o as ExecOptions;
  const argv = argvArg(x.argv, "argv");
  const env: Uint8Array[] = [];
  if (x.env !== undefined) {
    if (typeof x.env !== "object" || x.env === null) throw invalidOption("env", "a Record<string, string>", x.env);
    for (const [k, v] of Object.entries(x.env)) {
      if (!k || k.includes("=") || k.includes("\0")) throw invalidOption(`env key`, "a name without '=' or NUL", k);
      if (typeof v !== "string" || v.includes("\0")) throw invalidOption(`env.${k}`, "a string without NUL", v);
      env.push(Buffer.from(`${k}=${v}`, "utf8"));
    }
  }
  const files: ValidExec["files"] = [];
  if (x.stageFiles !== undefined) {
    if (typeof x.stageFiles !== "object" || x.stageFiles === null) throw invalidOption("stageFiles", "a Record<path, Buffer>", x.stageFiles);
    for (const [p, data] of Object.entries(x.stageFiles)) {
      files.push({ path: guestPath(p, `stageFiles key`), data: fileData(data, `stageFiles[${JSON.stringify(p)}]`), mode: 0o644 });
    }
  }
  if (x.stageFilesMode !== undefined) {
    if (!Array.isArray(x.stageFilesMode)) throw invalidOption("stageFilesMode", "an array of {path, data, mode}", x.stageFilesMode);
    x.stageFilesMode.forEach((f: StagedFileMode, i: number) => {
      if (typeof f !== "object" || f === null) throw invalidOption(`stageFilesMode[${i}]`, "{path, data, mode}", f);
      if (!Number.isInteger(f.mode) || f.mode < 0 || f.mode > 0o7777) throw invalidOption(`stageFilesMode[${i}].mode`, "permission bits (0..0o7777)", f.mode);
      files.push({ path: guestPath(f.path, `stageFilesMode[${i}].path`), data: fileData(f.data ?? f.bytes, `stageFilesMode[${i}].data`), mode: f.mode });
    });
  }
  let cwd: Uint8Array | undefined;
  if (x.cwd !== undefined) cwd = guestPath(x.cwd, "cwd");
  const chain = x.chain === undefined ? undefined : argvArg(x.chain, "chain");
  if (x.tty !== undefined && typeof x.tty !== "boolean") throw invalidOption("tty", "a boolean", x.tty);
  if (x.winsize !== undefined && !x.tty) throw invalidOption("winsize", "to be used with tty: true", x.winsize);
  const tty = x.tty ? winsizeArg(x.winsize) : undefined;
  if (x.user !== undefined && (typeof x.user !== "string" || !/^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$/.test(x.user))) {
    throw invalidOption("user", "a user name or uid, optionally :group or :gid", x.user);
  }
  if (x.isolateTree !== undefined && typeof x.isolateTree !== "boolean") throw invalidOption("isolateTree", "a boolean", x.isolateTree);
  if (x.signal !== undefined && !(x.signal instanceof AbortSignal)) throw invalidOption("signal", "an AbortSignal", x.signal);
  const maxOutputBytes = x.maxOutputBytes ?? DEFAULT_MAX_OUTPUT;
  if (!Number.isInteger(maxOutputBytes) || maxOutputBytes < 0) throw invalidOption("maxOutputBytes", "a non-negative integer", x.maxOutputBytes);
  return {
    argv,
    env,
    ...(cwd ? { cwd } : {}),
    timeoutMs: validTimeout(x.timeoutMs, "timeoutMs", defaultTimeout),
    ...(chain ? { chain } : {}),
    ...(tty ? { tty } : {}),
    ...(x.user ? { user: x.user } : {}),
    files,
    ...(x.signal ? { signal: x.signal } : {}),
    maxOutputBytes,
    ...(x.isolateTree !== undefined ? { isolateTree: x.isolateTree } : {}),
  };
}
