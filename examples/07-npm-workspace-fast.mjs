// Pattern 6: npm workflow — the source tree on a mount (live host edits),
// node_modules on a volume (fast writes, baked with the snapshot), and the
// install done once in warmup: every restored VM has node_modules already.
// docs/mounts.md, docs/volumes.md.
//
//   npm run setup && node examples/07-npm-workspace-fast.mjs
//
// Runs offline from a checkout. The seed's "node:20-alpine" comes from a
// registry; here the image is SUPERMACHINE_EXAMPLE_NODE_IMAGE (any ref
// Image.build takes, with node and npm in it) or, without it, the default
// busybox image plus this host's own node and npm (examples/offline/npm.mjs).
// The project is a demo made in a temp dir, whose .npmrc points npm at a
// registry this script serves on the host's loopback; the VM reaches it as
// "registry.local" through the network policy (docs/network.md). For your
// own project: hostPath is its directory, and `network` allows your registry.

import { existsSync, readdirSync } from "node:fs";
import { rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Image } from "@supermachine/core";
import { REGISTRY_HOST, demoProject, hostNodeImageRef, startDemoRegistry } from "./offline/npm.mjs";

const registry = await startDemoRegistry();
const projectDir = await demoProject(registry.url);
try {
  const image = await Image.build({
    ref: process.env.SUPERMACHINE_EXAMPLE_NODE_IMAGE ?? (await hostNodeImageRef()),
    memoryMib: 512,
    // Source tree — live host edits
    mounts: [{ hostPath: projectDir, guestTag: "src", symlinks: "opaque" }],
    // Dependency cache — fast writes, persists between bakes via the snapshot
    volumes: [
      { name: "node_modules", sizeMib: 1024, mountPoint: "/work/node_modules" },
    ],
    // (extension) The registry on the host's loopback, and nothing else.
    network: { allow: [REGISTRY_HOST], hosts: { [REGISTRY_HOST]: "127.0.0.1" } },
    // One-time install at bake. Once snapshotted, every restore has
    // node_modules already populated — no install on the hot path.
    warmup: async (vm) => {
      await vm.exec({ argv: ["mount", "-t", "virtiofs", "src", "/work"] });
      await vm.exec({ argv: ["cp", "-r", "/work/package*.json", "/work/node_modules/.."] });
      const install = await vm.exec({ argv: ["sh", "-c", "cd /work && npm install"], timeoutMs: 600_000 });
      if (install.exitCode !== 0) throw new Error(`npm install failed (exit ${install.exitCode}):\n${install.stdout}${install.stderr}`);
      console.log(`warmup: npm install done at bake time (${registry.requests} registry requests)`);
    },
  });
  console.log(`image ${image.baked ? "baked now" : "restored from the snapshot cache (no install)"}`);

  const pool = await image.pool({ min: 0, max: 2 });
  const served = registry.requests;
  try {
    const sh = async (vm, script) => {
      const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs: 120_000 });
      if (r.exitCode !== 0) throw new Error(`\`${script}\` failed (exit ${r.exitCode}): ${r.stderr}`);
      return r.stdout.toString();
    };
    for (const n of [1, 2]) {
      const vm = await pool.acquire();
      try {
        // node_modules is there on restore, in the volume (not on the host).
        const t = performance.now();
        const out = await sh(vm, "cd /work && node index.js");
        console.log(`VM ${n}: ${out.trim()}  (first run after restore: ${Math.round(performance.now() - t)} ms)`);
        console.log(`VM ${n}: /work/node_modules has ${(await sh(vm, "ls /work/node_modules")).split("\n").filter((s) => s && !s.startsWith(".")).join(", ")}`);
        if (n === 1) {
          // The source is live: a host edit shows up in the guest (0.5 s cache timeout).
          await writeFile(join(projectDir, "index.js"), "console.log(require('demo-greet').greet('edited on the host'));\n");
          await new Promise((r) => setTimeout(r, 600));
          console.log(`VM ${n} after a host edit: ${(await sh(vm, "cd /work && node index.js")).trim()}`);
        }
      } finally {
        await vm.release();
      }
    }
    // The agent made the volume's mount point inside the mounted tree (an empty directory, as Docker does).
    const hostModules = join(projectDir, "node_modules");
    const onHost = existsSync(hostModules) ? readdirSync(hostModules).length : 0;
    console.log(`node_modules on the host: ${onHost === 0 ? "empty (the install lives in the volume)" : `${onHost} entries`}`);
    console.log(`registry requests by restored VMs: ${registry.requests - served}`);
  } finally {
    await pool.shutdown();
    await image.close();
  }
} finally {
  await registry.close();
  await rm(projectDir, { recursive: true, force: true });
}
