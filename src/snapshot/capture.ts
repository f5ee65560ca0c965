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
import { stat, unlink } from "node:fs/promises";
import { join } from "node:path";
import { SnapshotError } from "../errors.js";
import { MsgType } from "../protocol/constants.js";
import { QemuProcess } from "../vmm/qemu.js";
import { QmpClient, connectQmp } from "../vmm/qmp.js";
import { createRuntimeDir, removeRuntimeDir } from "../vm/runtime-dir.js";
import { launchVm, type LaunchSpec, type StartedQemu, type Vm } from "../vm/vm.js";
import { sha256File, sparseCopyWithHash, stubKernelPath } from "./files.js";
import type { SnapshotFile, SnapshotManifest } from "./manifest.js";
import { loadState, saveState } from "./migrate.js";

const SAVE_TIMEOUT_MS = 120_000;

async function fileRecord(path: string): Promise<SnapshotFile> {
  return { size: (await stat(path)).size, sha256: await sha256File(path) };
}

/**
 * Loads a full migration stream into a paused helper QEMU whose RAM is a
 * shared file at `ramPath`, and saves its device state (RAM left out) to
 * `statePath`.
 */
async function reconstitute(launch: LaunchSpec, stream: string, ramPath: string, statePath: string): Promise<void> {
  const dir = createRuntimeDir();
  const q = await QemuProcess.start({
    accel: launch.accel.accel,
    memoryMib: launch.memoryMib,
    vcpus: launch.vcpus,
    kernel: await stubKernelPath(launch.origin.cacheDir),
    cmdline: "",
    ...(launch.rootfsImage ? { rootfs: launch.rootfsImage } : {}),
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

/**
 * Writes `ram` and `state` of a running VM into `stage`. The VM is paused
 * (and its agent quiet) only while its state is saved; it runs on after.
 */
export async function captureVm(vm: Vm, stage: string): Promise<{ ram: SnapshotFile; state: SnapshotFile }> {
  const ramPath = join(stage, "ram");
  const statePath = join(stage, "state");
  // No liveness pings while the agent is quiet and the VM paused (a ping
  // would also end the agent's quiet period).
  const resume = vm.conn.pauseLiveness();
  // The agent finishes what it was writing and then stays silent: no frame is
  // half-way through the channel when the state is saved.
  try {
    await vm.conn.request(MsgType.SNAPSHOT_PREPARE);
  } catch (e) {
    resume();
    throw e;
  }
  const qmp = await vm.qmp();
  let running = true;
  await qmp.execute("stop");
  running = false;
  try {
    if (vm.ram.kind === "shared-file") {
      await saveState(qmp, vm.runtimeDir, statePath, { ignoreShared: true, timeoutMs: SAVE_TIMEOUT_MS });
      const copy = await sparseCopyWithHash(join(vm.runtimeDir, "ram"), ramPath);
      await qmp.execute("cont");
      running = true;
      return { ram: { size: copy.size, sha256: copy.sha256 }, state: await fileRecord(statePath) };
    }
    const stream = join(stage, `state.full-${randomBytes(4).toString("hex")}`);
    try {
      await saveState(qmp, vm.runtimeDir, stream, { ignoreShared: false, timeoutMs: SAVE_TIMEOUT_MS });
      await qmp.execute("cont");
      running = true;
      await reconstitute(vm.launch, stream, ramPath, statePath);
    } finally {
      await unlink(stream).catch(() => undefined);
    }
    return { ram: await fileRecord(ramPath), state: await fileRecord(statePath) };
  } finally {
    if (!running) await qmp.execute("cont").catch(() => undefined);
    // Any frame ends the agent's quiet period.
    await vm.conn.ping().catch(() => undefined);
    resume();
  }
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
}

/** The launch of a VM restored from a snapshot: its RAM maps the snapshot's copy-on-write. */
export async function restoreSpec(o: RestoreOptions, id: string = randomBytes(4).toString("hex")): Promise<LaunchSpec> {
  const m = o.manifest;
  return {
    id,
    accel: o.accel,
    memoryMib: m.memoryMib,
    vcpus: m.vcpus,
    kernel: await stubKernelPath(o.cacheDir),
    cmdline: "",
    rootfsImage: join(o.snapshotDir, "rootfs.erofs"),
    ram: { kind: "snapshot", path: join(o.snapshotDir, "ram") },
    incomingState: join(o.snapshotDir, "state"),
    hostname: `sm-${id}`,
    bootTimeoutMs: o.bootTimeoutMs,
    ...(o.signal ? { signal: o.signal } : {}),
    ...(m.cpuModel ? { cpuModel: m.cpuModel } : {}),
    ...(o.timings ? { timings: o.timings } : {}),
    ...(o.cpu ? { cpu: o.cpu } : {}),
    ...(o.network ? { network: o.network } : {}),
    ...(o.netSocket !== undefined ? { netSocket: o.netSocket } : {}),
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
  return launchVm(await restoreSpec(o, started?.id), started);
}
