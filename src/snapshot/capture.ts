/**
 * Taking a snapshot of a running VM, which keeps running afterwards, and
 * restoring VMs from snapshots.
 *
 * A VM whose RAM is a shared file (a bake VM) is captured by saving its
 * device state with `x-ignore-shared` and copying the RAM file (sparse).
 * Any other VM (booted with anonymous RAM, or restored with a private
 * mapping) is saved whole (RAM in the stream), then a helper QEMU with a
 * shared RAM file at the destination loads that stream and saves it again
 * the fast way: every snapshot ends up in the one format restores map
 * copy-on-write.
 */

import { randomBytes } from "node:crypto";
import { unlink } from "node:fs/promises";
import { join } from "node:path";
import { SnapshotError } from "../errors.js";
import { MsgType } from "../protocol/constants.js";
import { QemuProcess, UNNAMED_TCG_CPU } from "../vmm/qemu.js";
import { QmpClient, connectQmp } from "../vmm/qmp.js";
import { createRuntimeDir, removeRuntimeDir } from "../vm/runtime-dir.js";
import { launchVm, type LaunchSpec, type StartedQemu, type Vm } from "../vm/vm.js";
import { ringDisk } from "../agent-client/ring.js";
import { fileRecord, fsyncFile, ramRecord, sparseCopy, stubKernelPath } from "./files.js";
import { manifestDisks, type RamFile, type SnapshotDisk, type SnapshotFile, type SnapshotManifest, type SnapshotMount } from "./manifest.js";
import { emptyImagePath, flattenOverlay, overlayPath, type QemuDisk } from "../volumes/disks.js";
import { diskFileName, diskSerial, type DiskPlan } from "../volumes/spec.js";
import type { ValidMount } from "../mounts/attach.js";
import { loadState, saveState } from "./migrate.js";

const SAVE_TIMEOUT_MS = 120_000;

/**
 * Loads a full migration stream into a paused helper QEMU whose RAM is a
 * shared file at `ramPath`, and saves its device state (RAM left out) to
 * `statePath`.
 */
async function reconstitute(launch: LaunchSpec, stream: string, ramPath: string, statePath: string, disks: QemuDisk[]): Promise<void> {
  const dir = createRuntimeDir();
  const q = await QemuProcess.start({
    accel: launch.accel.accel,
    memoryMib: launch.memoryMib,
    vcpus: launch.vcpus,
    kernel: await stubKernelPath(launch.origin.cacheDir),
    cmdline: "",
    ...(launch.rootfsImage ? { rootfs: launch.rootfsImage } : {}),
    // The same disks (the stream holds their devices' state), read-only:
    // the helper never runs the guest; the same stream ring disk after them.
    ...(disks.length || launch.streamRing ? { disks: [...disks, ...(launch.streamRing ? [ringDisk(dir)] : [])] } : {}),
    memoryFile: { path: ramPath, share: true },
    incoming: true,
    paused: true,
    dir,
    name: `sm-${launch.id}-s`,
    ...(launch.cpuModel ? { cpuModel: launch.cpuModel } : {}),
    // The stream holds the NIC's state, so the helper needs the same device.
    // It never runs the guest: its netdev is left unconnected (QEMU 7.2
    // starts anyway when nobody listens). Every VM has a NIC.
    netSocket: join(dir, "net-unused.sock"),
  });
  let qmp: QmpClient | undefined;
  try {
    qmp = await connectQmp(q, Date.now() + SAVE_TIMEOUT_MS);
    await loadState(qmp, dir, stream, { ignoreShared: false, timeoutMs: SAVE_TIMEOUT_MS });
    await saveState(qmp, dir, statePath, { ignoreShared: true, timeoutMs: SAVE_TIMEOUT_MS });
  } catch (e) {
    // Say why: QEMU prints the reason (e.g. a device or RAM block the
    // stream has and the helper lacks) and exits.
    const ex = await Promise.race([q.exited, new Promise<undefined>((r) => setTimeout(() => r(undefined), 1000).unref())]);
    const lines = [...(ex ? [`QEMU exited (${ex.signal ?? `code ${ex.code}`})`] : []), ...q.consoleTail().trim().split("\n").slice(-5).filter(Boolean)];
    const detail = lines.length ? `\n--- helper QEMU (tail) ---\n${lines.join("\n")}` : "";
    throw new SnapshotError(`could not rebuild the snapshot's memory file: ${(e as Error).message}${detail}`, { cause: e });
  } finally {
    qmp?.close();
    await q.stop();
    await removeRuntimeDir(dir);
  }
}

/** The records of a capture's files (sizes and digests, for the manifest). */
export interface CapturedFiles {
  ram: RamFile;
  state: SnapshotFile;
  disks: SnapshotDisk[];
}

/**
 * Writes `ram` and `state` of a running VM into `stage`. The VM is paused
 * (and its agent quiet) only while its state is saved; it runs on after.
 */
export async function captureVm(vm: Vm, stage: string): Promise<CapturedFiles & { mounts: SnapshotMount[] }> {
  const c = await captureVmEarly(vm, stage);
  return { ...(await c.files), mounts: c.mounts };
}

/**
 * captureVm, resolving as soon as the VM runs again: `files` resolves once
 * the copies are hashed and on disk (a bake VM's: ~0.15 s later). The
 * stage's files must not be touched before then.
 */
export async function captureVmEarly(vm: Vm, stage: string): Promise<{ files: Promise<CapturedFiles>; mounts: SnapshotMount[] }> {
  // Host directories are never part of a snapshot: unmounted in the guest
  // first, mounted again at the same places afterwards (and in every restore).
  const mounts = await vm._detachMounts();
  let files: Promise<CapturedFiles>;
  try {
    files = (await captureDetached(vm, stage)).files;
  } finally {
    if (vm.status === "ready" && mounts.length > 0) await vm._attachMounts(mounts);
  }
  return {
    files,
    mounts: mounts.map((m) => ({ guestTag: m.guestTag, symlinks: m.symlinks, readOnly: m.readOnly, hostPath: m.hostPath, ...(m.guestPath !== undefined ? { guestPath: m.guestPath } : {}) })),
  };
}

/** The capture; its promise of the records is already settled except on the fast path (shared-file RAM), whose hash runs on while the VM does. */
async function captureDetached(vm: Vm, stage: string): Promise<{ files: Promise<CapturedFiles> }> {
  const ramPath = join(stage, "ram");
  const statePath = join(stage, "state");
  const plans = vm.launch.disks ?? [];
  // The disks are flattened while the VM is stopped (its writes after the
  // snapshot go on into its own overlay, never into the snapshot's images).
  const flattenDisks = async () => {
    const bases = vm.launch.diskBases;
    for (const [i, d] of plans.entries()) {
      await flattenOverlay(overlayPath(vm.runtimeDir, d), bases?.[i] ?? emptyImagePath(vm.runtimeDir, d), join(stage, diskFileName(d)));
    }
  };
  const diskRecords = async (): Promise<SnapshotDisk[]> => {
    const out: SnapshotDisk[] = [];
    for (const d of plans) out.push({ role: d.role, name: d.name, sizeMib: d.sizeMib, mountPoint: d.mountPoint, ...(await fileRecord(join(stage, diskFileName(d)))) });
    return out;
  };
  // No liveness pings while the agent is quiet and the VM paused (a ping
  // would also end the agent's quiet period).
  const resume = vm.conn.pauseLiveness();
  // The agent finishes what it was writing and then stays silent: no frame is
  // half-way through the channel when the state is saved.
  try {
    await vm.conn.request(MsgType.SNAPSHOT_PREPARE);
  } catch (e) {
    // The agent may have stopped the guest's processes before it failed to answer.
    await vm.configure({ identity: "reseed" }).catch(() => undefined);
    resume();
    throw e;
  }
  let qmp: QmpClient | undefined;
  let running = true;
  try {
    qmp = await vm.qmp();
    await qmp.execute("stop");
    running = false;
    if (vm.ram.kind === "shared-file") {
      await saveState(qmp, vm.runtimeDir, statePath, { ignoreShared: true, timeoutMs: SAVE_TIMEOUT_MS });
      // Only the copy happens while the guest is stopped (cp copies the data
      // extents and leaves the holes: ~40 ms for a Python guest's 80 MB of
      // 256 MiB); the hash is taken from the copy once it runs again (0.2–0.4 s).
      await sparseCopy(join(vm.runtimeDir, "ram"), ramPath);
      await flattenDisks();
      await qmp.execute("cont");
      running = true;
      const files = records(ramPath, statePath, diskRecords);
      files.catch(() => undefined);
      return { files };
    }
    const stream = join(stage, `state.full-${randomBytes(4).toString("hex")}`);
    try {
      await saveState(qmp, vm.runtimeDir, stream, { ignoreShared: false, timeoutMs: SAVE_TIMEOUT_MS });
      await flattenDisks();
      await qmp.execute("cont");
      running = true;
      const helperDisks: QemuDisk[] = plans.map((d, i) => ({ serial: diskSerial(d, i), file: join(stage, diskFileName(d)), format: "raw", readOnly: true, backing: [] }));
      await reconstitute(vm.launch, stream, ramPath, statePath, helperDisks);
    } finally {
      await unlink(stream).catch(() => undefined);
    }
    return { files: Promise.resolve(await records(ramPath, statePath, diskRecords)) };
  } finally {
    if (!running) await qmp?.execute("cont").catch(() => undefined);
    // Any frame ends the agent's quiet period. SNAPSHOT_PREPARE stopped
    // every guest process; a CONFIGURE continues them, after reseeding the
    // RNG (the snapshot file holds this VM's RNG state) and stepping the
    // clock. This VM keeps its hostname, machine-id and boot_id. Sent, not
    // waited for (its failure was always ignored): the agent handles frames
    // in order, so whatever this VM is asked next runs after it. A pool's
    // derived snapshot hands the VM on without that round trip (≈ 25 ms of
    // its capture under TCG, docs/performance.md); a pause of the VM waits
    // for it (Vm._pause).
    vm._afterCapture(
      vm
        .configure({ identity: "reseed" })
        .catch(() => undefined)
        .then(resume),
    );
  }
}

/**
 * The RAM and state files' records, once their data is on disk: the RAM
 * file's fsync (its ~80 MB of a Python guest, ~50–60 ms) overlaps its hash
 * instead of following it. A snapshot's publish fsyncs only what is written
 * after this (the manifest, disk images).
 */
async function records(ramPath: string, statePath: string, disks: () => Promise<SnapshotDisk[]>): Promise<CapturedFiles> {
  const [ram, state] = await Promise.all([ramRecord(ramPath), fileRecord(statePath), fsyncFile(ramPath), fsyncFile(statePath)]);
  return { ram, state, disks: await disks() };
}

export interface RestoreOptions {
  snapshotDir: string;
  manifest: SnapshotManifest;
  cacheDir: string;
  bootTimeoutMs: number;
  signal?: AbortSignal;
  accel: LaunchSpec["accel"];
  timings?: Record<string, number>;
  /** CPU per phase (see LaunchSpec.cpu). */
  cpu?: LaunchSpec["cpu"];
  /** The restored VM's egress policy (not part of the snapshot). */
  network?: LaunchSpec["network"];
  /**
   * The host network stack's socket for the restored VM's NIC. Required when
   * the snapshot was taken of a VM with a NIC (migration needs the same
   * devices), and only then.
   */
  netSocket?: string;
  /** Mounts of the restored VM (each mounted at its guestPath): the manifest's, with the caller's host paths. */
  mounts?: readonly ValidMount[];
}

/** The launch of a VM restored from a snapshot: its RAM maps the snapshot's copy-on-write. */
export async function restoreSpec(o: RestoreOptions, id: string = randomBytes(4).toString("hex")): Promise<LaunchSpec> {
  const m = o.manifest;
  const disks: DiskPlan[] = manifestDisks(m).map((d) => ({ role: d.role, name: d.name, sizeMib: d.sizeMib, mountPoint: d.mountPoint }));
  return {
    id,
    accel: o.accel,
    memoryMib: m.memoryMib,
    vcpus: m.vcpus,
    kernel: await stubKernelPath(o.cacheDir),
    cmdline: "",
    rootfsImage: join(o.snapshotDir, "rootfs.erofs"),
    ...(disks.length ? { disks, diskBases: disks.map((d) => join(o.snapshotDir, diskFileName(d))) } : {}),
    ram: { kind: "snapshot", path: join(o.snapshotDir, "ram") },
    incomingState: join(o.snapshotDir, "state"),
    hostname: `sm-${id}`,
    bootTimeoutMs: o.bootTimeoutMs,
    ...(o.signal ? { signal: o.signal } : {}),
    // A manifest without a model was baked with the old default.
    cpuModel: m.cpuModel ?? UNNAMED_TCG_CPU,
    ...(m.streamRing ? { streamRing: true } : {}),
    ...(o.timings ? { timings: o.timings } : {}),
    ...(o.cpu ? { cpu: o.cpu } : {}),
    ...(o.network ? { network: o.network } : {}),
    ...(o.netSocket !== undefined ? { netSocket: o.netSocket } : {}),
    ...(o.mounts?.length ? { mounts: o.mounts } : {}),
    origin: {
      image: m.image,
      config: m.config,
      workload: m.workload,
      guestPort: m.guestPort,
      listenerRequired: m.listenerRequired,
      cacheDir: o.cacheDir,
    },
  };
}

/** Restores a VM, on a QEMU started ahead of time when one is given. */
export async function restoreVm(o: RestoreOptions, started?: StartedQemu): Promise<Vm> {
  // A reused QEMU runs a new VM: it gets an id of its own.
  return launchVm(await restoreSpec(o, started?.reload ? undefined : started?.id), started);
}
