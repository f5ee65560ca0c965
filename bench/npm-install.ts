/**
 * npm install benchmark (issue 10, the seed's Pattern 6): the same `npm
 * install` of a fixture project (`--packages` generated packages of
 * `--files` small files each, from an npm registry on 127.0.0.1) timed
 *
 *   - on this host (the baseline: the same node and npm, a cold npm cache);
 *   - in a VM, with node_modules on the root filesystem's writable layer
 *     (the default tmpfs, and the disk-backed layer of `diskMib`), on a
 *     volume, and on a mount (a host directory through the FUSE server);
 *   - and the path Pattern 6 is for: a VM restored from a snapshot whose
 *     warmup installed into a volume, timed from `pool.acquire()` to the
 *     first `node -e require(...)` that loads every package.
 *
 * Each VM run gets a fresh restored VM (cold npm cache, no node_modules);
 * every VM has `diskMib` so npm's cache never lands in guest RAM. The image
 * is Debian bookworm + this host's node and npm (the test fixture used by
 * test/net/npm-warmup.test.ts); the VM reaches the registry as
 * `registry.local` through the network policy. Runs in a loopback-only
 * network namespace. Prints tables (p50 of N runs: wall time, the guest's
 * own user+sys from bash's `time`, and host CPU of QEMU plus this process);
 * asserts nothing.
 *
 *   node dist/bench/npm-install.js [--runs N] [--packages N] [--files N] [--only host,tmpfs,disk,volume,mount,restore]
 */

import { spawn } from "node:child_process";
import { mkdirSync, readFileSync, readdirSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { cpus, loadavg, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { Image, type BuildOptions } from "../src/index.js";
import type { Vm } from "../src/vm/vm.js";
import { debianPythonLayout, hostNodeLayerTar } from "../test/fixtures/oci/images.js";
import { startNpmRegistry, type NpmPackage } from "../test/fixtures/npm/registry.js";
import { enterLoopbackNetns } from "./netns.js";
import { Args, fmtMs, processTree, summarize, table } from "./stats.js";

const args = new Args(process.argv.slice(2));
enterLoopbackNetns({ what: "npm-install bench" });
const runs = args.num("runs", 3);
const packageCount = Math.max(2, args.num("packages", 60));
const filesPerPackage = Math.max(1, args.num("files", 6));
const only = new Set(args.list("only") ?? ["host", "tmpfs", "disk", "volume", "mount", "restore"]);

const HOST = "registry.local";
const CLK_TCK = 100;

/**
 * `packageCount` packages: the project depends on the first tenth, and each
 * package depends on the next two, so npm resolves a tree that reaches them
 * all. Each has `filesPerPackage` files of about 1 KiB (plus package.json).
 */
function fixturePackages(): { packages: NpmPackage[]; top: string[] } {
  const name = (i: number): string => `bench-pkg-${String(i).padStart(3, "0")}`;
  const packages: NpmPackage[] = [];
  for (let i = 0; i < packageCount; i++) {
    const deps = [2 * i + 1, 2 * i + 2].filter((j) => j < packageCount);
    const files: Record<string, string> = {
      "index.js": `${deps.map((j) => `require(${JSON.stringify(name(j))});`).join("\n")}\nmodule.exports = ${i};\n`,
    };
    for (let f = 1; f < filesPerPackage; f++) files[`lib/part-${f}.js`] = `// ${name(i)} part ${f}\n${"module.exports.x = 'abcdefghijklmnopqrstuvwxyz0123456789';\n".repeat(16)}`;
    packages.push({ name: name(i), version: "1.0.0", dependencies: Object.fromEntries(deps.map((j) => [name(j), "^1.0.0"])), files });
  }
  const top = packages.slice(0, Math.max(1, Math.ceil(packageCount / 10))).map((p) => p.name);
  return { packages, top };
}

/** utime + stime of processes, in ms; the ones that vanished count 0. */
function cpuMs(pids: Iterable<number>): number {
  let ticks = 0;
  for (const p of new Set(pids)) {
    try {
      const s = readFileSync(`/proc/${p}/stat`, "latin1");
      const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
      ticks += Number(f[11]) + Number(f[12]);
    } catch {
      /* gone */
    }
  }
  return (ticks * 1000) / CLK_TCK;
}

function selfCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

interface Sample {
  wallMs: number;
  /** user+sys as the workload's own `time` saw it. */
  cpuMs: number;
  /** QEMU's and this process's CPU over the run (VMs only). */
  hostCpuMs?: number;
}

/** bash's `time` with TIMEFORMAT="%R %U %S" on the last line of stderr → user+sys in ms. */
function parseTime(stderr: string): number {
  const m = /(\d+\.\d+) (\d+\.\d+) (\d+\.\d+)\s*$/.exec(stderr);
  if (!m) throw new Error(`no timing line in: ${stderr.slice(-500)}`);
  return (Number(m[2]) + Number(m[3])) * 1000;
}

const TIMED = (cmd: string): string => `TIMEFORMAT='%R %U %S'; time ( ${cmd} )`;

function runHost(cmd: string, cwd: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn("bash", ["-c", cmd], { cwd, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    c.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    c.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    c.once("error", reject);
    c.once("close", (code) => resolve({ code, stdout, stderr }));
  });
}

const NPM_FLAGS = "--no-audit --no-fund --no-update-notifier --loglevel=warn";

async function main(): Promise<void> {
  const { packages, top } = fixturePackages();
  const fileCount = packages.reduce((n, p) => n + Object.keys(p.files).length + 1, 0);
  const registry = await startNpmRegistry(packages);
  const work = await mkdtemp(join(tmpdir(), "sm-bench-npm-"));
  const projectJson = JSON.stringify({ name: "bench-app", version: "1.0.0", private: true, dependencies: Object.fromEntries(top.map((n) => [n, "^1.0.0"])) }, null, 2);
  const requireAll = `node -e ${JSON.stringify(`for (const n of ${JSON.stringify(top)}) require(n)`)}`;
  const rows: string[][] = [];
  const add = (what: string, s: Sample[], note = ""): void => {
    const p50 = (f: (x: Sample) => number | undefined): string => {
      const v = s.map(f).filter((x): x is number => x !== undefined);
      return v.length ? fmtMs(summarize(v).p50 / 1000) : "–";
    };
    rows.push([what, String(s.length), p50((x) => x.wallMs), p50((x) => x.cpuMs), p50((x) => x.hostCpuMs), note]);
    console.error(`npm-install bench: ${what}: wall ${s.map((x) => Math.round(x.wallMs)).join(", ")} ms`);
  };
  let accel = "?";
  const images: Image[] = [];
  try {
    // ------------------------------------------------------------ the host
    if (only.has("host")) {
      const samples: Sample[] = [];
      for (let i = 0; i < runs; i++) {
        const dir = join(work, `host-${i}`);
        mkdirSync(dir);
        await writeFile(join(dir, "package.json"), projectJson);
        const t = performance.now();
        const r = await runHost(TIMED(`npm install --registry=http://127.0.0.1:${registry.port}/ --cache=${join(work, `host-cache-${i}`)} ${NPM_FLAGS}`), dir);
        const wallMs = performance.now() - t;
        if (r.code !== 0) throw new Error(`host npm install failed: ${r.stderr}`);
        const check = await runHost(requireAll, dir);
        if (check.code !== 0) throw new Error(`host: the installed tree does not load: ${check.stderr}`);
        samples.push({ wallMs, cpuMs: parseTime(r.stderr) });
      }
      add("host (same node + npm, no VM)", samples, "node_modules on the host's disk");
    }

    // ------------------------------------------------------------ VMs
    const layout = join(work, "layout");
    const ref = await debianPythonLayout(layout, { extraLayers: [await readFile(await hostNodeLayerTar())], env: ["HOME=/root"], workingDir: "/", tag: "node" });
    const base: BuildOptions = {
      ref,
      snapshotsDir: join(work, "snapshots"),
      memoryMib: 512,
      network: { allow: [HOST], hosts: { [HOST]: "127.0.0.1" } },
    };
    const url = (): string => `http://${HOST}:${registry.port}/`;
    const install = `cd /work && npm install --registry=${url()} ${NPM_FLAGS}`;

    /** One fresh VM per run: prepare, then time the install in the guest. */
    const placement = async (key: string, label: string, note: string, o: Partial<BuildOptions>, prepare: (vm: Vm) => Promise<void>): Promise<void> => {
      if (!only.has(key)) return;
      const image = await Image.build({ ...base, ...o });
      images.push(image);
      const pool = await image.pool({ min: 0, max: 1 });
      const samples: Sample[] = [];
      try {
        for (let i = 0; i < runs; i++) {
          const vm = await pool.acquire();
          try {
            accel = vm.accelerator;
            await prepare(vm);
            const qemu = processTree(vm.pid!);
            const c0 = cpuMs(qemu) + selfCpuMs();
            const t = performance.now();
            const r = await vm.exec({ argv: ["bash", "-c", TIMED(install)], timeoutMs: 1_800_000 });
            const wallMs = performance.now() - t;
            const hostCpuMs = cpuMs(qemu) + selfCpuMs() - c0;
            if (r.exitCode !== 0) throw new Error(`${label}: npm install failed (exit ${r.exitCode}): ${r.stderr.toString().slice(-2000)}`);
            const check = await vm.exec({ argv: ["sh", "-c", `cd /work && ${requireAll}`], timeoutMs: 300_000 });
            if (check.exitCode !== 0) throw new Error(`${label}: the installed tree does not load: ${check.stderr}`);
            samples.push({ wallMs, cpuMs: parseTime(r.stderr.toString()), hostCpuMs });
          } finally {
            await vm.release();
          }
        }
      } finally {
        await pool.shutdown();
      }
      add(label, samples, note);
    };

    const writeProject = async (vm: Vm): Promise<void> => {
      await vm.writeFile("/work/package.json", Buffer.from(projectJson));
    };
    await placement("tmpfs", "VM, root filesystem (tmpfs writable layer, the default)", "every byte in guest RAM", {}, writeProject);
    await placement("disk", "VM, root filesystem (`diskMib: 2048`)", "overlay upper dir on an ext4 virtio-blk disk", { diskMib: 2048 }, writeProject);
    await placement("volume", "VM, volume at /work/node_modules", "ext4 on virtio-blk, `sizeMib: 1024`", { diskMib: 2048, volumes: [{ name: "node_modules", sizeMib: 1024, mountPoint: "/work/node_modules" }] }, writeProject);
    const share = join(work, "share");
    mkdirSync(share);
    await placement("mount", "VM, mount at /work (host directory)", "FUSE, the TypeScript file server", { diskMib: 2048, mounts: [{ hostPath: share, guestTag: "work", guestPath: "/work" }] }, async () => {
      for (const f of readdirSync(share)) await rm(join(share, f), { recursive: true, force: true });
      await writeFile(join(share, "package.json"), projectJson);
    });

    // ------------------------------------------------------------ Pattern 6's point
    if (only.has("restore")) {
      const recipe: BuildOptions = {
        ...base,
        diskMib: 2048,
        volumes: [{ name: "node_modules", sizeMib: 1024, mountPoint: "/work/node_modules" }],
        warmupTag: `npm-${packageCount}-${filesPerPackage}`,
        warmup: async (vm) => {
          await vm.writeFile("/work/package.json", Buffer.from(projectJson));
          const r = await vm.exec({ argv: ["sh", "-c", install], timeoutMs: 1_800_000 });
          if (r.exitCode !== 0) throw new Error(`warmup npm install failed: ${r.stderr.toString().slice(-2000)}`);
        },
      };
      // Bake, then build again as a later process would: a cache hit, and
      // every acquire a copy-on-write restore (not the bake's handoff VM).
      await (await Image.build(recipe)).close();
      const image = await Image.build(recipe);
      images.push(image);
      const pool = await image.pool({ min: 0, max: 1, network: false });
      const acquire: number[] = [];
      const first: Sample[] = [];
      try {
        for (let i = 0; i < runs; i++) {
          const t = performance.now();
          const vm = await pool.acquire();
          try {
            const a = performance.now() - t;
            const r = await vm.exec({ argv: ["bash", "-c", TIMED(`cd /work && ${requireAll}`)], timeoutMs: 300_000 });
            if (r.exitCode !== 0) throw new Error(`restored VM: require failed: ${r.stderr}`);
            acquire.push(a);
            first.push({ wallMs: performance.now() - t, cpuMs: parseTime(r.stderr.toString()) });
          } finally {
            await vm.release();
          }
        }
      } finally {
        await pool.shutdown();
      }
      add("restored VM, node_modules baked in a volume: acquire → first require", first, `acquire p50 ${fmtMs(summarize(acquire).p50 / 1000)} s of it; no install`);
    }
  } finally {
    for (const i of images) await i.close().catch(() => undefined);
    await registry.stop();
    await rm(work, { recursive: true, force: true });
  }

  const [l1, l5] = loadavg();
  console.log(
    `\nnpm install of ${top.length} top-level dependencies → ${packageCount} packages, ${fileCount} files (${filesPerPackage} per package + package.json), registry on 127.0.0.1; ${accel}, 1 vCPU, 512 MiB; cold npm cache each run\n`,
  );
  console.log(table(["where node_modules is", "runs", "wall p50 s", "user+sys p50 s (its own `time`)", "host CPU p50 s (QEMU + Node)", "notes"], rows));
  console.log(`\nmachine: ${cpus().length} × ${cpus()[0]?.model.replace(/\s+/g, " ").trim()}, ${Math.round(totalmem() / 2 ** 30)} GiB; load average at the end ${l1!.toFixed(2)} (1 min), ${l5!.toFixed(2)} (5 min); node ${process.version}`);
}

await main();
