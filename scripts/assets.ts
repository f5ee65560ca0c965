/**
 * Setup step (run by scripts/setup.mjs after the TypeScript build): fetch the
 * guest kernel into the asset cache and build the default image. A fast
 * no-op when both are there.
 */

import { defaultCacheDir } from "../src/paths.js";
import { bootAssets } from "../src/guest/assets.js";
import { ensureDefaultImage } from "../src/guest/default-image.js";
import { fetchDebianKernel } from "../src/guest/kernel.js";
import { SupermachineError } from "../src/errors.js";

async function main(): Promise<void> {
  const cacheDir = defaultCacheDir();
  const log = (s: string) => console.log(`setup: ${s}`);
  if (!process.env.SUPERMACHINE_KERNEL) {
    const k = await fetchDebianKernel(cacheDir, { refresh: process.argv.includes("--refresh-kernel"), log });
    if (!k.fetched) log(`kernel ${k.version} already cached`);
  }
  const img = await ensureDefaultImage(cacheDir);
  log(`default image: ${img}`);
  const a = await bootAssets({ cacheDir });
  log(`boot assets: kernel ${a.kernel}, initramfs ${a.initrd}`);
}

main().catch((e: unknown) => {
  if (e instanceof SupermachineError) console.error(`setup: ${e.message}`);
  else console.error(e);
  process.exit(1);
});
