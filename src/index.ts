/**
 * @supermachine/core for Linux: run any OCI/Docker image as a
 * hardware-isolated microVM (QEMU microvm on KVM, or TCG where the host has
 * no hardware virtualization).
 */

export * from "./errors.js";
export { Vm, type VmBootOptions, type GuestConfig, type VmNetwork } from "./vm/vm.js";
export type { NetworkPolicy, NetworkOption } from "./net/policy.js";
export { GUEST_NETWORK, type NetworkStats, type NetworkDeniedEvent } from "./net/stack.js";
export { Image, type BuildOptions, type ExtraFile, type MountSpec, type VolumeSpec, type WarmupVm } from "./image/image.js";
export { defaultImageRef } from "./guest/default-image.js";
export { Pool, type PoolOptions, type PoolStats } from "./pool/pool.js";
export { resolveImage, type ImageProgress, type ResolvedImage } from "./image/resolve.js";
export {
  listImages,
  findImages,
  removeImage,
  listSnapshots,
  removeSnapshot,
  prune,
  type CacheDirs,
  type CachedImage,
  type CachedSnapshot,
  type SnapshotLeaseInfo,
  type PruneOptions,
  type PruneResult,
  type PruneEntry,
} from "./image/cache-admin.js";
export { ExecChild } from "./vm/exec-child.js";
export { DEFAULT_LAYER_LIMITS, LAYER_LIMIT_ENV, type LayerLimits } from "./rootfs/limits.js";
export { TcpForwarder } from "./vm/tcp-forwarder.js";
export { LogReader, LOG_BUFFER_BYTES, type LogEntry, type LogsOptions } from "./vm/logs.js";
export type { ExecOptions, ExecOutput, ExecWaitResult, StagedFileMode, Winsize } from "./vm/options.js";
export { confinement, type ConfinementItem, type ConfinementReport } from "./vmm/confine.js";
export { chooseAccelerator, type Accelerator, type AcceleratorOption, type AcceleratorChoice } from "./vmm/accel.js";
export { SUPPORTED_HOSTS, assertSupportedHost, platformPackageName, platformPackageStatus, type PlatformAssets, type PlatformPackageStatus } from "./platform/index.js";
export { doctor, formatDoctorReport, type DoctorCheck, type DoctorOptions, type DoctorReport, type DoctorStatus } from "./doctor/index.js";
