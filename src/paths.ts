/**
 * Where supermachine keeps things on the host.
 */

import { homedir } from "node:os";
import { join, resolve } from "node:path";

/**
 * The cache root: kernels, initramfs images, image blobs, root filesystem
 * images. `$SUPERMACHINE_CACHE_DIR`, else `$XDG_CACHE_HOME/supermachine`,
 * else `~/.cache/supermachine`.
 */
export function defaultCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SUPERMACHINE_CACHE_DIR) return resolve(env.SUPERMACHINE_CACHE_DIR);
  if (env.XDG_CACHE_HOME) return resolve(env.XDG_CACHE_HOME, "supermachine");
  return join(env.HOME || homedir(), ".cache", "supermachine");
}

/**
 * Where snapshots go: `$SUPERMACHINE_SNAPSHOTS_DIR`, else
 * `~/.local/supermachine-snapshots`.
 */
export function defaultSnapshotsDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.SUPERMACHINE_SNAPSHOTS_DIR ?? join(env.HOME || homedir(), ".local", "supermachine-snapshots");
}
