/**
 * Shared test fixtures: the default image, VM boot with generous deadlines,
 * and cleanup that always runs.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { ensureDefaultImage, DEFAULT_IMAGE_CONFIG } from "../src/guest/default-image.js";
import { defaultCacheDir } from "../src/paths.js";
import { GuestDiedError } from "../src/errors.js";
import { Vm, type VmBootOptions } from "../src/vm/vm.js";

export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** TCG VMs are ~10x slower than native: tests check correctness, not speed. */
export const VM_TEST_TIMEOUT = 10 * 60_000;

export async function defaultRootfs(): Promise<string> {
  return ensureDefaultImage(defaultCacheDir());
}

/**
 * Compiles test/fixtures/guest/NAME.c into a static program for the guest
 * (setup installs gcc and libc6-dev: scripts/setup.mjs) and returns its bytes.
 */
export async function compileGuestProgram(name: string): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), "sm-guest-prog-"));
  try {
    const out = join(dir, name);
    await promisify(execFile)("cc", ["-O1", "-static", "-o", out, join(REPO_ROOT, "test", "fixtures", "guest", `${name}.c`)]);
    return await readFile(out);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Boots a VM of the default image. Always pair with `await vm.destroy()` in `after`/`finally`. */
export async function bootDefault(o: Partial<VmBootOptions> = {}): Promise<Vm> {
  return Vm.boot({ rootfs: await defaultRootfs(), config: DEFAULT_IMAGE_CONFIG, ...o });
}

/** PIDs of live processes whose command line matches `re`. */
export function pidsMatching(re: RegExp): number[] {
  const out: number[] = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, "latin1").replace(/\0/g, " ");
      if (re.test(cmd)) out.push(Number(d));
    } catch {
      /* gone */
    }
  }
  return out;
}

/** Live processes below this one (any depth) whose command line matches `re`. */
export function descendantsMatching(re: RegExp): number[] {
  const parent = new Map<number, number>();
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const st = readFileSync(`/proc/${d}/stat`, "latin1");
      const f = st.slice(st.lastIndexOf(")") + 2).split(" ");
      if (f[0] === "Z") continue;
      parent.set(Number(d), Number(f[1]));
    } catch {
      /* gone */
    }
  }
  const below = (pid: number): boolean => {
    for (let p = parent.get(pid), n = 0; p !== undefined && n < 64; p = parent.get(p), n++) if (p === process.pid) return true;
    return false;
  };
  return pidsMatching(re).filter((p) => parent.has(p) && below(p));
}

/** Whether `pid` runs (a zombie, or a process reaped while we look, does not). */
export function processAlive(pid: number): boolean {
  try {
    return !readFileSync(`/proc/${pid}/stat`, "latin1").includes(") Z ");
  } catch {
    return false;
  }
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Kills `vm`'s QEMU under an exec in flight and checks that the exec and a
 * later one fail with GuestDiedError.
 */
export async function killQemuUnderExec(vm: Vm): Promise<void> {
  const work = vm.exec({ argv: ["sleep", "100"] }).then(
    () => undefined,
    (e: unknown) => e,
  );
  await new Promise((r) => setTimeout(r, 200));
  process.kill(vm.pid!, "SIGKILL");
  assert.ok((await work) instanceof GuestDiedError, "the exec in flight fails with GuestDiedError");
  await assert.rejects(vm.exec({ argv: ["true"] }), GuestDiedError);
}
