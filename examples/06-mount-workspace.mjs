// Pattern 5: a live host directory inside the VM (docs/mounts.md).
//
//   npm run setup && node examples/06-mount-workspace.mjs [host-dir]
//
// Runs offline from a checkout: it imports the built package from ../dist
// and uses the default image (busybox, built locally by setup) unless
// SM_EXAMPLE_REF names another image (e.g. "node:20-alpine" with a
// registry). Without host-dir it makes a small project in a temp dir.
// In the guest, the seed's `mount -t virtiofs <tag> <dir>` is performed by
// the agent (no virtio-fs device or mount binary is needed).

import { mkdtemp, mkdir, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Image } from "../dist/src/index.js";
import { ensureDefaultImage } from "../dist/src/guest/default-image.js";
import { defaultCacheDir } from "../dist/src/paths.js";

const own = process.argv[2] === undefined;
const hostPath = own ? await mkdtemp(join(tmpdir(), "sm-example-06-")) : resolve(process.argv[2]);
if (own) {
  // A tiny npm-workspaces project: node_modules/<member> → ../packages/<member>.
  await mkdir(join(hostPath, "packages", "greet"), { recursive: true });
  await mkdir(join(hostPath, "node_modules"), { recursive: true });
  await writeFile(join(hostPath, "package.json"), JSON.stringify({ name: "demo", workspaces: ["packages/*"] }, null, 2) + "\n");
  await writeFile(join(hostPath, "packages", "greet", "index.js"), "module.exports = () => 'hello';\n");
  await symlink("../packages/greet", join(hostPath, "node_modules", "greet"));
}

const ref = process.env.SM_EXAMPLE_REF ?? `dir:${await ensureDefaultImage(defaultCacheDir())}`;
const image = await Image.build({
  ref,
  mounts: [
    {
      hostPath, // host source tree
      guestTag: "workspace", // guest mounts via this tag
      symlinks: "opaque", // workspace symlinks work; the host never resolves them
    },
  ],
});
const pool = await image.pool();
const vm = await pool.acquire();
try {
  const sh = async (script) => {
    const r = await vm.exec({ argv: ["sh", "-c", script] });
    process.stdout.write(`$ ${script}\n${r.stdout}${r.stderr}`);
    return r;
  };
  // Inside the guest, as the seed writes it:
  const m = await vm.exec({ argv: ["mount", "-t", "virtiofs", "workspace", "/work"] });
  if (m.exitCode !== 0) throw new Error(`mount failed: ${m.stderr}`);
  await sh("cd /work && ls -la && cat package.json");
  await sh("cat /work/node_modules/greet/index.js");
  // The guest writes back...
  await sh("echo 'built in the VM' > /work/build-output.txt");
  console.log(`host reads: ${await readFile(join(hostPath, "build-output.txt"), "utf8")}`);
  // ...and sees host edits (within the 0.5 s cache timeout).
  await writeFile(join(hostPath, "edited-on-host.txt"), "fresh from the host\n");
  await new Promise((r) => setTimeout(r, 600));
  await sh("cat /work/edited-on-host.txt");
} finally {
  await vm.release();
  await pool.shutdown();
  await image.close();
  if (own) await rm(hostPath, { recursive: true, force: true });
}
