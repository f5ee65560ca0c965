/**
 * Cached erofs images of host directories (`--rootfs DIR`, the default
 * busybox image). The key is a signature of the directory walk (names, modes,
 * owners, sizes, mtimes), so an edited directory gets a new image.
 */

import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { lstat, mkdir, readdir, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import { ImageError } from "../errors.js";
import { buildRootfsImage } from "./index.js";

/** Bumped when the image writer's output format changes. */
const FORMAT = 1;

async function signature(dir: string): Promise<string> {
  const h = createHash("sha256");
  h.update(`dir-v${FORMAT}\0${dir}\0`);
  const walk = async (rel: string) => {
    const names = (await readdir(join(dir, rel))).sort();
    for (const n of names) {
      const r = rel ? `${rel}/${n}` : n;
      const st = await lstat(join(dir, r));
      h.update(`${r}\0${st.mode}\0${st.uid}\0${st.gid}\0${st.size}\0${st.mtimeMs}\0${st.nlink}\0`);
      if (st.isDirectory()) await walk(r);
    }
  };
  await walk("");
  return h.digest("hex");
}

/**
 * Returns an erofs image of `dir`, building it under `<cacheDir>/rootfs/`
 * when the directory changed. Files are recorded as root-owned when
 * `ownerRoot` (a directory prepared by an unprivileged user).
 */
export async function directoryImage(dir: string, cacheDir: string, o: { ownerRoot?: boolean; signal?: AbortSignal } = {}): Promise<string> {
  const abs = resolve(dir);
  const st = await stat(abs).catch(() => undefined);
  if (!st?.isDirectory()) throw new ImageError(`root filesystem directory ${abs} does not exist or is not a directory (check --rootfs / the rootfs option)`);
  const key = await signature(abs);
  const out = join(cacheDir, "rootfs", `dir-${key.slice(0, 32)}${o.ownerRoot ? "-root" : ""}.erofs`);
  if (existsSync(out)) return out;
  await mkdir(join(cacheDir, "rootfs"), { recursive: true });
  await buildRootfsImage({ source: { kind: "directory", path: abs, ownerRoot: o.ownerRoot ?? false }, out, ...(o.signal ? { signal: o.signal } : {}) });
  return out;
}
