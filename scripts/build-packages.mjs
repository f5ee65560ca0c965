#!/usr/bin/env node
// Builds the npm packages of a release from a checkout that ran
// `npm run setup` (TypeScript build, cargo build of the agent, Debian kernel
// in the asset cache):
//
//   @supermachine/core                 the library: dist/src (ESM), dist/cjs
//                                      (CommonJS), bin, docs; no runtime
//                                      dependencies, no install scripts; the
//                                      platform package as an optional
//                                      dependency of the same version
//   @supermachine/core-linux-x64-gnu   the native part, as the seed ships
//                                      @supermachine/core-darwin-arm64: the
//                                      static guest agent, Debian's kernel
//                                      (uncompressed vmlinux) with the modules
//                                      the guest loads, Debian's static
//                                      busybox, and the GPL source pointer
//
// optionalDependencies are added here, at pack time (as napi-rs's
// `prepublish` does), not in the checkout's package.json: `npm ci` in a
// checkout must not look for a platform package that is not published.
// The platform package's os/cpu fields make npm skip it (never fail) on other
// hosts; on those the library throws UnsupportedPlatformError on first use.
// There is no arm64 package: VMs are QEMU microvm machines, x86 only
// (src/platform/host.ts).
//
// Usage: node scripts/build-packages.mjs [--out DIR] [--no-pack]
//   Prints the tarball paths, one per line (main package first).
// Plain JavaScript: it uses dist/ (the build) but needs no devDependency.

import { execFileSync, spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const argv = process.argv.slice(2);
const outIdx = argv.indexOf("--out");
const out = resolve(outIdx >= 0 && argv[outIdx + 1] ? argv[outIdx + 1] : join(root, "dist", "packages"));
const pack = !argv.includes("--no-pack");

function die(msg) {
  console.error(`build-packages: ${msg}`);
  process.exit(1);
}
const log = (s) => console.error(`build-packages: ${s}`);

if (process.platform !== "linux" || process.arch !== "x64") {
  die(`platform packages are built on linux-x64 only (this is ${process.platform}-${process.arch}); there is no arm64 package: the VMs are QEMU microvm machines, which exist for x86 only`);
}
const dist = (p) => pathToFileURL(join(root, "dist", p)).href;
if (!existsSync(join(root, "dist", "src", "index.js")) || !existsSync(join(root, "dist", "cjs", "index.js"))) die("dist/src and dist/cjs are not built: run `npm run setup` (or `npm run build`) first");

const { isStaticElf } = await import(dist("src/guest/default-image.js"));
const { GUEST_MODULES } = await import(dist("src/guest/modules.js"));
const { defaultCacheDir } = await import(dist("src/paths.js"));
const { platformPackageName, PLATFORM_ASSETS_FORMAT } = await import(dist("src/platform/package.js"));

const mainPkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const version = mainPkg.version;
const platformName = platformPackageName("linux", "x64");

// ------------------------------------------------------------ the inputs

const agent = process.env.SUPERMACHINE_AGENT || join(root, "agent", "target", "x86_64-unknown-linux-gnu", "release", "supermachine-agent");
if (!existsSync(agent)) die(`no agent binary at ${agent}: run \`npm run setup\` (cargo build), or set SUPERMACHINE_AGENT`);
if (!isStaticElf(readFileSync(agent))) die(`${agent} is not a static ELF binary`);

// The cached Debian kernel made for the modules this checkout's guest loads
// (`current` first; the cache is shared by checkouts of other versions).
const kroot = join(defaultCacheDir(), "kernel");
const moduleSet = GUEST_MODULES.join(",");
const made = (v) => existsSync(join(kroot, v, "complete")) && existsSync(join(kroot, v, "vmlinux")) && existsSync(join(kroot, v, "modules", "wanted")) && readFileSync(join(kroot, v, "modules", "wanted"), "utf8").trim() === moduleSet;
const currentFile = join(kroot, "current");
const candidates = [...(existsSync(currentFile) ? [readFileSync(currentFile, "utf8").trim()] : []), ...(existsSync(kroot) ? readdirSync(kroot).sort().reverse() : [])];
const current = candidates.find((v) => v && !v.startsWith(".") && made(v));
if (!current) die(`no Debian kernel with a vmlinux and the guest's modules (${moduleSet}) in ${kroot}: run \`npm run setup\``);
const kdir = join(kroot, current);
const [kernelPackage, kernelVersion] = readFileSync(join(kdir, "complete"), "utf8").trim().split(/\s+/);
const release = readFileSync(join(kdir, "release"), "utf8").trim();
// The Debian source package the kernel was built from (the signed image's
// Source is a template package; its binaries come from `linux`).
const kernelSource = "linux";
const show = spawnSync("apt-cache", ["show", `${kernelPackage}=${kernelVersion}`], { encoding: "utf8" });
const signed = /^Source:\s*(\S+)/m.exec(show.stdout ?? "")?.[1];
const moduleFiles = readFileSync(join(kdir, "modules", "order"), "utf8").split("\n").map((s) => s.trim()).filter(Boolean);
for (const m of moduleFiles) if (!/^[A-Za-z0-9_.-]+\.ko$/.test(m)) die(`bad module name ${m}`);

const busybox = ["/bin/busybox", "/usr/bin/busybox"].find((p) => existsSync(p) && isStaticElf(readFileSync(p)));
const bb = spawnSync("dpkg-query", ["-W", "-f=${Package} ${Version} ${source:Package} ${source:Version}", "busybox-static"], { encoding: "utf8" });
const [bbPackage, bbVersion, bbSource, bbSourceVersion] = bb.status === 0 ? bb.stdout.trim().split(/\s+/) : [];

// ------------------------------------------------------- platform package

rmSync(out, { recursive: true, force: true });
const pdir = join(out, "stage", "core-linux-x64-gnu");
mkdirSync(join(pdir, "agent"), { recursive: true });
mkdirSync(join(pdir, "kernel", "modules"), { recursive: true });
copyFileSync(agent, join(pdir, "agent", "supermachine-agent"));
chmodSync(join(pdir, "agent", "supermachine-agent"), 0o755);
copyFileSync(join(kdir, "vmlinux"), join(pdir, "kernel", "vmlinux"));
for (const m of moduleFiles) copyFileSync(join(kdir, "modules", m), join(pdir, "kernel", "modules", m));
writeFileSync(join(pdir, "kernel", "modules", "order"), moduleFiles.join("\n") + "\n");
writeFileSync(join(pdir, "kernel", "release"), `${release}\n`);
if (busybox) {
  mkdirSync(join(pdir, "busybox"), { recursive: true });
  copyFileSync(busybox, join(pdir, "busybox", "busybox"));
  chmodSync(join(pdir, "busybox", "busybox"), 0o755);
}

const platformPkg = {
  name: platformName,
  version,
  description: `Prebuilt guest agent, Debian guest kernel (${release}) and static busybox for ${mainPkg.name} on Linux x86-64. Installed by ${mainPkg.name}; not used directly.`,
  license: "Apache-2.0 AND GPL-2.0-only",
  os: ["linux"],
  cpu: ["x64"],
  files: ["agent", "kernel", ...(busybox ? ["busybox"] : []), "README.md", "COPYING"],
  supermachine: {
    assetsFormat: PLATFORM_ASSETS_FORMAT,
    agent: "agent/supermachine-agent",
    kernel: {
      image: "kernel/vmlinux",
      modules: "kernel/modules",
      guestModules: moduleSet,
      release,
      // Same id as a checkout's cache of this kernel: snapshot keys agree.
      id: `debian:${current}`,
      package: kernelPackage,
      version: kernelVersion,
      source: kernelSource,
    },
    ...(busybox ? { busybox: "busybox/busybox" } : {}),
  },
};
writeFileSync(join(pdir, "package.json"), JSON.stringify(platformPkg, null, 2) + "\n");

const sourceNote = [
  `- \`kernel/\`: Debian's \`${kernelPackage}\` ${kernelVersion} (kernel ${release}), unpacked:`,
  "  `vmlinux` is the uncompressed kernel extracted from its `vmlinuz`, and",
  "  `modules/` holds the modules the guest loads (" + moduleFiles.map((m) => m.replace(/\.ko$/, "")).join(", ") + "),",
  "  unmodified. License: GPL-2.0-only (with the Linux syscall note).",
  `  Corresponding source: Debian source package \`${kernelSource}\`, version ${kernelVersion}` +
    (signed && signed !== kernelSource ? ` (the signed image's template package is \`${signed}\`)` : "") +
    `; get it with \`apt-get source ${kernelSource}=${kernelVersion}\` from a Debian archive that has it,`,
  "  or from Debian's snapshot archive.",
  ...(busybox
    ? [
        `- \`busybox/busybox\`: Debian's \`${bbPackage ?? "busybox-static"}\` ${bbVersion ?? "(version unknown)"}, unmodified. License: GPL-2.0-only.`,
        `  Corresponding source: Debian source package \`${bbSource ?? "busybox"}\`, version ${bbSourceVersion ?? bbVersion ?? "(unknown)"}` +
          ` (\`apt-get source ${bbSource ?? "busybox"}=${bbSourceVersion ?? bbVersion ?? ""}\`).`,
      ]
    : []),
  `- \`agent/supermachine-agent\`: the guest agent of ${mainPkg.name} ${version}, a static Rust binary`,
  `  built from \`agent/\` of the same release. License: ${mainPkg.license}.`,
].join("\n");

writeFileSync(
  join(pdir, "README.md"),
  `# ${platformName}

The native part of \`${mainPkg.name}\` (supermachine for Linux) on
Linux x86-64, in the seed's layout: \`${mainPkg.name}\` lists it in
\`optionalDependencies\`, and npm installs it only where its \`os\`/\`cpu\`
fields match. Do not depend on it directly. It holds no code that runs on
the host: only what the VMs boot.

| File | What |
|---|---|
| \`agent/supermachine-agent\` | the guest agent, PID 1 in every VM (static) |
| \`kernel/vmlinux\` | the guest kernel, uncompressed (booted through its PVH entry) |
| \`kernel/modules/\` | the kernel modules the guest loads, and their load \`order\` |
${busybox ? "| `busybox/busybox` | the default image's static busybox |\n" : ""}
Built by \`scripts/build-packages.mjs\` in the ${mainPkg.name} repository.

## Licenses and sources

${sourceNote}

See COPYING.
`,
);
writeFileSync(
  join(pdir, "COPYING"),
  `This package redistributes, unmodified, GPL-2.0-licensed binaries from Debian.
The GNU General Public License version 2 is at /usr/share/common-licenses/GPL-2
on Debian and Ubuntu systems.

${sourceNote}

The corresponding source of each GPL binary is the Debian source package named
above, at the version named above.
`,
);

// ------------------------------------------------------------ main package

const mdir = join(out, "stage", "core");
mkdirSync(mdir, { recursive: true });
const files = mainPkg.files;
for (const f of files) {
  const src = join(root, f);
  if (!existsSync(src)) die(`${f} (in package.json "files") does not exist`);
  cpSync(src, join(mdir, f), { recursive: true, filter: (p) => !p.endsWith(".map") && !p.endsWith(".tsbuildinfo") });
}
for (const f of ["README.md", "LICENSE", "NOTICE"]) if (existsSync(join(root, f))) copyFileSync(join(root, f), join(mdir, f));
const { devDependencies: _dev, scripts: _scripts, ...shipped } = mainPkg;
void _dev;
void _scripts;
shipped.optionalDependencies = { ...(mainPkg.optionalDependencies ?? {}), [platformName]: version };
if (shipped.dependencies && Object.keys(shipped.dependencies).length) die(`the main package must have no runtime dependencies (found ${Object.keys(shipped.dependencies).join(", ")})`);
writeFileSync(join(mdir, "package.json"), JSON.stringify(shipped, null, 2) + "\n");

// ------------------------------------------------------------------- pack

if (!pack) {
  console.log(mdir);
  console.log(pdir);
  process.exit(0);
}
const tarballs = [];
for (const dir of [mdir, pdir]) {
  const r = execFileSync("npm", ["pack", "--json", "--ignore-scripts", "--pack-destination", out], { cwd: dir, encoding: "utf8", maxBuffer: 64 << 20, env: { ...process.env, npm_config_update_notifier: "false", npm_config_fund: "false", npm_config_audit: "false" } });
  const info = JSON.parse(r)[0];
  tarballs.push(join(out, info.filename));
  log(`${info.name}@${info.version}: ${info.filename}, ${(info.size / (1 << 20)).toFixed(1)} MiB packed, ${info.entryCount} files`);
}
rmSync(join(out, "stage"), { recursive: true, force: true });
for (const t of tarballs) console.log(t);
