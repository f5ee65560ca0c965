/**
 * Host processes for the benchmark's peers: run a command to completion
 * (output collected, exit status checked), or keep one running.
 */

import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Bytes written to stdin (then closed); stdin is /dev/null without it. */
  input?: Buffer;
  timeoutMs?: number;
  /**
   * The command leaves processes behind that keep its stdout/stderr open
   * (`runsc run -detach`): output goes to /dev/null and a temp file, and
   * the call resolves when the command itself exits.
   */
  detaches?: boolean;
}

/** Runs argv to completion; never rejects on a non-zero exit (see `check`). */
export function run(argv: readonly string[], o: RunOptions = {}): Promise<RunResult> {
  if (o.detaches) return runDetaching(argv, o);
  return new Promise((resolve, reject) => {
    const [cmd, ...args] = argv;
    const c = spawn(cmd!, args, {
      stdio: [o.input ? "pipe" : "ignore", "pipe", "pipe"],
      env: o.env ?? process.env,
      ...(o.cwd ? { cwd: o.cwd } : {}),
    });
    let stdout = "";
    let stderr = "";
    c.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    c.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr.length < 65536 ? (stderr += d) : undefined));
    if (o.input) c.stdin!.end(o.input);
    const timer = o.timeoutMs ? setTimeout(() => c.kill("SIGKILL"), o.timeoutMs) : undefined;
    c.once("error", (e) => {
      if (timer) clearTimeout(timer);
      reject(e);
    });
    c.once("close", (code, signal) => {
      if (timer) clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

async function runDetaching(argv: readonly string[], o: RunOptions): Promise<RunResult> {
  const dir = await mkdtemp(join(tmpdir(), "sm-bench-run-"));
  const errPath = join(dir, "stderr");
  const fd = openSync(errPath, "w");
  try {
    const [cmd, ...args] = argv;
    const c = spawn(cmd!, args, { stdio: ["ignore", "ignore", fd], env: o.env ?? process.env, ...(o.cwd ? { cwd: o.cwd } : {}) });
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      c.once("error", reject);
      c.once("exit", (code, signal) => resolve([code, signal]));
    });
    return { code, signal, stdout: "", stderr: readFileSync(errPath, "utf8").slice(0, 65536) };
  } finally {
    closeSync(fd);
    await rm(dir, { recursive: true, force: true });
  }
}

/** Runs argv; rejects unless it exits 0 (and, if given, prints `expect`). */
export async function check(argv: readonly string[], o: RunOptions & { expect?: string } = {}): Promise<RunResult> {
  const r = await run(argv, o);
  if (r.code !== 0 || (o.expect !== undefined && !r.stdout.includes(o.expect))) {
    throw new Error(
      `${argv.join(" ")} exited ${r.code ?? r.signal}${o.expect !== undefined ? ` (expected ${JSON.stringify(o.expect)} in stdout, got ${JSON.stringify(r.stdout.slice(0, 200))})` : ""}: ${r.stderr.trim().slice(0, 2000)}`,
    );
  }
  return r;
}

/** A long-running child, killed (with its process group) by stop(). */
export class Background {
  readonly child: ChildProcess;
  private readonly exited: Promise<void>;
  stderr = "";
  constructor(argv: readonly string[], env?: NodeJS.ProcessEnv) {
    const [cmd, ...args] = argv;
    this.child = spawn(cmd!, args, { stdio: ["ignore", "ignore", "pipe"], env: env ?? process.env, detached: true });
    this.child.stderr!.setEncoding("utf8").on("data", (d: string) => (this.stderr.length < 65536 ? (this.stderr += d) : undefined));
    this.exited = new Promise((r) => this.child.once("close", () => r()));
    this.child.once("error", () => undefined);
  }
  get pid(): number {
    return this.child.pid ?? -1;
  }
  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }
  async stop(): Promise<void> {
    if (this.running && this.child.pid) {
      try {
        process.kill(-this.child.pid, "SIGKILL");
      } catch {
        this.child.kill("SIGKILL");
      }
    }
    await this.exited;
  }
}

/** Waits for `cond` (polling), or throws naming `what`. */
export async function waitUntil(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
