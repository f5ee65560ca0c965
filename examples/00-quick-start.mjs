// The seed's quick start, as it is written there: build an image, make a
// pool, acquire a VM, run one command, give the VM back.
//
// The seed builds "alpine:latest" from a registry; this example runs offline
// from a checkout, so it uses the default image (busybox, built locally) or
// the image named by SUPERMACHINE_EXAMPLE_IMAGE (any ref Image.build takes:
// "alpine:latest", "oci:/path/to/layout:tag", "dir:/path/to/rootfs", ...).
//
//   node examples/00-quick-start.mjs

import { Image, defaultImageRef } from "@supermachine/core";

const ref = process.env.SUPERMACHINE_EXAMPLE_IMAGE ?? (await defaultImageRef());

const image = await Image.build({ ref });
const pool  = await image.pool({ min: 4, max: 16 });
const vm    = await pool.acquire();
try {
  const { stdout, exitCode } = await vm.exec({
    argv: ["echo", "hello from the VM"],
    timeoutMs: 5_000,
  });
  console.log(stdout.toString());   // "hello from the VM\n"
  console.log(`exit code ${exitCode}, accelerator ${vm.accelerator}, image ${image.baked ? "baked now" : "from the snapshot cache"}`);
} finally {
  await vm.release();
}
// No pool.shutdown() in the seed's quick start: idle VMs do not hold Node's
// event loop, so the script exits here (docs/lifecycles.md).
