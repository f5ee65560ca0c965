/**
 * Benchmarks that start VMs run in a network namespace of their own with
 * only loopback, as the tests do (scripts/test.mjs): every VM has a NIC on
 * the host-side network stack, and even a broken egress policy must not send
 * a packet off this machine. A bench calls enterLoopbackNetns() first; it
 * returns at once when the process already is in such a namespace (e.g. a
 * bench started by a test), and otherwise runs the same script again under
 * `unshare --net` and exits with its status.
 */

import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { constants } from "node:os";

/** Set in the environment of the re-executed process. */
export const NETNS_ENV = "SUPERMACHINE_NETNS";

/** The network interfaces of this process's network namespace. */
export function netInterfaces(): string[] {
  // /proc/self/net follows the reader's namespace (/sys/class/net follows
  // the namespace sysfs was mounted in).
  const text = readFileSync("/proc/self/net/dev", "latin1");
  return text
    .split("\n")
    .slice(2)
    .map((l) => l.split(":")[0]!.trim())
    .filter(Boolean);
}

/** Whether this process is in a network namespace with only loopback. */
export function loopbackOnly(): boolean {
  const ifs = netInterfaces();
  return ifs.length === 1 && ifs[0] === "lo";
}

/**
 * Makes sure the rest of this process runs in a loopback-only network
 * namespace: returns when it already does; otherwise re-executes
 * `process.argv` (with `nodeArgs` before the script, and `extraArgs` after
 * its arguments) under `unshare --net` (`--map-root-user` when not root),
 * brings loopback up there, and exits with the child's status. Never
 * returns in the parent.
 */
export function enterLoopbackNetns(o: { readonly what: string; readonly nodeArgs?: readonly string[]; readonly extraArgs?: readonly string[] }): void {
  if (loopbackOnly()) return;
  if (process.env[NETNS_ENV] === "1") {
    console.error(`${o.what}: refusing to run: the network namespace has other interfaces than loopback: ${netInterfaces().join(", ")}`);
    process.exit(1);
  }
  const asRoot = process.getuid?.() === 0;
  const [script, ...args] = process.argv.slice(1);
  const r = spawnSync(
    "unshare",
    [
      ...(asRoot ? [] : ["--map-root-user"]),
      "--net",
      "--",
      "sh",
      "-c",
      'ip link set lo up && exec "$0" "$@"',
      process.execPath,
      ...process.execArgv,
      ...(o.nodeArgs ?? []),
      script!,
      ...args,
      ...(o.extraArgs ?? []),
    ],
    { stdio: "inherit", env: { ...process.env, [NETNS_ENV]: "1" } },
  );
  if (r.error) {
    console.error(`${o.what}: cannot create a network namespace (unshare --net, util-linux): ${r.error.message}`);
    process.exit(1);
  }
  process.exit(r.status ?? (r.signal ? 128 + (constants.signals[r.signal] ?? 0) : 1));
}
