/**
 * The CLI as a user runs it, in caches of its own: a temp cache and
 * snapshots directory (the guest kernel shared by a symlink, as
 * test/image/pull-boot.test.ts does) and a runtime dir of its own so
 * leftover VMs are told apart from other test files' VMs.
 */

import { spawn, spawnSync, type ChildProcess, type SpawnSyncReturns } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defaultCacheDir } from "../../src/paths.js";
import { REPO_ROOT, pidsMatching } from "../helpers.js";

export const BIN = join(REPO_ROOT, "bin", "supermachine.js");

export interface CliEnv {
  readonly work: string;
  readonly cacheDir: string;
  readonly snapshotsDir: string;
  readonly runtimeDir: string;
  readonly env: NodeJS.ProcessEnv;
  run(args: string[], o?: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number }): SpawnSyncReturns<string>;
  spawn(args: string[], o?: { env?: NodeJS.ProcessEnv }): ChildProcess;
  /** Like run() without blocking this process's event loop (servers in the test keep answering). */
  runAsync(args: string[], o?: { env?: NodeJS.ProcessEnv }): Promise<{ status: number | null; stdout: string; stderr: string }>;
  /** QEMU processes of this environment still alive. */
  qemus(): number[];
  /** Entries left in the runtime dir. */
  runtimeLeft(): string[];
  remove(): void;
}

export function cliEnv(name: string): CliEnv {
  const work = mkdtempSync(join(tmpdir(), `sm-cli-${name}-`));
  const cacheDir = join(work, "cache");
  const snapshotsDir = join(work, "snapshots");
  const runtimeDir = join(work, "rt");
  mkdirSync(cacheDir, { recursive: true });
  mkdirSync(runtimeDir);
  symlinkSync(join(defaultCacheDir(), "kernel"), join(cacheDir, "kernel"));
  // The QEMU setup built (when it did), as a user's cache has it.
  if (existsSync(join(defaultCacheDir(), "qemu"))) symlinkSync(join(defaultCacheDir(), "qemu"), join(cacheDir, "qemu"));
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    SUPERMACHINE_CACHE_DIR: cacheDir,
    SUPERMACHINE_SNAPSHOTS_DIR: snapshotsDir,
    SUPERMACHINE_RUNTIME_DIR: runtimeDir,
    SUPERMACHINE_ACCEL: process.env.SUPERMACHINE_ACCEL ?? "auto",
    SUPERMACHINE_DEBUG: "1",
  };
  const esc = runtimeDir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return {
    work,
    cacheDir,
    snapshotsDir,
    runtimeDir,
    env,
    run: (args, o = {}) =>
      spawnSync(process.execPath, [BIN, ...args], { encoding: "utf8", timeout: o.timeoutMs ?? 300_000, env: { ...env, ...o.env }, cwd: work, ...(o.input !== undefined ? { input: o.input } : {}) }),
    spawn: (args, o = {}) => spawn(process.execPath, [BIN, ...args], { env: { ...env, ...o.env }, cwd: work, stdio: ["pipe", "pipe", "pipe"] }),
    runAsync: (args, o = {}) =>
      new Promise((resolve) => {
        const child = spawn(process.execPath, [BIN, ...args], { env: { ...env, ...o.env }, cwd: work, stdio: ["ignore", "pipe", "pipe"] });
        let stdout = "";
        let stderr = "";
        child.stdout!.on("data", (b: Buffer) => (stdout += b.toString()));
        child.stderr!.on("data", (b: Buffer) => (stderr += b.toString()));
        child.once("close", (status) => resolve({ status, stdout, stderr }));
      }),
    qemus: () => pidsMatching(new RegExp(`qemu-system.*${esc}`)),
    runtimeLeft: () => {
      try {
        return readdirSync(join(runtimeDir, `supermachine-${process.getuid!()}`));
      } catch {
        return [];
      }
    },
    remove: () => rmSync(work, { recursive: true, force: true }),
  };
}
