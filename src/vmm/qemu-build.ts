/**
 * Building QEMU with the patches in qemu/ (qemu/README.md):
 * supermachine-reload.patch (process reuse, docs/qemu-reuse.md),
 * supermachine-rep-string.patch (`rep movs`/`rep stos` a page at a time
 * under TCG) and supermachine-pretranslate.patch (a fresh process
 * translates a snapshot's known blocks in a thread of its own,
 * docs/pretranslate.md). Debian's own source of the QEMU this host has installed
 * (`apt-get source`, from the deb-src twin of each of the host's apt
 * sources, in private package lists), the patches, a configure limited to the x86_64
 * system emulator, `ninja`. The binary goes to `<dir>/bin`, which
 * findQemu() looks in: the cache (`npm run setup` in a checkout, or a user
 * without root) or, for root, /usr/local/lib/supermachine/qemu (`sudo
 * supermachine setup --qemu`: every user's Node finds it). A no-op when
 * the build is there for this patch and version.
 */

import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { PACKAGE_ROOT } from "../guest/assets.js";
import { missingDebianPackages } from "../platform/debian.js";

/** Debian packages the build needs. */
export const QEMU_BUILD_PACKAGES = ["dpkg-dev", "patch", "meson", "ninja-build", "pkg-config", "python3", "libglib2.0-dev", "libpixman-1-dev", "libseccomp-dev", "libfdt-dev", "gcc", "libc6-dev", "xz-utils"];

/** The patches the build applies, in order, shipped with the package (`qemu/` at its root; qemu/README.md). */
export const QEMU_PATCHES = ["supermachine-reload.patch", "supermachine-rep-string.patch", "supermachine-pretranslate.patch"] as const;

export function qemuPatchFiles(): string[] {
  return QEMU_PATCHES.map((p) => join(PACKAGE_ROOT, "qemu", p));
}

/** Configure flags: the system emulator only, what the VMs use (docs/qemu-reuse.md). */
const CONFIGURE = [
  "--target-list=x86_64-softmmu",
  "--without-default-features",
  "--enable-tcg",
  "--enable-kvm",
  "--enable-seccomp",
  "--disable-docs",
  "--disable-werror",
  "--disable-debug-info",
  // Debian's firmware (bios-microvm.bin), which the confinement can see under /usr.
  "--firmwarepath=/usr/share/qemu",
];

const APT_ENV = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };

function run(cmd: string, argv: string[], opts: { cwd?: string } = {}): string {
  const r = spawnSync(cmd, argv, { cwd: opts.cwd, encoding: "utf8", maxBuffer: 64 << 20, env: APT_ENV });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(" ")} failed (exit ${r.status}):\n${(r.stderr || r.stdout).slice(-3000)}`);
  return r.stdout;
}

/** The deb-src twin of every `deb` source this host's apt uses (one-line and deb822 formats). */
function sourceLines(): string[] {
  const out = new Set<string>();
  const files: string[] = [];
  if (existsSync("/etc/apt/sources.list")) files.push("/etc/apt/sources.list");
  const d = "/etc/apt/sources.list.d";
  if (existsSync(d)) for (const f of readdirSync(d)) if (f.endsWith(".list") || f.endsWith(".sources")) files.push(join(d, f));
  for (const f of files) {
    const text = readFileSync(f, "utf8");
    if (f.endsWith(".sources")) {
      for (const stanza of text.split(/\n\s*\n/)) {
        const field = (k: string) => new RegExp(`^${k}:\\s*(.+)$`, "mi").exec(stanza)?.[1]?.trim();
        const types = field("Types")?.split(/\s+/) ?? [];
        if (!types.includes("deb") || /^enabled:\s*no/im.test(stanza)) continue;
        const uris = field("URIs")?.split(/\s+/) ?? [];
        const suites = field("Suites")?.split(/\s+/) ?? [];
        const comps = field("Components") ?? "main";
        const signed = field("Signed-By");
        const opt = signed && !signed.includes("\n") ? ` [signed-by=${signed}]` : "";
        for (const u of uris) for (const s of suites) out.add(`deb-src${opt} ${u} ${s} ${comps}`);
      }
    } else {
      for (const line of text.split("\n")) {
        const m = /^\s*deb(\s+\[[^\]]*\])?\s+(\S+)\s+(\S+)\s+(.+)$/.exec(line);
        if (m) out.add(`deb-src${m[1] ?? ""} ${m[2]} ${m[3]} ${m[4]!.trim()}`);
      }
    }
  }
  return [...out];
}

function installedSourceVersion(): string | undefined {
  const r = spawnSync("dpkg-query", ["-W", "-f=${source:Version}", "qemu-system-x86"], { encoding: "utf8" });
  return r.status === 0 && r.stdout.trim() ? r.stdout.trim() : undefined;
}

export type QemuBuildResult = { status: "built"; binary: string } | { status: "present"; binary: string } | { status: "skipped"; reason: string } | { status: "failed"; reason: string };

/**
 * Builds the patched QEMU into `dest` unless it is there for this patch and
 * version. Failures are returned ("failed"), not thrown.
 */
export async function buildPatchedQemu(o: { dest: string; log: (s: string) => void; dryRun?: boolean }): Promise<QemuBuildResult> {
  const { dest, log } = o;
  const binary = join(dest, "bin", "qemu-system-x86_64");
  if (process.arch !== "x64") return { status: "skipped", reason: "the QEMU build with process reuse is x86_64-only for now" };
  const patchFiles = qemuPatchFiles();
  const missingPatch = patchFiles.find((f) => !existsSync(f));
  if (missingPatch) return { status: "failed", reason: `${missingPatch} is missing` };
  const version = installedSourceVersion();
  const hash = createHash("sha256");
  for (const f of patchFiles) hash.update(readFileSync(f));
  const key = hash
    .update(CONFIGURE.join(" "))
    .update(version ?? "")
    .digest("hex")
    .slice(0, 16);
  const stamp = join(dest, "build.json");
  if (existsSync(stamp) && existsSync(binary)) {
    try {
      if ((JSON.parse(readFileSync(stamp, "utf8")) as { key?: string }).key === key) return { status: "present", binary };
    } catch {
      /* rebuilt below */
    }
  }
  if (!version) return { status: "failed", reason: "qemu-system-x86 is not installed (dpkg-query): install it first" };
  let missing = missingDebianPackages(QEMU_BUILD_PACKAGES);
  if (missing.length && process.getuid?.() === 0) {
    const cmd = ["apt-get", "install", "-y", "--no-install-recommends", ...missing];
    log(`${o.dryRun ? "would run" : "running"}: ${cmd.join(" ")} (to build QEMU)`);
    if (!o.dryRun) {
      spawnSync("apt-get", ["update"], { stdio: "ignore", env: APT_ENV });
      spawnSync(cmd[0]!, cmd.slice(1), { stdio: ["ignore", "ignore", "inherit"], env: APT_ENV });
      missing = missingDebianPackages(QEMU_BUILD_PACKAGES);
    }
  }
  if (missing.length && !o.dryRun) return { status: "failed", reason: `the build needs these Debian packages (as root: apt-get install ${missing.join(" ")})` };
  const patchNames = QEMU_PATCHES.map((p) => `qemu/${p}`).join(" and ");
  if (o.dryRun) return { status: "skipped", reason: `would build QEMU ${version} with ${patchNames} into ${dest}` };
  const work = mkdtempSync(join(tmpdir(), "sm-qemu-build-"));
  try {
    log(`building QEMU ${version} with ${patchNames} (a few minutes, once)`);
    const lines = sourceLines();
    if (lines.length === 0) throw new Error("no apt sources found to derive deb-src entries from");
    const list = join(work, "sources.list");
    writeFileSync(list, lines.join("\n") + "\n");
    mkdirSync(join(work, "lists", "partial"), { recursive: true });
    // Private lists: the host's own package lists stay as they are.
    const apt = ["-o", `Dir::Etc::SourceList=${list}`, "-o", "Dir::Etc::SourceParts=/dev/null", "-o", `Dir::State::Lists=${join(work, "lists")}`];
    run("apt-get", [...apt, "update"]);
    const src = join(work, "src");
    mkdirSync(src);
    try {
      run("apt-get", [...apt, "source", "--download-only", `qemu=${version}`], { cwd: src });
    } catch (e) {
      // That revision left the archive (a security update replaced it): the
      // archive's current 7.2 source takes the same patch.
      log(`the source of ${version} is not in the archive (${(e as Error).message.split("\n")[0]}); using the current one`);
      run("apt-get", [...apt, "source", "--download-only", "qemu"], { cwd: src });
    }
    const dsc = readdirSync(src).find((f) => f.endsWith(".dsc"));
    if (!dsc) throw new Error("apt-get source gave no .dsc");
    run("dpkg-source", ["--no-check", "-x", dsc, "q"], { cwd: src });
    const tree = join(src, "q");
    for (const f of patchFiles) run("patch", ["-p1", "--batch", "--forward", "-i", f], { cwd: tree });
    const build = join(tree, "b");
    mkdirSync(build);
    run(join(tree, "configure"), CONFIGURE, { cwd: build });
    run("ninja", ["-j", String(Math.max(1, availableParallelism())), "qemu-system-x86_64"], { cwd: build });
    const staging = `${dest}.tmp-${process.pid}`;
    rmSync(staging, { recursive: true, force: true });
    mkdirSync(join(staging, "bin"), { recursive: true });
    copyFileSync(join(build, "qemu-system-x86_64"), join(staging, "bin", "qemu-system-x86_64"));
    chmodSync(join(staging, "bin", "qemu-system-x86_64"), 0o755);
    writeFileSync(join(staging, "build.json"), JSON.stringify({ key, version, patches: QEMU_PATCHES, configure: CONFIGURE }, null, 2) + "\n");
    rmSync(dest, { recursive: true, force: true });
    mkdirSync(dirname(dest), { recursive: true });
    renameSync(staging, dest);
    return { status: "built", binary };
  } catch (e) {
    return { status: "failed", reason: (e as Error).message };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
