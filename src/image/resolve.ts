/**
 * IMAGE → bootable root filesystem image + config. (Registry pulls land
 * here; until then, only local root filesystem directories boot.)
 */

import { ImageError } from "../errors.js";
import type { GuestConfig } from "../vm/vm.js";

export interface ResolveOptions {
  onProgress?: (message: string) => void;
}

export async function resolveRootfs(ref: string, _o: ResolveOptions = {}): Promise<{ rootfsImage: string; config: GuestConfig }> {
  throw new ImageError(`cannot run image ${JSON.stringify(ref)}: registry images are not supported yet; use --rootfs DIR or the default image`);
}
