#!/usr/bin/env node
// Runs every test (node:test, compiled to dist/test) with bounded
// concurrency, then checks that no QEMU process the tests started is left.
//   node scripts/test.mjs [substring...]   only test files whose path matches

import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const filters = process.argv.slice(2);

// Every VM has a network, so the tests run in a network namespace of their
// own with only loopback: even a broken egress policy cannot send a packet
// off this machine. Fixtures that need the package archive are built first,
// outside it.
if (process.env.SUPERMACHINE_TEST_NETNS !== "1") {
  const pre = spawnSync(process.execPath, [join(root, "dist", "test", "fixtures", "prebuild.js")], { stdio: "inherit" });
  if (pre.status !== 0) process.exit(pre.status ?? 1);
  const asRoot = process.getuid?.() === 0;
  const r = spawnSync(
    "unshare",
    [...(asRoot ? [] : ["--map-root-user"]), "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', process.execPath, fileURLToPath(import.meta.url), ...filters],
    { stdio: "inherit", env: { ...process.env, SUPERMACHINE_TEST_NETNS: "1" } },
  );
  if (r.error) {
    console.error(`test: cannot create a network namespace (unshare --net): ${r.error.message}`);
    process.exit(1);
  }
  process.exit(r.status ?? 1);
}
{
  // Check the namespace really is closed: loopback only.
  const links = spawnSync("ip", ["-o", "link", "show"], { encoding: "utf8" }).stdout.trim().split("\n");
  if (links.length !== 1 || !/: lo:/.test(links[0] ?? "")) {
    console.error(`test: refusing to run: the network namespace has other interfaces than loopback:\n${links.join("\n")}`);
    process.exit(1);
  }
}

function collect(dir, out = []) {
  if (!existsSync(dir)) return out;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) collect(p, out);
    else if (e.name.endsWith(".test.js")) out.push(p);
  }
  return out;
}

function qemuPids() {
  const r = spawnSync("ps", ["-eo", "pid=,args="], { encoding: "utf8" });
  return new Set(
    r.stdout
      .split("\n")
      .filter((l) => /qemu-system/.test(l) && /-name sm-/.test(l))
      .map((l) => Number(l.trim().split(/\s+/)[0])),
  );
}

const files = collect(join(root, "dist", "test"))
  .filter((f) => filters.length === 0 || filters.some((s) => relative(root, f).includes(s)))
  .sort();
if (files.length === 0) {
  console.error("test: no test files found (did the build run?)");
  process.exit(1);
}
const before = qemuPids();
// Two cores and emulated CPUs: at most two test files (and so few VMs) at once.
const concurrency = process.env.SUPERMACHINE_TEST_CONCURRENCY ?? "2";
const r = spawnSync(process.execPath, ["--test", `--test-concurrency=${concurrency}`, ...files], {
  stdio: "inherit",
  cwd: root,
  env: process.env,
});
const leaked = [...qemuPids()].filter((p) => !before.has(p));
if (leaked.length) {
  console.error(`test: FAIL: QEMU processes left behind by the tests: ${leaked.join(", ")}`);
  spawnSync("kill", ["-9", ...leaked.map(String)]);
  process.exit(1);
}
console.log("test: no QEMU process left behind");
// The mount tests serve FUSE mounts on the host kernel (test/mounts/kernel.test.ts): none may stay.
const fuseLeft = existsSync("/proc/self/mounts")
  ? readFileSync("/proc/self/mounts", "utf8")
      .split("\n")
      .map((l) => l.split(" "))
      .filter((f) => f[2] === "fuse" && f[0]?.startsWith("sm-"))
      .map((f) => f[1])
  : [];
if (fuseLeft.length) {
  console.error(`test: FAIL: FUSE mounts left behind by the tests: ${fuseLeft.join(", ")}`);
  for (const m of fuseLeft) spawnSync("umount", ["-l", m]);
  process.exit(1);
}
process.exit(r.status ?? 1);
