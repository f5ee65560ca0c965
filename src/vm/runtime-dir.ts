/**
 * Per-VM runtime directories (sockets) under one parent per user:
 * `$TMPDIR/supermachine-<uid>/<pid>-<random>/`. A directory left behind by a
 * process that was killed (it cannot clean up) is swept by the next process;
 * a process that exits removes the ones it still has (after the QEMU 'exit'
 * hook killed their VMs).
 */

import { randomBytes } from "node:crypto";
import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

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

/** Creates a fresh runtime directory for one VM. */
export function createRuntimeDir(): string {
  const p = parent();
  mkdirSync(p, { recursive: true, mode: 0o700 });
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
