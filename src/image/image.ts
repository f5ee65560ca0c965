/**
 * Image: an image baked into a snapshot. `Image.build` pulls, boots once,
 * starts the workload, runs `warmup`, snapshots, and caches the snapshot
 * under a key that hashes everything that changes it; later builds with the
 * same inputs return without booting. Pools restore VMs from the snapshot.
 */

import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { copyFile, link, mkdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, join, resolve } from "node:path";
import { promisify } from "node:util";
import { ImageError, PoolError, SnapshotError, TimeoutError, invalidOption } from "../errors.js";
import { bootAssets, defaultAslr, kernelCmdline, wakeupPreemption } from "../guest/assets.js";
import { assertSupportedHost } from "../platform/host.js";
import { DEFAULT_IMAGE_CONFIG } from "../guest/default-image.js";
import { acquireLock } from "../oci/lock.js";
import type { PullPolicy } from "../oci/pull.js";
import { defaultCacheDir, defaultSnapshotsDir } from "../paths.js";
import { leaseSnapshot, recordImageUse, type SnapshotLease } from "./cache-admin.js";
import { RecordBuilder } from "../protocol/codec.js";
import { FILE_LIMIT, MsgType, Tag } from "../protocol/constants.js";
import { directoryImage } from "../rootfs/cache.js";
import { compilePolicy, type CompiledPolicy, type NetworkOption } from "../net/policy.js";
import { tracedProgress } from "../diagnostics.js";
import type { LayerLimits } from "../rootfs/limits.js";
import { captureVmEarly, restoreSpec, restoreVm, type RestoreOptions } from "../snapshot/capture.js";
import { fsyncFile, sealSnapshotDir, sha256File } from "../snapshot/files.js";
import { coldBootLaunch } from "../vm/boot-template.js";
import { readManifest, SNAPSHOT_DIR_MODE, SNAPSHOT_FILE_MODE, SNAPSHOT_FORMAT, SNAPSHOT_VERSION, type SnapshotManifest, type WorkloadSpec } from "../snapshot/manifest.js";
import { chooseAccelerator, warnTcgOnce, type AcceleratorChoice, type AcceleratorOption } from "../vmm/accel.js";
import { UNNAMED_TCG_CPU, findQemu, tcgCpuModel } from "../vmm/qemu.js";
import { discardQemu, launchVm, startQemu, type GuestConfig, type PhaseCpu, type StartedQemu, type Vm } from "../vm/vm.js";
import { Pool, basePrewarm, pauseIdleFor, type PoolOptions } from "../pool/pool.js";
import { checkHostPaths, validateMounts, type ValidMount } from "../mounts/attach.js";
import type { MountSpec } from "../mounts/server.js";
import { guestConfigOf, resolveImage, type ImageProgress } from "./resolve.js";
import { checkDiskTools } from "../volumes/disks.js";
import { diskFileName, validateDisks, type DiskPlan, type VolumeSpec } from "../volumes/spec.js";

const execFileP = promisify(execFile);

/** A host file staged into the guest at a fixed path, before the snapshot. */
export interface ExtraFile {
  readonly hostPath: string;
  readonly guestPath: string;
  /** (extension) Permission bits. @default the host file's */
  readonly mode?: number;
}

export type { MountSpec } from "../mounts/server.js";

export type { VolumeSpec } from "../volumes/spec.js";

/** The VM `warmup` receives: a full Vm. */
export type WarmupVm = Vm;

export interface BuildOptions {
  /** OCI ref ("alpine:latest", "host:5000/app@sha256:…"), an offline source (oci:DIR, docker-archive:FILE), or (extension) dir:PATH. */
  readonly ref: string;
  /** Stable snapshot name. @default derived from the cache key */
  readonly name?: string;
  /** Guest-visible memory ceiling (lazily committed). @default 256 */
  readonly memoryMib?: number;
  /** @default 1 */
  readonly vcpus?: number;
  /** @default "missing" */
  readonly pullPolicy?: PullPolicy;
  /** Overrides the image's ENTRYPOINT + CMD for the workload. */
  readonly cmd?: readonly string[];
  /** Extra environment for the workload (and for execs in the VM). @default {} */
  readonly env?: Readonly<Record<string, string>>;
  /** Port the workload listens on (with listenerRequired). @default 80 */
  readonly guestPort?: number;
  /**
   * Start the workload and wait for it to listen on guestPort before the
   * snapshot (restored VMs then serve at once). Without it, the snapshot is
   * taken before the workload starts, and each VM starts it after restore.
   * @default false
   */
  readonly listenerRequired?: boolean;
  /** Host files staged into the guest before the snapshot (content is part of the cache key). */
  readonly extraFiles?: readonly ExtraFile[];
  /**
   * Live host directories (docs/mounts.md): each is registered with every
   * VM (the bake's, every restore's) by its guestTag; the guest mounts it
   * with `mount -t virtiofs <guestTag> <dir>` (run through vm.exec), or it
   * is mounted at guestPath automatically. Host contents are never part of
   * the snapshot; hostPath is not part of the cache key (tags, guest paths
   * and policies are). A mount the warmup made is mounted again at the same
   * place in every restored VM.
   * @default []
   */
  readonly mounts?: readonly MountSpec[];
  /**
   * Block-device volumes (ext4 on virtio-blk), mounted at their mountPoint in
   * every VM. What warmup writes to them is baked with the snapshot; every
   * restored VM writes to a copy-on-write view of its own, discarded at
   * release. See docs/volumes.md. @default []
   */
  readonly volumes?: readonly VolumeSpec[];
  /**
   * (extension) A disk-backed writable layer of this many MiB (sparse; an
   * ext4 disk under the root overlay) instead of a tmpfs, so that what the
   * guest writes outside volumes does not count against memoryMib. Baked and
   * restored copy-on-write like volumes. @default undefined (a tmpfs layer)
   */
  readonly diskMib?: number;
  /**
   * (extension) The VM's network and its egress policy: `true` is the public
   * internet (private, loopback, link-local and the VM network's own ranges
   * denied), `false` cuts the VM off, `{ allow, deny, hosts }` narrows it.
   * Applies to the bake (warmup) and is the default of pools made from this
   * Image object; it is not part of the snapshot key, so one snapshot serves
   * pools with different policies. See docs/network.md. @default true
   */
  readonly network?: NetworkOption;
  /** Cache key of the warmup: bump it to rebake. @default "default" */
  readonly warmupTag?: string;
  /** Runs in the VM after the workload started and before the snapshot. */
  readonly warmup?: (vm: WarmupVm) => Promise<void>;
  /** @default ~/.local/supermachine-snapshots */
  readonly snapshotsDir?: string;
  /** (extension) @default "auto" */
  readonly accel?: AcceleratorOption;
  /**
   * (extension) User-space address randomization in the guest
   * (`kernel.randomize_va_space`). Under TCG every program start is
   * translated again when its code moves, so it is off there by default:
   * the first Python start in a VM took about 40 % less here
   * (docs/performance.md). It guards the guest's programs against exploits
   * of their own inputs, never the host, which the VM boundary does; the
   * guest kernel's own KASLR is off either way (snapshots).
   * @default true under KVM, false under TCG
   */
  readonly aslr?: boolean;
  /** (extension) Image/asset cache. @default ~/.cache/supermachine */
  readonly cacheDir?: string;
  /** (extension) Registries reached over plain HTTP (loopback always is). */
  readonly insecureRegistries?: readonly string[];
  /**
   * Caps on what the image's layers may cost the host (entries, uncompressed
   * bytes, path depth, PAX/xattr data, blob sizes); see docs/security-inputs.md.
   * @default the SUPERMACHINE_LAYER_* / SUPERMACHINE_BLOB_MAX_BYTES environment variables, else the documented defaults
   */
  readonly layerLimits?: LayerLimits;
  /** (extension) e.g. "linux/amd64". @default the host's */
  readonly platform?: string;
  /**
   * (extension) Progress: pull (bytes per layer), unpack, pack (the erofs
   * image), then the bake's phases (boot, warmup, snapshot) or
   * `snapshot-cached` on a cache hit.
   */
  readonly onProgress?: (p: ImageProgress) => void;
  /**
   * (extension) Start the image's workload (ENTRYPOINT + CMD, or cmd) in
   * restored VMs. `false` bakes a VM that only runs what is exec'd in it
   * (what `supermachine run IMAGE COMMAND` uses). Part of the cache key.
   * @default true
   */
  readonly runWorkload?: boolean;
  /** (extension) */
  readonly signal?: AbortSignal;
  /** (extension) Deadline for booting (and each restore's resume). @default 120000 (TCG), 30000 (KVM) */
  readonly bootTimeoutMs?: number;
  /** (extension) How long listenerRequired waits for the listener. @default 120000 */
  readonly listenerTimeoutMs?: number;
}

export { defaultSnapshotsDir };

let qemuVersionMemo: Promise<string> | undefined;
function qemuVersion(): Promise<string> {
  qemuVersionMemo ??= execFileP(findQemu(), ["--version"]).then((r) => r.stdout.split("\n")[0]!.trim());
  return qemuVersionMemo;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

interface ValidBuild {
  ref: string;
  name?: string;
  memoryMib: number;
  vcpus: number;
  pullPolicy: PullPolicy;
  cmd?: string[];
  env: [string, string][];
  guestPort: number;
  listenerRequired: boolean;
  extraFiles: { hostPath: string; guestPath: string; mode?: number }[];
  warmupTag: string;
  runWorkload: boolean;
  warmup?: (vm: Vm) => Promise<void>;
  snapshotsDir: string;
  cacheDir: string;
  network: CompiledPolicy;
  disks: DiskPlan[];
  mounts: ValidMount[];
  aslr?: boolean;
}

function validateBuild(o: BuildOptions): ValidBuild {
  if (typeof o !== "object" || o === null) throw invalidOption("options", "a BuildOptions object", o);
  if (typeof o.ref !== "string" || o.ref.trim() === "") throw invalidOption("ref", "an image reference", o.ref);
  if (o.name !== undefined && (typeof o.name !== "string" || !NAME_RE.test(o.name))) throw invalidOption("name", "letters, digits, '.', '_', '-' (≤ 128)", o.name);
  const int = (v: unknown, name: string, dflt: number, min: number, max: number): number => {
    if (v === undefined) return dflt;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) throw invalidOption(name, `an integer in ${min}..${max}`, v);
    return v;
  };
  if (o.pullPolicy !== undefined && !["always", "missing", "never"].includes(o.pullPolicy)) throw invalidOption("pullPolicy", '"always", "missing" or "never"', o.pullPolicy);
  if (o.cmd !== undefined && (!Array.isArray(o.cmd) || o.cmd.length === 0 || !o.cmd.every((a) => typeof a === "string" && !a.includes("\0")))) {
    throw invalidOption("cmd", "a non-empty array of strings", o.cmd);
  }
  const env: [string, string][] = [];
  for (const [k, v] of Object.entries(o.env ?? {})) {
    if (!k || k.includes("=") || k.includes("\0") || typeof v !== "string" || v.includes("\0")) throw invalidOption(`env.${k}`, "a string value under a name without '='", v);
    env.push([k, v]);
  }
  env.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  if (o.listenerRequired !== undefined && typeof o.listenerRequired !== "boolean") throw invalidOption("listenerRequired", "a boolean", o.listenerRequired);
  const extraFiles = (o.extraFiles ?? []).map((f, i) => {
    if (typeof f !== "object" || f === null || typeof f.hostPath !== "string" || typeof f.guestPath !== "string" || !f.guestPath.startsWith("/")) {
      throw invalidOption(`extraFiles[${i}]`, "{hostPath, guestPath (absolute)}", f);
    }
    if (f.mode !== undefined && (!Number.isInteger(f.mode) || f.mode < 0 || f.mode > 0o7777)) throw invalidOption(`extraFiles[${i}].mode`, "permission bits", f.mode);
    return { hostPath: resolve(f.hostPath), guestPath: f.guestPath, ...(f.mode !== undefined ? { mode: f.mode } : {}) };
  });
  if (o.runWorkload !== undefined && typeof o.runWorkload !== "boolean") throw invalidOption("runWorkload", "a boolean", o.runWorkload);
  const disks = validateDisks(o.volumes, o.diskMib);
  const mounts = validateMounts(o.mounts);
  if (o.warmupTag !== undefined && typeof o.warmupTag !== "string") throw invalidOption("warmupTag", "a string", o.warmupTag);
  if (o.warmup !== undefined && typeof o.warmup !== "function") throw invalidOption("warmup", "an async function (vm) => void", o.warmup);
  if (o.aslr !== undefined && typeof o.aslr !== "boolean") throw invalidOption("aslr", "a boolean", o.aslr);
  return {
    ref: o.ref.trim(),
    ...(o.name ? { name: o.name } : {}),
    memoryMib: int(o.memoryMib, "memoryMib", 256, 32, 1 << 20),
    vcpus: int(o.vcpus, "vcpus", 1, 1, 64),
    pullPolicy: o.pullPolicy ?? "missing",
    ...(o.cmd ? { cmd: [...o.cmd] } : {}),
    env,
    guestPort: int(o.guestPort, "guestPort", 80, 1, 65535),
    listenerRequired: o.listenerRequired ?? false,
    extraFiles,
    warmupTag: o.warmupTag ?? "default",
    runWorkload: o.runWorkload ?? true,
    ...(o.warmup ? { warmup: o.warmup } : {}),
    snapshotsDir: resolve(o.snapshotsDir ?? defaultSnapshotsDir()),
    cacheDir: o.cacheDir ?? defaultCacheDir(),
    network: compilePolicy(o.network),
    disks,
    mounts,
    ...(o.aslr !== undefined ? { aslr: o.aslr } : {}),
  };
}

interface ResolvedRootfs {
  ref: string;
  digest: string;
  rootfsImage: string;
  config: GuestConfig;
  entrypoint: string[];
  cmd: string[];
}

async function resolveRootfsFor(v: ValidBuild, o: BuildOptions): Promise<ResolvedRootfs> {
  if (v.ref.startsWith("dir:")) {
    const dir = v.ref.slice(4);
    const rootfsImage = await directoryImage(dir, v.cacheDir, o.signal ? { signal: o.signal } : {});
    await recordImageUse(rootfsImage, { ref: `dir:${resolve(dir)}`, digest: basename(rootfsImage, ".erofs"), blobs: [], cacheDir: v.cacheDir });
    return { ref: v.ref, digest: `sha256:${basename(rootfsImage).replace(/^dir-|\.erofs$|-root$/g, "")}`, rootfsImage, config: { ...DEFAULT_IMAGE_CONFIG, env: [...DEFAULT_IMAGE_CONFIG.env] }, entrypoint: [], cmd: [] };
  }
  const r = await resolveImage(v.ref, {
    pullPolicy: v.pullPolicy,
    cacheDir: v.cacheDir,
    ...(o.insecureRegistries ? { insecureRegistries: o.insecureRegistries } : {}),
    ...(o.layerLimits ? { limits: o.layerLimits } : {}),
    ...(o.platform ? { platform: o.platform } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
  });
  return { ref: r.ref, digest: r.manifestDigest, rootfsImage: r.rootfsImage, config: guestConfigOf(r.imageConfig), entrypoint: [...(r.imageConfig.entrypoint ?? [])], cmd: [...(r.imageConfig.cmd ?? [])] };
}

/** Merges KEY=VALUE lists: later entries replace earlier ones of the same key. */
function mergeEnv(base: readonly string[], extra: readonly [string, string][]): string[] {
  const out = [...base];
  for (const [k, v] of extra) {
    const i = out.findIndex((e) => e.startsWith(`${k}=`));
    if (i >= 0) out[i] = `${k}=${v}`;
    else out.push(`${k}=${v}`);
  }
  return out;
}

/** sha256 of a rootfs image, remembered next to it (the image never changes under its name). */
async function rootfsDigest(path: string): Promise<string> {
  const side = `${path}.sha256`;
  const st = await stat(path);
  const memo = await readFile(side, "utf8").catch(() => "");
  const [sum, size] = memo.trim().split(" ");
  if (sum && /^[0-9a-f]{64}$/.test(sum) && Number(size) === st.size) return sum;
  const fresh = await sha256File(path);
  await writeFile(`${side}.${process.pid}.tmp`, `${fresh} ${st.size}\n`);
  await rename(`${side}.${process.pid}.tmp`, side);
  return fresh;
}

async function linkOrCopy(src: string, dst: string): Promise<void> {
  try {
    await link(src, dst);
  } catch {
    await copyFile(src, dst);
  }
}

/** Publishes a complete stage directory as `dir`, replacing an old one. */
async function publish(stage: string, dir: string): Promise<void> {
  if (existsSync(dir)) {
    const old = `${dir}.old-${randomBytes(4).toString("hex")}`;
    await rename(dir, old);
    await rename(stage, dir);
    await rm(old, { recursive: true, force: true });
  } else {
    await rename(stage, dir);
  }
}

/** Stopped QEMU processes an image keeps for reuse (Image.recycle), and for how long unused. */
const MAX_RECYCLED = 8;
/** @internal SUPERMACHINE_RECYCLED_TTL_MS overrides the 30 s (tests). */
function recycledTtlMs(): number {
  const v = Number(process.env.SUPERMACHINE_RECYCLED_TTL_MS);
  return Number.isInteger(v) && v > 0 ? v : 30_000;
}

/** What Image.build works out before it looks for a snapshot: the inputs, their key, where the snapshot goes. */
interface BuildPlan {
  options: BuildOptions;
  v: ValidBuild;
  accel: AcceleratorChoice;
  bootTimeoutMs: number;
  root: ResolvedRootfs;
  assets: Awaited<ReturnType<typeof bootAssets>>;
  qemu: string;
  files: { guestPath: string; data: Buffer; mode: number; sha256: string }[];
  imageCmd: { entrypoint: string[]; cmd: string[] };
  cpuModel: string | undefined;
  aslr: boolean;
  bakePrewarm: boolean;
  config: GuestConfig;
  inputs: Record<string, unknown>;
  key: string;
  name: string;
  dir: string;
  workload: WorkloadSpec | null;
}

async function planBuild(options: BuildOptions): Promise<BuildPlan> {
  assertSupportedHost();
  // Progress also goes to diagnostics_channel and NODE_DEBUG (src/diagnostics.ts).
  if (typeof options === "object" && options !== null) options = { ...options, onProgress: tracedProgress(options.onProgress) };
  const v = validateBuild(options);
  await checkHostPaths(v.mounts);
  const accel = chooseAccelerator(options.accel);
  warnTcgOnce(accel);
  const bootTimeoutMs = options.bootTimeoutMs ?? (accel.accel === "tcg" ? 120_000 : 30_000);
  if (v.disks.length) checkDiskTools();
  const [root, assets, qemu] = await Promise.all([resolveRootfsFor(v, options), bootAssets({ cacheDir: v.cacheDir }), qemuVersion()]);
  const files = await Promise.all(
    v.extraFiles.map(async (f, i) => {
      const st = await stat(f.hostPath).catch(() => undefined);
      if (!st?.isFile()) throw new ImageError(`extraFiles[${i}].hostPath ${f.hostPath} is not a readable file`);
      if (st.size > FILE_LIMIT) throw new ImageError(`extraFiles[${i}] ${f.hostPath} is ${st.size} bytes, over the 4 MiB limit of staged files`);
      const data = await readFile(f.hostPath);
      return { ...f, data, mode: f.mode ?? st.mode & 0o7777, sha256: createHash("sha256").update(data).digest("hex") };
    }),
  );
  const workloadArgv = v.runWorkload ? (v.cmd ?? [...root.entrypoint, ...root.cmd]) : [];
  const imageCmd = { entrypoint: root.entrypoint, cmd: root.cmd };
  const cpuModel = accel.accel === "tcg" ? tcgCpuModel() : undefined;
  const aslr = v.aslr ?? defaultAslr(accel.accel);
  // @internal SUPERMACHINE_BAKE_PREWARM=0: no prewarm before the snapshot (for benchmarks).
  const bakePrewarm = process.env.SUPERMACHINE_BAKE_PREWARM !== "0";
  const config: GuestConfig = { ...root.config, env: mergeEnv(root.config.env ?? [], v.env) };
  const inputs = {
    format: SNAPSHOT_VERSION,
    image: root.digest,
    rootfs: basename(root.rootfsImage),
    assets: assets.id,
    qemu,
    accel: accel.accel,
    // Keys without a model mean the old default, "max" (those snapshots stay valid).
    ...(cpuModel && cpuModel !== UNNAMED_TCG_CPU ? { cpuModel } : {}),
    // Snapshots baked before the prewarm existed are baked again.
    bakePrewarm,
    // ...and those without the stream ring disk.
    streamRing: true,
    arch: process.arch,
    memoryMib: v.memoryMib,
    vcpus: v.vcpus,
    cmd: v.cmd ?? null,
    env: v.env,
    guestPort: v.guestPort,
    listenerRequired: v.listenerRequired,
    extraFiles: files.map((f) => ({ guestPath: f.guestPath, sha256: f.sha256, mode: f.mode })),
    warmupTag: v.warmupTag,
    disks: v.disks,
    // Only when set, so the keys of existing snapshots stay the same.
    ...(v.runWorkload ? {} : { workload: false }),
    ...(aslr ? {} : { aslr: false }),
    // Only when it differs from the accelerator's default (TCG: off).
    ...(accel.accel === "tcg" && wakeupPreemption(accel.accel) ? { wakeupPreemption: true } : {}),
    // Where and how each mount appears, never its host directory.
    ...(v.mounts.length ? { mounts: v.mounts.map((m) => ({ guestTag: m.guestTag, guestPath: m.guestPath ?? null, symlinks: m.symlinks, readOnly: m.readOnly })) } : {}),
  };
  const key = createHash("sha256").update(JSON.stringify(inputs)).digest("hex");
  const name = v.name ?? `sm-${key.slice(0, 16)}`;
  const dir = join(v.snapshotsDir, name);
  const workload: WorkloadSpec | null =
    workloadArgv.length > 0
      ? {
          argv: workloadArgv,
          env: [...(config.env ?? [])],
          ...(config.workingDir ? { cwd: config.workingDir } : {}),
          ...(config.user ? { user: config.user } : {}),
          startAt: v.listenerRequired ? "bake" : "restore",
        }
      : null;
  if (v.listenerRequired && !workload) throw new ImageError(`listenerRequired needs a workload, but ${v.ref} has no ENTRYPOINT/CMD; pass cmd`);
  return { options, v, accel, bootTimeoutMs, root, assets, qemu, files, imageCmd, cpuModel, aslr, bakePrewarm, config, inputs, key, name, dir, workload };
}

/**
 * The snapshot of `plan`: the one on disk when it is there (looked for again
 * under the lock: one baker per snapshot across processes, the others use its
 * result), else what `bake` makes in a stage directory, the root filesystem
 * linked in and its digest running meanwhile (sealBake publishes the stage).
 * A failed bake leaves no stage behind.
 */
async function bakeLocked(plan: BuildPlan, cached: (m: SnapshotManifest) => Promise<Image>, bake: (stage: string, rootfsSum: Promise<string>) => Promise<Image>): Promise<Image> {
  const { v, root, key, name, dir, options } = plan;
  // This process may be writing that very snapshot (a build that returned before its files were on disk).
  await publishingHere.get(dir)?.catch(() => undefined);
  const hit = await readManifest(dir, "quick").catch(() => undefined);
  if (hit && hit.key === key) return cached(hit);
  await mkdir(v.snapshotsDir, { recursive: true, mode: SNAPSHOT_DIR_MODE });
  const valid = async () => (await readManifest(dir, "quick").catch(() => undefined))?.key === key;
  const lock = await acquireLock(join(v.snapshotsDir, `.${name}.lock`), { until: valid, staleMs: 10 * 60_000, ...(options.signal ? { signal: options.signal } : {}) });
  let publishing: Promise<void> | undefined;
  try {
    const again = await readManifest(dir, "quick").catch(() => undefined);
    if (again && again.key === key) return await cached(again);
    const stage = join(v.snapshotsDir, `.${name}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`);
    await mkdir(stage, { mode: SNAPSHOT_DIR_MODE });
    let rootfsSum: Promise<string> | undefined;
    try {
      await linkOrCopy(root.rootfsImage, join(stage, "rootfs.erofs"));
      // The image's digest (a read of the whole rootfs, ~0.2 s for 160 MB)
      // runs while the VM boots; the manifest needs it only at the end.
      rootfsSum = rootfsDigest(root.rootfsImage);
      rootfsSum.catch(() => undefined);
      const image = await bake(stage, rootfsSum);
      // Published behind the Image (sealBake): the lock is held,
      // and a failure leaves no stage, until it is.
      publishing = image._publishing?.catch(async (e: unknown) => {
        await rm(stage, { recursive: true, force: true });
        throw e;
      });
      return image;
    } catch (e) {
      await rootfsSum?.catch(() => undefined);
      await rm(stage, { recursive: true, force: true });
      throw e;
    }
  } finally {
    if (publishing) void publishing.then(() => lock?.release(), () => lock?.release());
    else await lock?.release();
  }
}

function bakePhase(plan: BuildPlan, p: "boot" | "warmup" | "snapshot" | "done"): void {
  plan.options.onProgress?.({ stage: "bake", phase: p, name: plan.name });
}

/** The Image of a snapshot Image.build found in the cache. */
function cachedImage(plan: BuildPlan, m: SnapshotManifest): Image {
  plan.options.onProgress?.({ stage: "snapshot-cached", name: plan.name });
  return new Image({ snapshotPath: plan.dir, manifest: m, baked: false, cacheDir: plan.v.cacheDir, bootTimeoutMs: plan.bootTimeoutMs, recipe: plan.options, network: plan.v.network, imageCmd: plan.imageCmd, mounts: plan.v.mounts });
}

/** A pool's prewarm list, before a snapshot. Only an optimization, like the pool's prewarm: a command that fails or times out does not fail the bake. */
async function runPrewarmList(vm: Vm, prewarm: readonly (readonly string[])[], timeoutMs: number): Promise<void> {
  for (const argv of prewarm) await vm.exec({ argv: [...argv], timeoutMs, maxOutputBytes: 1 << 20 }).catch(() => undefined);
}

/**
 * The snapshots this process is still writing (sealBake), by directory:
 * Image.fromSnapshot and Image.build wait for them instead of finding no
 * directory or baking the same key again.
 */
const publishingHere = new Map<string, Promise<void>>();

/**
 * Takes the snapshot of a bake VM into `stage`, publishes it as the plan's
 * directory and returns the Image, the VM living on as its warm handoff (its
 * workload, if it starts at restore, not started yet: see takeHandoff).
 *
 * The Image comes back as soon as the VM runs again, and the rest (the RAM
 * and rootfs digests, on the hash thread; manifest, fsync, publish: the
 * Python bake's snapshot step went 231–304 → 88–160 ms) goes on behind it as the Image's `_publishing`, as the
 * original's "background disk save" does: restores and `saved()` wait for
 * it, and so do Image.fromSnapshot and Image.build of that directory in this
 * process (publishingHere). Meanwhile a pool's first VM (the handoff, and a
 * derived prewarm list) runs beside it.
 */
async function sealBake(plan: BuildPlan, vm: Vm, stage: string, rootfsSum: Promise<string>): Promise<Image> {
  const { v, accel, root, qemu, cpuModel, config, workload, inputs, key, name, dir } = plan;
  bakePhase(plan, "snapshot");
  const captured = await captureVmEarly(vm, stage);
  const manifest: SnapshotManifest = {
    format: SNAPSHOT_FORMAT,
    version: SNAPSHOT_VERSION,
    key,
    name,
    createdAt: new Date().toISOString(),
    accel: accel.accel,
    arch: process.arch,
    qemuVersion: qemu,
    ...(cpuModel ? { cpuModel } : {}),
    streamRing: true,
    memoryMib: v.memoryMib,
    vcpus: v.vcpus,
    image: { ref: root.ref, digest: root.digest },
    config,
    workload,
    guestPort: v.guestPort,
    listenerRequired: v.listenerRequired,
    inputs,
    // Filled in by finish(), before the manifest is written or restored from.
    files: { ram: { size: 0, sparseSha256: "" }, state: { size: 0, sha256: "" }, rootfs: { size: 0, sha256: "" } },
    ...(captured.mounts.length ? { mounts: captured.mounts } : {}),
  };
  const finish = async (): Promise<void> => {
    const files = await captured.files;
    manifest.files = { ram: files.ram, state: files.state, rootfs: { size: (await stat(join(stage, "rootfs.erofs"))).size, sha256: await rootfsSum } };
    if (files.disks.length) manifest.disks = files.disks;
    await writeFile(join(stage, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n", { mode: SNAPSHOT_FILE_MODE });
    const diskFiles = files.disks.map(diskFileName);
    await sealSnapshotDir(stage, diskFiles);
    // ram and state are on disk already (the capture's records).
    for (const f of [...diskFiles, "manifest.json"]) await fsyncFile(join(stage, f));
    await publish(stage, dir);
    // The stage is gone: the handoff VM's disk (same inode) now lives under
    // dir (unless a later snapshot of that VM, a derived list, moved it on).
    if (vm.launch.rootfsImage === join(stage, "rootfs.erofs")) vm.launch.rootfsImage = join(dir, "rootfs.erofs");
  };
  const publishing = finish().catch((e: unknown) => {
    throw new SnapshotError(`The snapshot ${dir} could not be written (${(e as Error).message}); restores from it fail. Free space under ${v.snapshotsDir} or point snapshotsDir elsewhere, then build again.`, { cause: e });
  });
  publishing.catch(() => undefined);
  publishingHere.set(dir, publishing);
  const forget = (): void => {
    if (publishingHere.get(dir) === publishing) publishingHere.delete(dir);
  };
  publishing.then(forget, forget);
  // With disks (volumes, diskMib) the manifest's disk records (the flattened
  // images' sizes and digests) are part of what the Image is: such a build
  // returns once its snapshot is written.
  if (vm.launch.disks?.length) await publishing;
  // The bake VM lives on as the first VM handed out (warm handoff); it
  // must look like a restored one: the warmup's processes detached. Its
  // workload starts when it is taken (as a restored VM's starts at its
  // restore), so that until then a pool's prewarm list can still be baked
  // from it (Image.derive).
  vm._detachChildren();
  // Until then it waits stopped where pools stop their idle VMs (TCG): a
  // running idle VM costs ~5 ms of CPU a second.
  let handoffPaused = false;
  if (pauseIdleFor(accel.accel)) handoffPaused = await vm._pause().then(() => true, () => false);
  bakePhase(plan, "done");
  return new Image({
    snapshotPath: dir,
    manifest,
    baked: true,
    cacheDir: v.cacheDir,
    bootTimeoutMs: plan.bootTimeoutMs,
    handoff: vm,
    handoffPaused,
    handoffWorkload: workload && workload.startAt === "restore" ? workload : null,
    recipe: plan.options,
    network: v.network,
    imageCmd: plan.imageCmd,
    mounts: v.mounts,
    publishing,
  });
}

export class Image {
  /** The snapshot directory. */
  readonly snapshotPath: string;
  readonly manifest: SnapshotManifest;
  /**
   * @internal While a baked snapshot is still being hashed and published
   * behind its Image (sealBake): restores wait for it, close() too. Rejects
   * with what kept it from being published.
   */
  readonly _publishing: Promise<void> | undefined;

  /**
   * (extension) Resolves once the snapshot is complete on disk at
   * `snapshotPath`. Image.build returns as soon as the VM is captured, and
   * its files are hashed, synced and renamed into place in the background
   * (the original's "background disk save"); restores, pools, `close()`,
   * and Image.fromSnapshot / Image.build of the same directory in this
   * process wait for it by themselves. Await it before another process
   * reads the directory. Until then `manifest.files` holds zero sizes and
   * empty digests (filled in as the files are hashed). Rejects with
   * SnapshotError when the snapshot could not be written (the Image's VMs
   * cannot be restored then; build again). A build with volumes or
   * `diskMib` returns only once it is written.
   */
  saved(): Promise<void> {
    return this._publishing ?? Promise.resolve();
  }
  /** (extension) True when this Image.build booted a VM (cache miss). */
  readonly baked: boolean;
  /** @internal */ readonly cacheDir: string;
  /** @internal */ readonly bootTimeoutMs: number;
  /** @internal The egress policy of VMs restored through this object (pools may override it). */
  readonly network: CompiledPolicy;
  private handoff: Vm | undefined;
  private readonly handoffPaused: boolean;
  /** The workload the handoff VM starts when taken (its snapshot was taken before it started). */
  private readonly handoffWorkload: WorkloadSpec | null;
  private accelChoice: AcceleratorChoice | undefined;
  /** A QEMU started ahead of the next restore (pools keep one ready). */
  private spare: Promise<StartedQemu> | undefined;
  /** QEMU processes that VMs of this snapshot ran in, stopped, for the next restores (Vm._recycle), each with its expiry. */
  private recycled: { s: StartedQemu; expiry: NodeJS.Timeout }[] = [];
  /** The users of keepSpare, by whether each may still need a new QEMU process (the count of its calls). */
  private readonly spareWants = new Map<() => boolean, number>();
  /** This process's lease on the snapshot (cache-admin.ts): prune keeps it while held. */
  private readonly lease: SnapshotLease;
  /**
   * (extension) The image's ENTRYPOINT and CMD (what `supermachine run`
   * combines with its COMMAND); null for an Image loaded from a snapshot.
   */
  readonly imageCmd: { readonly entrypoint: readonly string[]; readonly cmd: readonly string[] } | null;
  /** The Image.build options this image came from (to bake it again at another size). */
  private readonly recipe: BuildOptions | undefined;
  /** Host directories of the manifest's mounts, by tag (from the build options; else the manifest's). */
  private readonly mountHosts: Map<string, string>;
  /** The same image at other sizes (pools with memoryMib/vcpus overrides), by "MEMxCPUS". */
  private siblings = new Map<string, Promise<Image>>();

  /** @internal */
  constructor(p: { snapshotPath: string; manifest: SnapshotManifest; baked: boolean; cacheDir: string; bootTimeoutMs?: number; handoff?: Vm; handoffPaused?: boolean; handoffWorkload?: WorkloadSpec | null; recipe?: BuildOptions; network?: CompiledPolicy; imageCmd?: { entrypoint: string[]; cmd: string[] }; mounts?: readonly ValidMount[]; publishing?: Promise<void> }) {
    this._publishing = p.publishing;
    this.lease = leaseSnapshot(p.snapshotPath);
    this.imageCmd = p.imageCmd ?? null;
    this.network = p.network ?? compilePolicy(true);
    this.snapshotPath = p.snapshotPath;
    this.manifest = p.manifest;
    this.baked = p.baked;
    this.cacheDir = p.cacheDir;
    this.bootTimeoutMs = p.bootTimeoutMs ?? (p.manifest.accel === "tcg" ? 120_000 : 30_000);
    this.handoff = p.handoff;
    this.handoffPaused = p.handoffPaused ?? false;
    this.handoffWorkload = p.handoffWorkload ?? null;
    this.recipe = p.recipe;
    this.mountHosts = new Map((p.mounts ?? []).map((m) => [m.guestTag, m.hostPath]));
  }

  get memoryMib(): number {
    return this.manifest.memoryMib;
  }

  get vcpus(): number {
    return this.manifest.vcpus;
  }

  /**
   * Builds (or finds in the cache) the snapshot of an image. A cache hit
   * returns without booting anything.
   */
  static async build(options: BuildOptions): Promise<Image> {
    const plan = await planBuild(options);
    const { v, accel, bootTimeoutMs, root, assets, files, cpuModel, aslr, bakePrewarm, config, workload } = plan;
    options = plan.options;
    return bakeLocked(plan, async (m) => cachedImage(plan, m), async (stage, rootfsSum) => {
      let vm: Vm | undefined;
      try {
        const id = randomBytes(4).toString("hex");
        bakePhase(plan, "boot");
        // Without volumes the bake starts from the boot template (a copy of
        // its RAM: the snapshot is then taken from that file).
        const boot = await coldBootLaunch({
          template: { accel: accel.accel, memoryMib: v.memoryMib, vcpus: v.vcpus, kernel: assets.kernel, initrd: assets.initrd, ...(cpuModel ? { cpuModel } : {}), cacheDir: v.cacheDir, timeoutMs: bootTimeoutMs },
          cmdline: kernelCmdline({ accel: accel.accel, hostname: `sm-${id}`, hasRootfs: true, disks: v.disks, aslr }),
          ram: "shared-file",
          useTemplate: v.disks.length === 0,
          ...(options.signal ? { signal: options.signal } : {}),
        });
        vm = await launchVm({
          id,
          accel,
          memoryMib: v.memoryMib,
          vcpus: v.vcpus,
          ...boot,
          ...(cpuModel ? { cpuModel } : {}),
          streamRing: true,
          rootfsImage: join(stage, "rootfs.erofs"),
          ...(v.disks.length ? { disks: v.disks } : {}),
          hostname: `sm-${id}`,
          config,
          bootTimeoutMs,
          network: v.network,
          mounts: v.mounts,
          ...(options.signal ? { signal: options.signal } : {}),
          origin: { image: { ref: root.ref, digest: root.digest }, config, workload, guestPort: v.guestPort, listenerRequired: v.listenerRequired, cacheDir: v.cacheDir },
        });
        bakePhase(plan, "warmup");
        for (const f of files) await vm.conn.writeFile(Buffer.from(f.guestPath), f.data, f.mode, true);
        if (workload && workload.startAt === "bake") {
          await startWorkload(vm, workload);
          await waitListener(vm, v.guestPort, options.listenerTimeoutMs ?? 120_000);
        }
        if (v.warmup) await v.warmup(vm);
        // What a pool's prewarm runs, once before the snapshot: the program's
        // pages are then in the snapshot's page cache, so no restored VM
        // reads them from its disk again (docs/performance.md). Only an
        // optimization: an exec the image's config cannot run (say, a User
        // missing from its /etc/passwd) does not fail the bake; a VM that
        // died fails the capture below, which says so.
        if (bakePrewarm) await basePrewarm(vm, bootTimeoutMs).catch(() => undefined);
        // The first bake from a boot template (TCG) leaves the blocks its QEMU
        // translated beside the template, for the VMs started from it later
        // (docs/boot-templates.md); later bakes find the list and skip this.
        await vm._recordTbHints().catch(() => 0);
        return await sealBake(plan, vm, stage, rootfsSum);
      } catch (e) {
        await vm?.destroy();
        throw e;
      }
    });
  }

  /**
   * @internal A pool's `prewarm` list baked from the warm-handoff VM of the
   * bake that just made this image (the same size): the VM runs the list and
   * its snapshot is taken again, under the key a full bake of `options` (the
   * sibling's recipe) has. Saves that bake's boot and warmup; the snapshot
   * holds the same steps (files, warmup, base prewarm, the list), with one
   * more capture between them. A snapshot that is there by now wins.
   */
  private static async derive(options: BuildOptions, h: { vm: Vm; paused: boolean }, prewarm: readonly (readonly string[])[], timeoutMs: number): Promise<Image> {
    const { vm } = h;
    let baked = false;
    try {
      const plan = await planBuild(options);
      return await bakeLocked(plan, async (m) => cachedImage(plan, m), async (stage, rootfsSum) => {
        bakePhase(plan, "warmup");
        if (h.paused) await vm._resume();
        await runPrewarmList(vm, prewarm, timeoutMs);
        const image = await sealBake(plan, vm, stage, rootfsSum);
        baked = true;
        return image;
      });
    } finally {
      // A snapshot found on disk, or a failure: the VM has no image to live on in.
      if (!baked) await vm.destroy();
    }
  }

  /** Loads a snapshot directory, checking every file against its manifest. */
  static async fromSnapshot(path: string): Promise<Image> {
    assertSupportedHost();
    if (typeof path !== "string" || path === "") throw invalidOption("path", "a snapshot directory", path);
    const dir = resolve(path);
    // A build of this process may still be writing it (Image.build returns before its snapshot is on disk).
    await publishingHere.get(dir)?.catch(() => undefined);
    const manifest = await readManifest(dir, "full");
    return new Image({ snapshotPath: dir, manifest, baked: false, cacheDir: defaultCacheDir() });
  }

  /** @internal Checks that this host can run the snapshot (same accelerator and arch). */
  accelFor(): AcceleratorChoice {
    if (this.accelChoice) return this.accelChoice;
    if (this.manifest.arch !== process.arch) throw new SnapshotError(`${this.snapshotPath} was taken on ${this.manifest.arch}; this host is ${process.arch}`);
    const here = chooseAccelerator();
    if (here.accel !== this.manifest.accel) {
      throw new SnapshotError(
        `${this.snapshotPath} was taken under ${this.manifest.accel} and this host runs ${here.accel} (${here.reason}); a snapshot only restores under the accelerator it was taken with. Rebuild the image here.`,
      );
    }
    this.accelChoice = here;
    return here;
  }

  /**
   * @internal The bake's own VM, once (warm handoff), running, with its
   * workload started (what a restore does): a pool takes it as a restored VM.
   * Undefined when there is none, it died, or its workload would not start
   * (a pool's next restore then reports the failure).
   */
  async takeHandoff(): Promise<Vm | undefined> {
    const vm = this.handoff;
    const paused = this.handoffPaused;
    this.handoff = undefined;
    if (!vm || vm.status !== "ready") return undefined;
    try {
      if (paused) await vm._resume();
      if (this.handoffWorkload) await startWorkload(vm, this.handoffWorkload);
      return vm;
    } catch {
      await vm.destroy();
      return undefined;
    }
  }

  /** @internal (tests) The warm-handoff VM, left in place, and whether it is stopped. */
  get _handoff(): { vm: Vm; paused: boolean } | undefined {
    return this.handoff ? { vm: this.handoff, paused: this.handoffPaused } : undefined;
  }

  /** @internal Destroys the warm-handoff VM if it is still here (a pool of another variant took over). */
  async dropHandoff(): Promise<void> {
    const vm = this.handoff;
    this.handoff = undefined;
    await vm?.destroy();
  }

  private restoreOptions(o: { signal?: AbortSignal; timeoutMs?: number; timings?: Record<string, number>; cpu?: Record<string, PhaseCpu>; network?: CompiledPolicy }): RestoreOptions {
    return {
      network: o.network ?? this.network,
      snapshotDir: this.snapshotPath,
      manifest: this.manifest,
      cacheDir: this.cacheDir,
      bootTimeoutMs: o.timeoutMs ?? this.bootTimeoutMs,
      accel: this.accelFor(),
      mounts: this.restoreMounts(),
      ...(o.signal ? { signal: o.signal } : {}),
      ...(o.timings ? { timings: o.timings } : {}),
      ...(o.cpu ? { cpu: o.cpu } : {}),
    };
  }

  /** The snapshot's mounts, with this image's host directories. */
  private restoreMounts(): ValidMount[] {
    return (this.manifest.mounts ?? []).map((m) => ({
      guestTag: m.guestTag,
      symlinks: m.symlinks,
      readOnly: m.readOnly,
      hostPath: this.mountHosts.get(m.guestTag) ?? m.hostPath,
      ...(m.guestPath !== undefined ? { guestPath: m.guestPath } : {}),
    }));
  }

  /**
   * @internal Keeps one QEMU process started ahead of the next restore while
   * a pool uses this image: QEMU's own start-up (~35 ms under TCG) leaves
   * the restore path. `wants` tells whether that user may still need a new
   * process (a pool below its `max`; with reused processes, one at its
   * `max` does not): a spare nobody will take only costs the CPU of its
   * start-up, beside the VMs that are running. Give the same `wants` to
   * the call that turns it off.
   */
  keepSpare(on: boolean, wants: () => boolean = always): Promise<void> {
    const n = (this.spareWants.get(wants) ?? 0) + (on ? 1 : -1);
    if (n > 0) this.spareWants.set(wants, n);
    else this.spareWants.delete(wants);
    if (this.spareWants.size > 0) this.prepareSpare();
    else return this.dropStarted();
    return Promise.resolve();
  }

  /** Stops the spare and the recycled QEMUs; resolves when they are gone. */
  private async dropStarted(): Promise<void> {
    const gone = this.recycled.splice(0).map((r) => {
      clearTimeout(r.expiry);
      return discardQemu(r.s);
    });
    const s = this.spare;
    this.spare = undefined;
    if (s) gone.push(s.then(discardQemu, () => undefined));
    await Promise.all(gone);
  }

  /**
   * @internal Takes back the QEMU of a VM of this image that ended
   * (Vm._recycle), for the next restore while a pool uses the image; at
   * most {@link MAX_RECYCLED} wait, the others are stopped.
   */
  recycle(s: StartedQemu): Promise<void> {
    if (this.spareWants.size === 0 || this.recycled.length >= MAX_RECYCLED) return discardQemu(s);
    // Not kept for long unused: it holds the previous guest's memory, and a
    // pool at min 0 that goes quiet should hold no process.
    const entry = {
      s,
      expiry: setTimeout(() => {
        this.recycled = this.recycled.filter((r) => r !== entry);
        void discardQemu(s);
      }, recycledTtlMs()).unref(),
    };
    this.recycled.push(entry);
    return Promise.resolve();
  }

  private prepareSpare(): void {
    if (this.spare || ![...this.spareWants.keys()].some((w) => w())) return;
    const s = Promise.resolve(this._publishing)
      .then(() => restoreSpec(this.restoreOptions({})))
      .then((spec) => startQemu(spec));
    s.catch(() => {
      if (this.spare === s) this.spare = undefined;
    });
    this.spare = s;
  }

  /** @internal Restores one VM from the snapshot (copy-on-write RAM). */
  async restore(o: { signal?: AbortSignal; timeoutMs?: number; timings?: Record<string, number>; cpu?: Record<string, PhaseCpu>; network?: CompiledPolicy } = {}): Promise<Vm> {
    if (this._publishing) await this._publishing;
    let started: StartedQemu | undefined;
    while (!started && this.recycled.length > 0) {
      const r = this.recycled.pop()!;
      clearTimeout(r.expiry);
      if (r.s.qemu.exitStatus) void discardQemu(r.s);
      else started = r.s;
    }
    if (!started && this.spare) {
      const s = this.spare;
      this.spare = undefined;
      started = await s.catch(() => undefined);
      if (started && started.qemu.exitStatus) started = undefined;
    }
    const vm = await restoreVm(this.restoreOptions(o), started);
    this.prepareSpare();
    try {
      const w = this.manifest.workload;
      if (w && w.startAt === "restore") await startWorkload(vm, w);
    } catch (e) {
      await vm.destroy();
      throw e;
    }
    return vm;
  }

  /**
   * @internal This image at another memory size / vCPU count, or with a
   * pool's `prewarm` commands run before its snapshot. A snapshot's RAM size
   * and CPU count are fixed, so the image is baked again at that size on
   * first use (its Image.build options rerun, warmup included) and cached
   * like any build: on disk under its own key, here per variant (a list at
   * the same size is baked from this image's own bake VM while it is still
   * here: Image.derive, no second boot). A baked
   * prewarm leaves the programs' pages in the snapshot's page cache, at the
   * same guest-physical addresses in every restored VM, so under TCG their
   * translations outlive each VM in a reused QEMU (docs/performance.md).
   */
  sibling(memoryMib: number, vcpus: number, prewarm: readonly (readonly string[])[] = [], timeoutMs = 30_000): Promise<Image> {
    if (memoryMib === this.memoryMib && vcpus === this.vcpus && prewarm.length === 0) return Promise.resolve(this);
    const pw = prewarm.length ? createHash("sha256").update(JSON.stringify(prewarm)).digest("hex").slice(0, 12) : "";
    const k = `${memoryMib}x${vcpus}${pw ? `+${pw}` : ""}`;
    let p = this.siblings.get(k);
    if (p) return p;
    const recipe = this.recipe;
    if (!recipe) {
      return Promise.reject(
        new PoolError(
          `${this.snapshotPath} was loaded from a snapshot taken with memoryMib ${this.memoryMib} and vcpus ${this.vcpus}, and the steps that made it (warmup, staged files, a running VM's state) cannot be replayed at another size. ` +
            `Build the image with Image.build({ ..., memoryMib: ${memoryMib}, vcpus: ${vcpus} }) (a pool of an Image.build result bakes the new size itself), or drop the pool's memoryMib/vcpus.`,
        ),
      );
    }
    const { signal: _signal, ...rest } = recipe;
    const suffix = `${memoryMib !== this.memoryMib || vcpus !== this.vcpus ? `-${memoryMib}m${vcpus}c` : ""}${pw ? `-pw${pw}` : ""}`;
    const name = recipe.name ? `${recipe.name.slice(0, 128 - suffix.length)}${suffix}` : undefined;
    const warmup = recipe.warmup;
    const options: BuildOptions = {
      ...rest,
      memoryMib,
      vcpus,
      ...(name ? { name } : {}),
      ...(pw
        ? {
            // Part of the snapshot key: another prewarm list is another bake.
            warmupTag: `${recipe.warmupTag ?? "default"} + prewarm ${JSON.stringify(prewarm)}`,
            warmup: async (vm: WarmupVm) => {
              if (warmup) await warmup(vm);
              await runPrewarmList(vm, prewarm, timeoutMs);
            },
          }
        : {}),
    };
    // Only the list differs and this process's bake VM is still here, its
    // workload not started: the list is baked from it (Image.derive), not
    // from a new boot. Not with volumes (their disks were flattened into
    // this image's snapshot).
    // @internal SUPERMACHINE_DERIVE_SIBLING=0: always bake again (for benchmarks).
    const vm = this.handoff;
    const derive = pw && memoryMib === this.memoryMib && vcpus === this.vcpus && vm?.status === "ready" && !this.manifest.disks?.length && process.env.SUPERMACHINE_DERIVE_SIBLING !== "0";
    if (derive) this.handoff = undefined;
    p = derive ? Image.derive(options, { vm, paused: this.handoffPaused }, prewarm, timeoutMs) : Image.build(options);
    this.siblings.set(k, p);
    p.catch(() => this.siblings.delete(k));
    return p;
  }

  /** @internal Whether sibling() can bake this image again (it came from Image.build). */
  get _rebakeable(): boolean {
    return this.recipe !== undefined;
  }

  /** A pool of VMs restored from this image's snapshot. */
  pool(options: PoolOptions = {}): Promise<Pool> {
    return Pool.create(this, options);
  }

  /**
   * Destroys the warm-handoff VM if no pool took it, and any QEMU started
   * ahead (also of the sizes pools baked), and gives up this object's lease
   * on the snapshot (`prune` may then remove it once no pool uses it).
   */
  async close(): Promise<void> {
    // Nothing of this object's left running: a derived snapshot is published (or its stage gone) first.
    await this._publishing?.catch(() => undefined);
    this.lease.release();
    const siblings = [...this.siblings.values()];
    this.siblings.clear();
    await Promise.all(siblings.map((s) => s.then((i) => i.close(), () => undefined)));
    const vm = this.handoff;
    this.handoff = undefined;
    await vm?.destroy();
    this.spareWants.clear();
    await this.dropStarted();
  }
}

const always = (): boolean => true;

/** Starts the image's workload under the agent (detached from every stream). */
export async function startWorkload(vm: Vm, w: WorkloadSpec): Promise<number> {
  const r = new RecordBuilder();
  for (const a of w.argv) r.bytes(Tag.WORKLOAD_START.argv, a);
  for (const e of w.env) r.bytes(Tag.WORKLOAD_START.env, e);
  if (w.cwd) r.bytes(Tag.WORKLOAD_START.cwd, w.cwd);
  if (w.user) r.bytes(Tag.WORKLOAD_START.user, w.user);
  const ok = await vm.conn.request(MsgType.WORKLOAD_START, r);
  return ok.u32(Tag.WORKLOAD_START_OK.pid) ?? 0;
}

async function waitListener(vm: Vm, port: number, timeoutMs: number): Promise<void> {
  try {
    await vm.conn.waitListen(port, timeoutMs);
  } catch (e) {
    const output = await vm._logsTail().catch(() => "");
    throw new TimeoutError(
      `listenerRequired: nothing listened on guest port ${port} within ${timeoutMs} ms of starting the workload. Check guestPort, the workload's command (cmd), or raise listenerTimeoutMs.\n` +
        (output ? `--- workload output (tail) ---\n${output}\n` : "") +
        `--- guest console (tail) ---\n${vm.consoleTail()}`,
      timeoutMs,
      { cause: e },
    );
  }
}
