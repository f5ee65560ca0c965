/**
 * Boot templates (docs/boot-templates.md): a cold boot without the boot.
 *
 * Under TCG a cold boot takes seconds, almost all of it the guest kernel's
 * initialisation and the agent loading kernel modules, and none of it
 * depends on the image. So the first cold boot on a machine (per kernel,
 * initramfs, QEMU, accelerator, CPU model, memory and vCPUs) boots a
 * template instead: the agent stops right after the modules and waits on
 * its port (`sm.template=1`); the host saves that VM like a snapshot, into
 * the cache. Every later cold boot (`Vm.boot`, a bake) restores the template
 * with its own root filesystem disk, sends the agent the rest of its kernel
 * command line (`sm.root`, `sm.hostname`, ..., `sm.rootsize`), and the
 * agent goes on from there: mounts the image as a partition of the
 * template's placeholder disk (a 1 TiB sparse file; the disk is probed
 * again only when no size comes), and serves as after a boot. The
 * template's guest zeroed its free memory before it was saved; under TCG
 * its VMs are pretranslated from the block list the first bake recorded
 * beside it.
 *
 * Only VMs whose disks are the root filesystem and the stream ring use one
 * (volumes and a writable layer disk are devices the template lacks).
 * `SUPERMACHINE_BOOT_TEMPLATE=0` turns them off.
 */

import { createHash, randomBytes } from "node:crypto";
import { realpathSync, statSync } from "node:fs";
import { mkdir, readFile, readdir, rename, rm, stat, truncate, writeFile } from "node:fs/promises";
import type { Socket } from "node:net";
import { join } from "node:path";
import { GuestDiedError, QemuError, TimeoutError } from "../errors.js";
import { acquireLock } from "../oci/lock.js";
import { connectAgentSocket } from "../agent-client/connection.js";
import { fileRecord, sparseCopy, stubKernelPath } from "../snapshot/files.js";
import { kernelCmdline } from "../guest/assets.js";
import type { LaunchSpec } from "./vm.js";
import { saveState } from "../snapshot/migrate.js";
import { connectQmp } from "../vmm/qmp.js";
import { QemuProcess, findQemu } from "../vmm/qemu.js";
import type { Accelerator } from "../vmm/accel.js";
import { createRuntimeDir, removeRuntimeDir } from "./runtime-dir.js";
import { ringDisk } from "../agent-client/ring.js";

/** Bumped when what a template holds changes (the agent's template protocol). */
const TEMPLATE_VERSION = 2;
/** The template's root disk: 1 TiB of holes (a partition on it cannot be larger). */
const PLACEHOLDER_BYTES = 2 ** 40;
/** A lock on a template build older than this is stale. */
const BUILD_LOCK_STALE_MS = 600_000;
const READY = "SMTPL ready";
const OK = "SMTPL ok";
/** What the agent may say before "ok" (bounded: it is the guest). */
const MAX_REPLY_BYTES = 4096;

export interface TemplateInputs {
  accel: Accelerator;
  memoryMib: number;
  vcpus: number;
  kernel: string;
  initrd: string;
  /** The kernel command line every VM of this template shares (no hostname, no disks). */
  baseCmdline: string;
  cpuModel?: string;
  qemuBinary?: string;
  cacheDir: string;
  /** How long the build may take (the boot's own deadline). */
  timeoutMs: number;
}

export interface BootTemplate {
  dir: string;
  ram: string;
  state: string;
}

interface TemplateManifest {
  version: number;
  key: string;
  inputs: unknown;
  ram: { size: number };
  state: { size: number; sha256: string };
}

/** Whether boot templates are on (SUPERMACHINE_BOOT_TEMPLATE=0 turns them off). */
function templatesEnabled(): boolean {
  return process.env.SUPERMACHINE_BOOT_TEMPLATE !== "0";
}

/** Keys whose build failed in this process: not tried again (those boots go cold at once). */
const failed = new Set<string>();

/** A file's identity: its real path (caches may link the machine's assets in), size and mtime. */
function fileId(p: string): string {
  const real = realpathSync(p);
  const st = statSync(real);
  return `${real}:${st.size}:${st.mtimeMs}`;
}

/**
 * Whether a template's guest zeroes its free memory before it is saved
 * (agent/src/init.rs, zero_free_memory): its RAM file, and every snapshot
 * baked from it, then holds no leftovers of the boot. @internal
 * SUPERMACHINE_TEMPLATE_ZERO=0 builds templates without (tests, comparisons).
 */
function zeroFree(): boolean {
  return process.env.SUPERMACHINE_TEMPLATE_ZERO !== "0";
}

function templateKey(i: TemplateInputs): { key: string; inputs: unknown } {
  const inputs = {
    ...(zeroFree() ? {} : { zeroFree: false }),
    version: TEMPLATE_VERSION,
    accel: i.accel,
    memoryMib: i.memoryMib,
    vcpus: i.vcpus,
    kernel: fileId(i.kernel),
    initrd: fileId(i.initrd),
    qemu: fileId(findQemu(i.qemuBinary)),
    cmdline: i.baseCmdline,
    cpuModel: i.cpuModel ?? null,
  };
  return { key: createHash("sha256").update(JSON.stringify(inputs)).digest("hex"), inputs };
}

/** The template's files, if a valid one exists. Its state file is checked against the manifest (the cache is not trusted more than a snapshot). */
async function validTemplate(dir: string, key: string): Promise<BootTemplate | undefined> {
  try {
    const m = JSON.parse(await readFile(join(dir, "manifest.json"), "utf8")) as TemplateManifest;
    if (m.version !== TEMPLATE_VERSION || m.key !== key) return undefined;
    const ram = join(dir, "ram");
    const state = join(dir, "state");
    if ((await stat(ram)).size !== m.ram.size) return undefined;
    const s = await fileRecord(state);
    if (s.size !== m.state.size || s.sha256 !== m.state.sha256) return undefined;
    return { dir, ram, state };
  } catch {
    return undefined;
  }
}

/**
 * The boot template for `i`, built now if there is none (once per machine
 * and inputs; concurrent callers wait for one build). Undefined when
 * templates are off or the build failed (the caller boots cold; the reason
 * goes to NODE_DEBUG=supermachine).
 */
export async function bootTemplate(i: TemplateInputs, signal?: AbortSignal): Promise<BootTemplate | undefined> {
  if (!templatesEnabled()) return undefined;
  const { key, inputs } = templateKey(i);
  if (failed.has(key)) return undefined;
  const root = join(i.cacheDir, "boot-templates");
  const dir = join(root, key);
  const have = await validTemplate(dir, key);
  if (have) return have;
  await mkdir(root, { recursive: true });
  const lock = await acquireLock(join(root, `${key}.lock`), { until: async () => (await validTemplate(dir, key)) !== undefined, staleMs: BUILD_LOCK_STALE_MS, ...(signal ? { signal } : {}) });
  try {
    const again = await validTemplate(dir, key);
    if (again) return again;
    await rm(dir, { recursive: true, force: true });
    const stage = `${dir}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
    try {
      await buildTemplate(i, stage, key, inputs);
      await rename(stage, dir);
      await pruneTemplates(root, key);
    } catch (e) {
      if (!signal?.aborted) failed.add(key);
      await rm(stage, { recursive: true, force: true });
      if (process.env.NODE_DEBUG?.includes("supermachine")) console.error(`supermachine: boot template not built, booting cold: ${(e as Error).message}`);
      return undefined;
    }
  } finally {
    await lock?.release();
  }
  return validTemplate(dir, key);
}

/** Templates kept per cache (each is up to its memory size on disk, sparse). */
const KEEP_TEMPLATES = 4;

/** Removes the least recently built templates beyond KEEP_TEMPLATES, if over an hour old (another kernel, agent or QEMU made them). */
async function pruneTemplates(root: string, keep: string): Promise<void> {
  const entries: { name: string; mtime: number }[] = [];
  for (const name of await readdir(root).catch(() => [] as string[])) {
    if (!/^[0-9a-f]{64}$/.test(name) || name === keep) continue;
    const st = await stat(join(root, name, "manifest.json")).catch(() => undefined);
    if (st) entries.push({ name, mtime: st.mtimeMs });
  }
  entries.sort((a, b) => b.mtime - a.mtime);
  // Only old ones: a VM of another process may be about to start from a new one.
  const old = Date.now() - 3_600_000;
  for (const e of entries.slice(KEEP_TEMPLATES - 1)) if (e.mtime < old) await rm(join(root, e.name), { recursive: true, force: true });
}

async function buildTemplate(i: TemplateInputs, stage: string, key: string, inputs: unknown): Promise<void> {
  await mkdir(stage, { recursive: true, mode: 0o700 });
  const rt = createRuntimeDir();
  let q: QemuProcess | undefined;
  try {
    // The root disk's place: the VMs put their own image there, and the
    // guest mounts it as a partition of the image's size on this disk
    // (sm.rootsize): a sparse placeholder larger than any image.
    const placeholder = join(rt, "root.placeholder");
    await writeFile(placeholder, Buffer.alloc(0));
    await truncate(placeholder, PLACEHOLDER_BYTES);
    const deadline = Date.now() + i.timeoutMs;
    q = await QemuProcess.start({
      ...(i.qemuBinary ? { qemuBinary: i.qemuBinary } : {}),
      accel: i.accel,
      memoryMib: i.memoryMib,
      vcpus: i.vcpus,
      kernel: i.kernel,
      initrd: i.initrd,
      cmdline: `${i.baseCmdline} sm.template=1${zeroFree() ? "" : " sm.zerofree=0"}`,
      rootfs: placeholder,
      disks: [ringDisk(rt)],
      memoryFile: { path: join(rt, "ram"), share: true },
      dir: rt,
      // The device is part of the state; nobody needs to listen.
      netSocket: join(rt, "net-unused.sock"),
      name: `sm-tpl-${randomBytes(3).toString("hex")}`,
      ...(i.cpuModel ? { cpuModel: i.cpuModel } : {}),
    });
    const sock = await agentSocket(q, deadline);
    try {
      await readUntil(sock, READY, deadline, q);
      const qmp = await connectQmp(q, deadline);
      try {
        await qmp.execute("stop");
        await saveState(qmp, rt, join(stage, "state"), { ignoreShared: true, timeoutMs: Math.max(1, deadline - Date.now()) });
      } finally {
        qmp.close();
      }
    } finally {
      sock.destroy();
    }
    // Sparse: the guest touched a fraction of its memory.
    await sparseCopy(join(rt, "ram"), join(stage, "ram"));
    const manifest: TemplateManifest = {
      version: TEMPLATE_VERSION,
      key,
      inputs,
      ram: { size: (await stat(join(stage, "ram"))).size },
      state: await fileRecord(join(stage, "state")),
    };
    await writeFile(join(stage, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n", { mode: 0o600 });
  } finally {
    await q?.stop();
    await removeRuntimeDir(rt);
  }
}

/** The agent's port socket of `q` (retried while QEMU creates it). */
function agentSocket(q: QemuProcess, deadline: number): Promise<Socket> {
  return connectAgentSocket(q.agentSocket, { timeoutMs: Math.max(1, deadline - Date.now()), gone: q.exitSignal });
}

/** Reads lines from the agent until `want`; other lines (repeated "ready") are skipped. */
function readUntil(sock: Socket, want: string, deadline: number, q: QemuProcess): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let text = "";
    const timer = setTimeout(() => done(new TimeoutError(`the boot template's agent did not say "${want}"\n--- guest console (tail) ---\n${q.consoleTail()}`, Math.max(0, deadline - Date.now()))), Math.max(1, deadline - Date.now()));
    const onData = (b: Buffer) => {
      text += b.toString("latin1");
      const lines = text.split("\n");
      text = lines.pop() ?? "";
      if (lines.some((l) => l === want)) return done();
      if (text.length > MAX_REPLY_BYTES) done(new QemuError(`the boot template's agent sent ${text.length} bytes without a line`));
    };
    const onClose = () => done(new GuestDiedError(`the agent's port closed before "${want}"`, q.consoleTail()));
    const done = (e?: Error) => {
      clearTimeout(timer);
      sock.off("data", onData);
      sock.off("close", onClose);
      if (e) reject(e);
      else resolve();
    };
    sock.on("data", onData);
    sock.on("close", onClose);
  });
}

/**
 * A VM restored from a template goes on booting: sends the agent the rest
 * of its command line and waits for its "ok". The caller then connects to
 * the agent as after a cold boot.
 */
export async function continueFromTemplate(q: QemuProcess, cmdline: string, deadline: number): Promise<void> {
  if (cmdline.includes("\n")) throw new TypeError("a template's command line is one line");
  const sock = await agentSocket(q, deadline);
  try {
    const reply = readUntil(sock, OK, deadline, q);
    sock.write(`${cmdline}\n`);
    await reply;
  } finally {
    sock.destroy();
  }
}

/**
 * The launch fields of a cold boot of `cmdline`: the boot template's state
 * and, for the agent, this VM's command line (its RAM mapped copy-on-write,
 * or with `ram: "shared-file"` a copy in the runtime dir, which a bake
 * snapshots from); without a template (`useTemplate` false, templates off,
 * or the build failed) the kernel itself.
 */
export async function coldBootLaunch(o: {
  template: Omit<TemplateInputs, "baseCmdline">;
  cmdline: string;
  ram: "anonymous" | "shared-file";
  useTemplate: boolean;
  signal?: AbortSignal;
}): Promise<Pick<LaunchSpec, "kernel" | "initrd" | "cmdline" | "ram" | "incomingState" | "template">> {
  const t = o.template;
  const tpl = o.useTemplate ? await bootTemplate({ ...t, baseCmdline: kernelCmdline({ accel: t.accel, hasRootfs: true }) }, o.signal) : undefined;
  if (!tpl) return { kernel: t.kernel, initrd: t.initrd, cmdline: o.cmdline, ram: { kind: o.ram } };
  return {
    kernel: await stubKernelPath(t.cacheDir),
    cmdline: "",
    ram: o.ram === "shared-file" ? { kind: "shared-file", from: tpl.ram } : { kind: "snapshot", path: tpl.ram },
    incomingState: tpl.state,
    template: { line: o.cmdline },
  };
}
