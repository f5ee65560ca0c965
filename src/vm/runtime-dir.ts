/**
 * Per-VM runtime directories (sockets) under one parent per user:
 * `$TMPDIR/supermachine-<uid>/<pid>-<random>/`. A directory left behind by a
 * process that was killed (it cannot clean up) is swept by the next process;
 * a process that exits removes the ones it still has (after the QEMU 'exit'
 * hook killed their VMs).
 *
 * The parent holds QMP and agent sockets: a directory someone else made
 * first (in a shared /tmp) could let them swap a socket under us. It is used
 * only when it is a real directory (not a symlink), owned by this user and
 * not writable by group or others; otherwise {@link UnsafePathError}.
 */

import { randomBytes } from "node:crypto";
import { lstatSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { UnsafePathError } from "../errors.js";

let swept = false;
const live = new Set<string>();
let hooked = false;

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on("exit", () => {
    for (const dir of live) {
      try {
        rmSync(dir, { recursive: true, force: true });
      } catch {
        /* best effort: the next process sweeps it */
      }
    }
  });
}

function parent(): string {
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  return join(process.env.SUPERMACHINE_RUNTIME_DIR ?? tmpdir(), `supermachine-${uid}`);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

function sweep(dir: string): void {
  for (const name of readdirSync(dir)) {
    const pid = Number(name.split("-")[0]);
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && !alive(pid)) {
      rmSync(join(dir, name), { recursive: true, force: true });
    }
  }
}

/**
 * Refuses a runtime parent directory that is not ours alone.
 *
 * @throws {UnsafePathError} a symlink, not a directory, owned by another user, or writable by group/others
 */
export function checkRuntimeParent(p: string): void {
  const st = lstatSync(p);
  const fix = `Remove it (rm -rf ${p}) so it is made afresh, or set SUPERMACHINE_RUNTIME_DIR to a directory you own`;
  if (st.isSymbolicLink()) throw new UnsafePathError(`Runtime directory ${p} is a symlink; refusing to put VM sockets there. ${fix}.`, p);
  if (!st.isDirectory()) throw new UnsafePathError(`Runtime directory ${p} is not a directory. ${fix}.`, p);
  const uid = typeof process.getuid === "function" ? process.getuid() : undefined;
  if (uid !== undefined && st.uid !== uid) throw new UnsafePathError(`Runtime directory ${p} is owned by uid ${st.uid}, not by this user (uid ${uid}); someone else may control it. ${fix}.`, p);
  if ((st.mode & 0o022) !== 0) {
    throw new UnsafePathError(`Runtime directory ${p} is writable by ${st.mode & 0o002 ? "others" : "its group"} (mode ${(st.mode & 0o7777).toString(8)}). chmod 700 it, or: ${fix}.`, p);
  }
}

/**
 * Creates a fresh runtime directory for one VM.
 *
 * @throws {UnsafePathError} the per-user parent exists and is not ours alone (see {@link checkRuntimeParent})
 */
export function createRuntimeDir(): string {
  const p = parent();
  try {
    mkdirSync(p, { recursive: true, mode: 0o700 });
  } catch (e) {
    // A dangling symlink or a file in its place: checkRuntimeParent says what is wrong.
    if (!["EEXIST", "ENOTDIR", "ENOENT"].includes((e as NodeJS.ErrnoException).code ?? "")) throw e;
  }
  checkRuntimeParent(p);
  if (!swept) {
    swept = true;
    try {
      sweep(p);
    } catch {
      /* best effort */
    }
  }
  const dir = join(p, `${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(dir, { mode: 0o700 });
  hookExit();
  live.add(dir);
  return dir;
}

export async function removeRuntimeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  live.delete(dir);
}
