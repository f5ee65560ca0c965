/**
 * Debian/Ubuntu package state, for `setup` and the QEMU build.
 */

import { spawnSync } from "node:child_process";

/** The packages of `wanted` that dpkg does not list as installed. */
export function missingDebianPackages(wanted: readonly string[]): string[] {
  return wanted.filter((p) => {
    const r = spawnSync("dpkg-query", ["-W", "-f=${Status}", p], { encoding: "utf8" });
    return r.status !== 0 || !r.stdout.includes("install ok installed");
  });
}
