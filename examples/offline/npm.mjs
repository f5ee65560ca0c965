// Offline stand-ins for what examples/07-npm-workspace-fast.mjs would take
// from the internet: a Node.js image (the seed's "node:20-alpine") and an npm
// registry. Not part of the pattern; the example imports them so that it
// runs from a checkout with no network at all.
//
//   hostNodeImageRef()   `dir:` root filesystem = the default busybox image +
//                        this host's own node, npm and the shared libraries
//                        node links against (built once, cached).
//   startDemoRegistry()  a tiny npm registry on 127.0.0.1 serving the demo
//                        project's dependencies (packuments + tarballs).
//   demoProject()        a small project in a temp dir: package.json,
//                        .npmrc (registry=… as the VM reaches it), index.js.

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, statSync } from "node:fs";
import { chmod, copyFile, cp, mkdir, mkdtemp, rename, rm, symlink, writeFile } from "node:fs/promises";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { gzipSync } from "node:zlib";
import { defaultImageRef } from "@supermachine/core";

/** The name the VM uses for the host's loopback registry (network.hosts maps it to 127.0.0.1). */
export const REGISTRY_HOST = "registry.local";

/**
 * A `dir:` image with node and npm: the default busybox root filesystem plus
 * this host's node binary, its npm, and the libraries `ldd` lists for node.
 * Built once next to the default image (keyed by node's version and size).
 */
export async function hostNodeImageRef() {
  const busybox = (await defaultImageRef()).slice("dir:".length);
  const node = process.execPath;
  const npm = join(dirname(dirname(node)), "lib", "node_modules", "npm");
  if (!existsSync(join(npm, "bin", "npm-cli.js"))) throw new Error(`no npm next to ${node} (looked in ${npm}): set SUPERMACHINE_EXAMPLE_NODE_IMAGE to an image with node and npm`);
  const key = `${process.version}-${statSync(node).size}`;
  const root = join(dirname(dirname(busybox)), `example-node-${key}`, "rootfs");
  if (existsSync(join(root, ".complete"))) return `dir:${root}`;
  const stage = `${root}.${process.pid}.tmp`;
  await rm(stage, { recursive: true, force: true });
  await mkdir(dirname(stage), { recursive: true });
  try {
    await cp(busybox, stage, { recursive: true, verbatimSymlinks: true });
    await rm(join(stage, ".complete"), { force: true });
    // node and the shared libraries it needs, at the paths the loader looks in.
    let ldd = "";
    try {
      ldd = execFileSync("ldd", [node], { encoding: "utf8" });
    } catch {
      // a static node: "not a dynamic executable", nothing to copy
    }
    const libs = ldd
      .split("\n")
      .map((l) => /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(l)?.[1])
      .filter((p) => p !== undefined);
    for (const p of [node, ...libs]) {
      await mkdir(join(stage, dirname(p)), { recursive: true });
      await copyFile(p, join(stage, p)); // follows symlinks: a regular file at the name the loader asks for
      await chmod(join(stage, p), 0o755);
    }
    await cp(npm, join(stage, npm), { recursive: true, verbatimSymlinks: true });
    await rm(join(stage, "usr", "bin", "npm"), { force: true });
    await symlink(join(npm, "bin", "npm-cli.js"), join(stage, "usr", "bin", "npm"));
    if (!existsSync(join(stage, "usr", "bin", "node"))) await symlink(node, join(stage, "usr", "bin", "node"));
    await writeFile(join(stage, ".complete"), `${key}\n`);
    await rm(root, { recursive: true, force: true });
    await rename(stage, root);
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
  return `dir:${root}`;
}

/** A ustar archive of `files` (name → content) under `package/`, gzipped: an npm tarball. */
function npmTarball(files) {
  const blocks = [];
  for (const [name, content] of Object.entries(files)) {
    const body = Buffer.from(content);
    const h = Buffer.alloc(512);
    h.write(`package/${name}`, 0, 100, "utf8");
    h.write("0000644\0", 100, "ascii");
    h.write("0000000\0", 108, "ascii");
    h.write("0000000\0", 116, "ascii");
    h.write(`${body.length.toString(8).padStart(11, "0")}\0`, 124, "ascii");
    h.write("00000000000\0", 136, "ascii");
    h.write("        ", 148, "ascii");
    h.write("0", 156, "ascii");
    h.write("ustar\0", 257, "ascii");
    h.write("00", 263, "ascii");
    let sum = 0;
    for (const b of h) sum += b;
    h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "ascii");
    blocks.push(h, body, Buffer.alloc((512 - (body.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return gzipSync(Buffer.concat(blocks));
}

/** The demo project's dependencies: demo-greet, which depends on demo-shout. */
const PACKAGES = [
  { name: "demo-shout", version: "1.0.0", dependencies: {}, index: "exports.shout = (s) => s.toUpperCase() + '!';\n" },
  { name: "demo-greet", version: "2.0.0", dependencies: { "demo-shout": "^1.0.0" }, index: "const { shout } = require('demo-shout');\nexports.greet = (who) => shout('hello ' + who);\n" },
];

/**
 * Serves PACKAGES on 127.0.0.1 (an ephemeral port). Tarball URLs use the
 * Host header the client sent, so the VM gets URLs it can resolve.
 * `requests` counts what was served; `close()` stops the server.
 */
export async function startDemoRegistry() {
  const tarballs = new Map();
  for (const p of PACKAGES) {
    const pkg = JSON.stringify({ name: p.name, version: p.version, main: "index.js", dependencies: p.dependencies }, null, 2);
    tarballs.set(`/${p.name}/-/${p.name}-${p.version}.tgz`, npmTarball({ "package.json": pkg, "index.js": p.index }));
  }
  const state = { requests: 0 };
  const server = createServer((req, res) => {
    state.requests++;
    const path = decodeURIComponent((req.url ?? "/").split("?")[0]);
    const tgz = tarballs.get(path);
    if (tgz) return void res.writeHead(200, { "content-type": "application/octet-stream" }).end(tgz);
    const p = PACKAGES.find((q) => `/${q.name}` === path);
    if (!p) return void res.writeHead(404, { "content-type": "application/json" }).end('{"error":"Not found"}');
    const t = tarballs.get(`/${p.name}/-/${p.name}-${p.version}.tgz`);
    const doc = {
      name: p.name,
      "dist-tags": { latest: p.version },
      versions: {
        [p.version]: {
          name: p.name,
          version: p.version,
          main: "index.js",
          dependencies: p.dependencies,
          dist: {
            tarball: `http://${req.headers.host}/${p.name}/-/${p.name}-${p.version}.tgz`,
            shasum: createHash("sha1").update(t).digest("hex"),
            integrity: `sha512-${createHash("sha512").update(t).digest("base64")}`,
          },
        },
      },
    };
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(doc));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = server.address().port;
  return {
    /** The registry's URL as the VM reaches it. */
    url: `http://${REGISTRY_HOST}:${port}/`,
    get requests() {
      return state.requests;
    },
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/** A small project using demo-greet, in a new temp directory; returns its path. */
export async function demoProject(registryUrl) {
  const dir = await mkdtemp(join(tmpdir(), "sm-example-07-"));
  await writeFile(join(dir, "package.json"), JSON.stringify({ name: "my-app", version: "1.0.0", private: true, dependencies: { "demo-greet": "^2.0.0" } }, null, 2) + "\n");
  await writeFile(join(dir, ".npmrc"), `registry=${registryUrl}\naudit=false\nfund=false\nupdate-notifier=false\n`);
  await writeFile(join(dir, "index.js"), "console.log(require('demo-greet').greet('from the source on the mount'));\n");
  return dir;
}
