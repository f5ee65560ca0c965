/**
 * Pretranslation (TCG only, the QEMU setup build's third patch; see
 * docs/pretranslate.md and qemu/README.md).
 *
 * A fresh QEMU process translates again every guest block it runs, and
 * under TCG that is about a third of a restored VM's first work. QEMU
 * keeps no translated code across processes, but a process can say which
 * blocks it made: their keys (guest pc, code page, CPU mode flags; never
 * host code). A pool records them once per snapshot, from a fresh restore
 * after its prewarm, into the snapshot directory (`tb-hints`); every later
 * fresh restore of that snapshot hands the list to QEMU, which translates
 * the blocks in a thread of its own, on another core, while the guest runs.
 *
 * The file is an optimization and is not trusted: it is read only if it is
 * a regular file of ours under a size cap with the right header, and QEMU
 * checks every key again (guest RAM only, the vCPU's own modes) and makes
 * a block visible only if the guest's code bytes still equal those it was
 * translated from. A missing or refused file costs nothing but the speed.
 */

import { lstat, open, readdir, readFile, rename, unlink, writeFile } from "node:fs/promises";
import { constants as osConstants, setPriority } from "node:os";
import type { Socket } from "node:net";
import { dirname, join } from "node:path";
import { servingQemu } from "../snapshot/migrate.js";
import type { QmpClient } from "./qmp.js";

export const PRETRANSLATE_COMMAND = "x-supermachine-pretranslate";
export const TB_HINTS_SAVE_COMMAND = "x-supermachine-tb-hints-save";
export const PRETRANSLATE_QUERY = "x-query-supermachine-pretranslate";
export const PRETRANSLATE_RELEASE_COMMAND = "x-supermachine-pretranslate-release";
/** The hints file, in a snapshot's directory. */
export const TB_HINTS_FILE = "tb-hints";
/**
 * Beside it, what the recording VM had run when it recorded: a pool's
 * digest of its prewarm (Pool: the list is then known to cover it). A list
 * without one (recorded by `supermachine run`) covers only the command.
 */
export const TB_HINTS_LABEL_FILE = "tb-hints.by";
const LABEL = /^[0-9a-f]{16,64}$/;
const MAGIC = "SMTBHNT1";
const HEADER = 16;
const RECORD = 32;
/** QEMU's cap on keys (PT_MAX_HINTS in the patch). */
export const MAX_TB_HINTS = 1 << 17;
const MAX_BYTES = HEADER + MAX_TB_HINTS * RECORD;

/** What QEMU reports about a pretranslation (x-query-supermachine-pretranslate). */
export interface PretranslateInfo {
  hints: number;
  invalid: number;
  present: number;
  translated: number;
  linked: number;
  dropped: number;
  /** Of the dropped, blocks whose guest code changed after it was copied. */
  stale: number;
  running: boolean;
  /** Batches handed to the vCPU, not yet processed. */
  pending: number;
  /** Batches a held pretranslation keeps. */
  held: number;
}

/** The hints file of the snapshot whose device state is `stateFile`. */
export function tbHintsPath(stateFile: string): string {
  return join(dirname(stateFile), TB_HINTS_FILE);
}

/** The label file of the hints file `file`. */
export function tbHintsLabelPath(file: string): string {
  return join(dirname(file), TB_HINTS_LABEL_FILE);
}

/** Checks a hints file's header and length; returns its key count. */
export function checkTbHints(buf: Buffer): number {
  if (buf.length < HEADER || buf.toString("latin1", 0, 8) !== MAGIC) throw new Error("not a block key list (bad magic)");
  const n = buf.readUInt32LE(8);
  if (buf.readUInt32LE(12) !== RECORD) throw new Error("not a block key list (record size)");
  if (n > MAX_TB_HINTS) throw new Error(`block key list of ${n} keys, over the ${MAX_TB_HINTS} cap`);
  if (buf.length !== HEADER + n * RECORD) throw new Error(`block key list of ${buf.length} bytes for ${n} keys`);
  return n;
}

/**
 * The bytes of `path` if it is a regular file (not a link) owned by this
 * user, not writable by group or others, of `min`..`max` bytes; undefined
 * when it is missing or refused.
 */
async function readGuarded(path: string, min: number, max: number): Promise<Buffer | undefined> {
  const st = await lstat(path).catch(() => undefined);
  if (!st || !st.isFile() || st.size > max || st.size < min) return undefined;
  if (typeof process.getuid === "function" && st.uid !== process.getuid()) return undefined;
  if (st.mode & 0o022) return undefined;
  const fh = await open(path, "r").catch(() => undefined);
  if (!fh) return undefined;
  try {
    const buf = Buffer.alloc(st.size);
    const { bytesRead } = await fh.read(buf, 0, st.size, 0);
    return bytesRead === st.size ? buf : undefined;
  } catch {
    return undefined;
  } finally {
    await fh.close();
  }
}

/**
 * Reads `file` if it is a usable hints file: a regular file (not a link)
 * owned by this user, not writable by others, under the cap, well formed.
 * Undefined when it is missing or refused.
 */
export async function readTbHints(file: string): Promise<Buffer | undefined> {
  const buf = await readGuarded(file, HEADER, MAX_BYTES);
  if (!buf) return undefined;
  try {
    checkTbHints(buf);
    return buf;
  } catch {
    return undefined;
  }
}

/**
 * The label of hints file `file` (see TB_HINTS_LABEL_FILE), read with the
 * same care as the list; undefined when it has none or it is refused.
 */
export async function readTbHintsLabel(file: string): Promise<string | undefined> {
  const label = (await readGuarded(tbHintsLabelPath(file), 0, 128))?.toString("latin1").trim();
  return label !== undefined && LABEL.test(label) ? label : undefined;
}

/**
 * Hands `hints` to the VM's QEMU, which starts translating them in a
 * thread of its own; resolves once QEMU has read them.
 */
export async function pretranslate(qmp: QmpClient, dir: string, hints: Buffer, o: { hold?: boolean } = {}): Promise<void> {
  const sock = join(dir, `pretranslate-${process.pid}.sock`);
  const serve = (s: Socket) => {
    s.on("error", () => undefined);
    s.end(hints);
  };
  await servingQemu(sock, serve, () => qmp.execute(PRETRANSLATE_COMMAND, { path: sock, ...(o.hold ? { hold: true } : {}) }));
}

/** Hands a held pretranslation's blocks to the vCPU (tests of the code check). */
export async function releasePretranslation(qmp: QmpClient): Promise<void> {
  await qmp.execute(PRETRANSLATE_RELEASE_COMMAND);
}

/**
 * Lowers the pretranslator thread of QEMU process `pid` to the lowest
 * priority (nice 19), best effort: it should take a core the vCPU and the
 * host do not need, not time from them (measured: at nice 0 it kept the
 * vCPU waiting for a core ≈ 90 ms per fresh VM on two cores).
 */
export async function deprioritizePretranslator(pid: number, o: { tries?: number; intervalMs?: number } = {}): Promise<boolean> {
  // QEMU's threads name themselves once they run: the command's answer can
  // come before the new thread has (on a busy host), so look a few times.
  const tries = o.tries ?? 25;
  for (let i = 0; i < tries; i++) {
    if (i > 0) await new Promise((r) => setTimeout(r, o.intervalMs ?? 2));
    const tids = await readdir(`/proc/${pid}/task`).catch(() => undefined);
    if (!tids) return false;
    for (const tid of tids) {
      const comm = await readFile(`/proc/${pid}/task/${tid}/comm`, "latin1").catch(() => "");
      if (comm.trim() !== "pretranslate") continue;
      try {
        setPriority(Number(tid), osConstants.priority.PRIORITY_LOW);
        return true;
      } catch {
        return false;
      }
    }
  }
  return false;
}

/** QEMU's pretranslation counters. */
export function pretranslateInfo(qmp: QmpClient): Promise<PretranslateInfo> {
  return qmp.execute<PretranslateInfo>(PRETRANSLATE_QUERY);
}

/**
 * Asks the VM's QEMU for the keys of the blocks it translated and writes
 * them to `file` (a temporary name, then a rename: a reader never sees
 * half a file), then `label` beside it (none: the old label goes first, so
 * that no reader pairs the new list with it). Returns the number of keys.
 */
export async function saveTbHints(qmp: QmpClient, dir: string, file: string, label?: string): Promise<number> {
  if (label !== undefined && !LABEL.test(label)) throw new Error(`bad block list label ${JSON.stringify(label)}`);
  const sock = join(dir, `tb-hints-${process.pid}.sock`);
  const chunks: Buffer[] = [];
  let size = 0;
  let done: Promise<void> | undefined;
  const serve = (s: Socket) => {
    done = new Promise<void>((resolve, reject) => {
      s.on("data", (c: Buffer) => {
        size += c.length;
        if (size > MAX_BYTES) s.destroy(new Error("block key list over the cap"));
        else chunks.push(c);
      });
      s.on("error", reject);
      s.on("end", () => resolve());
    });
  };
  await servingQemu(sock, serve, () => qmp.execute(TB_HINTS_SAVE_COMMAND, { path: sock }));
  for (let i = 0; !done && i < 100; i++) await new Promise((r) => setTimeout(r, 5));
  if (!done) throw new Error("QEMU did not send its block keys");
  await done;
  const buf = Buffer.concat(chunks);
  const n = checkTbHints(buf);
  const labelFile = tbHintsLabelPath(file);
  await unlink(labelFile).catch(() => undefined);
  await replaceFile(file, buf);
  if (label !== undefined) await replaceFile(labelFile, `${label}\n`);
  return n;
}

/** Writes `data` to a new temporary file, then renames it over `file`. */
async function replaceFile(file: string, data: Buffer | string): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, data, { flag: "wx", mode: 0o600 });
    await rename(tmp, file);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
}
