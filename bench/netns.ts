/**
 * Benchmarks that give VMs a network run in a network namespace of their
 * own with only loopback (every VM has a NIC: docs/network.md), so nothing
 * they do can reach another machine. `enterLoopbackNetns()` re-executes the
 * current script under `unshare --net` unless it already runs in one.
 */

import { spawnSync } from "node:child_process";

/** Re-executes this process in a fresh network namespace (loopback up); returns only inside it. */
export function enterLoopbackNetns(): void {
  if (process.env.SUPERMACHINE_TEST_NETNS === "1") return;
  const asRoot = process.getuid?.() === 0;
  const r = spawnSync(
    "unshare",
    [...(asRoot ? [] : ["--map-root-user"]), "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', process.execPath, ...process.execArgv, ...process.argv.slice(1)],
    { stdio: "inherit", env: { ...process.env, SUPERMACHINE_TEST_NETNS: "1" } },
  );
  if (r.error) {
    console.error(`bench: cannot create a network namespace (unshare --net): ${r.error.message}`);
    process.exit(1);
  }
  process.exit(r.status ?? 1);
}
