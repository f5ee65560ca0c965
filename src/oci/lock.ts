/**
 * A cross-process lock file: created with O_CREAT|O_EXCL, holding the owner's
 * pid, host name and a random nonce; its mtime is refreshed while held.
 *
 * A lock is stale when its owner is a dead process on this host, or when its
 * mtime has not moved for `staleMs` (an owner on another host sharing the
 * directory, a reused pid, a hung process). A stale lock is removed after
 * re-reading it and checking that it is still the same one (same nonce).
 *
 * This lock only avoids duplicate work. Correctness never depends on it: a
 * blob becomes visible only by an atomic rename of a fully verified file, so
 * even if two owners ever raced (the window between the nonce check and the
 * unlink), both would produce the same verified bytes and the last rename
 * would replace identical content.
 */

import { randomBytes } from "node:crypto";
import { constants as fsc } from "node:fs";
import { open, readFile, stat, unlink, utimes } from "node:fs/promises";
import { hostname } from "node:os";
import { AbortError } from "../errors.js";
import { delay } from "./http.js";

export interface LockOptions {
  readonly signal?: AbortSignal | undefined;
  /** A lock whose mtime is older than this is stale. @default 60000 */
  readonly staleMs?: number;
  /**
   * Checked while waiting; when it resolves true the wait ends without the
   * lock (the work was done by the other owner).
   */
  readonly until?: () => Promise<boolean>;
  /** Called once when the lock is held by someone else and we start waiting. */
  readonly onWait?: () => void;
}

export interface HeldLock {
  readonly path: string;
  release(): Promise<void>;
}

interface LockInfo {
  pid: number;
  host: string;
  nonce: string;
  created: number;
}

/** Whether a process with this pid exists (EPERM: it does, as another user's). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

async function readInfo(path: string): Promise<{ info: LockInfo | undefined; mtimeMs: number } | undefined> {
  try {
    const [text, st] = await Promise.all([readFile(path, "utf8"), stat(path)]);
    let info: LockInfo | undefined;
    try {
      const j = JSON.parse(text) as Partial<LockInfo>;
      if (typeof j.pid === "number" && typeof j.host === "string" && typeof j.nonce === "string") info = j as LockInfo;
    } catch {
      info = undefined;
    }
    return { info, mtimeMs: st.mtimeMs };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

/** Is this lock stale (see the module comment)? */
function isStale(found: { info: LockInfo | undefined; mtimeMs: number }, staleMs: number): boolean {
  const age = Date.now() - found.mtimeMs;
  if (!found.info) return age > Math.min(staleMs, 10_000); // never finished writing its owner
  if (found.info.host === hostname() && found.info.pid !== process.pid && !pidAlive(found.info.pid)) return true;
  return age > staleMs;
}

/**
 * Takes the lock at `path`, waiting while another live owner holds it.
 * Returns undefined when `until()` became true while waiting.
 */
export async function acquireLock(path: string, opts: LockOptions = {}): Promise<HeldLock | undefined> {
  const staleMs = opts.staleMs ?? 60_000;
  const nonce = randomBytes(12).toString("hex");
  let waited = false;
  let pause = 25;
  for (;;) {
    if (opts.signal?.aborted) throw new AbortError("The operation was aborted (signal fired)", { cause: opts.signal.reason });
    try {
      const fh = await open(path, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o644);
      try {
        const info: LockInfo = { pid: process.pid, host: hostname(), nonce, created: Date.now() };
        await fh.writeFile(JSON.stringify(info));
      } finally {
        await fh.close();
      }
      return holdLock(path, nonce, staleMs);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    if (opts.until && (await opts.until())) return undefined;
    const found = await readInfo(path);
    if (found && isStale(found, staleMs)) {
      // Remove it only if it is still the lock we judged stale.
      const again = await readInfo(path);
      if (again && again.info?.nonce === found.info?.nonce && again.mtimeMs === found.mtimeMs) {
        await unlink(path).catch(() => {});
      }
      continue;
    }
    if (!waited) {
      waited = true;
      opts.onWait?.();
    }
    await delay(pause, opts.signal);
    pause = Math.min(500, pause * 2);
  }
}

function holdLock(path: string, nonce: string, staleMs: number): HeldLock {
  const beat = setInterval(
    () => {
      const now = new Date();
      utimes(path, now, now).catch(() => {});
    },
    Math.max(250, Math.floor(staleMs / 4)),
  );
  beat.unref();
  let released = false;
  return {
    path,
    async release() {
      if (released) return;
      released = true;
      clearInterval(beat);
      // Only remove our own lock (it may have been judged stale and replaced).
      const found = await readInfo(path).catch(() => undefined);
      if (found?.info?.nonce === nonce) await unlink(path).catch(() => {});
    },
  };
}
