/**
 * Setup step (run by scripts/setup.mjs after the TypeScript build): builds
 * QEMU with the patches in qemu/ (qemu/README.md) into the cache
 * (`<cache>/qemu/bin/qemu-system-x86_64`, src/vmm/qemu-build.ts), where
 * findQemu() looks before PATH.
 *
 *   node dist/scripts/qemu.js [--required]
 *
 * Without --required a failure only warns: VMs then run on the host's QEMU
 * without process reuse (docs/qemu-reuse.md).
 */

import { buildPatchedQemu } from "../src/vmm/qemu-build.js";
import { builtQemuDir } from "../src/vmm/qemu.js";

const log = (s: string) => console.log(`setup: ${s}`);

async function main(): Promise<void> {
  const r = await buildPatchedQemu({ dest: builtQemuDir(), log });
  if (r.status === "present") log(`QEMU with the qemu/ patches already built: ${r.binary}`);
  else if (r.status === "built") log(`QEMU with the qemu/ patches: ${r.binary}`);
  else if (r.status === "skipped") log(`${r.reason}; using the host's QEMU`);
  else {
    if (process.argv.includes("--required")) throw new Error(`could not build QEMU with process reuse: ${r.reason}`);
    log(`could not build QEMU with process reuse (VMs use the host's QEMU, one process per VM): ${r.reason}`);
  }
}

main().catch((e: unknown) => {
  console.error(`setup: ${(e as Error).message}`);
  process.exit(1);
});
