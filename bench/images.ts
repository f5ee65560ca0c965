/**
 * The two root filesystems every system runs, prepared once and cached:
 *
 *   busybox  the default image's directory (ensureDefaultImage); our VMs
 *            build it as `dir:<that directory>`, bubblewrap and gVisor
 *            bind it read-only as their root.
 *   python   Debian bookworm + python3-minimal from mmdebstrap (the test
 *            fixture's debianPythonTar), written as an OCI layout (one gzip
 *            layer) for our VMs (`oci:<layout>:bookworm`), and the same tar
 *            extracted into a directory for bubblewrap and gVisor.
 */

import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../src/guest/default-image.js";
import { defaultCacheDir } from "../src/paths.js";
import type { GuestConfig } from "../src/vm/vm.js";
import { debianPythonTar, newLayout, testCacheDir } from "../test/fixtures/oci/images.js";
import { check } from "./proc.js";

export const PYTHON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

export interface BenchImage {
  /** "busybox" or "python". */
  readonly name: string;
  /** The root filesystem as a host directory (bubblewrap, gVisor). */
  readonly rootDir: string;
  /** The reference Image.build gets. */
  readonly ref: string;
  /** Environment and working directory of the image. */
  readonly config: GuestConfig;
  /** OCI layout directory and tag (python only: pushed to the registry in workload 6). */
  readonly layout?: { dir: string; tag: string };
  /** Bytes of the root filesystem (tar size or directory estimate), for the notes. */
  readonly description: string;
}

export interface BenchImages {
  busybox: BenchImage;
  python: BenchImage;
}

function benchCacheDir(): string {
  return join(testCacheDir(), "bench");
}

/** The busybox default image (the directory our CLI and Vm.boot use by default). */
export async function busyboxImage(): Promise<BenchImage> {
  const dir = await ensureDefaultImage(defaultCacheDir());
  return {
    name: "busybox",
    rootDir: dir,
    ref: `dir:${dir}`,
    config: DEFAULT_IMAGE_CONFIG,
    description: "Debian busybox-static, one static binary + applet links (the default image)",
  };
}

/** Runs `make(tmp)` unless `dir` was completed for `key`; atomic by rename. */
async function cached(dir: string, key: string, make: (tmp: string) => Promise<void>): Promise<string> {
  const marker = join(dir, ".bench-complete");
  if (existsSync(marker) && readFileSync(marker, "utf8") === key) return dir;
  const tmp = `${dir}.${process.pid}.tmp`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  await make(tmp);
  await writeFile(join(tmp, ".bench-complete"), key);
  await rm(dir, { recursive: true, force: true });
  await rename(tmp, dir);
  return dir;
}

/** Debian + python3: the mmdebstrap tar, as an OCI layout and as a directory. */
export async function pythonImage(log: (s: string) => void = () => undefined): Promise<BenchImage> {
  log("python image: mmdebstrap tar (cached in the test cache)");
  const tar = await debianPythonTar();
  const st = await stat(tar);
  const key = createHash("sha256").update(`${tar}\0${st.size}\0${st.mtimeMs}\0v1`).digest("hex");
  const root = benchCacheDir();
  await mkdir(root, { recursive: true });
  const tag = "bookworm";
  const layoutDir = await cached(join(root, "debian-python-layout"), key, async (tmp) => {
    log("python image: writing the OCI layout");
    const layout = await newLayout(tmp);
    const image = await layout.addImage({
      layers: [{ tar: await readFile(tar), compression: "gzip" }],
      config: { config: { Env: [`PATH=${PYTHON_PATH}`], Cmd: ["python3"], WorkingDir: "/" } },
    });
    layout.tag(image.manifest, tag);
    await layout.save();
  });
  const rootDir = await cached(join(root, "debian-python-rootfs"), key, async (tmp) => {
    log("python image: extracting the root filesystem for bubblewrap and gVisor");
    // Device nodes are left out: bubblewrap and gVisor mount their own /dev.
    await check(["tar", "-x", "-f", tar, "-C", tmp, "--numeric-owner", "--exclude=./dev/*"]);
  });
  return {
    name: "python",
    rootDir,
    ref: `oci:${layoutDir}:${tag}`,
    config: { env: [`PATH=${PYTHON_PATH}`], workingDir: "/" },
    layout: { dir: layoutDir, tag },
    description: `Debian bookworm + python3-minimal (mmdebstrap --variant=essential, ${Math.round(st.size / 1048576)} MiB tar, one layer)`,
  };
}
