/**
 * Setup step (run by scripts/setup.mjs after the TypeScript build): builds
 * QEMU with qemu/supermachine-reload.patch into the asset cache
 * (`<cache>/qemu/bin/qemu-system-x86_64`), where findQemu() prefers it. The
 * source is Debian's own package of the QEMU this host has installed
 * (`apt-get source`, from the deb-src twin of each of the host's apt
 * sources), so the build matches the firmware files of qemu-system-data.
 * A fast no-op when the build is there for this patch and version.
 *
 *   node dist/scripts/qemu.js [--required]
 *
 * Without --required a failure only warns: VMs then run on the host's QEMU
 * without process reuse (docs/qemu-reuse.md).
 */

import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { builtQemuDir } from "../src/vmm/qemu.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const patchFile = join(root, "qemu", "supermachine-reload.patch");
const log = (s: string) => console.log(`setup: ${s}`);

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

function run(cmd: string, argv: string[], opts: { cwd?: string } = {}): string {
  const r = spawnSync(cmd, argv, { cwd: opts.cwd, encoding: "utf8", maxBuffer: 64 << 20, env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } });
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

async function main(): Promise<void> {
  const required = process.argv.includes("--required");
  if (process.arch !== "x64") {
    log("the QEMU build with process reuse is x86_64-only for now; using the host's QEMU");
    return;
  }
  const dest = builtQemuDir();
  const version = installedSourceVersion();
  const key = createHash("sha256")
    .update(readFileSync(patchFile))
    .update(CONFIGURE.join(" "))
    .update(version ?? "")
    .digest("hex")
    .slice(0, 16);
  const stamp = join(dest, "build.json");
  if (existsSync(stamp) && existsSync(join(dest, "bin", "qemu-system-x86_64"))) {
    try {
      if ((JSON.parse(readFileSync(stamp, "utf8")) as { key?: string }).key === key) {
        log(`QEMU with process reuse already built (${version})`);
        return;
      }
    } catch {
      /* rebuilt below */
    }
  }
  if (!version) throw new Error("qemu-system-x86 is not installed (dpkg-query); run the package step first");
  const work = mkdtempSync(join(tmpdir(), "sm-qemu-build-"));
  try {
    log(`building QEMU ${version} with qemu/supermachine-reload.patch (a few minutes, once)`);
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
    run("patch", ["-p1", "--batch", "--forward", "-i", patchFile], { cwd: tree });
    const build = join(tree, "b");
    mkdirSync(build);
    run(join(tree, "configure"), CONFIGURE, { cwd: build });
    run("ninja", ["-j", String(Math.max(1, (await import("node:os")).availableParallelism())), "qemu-system-x86_64"], { cwd: build });
    const staging = `${dest}.tmp-${process.pid}`;
    rmSync(staging, { recursive: true, force: true });
    mkdirSync(join(staging, "bin"), { recursive: true });
    copyFileSync(join(build, "qemu-system-x86_64"), join(staging, "bin", "qemu-system-x86_64"));
    run("chmod", ["0755", join(staging, "bin", "qemu-system-x86_64")]);
    writeFileSync(join(staging, "build.json"), JSON.stringify({ key, version, patch: "supermachine-reload.patch", configure: CONFIGURE }, null, 2) + "\n");
    rmSync(dest, { recursive: true, force: true });
    mkdirSync(dirname(dest), { recursive: true });
    renameSync(staging, dest);
    log(`QEMU with process reuse: ${join(dest, "bin", "qemu-system-x86_64")}`);
  } catch (e) {
    if (required) throw e;
    log(`could not build QEMU with process reuse (VMs use the host's QEMU, one process per VM): ${(e as Error).message}`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(`setup: ${(e as Error).message}`);
  process.exit(1);
});
