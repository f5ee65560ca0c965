/**
 * The peers' tools: installed from Debian's archive when missing (apt-get,
 * as root), then probed by running `echo hi` in the busybox root. A peer
 * that cannot run is reported with what was tried and what came back.
 */

import { spawnSync } from "node:child_process";
import type { BenchImage } from "./images.js";
import { run } from "./proc.js";
import { Bubblewrap, Gvisor, Host, ociSpec } from "./systems.js";

export interface PeerProbe {
  /** Version string(s) of the tool. */
  version: string;
  /** Commands tried, in order, with their outcome. */
  tried: string[];
  ok: boolean;
  reason?: string;
}

function has(cmd: string): boolean {
  return spawnSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" }).status === 0;
}

function firstLine(s: string): string {
  return s.trim().split("\n")[0] ?? "";
}

/** Debian package → the command it provides. */
export const PEER_PACKAGES: Readonly<Record<string, string>> = {
  bubblewrap: "bwrap",
  runsc: "runsc",
  "util-linux": "nsenter",
  // workload 6: a real registry and the tool that pushes to it; the python image
  "docker-registry": "docker-registry",
  skopeo: "skopeo",
  mmdebstrap: "mmdebstrap",
};

/**
 * apt-get installs the packages whose command is missing (when `install`);
 * returns a line per package that is still missing, with apt's output tail.
 */
export function ensurePackages(install: boolean, log: (s: string) => void): Map<string, string> {
  const missing = Object.entries(PEER_PACKAGES).filter(([, cmd]) => !has(cmd)).map(([pkg]) => pkg);
  const problems = new Map<string, string>();
  if (missing.length === 0) return problems;
  if (!install) {
    for (const p of missing) problems.set(p, `not installed (--no-install given; apt-get install ${p})`);
    return problems;
  }
  if (process.getuid?.() !== 0 || !has("apt-get")) {
    for (const p of missing) problems.set(p, `not installed, and this process cannot apt-get install it (not root, or no apt-get)`);
    return problems;
  }
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  log(`installing Debian packages: ${missing.join(" ")}`);
  spawnSync("apt-get", ["update", "-qq"], { stdio: "ignore", env });
  for (const p of missing) {
    // One at a time: a package that does not exist must not block the others.
    const r = spawnSync("apt-get", ["install", "-y", "-qq", "--no-install-recommends", p], { encoding: "utf8", env });
    if (r.status !== 0 || !has(PEER_PACKAGES[p]!)) {
      problems.set(p, `tried \`apt-get install ${p}\`, got exit ${r.status}: ${(r.stderr || r.stdout).trim().split("\n").slice(-3).join(" / ")}`);
    }
  }
  return problems;
}

export async function probeBwrap(busybox: BenchImage, problem: string | undefined): Promise<PeerProbe> {
  if (problem) return { version: "–", tried: [problem], ok: false, reason: problem };
  const version = firstLine((await run(["bwrap", "--version"])).stdout);
  const argv = [...Bubblewrap.args(busybox.rootDir), "echo", "hi"];
  const r = await run(argv);
  const tried = [`\`${argv.join(" ")}\` → exit ${r.code}${r.code === 0 ? "" : `: ${r.stderr.trim()}`}`];
  if (r.code !== 0 || r.stdout !== "hi\n") return { version, tried, ok: false, reason: tried[0]! };
  const n = await run(["nsenter", "--version"]);
  return { version: `${version}; ${firstLine(n.stdout)}`, tried, ok: true };
}

export async function probeRunsc(busybox: BenchImage, problem: string | undefined): Promise<PeerProbe> {
  if (problem) return { version: "–", tried: [problem], ok: false, reason: problem };
  const v = await run(["runsc", "--version"]);
  const version = v.stdout.trim().split("\n").join(", ");
  const g = new Gvisor("");
  try {
    const bundle = await g.bundle(busybox, ["echo", "hi"]);
    const argv = [...g.flags(), "run", "--bundle", bundle, "probe"];
    const r = await run(argv, { timeoutMs: 60_000 });
    const tried = [`\`runsc --network=none run\` of an OCI bundle (${JSON.stringify((ociSpec(busybox, ["echo", "hi"]).root as { path: string }).path)}, read-only) → exit ${r.code ?? r.signal}${r.code === 0 ? "" : `: ${r.stderr.trim().slice(-600)}`}`];
    if (r.code !== 0 || r.stdout !== "hi\n") return { version, tried, ok: false, reason: tried[0]! };
    return { version, tried, ok: true };
  } finally {
    await g.close();
  }
}

export async function hostDetail(): Promise<string> {
  const py = firstLine((await run(["/usr/bin/python3", "--version"]).catch(() => ({ stdout: "no /usr/bin/python3" }))).stdout);
  return `/bin/echo, ${py} (/usr/bin/python3)`;
}

export { Host };
