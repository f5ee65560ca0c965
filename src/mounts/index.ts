/**
 * mounts/: live host directories inside the VM. The guest kernel's FUSE
 * requests travel over the agent protocol to a {@link FuseServer} per mount,
 * which serves one host directory and enforces the symlink policy. Pure
 * host-side code: no VM here. See docs/mounts.md.
 */

export {
  FuseServer,
  MAX_PAGES,
  MAX_READ_BYTES,
  MAX_SYMLINK_TARGET,
  MAX_WRITE_BYTES,
  NAME_MAX,
  OVERFLOW_ID,
  type FuseServerOptions,
  type MountSpec,
  type SymlinkPolicy,
} from "./server.js";
export * as fuseWire from "./wire.js";
