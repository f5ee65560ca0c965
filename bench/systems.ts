/**
 * The systems the benchmark puts side by side, each behind one interface:
 *
 *   supermachine  this project: snapshot restores from a Pool
 *   naive-vm      the same QEMU, kernel and image, cold-booted per task
 *                 (Vm.boot, no snapshot)
 *   bwrap         bubblewrap, the container baseline (namespaces, shared kernel)
 *   gvisor        gVisor's runsc, a user-space kernel
 *   host          a plain child_process spawn: the floor, no isolation
 *
 * Every system runs the same root filesystems (bench/images.ts), except the
 * host, which runs the host's own /bin/echo and /usr/bin/python3.
 */

import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync, readdirSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image, type Pool, Vm, resolveImage } from "../src/index.js";
import type { BenchImage } from "./images.js";
import { Background, check, run, waitUntil } from "./proc.js";
import { processTree } from "./stats.js";

export type SystemId = "supermachine" | "naive-vm" | "bwrap" | "gvisor" | "host";

export const SYSTEM_IDS: readonly SystemId[] = ["supermachine", "naive-vm", "bwrap", "gvisor", "host"];

/** Fresh environments, one per task. */
export interface OneShot {
  /** One task; resolves with its stdout. */
  run(): Promise<string>;
  /** Waits until background work the tasks caused is done (a pool refilling). */
  settle(): Promise<void>;
  close(): Promise<void>;
}

/** A running environment. */
export interface HeldEnv {
  exec(argv: readonly string[]): Promise<string>;
  /** Host processes that make up this environment. */
  pids(): number[];
}

export interface Held {
  readonly envs: readonly HeldEnv[];
  /** Host processes that belong to the group but to no one environment (a pool's spare QEMU). */
  sharedPids(): number[];
  close(): Promise<void>;
}

export interface System {
  readonly id: SystemId;
  readonly label: string;
  /** What isolates a task: shown in the table. */
  readonly isolation: string;
  /** Versions and configuration, for the notes. */
  readonly detail: string;
  oneShot(image: BenchImage, argv: readonly string[]): Promise<OneShot>;
  /** `count` running environments of `image`, each having run `argv` once. */
  hold(image: BenchImage, count: number, argv: readonly string[]): Promise<Held>;
  close(): Promise<void>;
}

const HOST_ENV = { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", HOME: "/root", LANG: "C.UTF-8" };

/** Runs `fn` over items, at most `limit` at once. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (t: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

function stdoutOf(r: { stdout: Buffer; stderr: Buffer; exitCode: number }, argv: readonly string[]): string {
  if (r.exitCode !== 0) throw new Error(`${argv.join(" ")} exited ${r.exitCode}: ${r.stderr.toString().slice(0, 500)}`);
  return r.stdout.toString();
}

// ------------------------------------------------------------ supermachine

export interface SupermachineOptions {
  snapshotsDir: string;
  /** Pool size for one-shot tasks (min = max). */
  poolSize: number;
  log: (s: string) => void;
}

/** This project: VMs restored from the image's snapshot by a Pool. */
export class Supermachine implements System {
  readonly id = "supermachine" as const;
  readonly label = "supermachine (this project)";
  readonly isolation = "VM (QEMU microvm), snapshot restore";
  detail = "";
  accel = "?";
  private readonly images = new Map<string, Promise<Image>>();
  /** Build time of each image's first Image.build in this run (ms). */
  readonly buildMs = new Map<string, number>();
  constructor(private readonly o: SupermachineOptions) {}

  image(img: BenchImage): Promise<Image> {
    let p = this.images.get(img.name);
    if (!p) {
      p = (async () => {
        this.o.log(`supermachine: Image.build ${img.name}`);
        const t = performance.now();
        const image = await Image.build({ ref: img.ref, snapshotsDir: this.o.snapshotsDir });
        this.buildMs.set(img.name, performance.now() - t);
        this.accel = image.manifest.accel;
        this.detail = `accelerator ${image.manifest.accel}, ${image.memoryMib} MiB, ${image.vcpus} vCPU, QEMU ${image.manifest.inputs.qemu ?? "?"}`;
        return image;
      })();
      this.images.set(img.name, p);
    }
    return p;
  }

  async oneShot(img: BenchImage, argv: readonly string[]): Promise<OneShot> {
    const image = await this.image(img);
    const size = this.o.poolSize;
    const pool = await image.pool({ min: size, max: size, restoreOnRelease: true, prewarm: [[...argv]] });
    return {
      run: async () => {
        const vm = await pool.acquire();
        try {
          return stdoutOf(await vm.exec({ argv, timeoutMs: 60_000 }), argv);
        } finally {
          await vm.release();
        }
      },
      settle: () => waitUntil(() => pool.stats().idle >= size, 120_000, "the pool to refill"),
      close: () => pool.shutdown(),
    };
  }

  /** A pool of max = `size` for throughput runs (min = max: all VMs restored ahead). */
  async pool(img: BenchImage, size: number, argv: readonly string[]): Promise<Pool> {
    const image = await this.image(img);
    return image.pool({ min: size, max: size, restoreOnRelease: true, prewarm: [[...argv]] });
  }

  async hold(img: BenchImage, count: number, argv: readonly string[]): Promise<Held> {
    const image = await this.image(img);
    const pool = await image.pool({ min: count, max: count, restoreOnRelease: false, prewarm: [[...argv]] });
    const vms: Vm[] = [];
    try {
      for (let i = 0; i < count; i++) vms.push(await pool.acquire());
      for (const vm of vms) stdoutOf(await vm.exec({ argv }), argv);
    } catch (e) {
      await pool.shutdown();
      throw e;
    }
    const mine = () => new Set(vms.flatMap((v) => (v.pid ? processTree(v.pid) : [])));
    return {
      envs: vms.map((vm) => ({
        exec: async (a) => stdoutOf(await vm.exec({ argv: a, timeoutMs: 60_000 }), a),
        pids: () => (vm.pid ? processTree(vm.pid) : []),
      })),
      // The QEMU the image keeps started ahead of the next restore.
      sharedPids: () => {
        const ours = mine();
        return qemuChildren().filter((p) => !ours.has(p));
      },
      close: async () => {
        for (const vm of vms) await vm.release();
        await pool.shutdown();
      },
    };
  }

  async close(): Promise<void> {
    for (const p of this.images.values()) await (await p.catch(() => undefined))?.close();
    this.images.clear();
  }
}

/** QEMU processes that are children of this Node process. */
export function qemuChildren(): number[] {
  return processTree(process.pid).filter((p) => {
    try {
      return /qemu-system/.test(readFileSync(`/proc/${p}/cmdline`, "latin1"));
    } catch {
      return false;
    }
  });
}

// ---------------------------------------------------------------- naive VM

/** The same VM cold-booted per task: Vm.boot, no snapshot. */
export class NaiveVm implements System {
  readonly id = "naive-vm" as const;
  readonly label = "naive VM (cold boot per task)";
  readonly isolation = "VM (QEMU microvm), cold boot";
  detail = "same QEMU, kernel, agent and root filesystem image; Vm.boot per task (a cold boot: no boot template), no snapshot";
  private readonly rootfsImages = new Map<string, Promise<{ rootfsImage: string } | { rootfs: string }>>();

  private source(img: BenchImage): Promise<{ rootfsImage: string } | { rootfs: string }> {
    let p = this.rootfsImages.get(img.name);
    if (!p) {
      p = img.ref.startsWith("dir:") ? Promise.resolve({ rootfs: img.rootDir }) : resolveImage(img.ref).then((r) => ({ rootfsImage: r.rootfsImage }));
      this.rootfsImages.set(img.name, p);
    }
    return p;
  }

  async boot(img: BenchImage): Promise<Vm> {
    // A cold boot: the boot template would make this a restore.
    return Vm.boot({ ...(await this.source(img)), config: img.config, bootTemplate: false });
  }

  async oneShot(img: BenchImage, argv: readonly string[]): Promise<OneShot> {
    await this.source(img);
    return {
      run: async () => {
        const vm = await this.boot(img);
        try {
          return stdoutOf(await vm.exec({ argv, timeoutMs: 60_000 }), argv);
        } finally {
          await vm.destroy();
        }
      },
      settle: async () => undefined,
      close: async () => undefined,
    };
  }

  async hold(img: BenchImage, count: number, argv: readonly string[]): Promise<Held> {
    const vms: Vm[] = [];
    try {
      // At most two boots at once on two cores.
      await mapLimit(Array.from({ length: count }), 2, async () => {
        const vm = await this.boot(img);
        vms.push(vm);
        stdoutOf(await vm.exec({ argv }), argv);
      });
    } catch (e) {
      await Promise.all(vms.map((v) => v.destroy()));
      throw e;
    }
    return {
      envs: vms.map((vm) => ({
        exec: async (a) => stdoutOf(await vm.exec({ argv: a, timeoutMs: 60_000 }), a),
        pids: () => (vm.pid ? processTree(vm.pid) : []),
      })),
      sharedPids: () => [],
      close: async () => {
        await Promise.all(vms.map((v) => v.destroy()));
      },
    };
  }

  async close(): Promise<void> {}
}

// --------------------------------------------------------------- bubblewrap

/** bubblewrap: new namespaces (user, pid, net, ipc, uts, cgroup, mount), the image as a read-only root. */
export class Bubblewrap implements System {
  readonly id = "bwrap" as const;
  readonly label = "bubblewrap (container)";
  readonly isolation = "namespaces, shared host kernel";
  constructor(readonly detail: string) {}

  static args(root: string): string[] {
    return ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", root, "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/", "--"];
  }

  async oneShot(img: BenchImage, argv: readonly string[]): Promise<OneShot> {
    const full = [...Bubblewrap.args(img.rootDir), ...argv];
    return {
      run: async () => (await check(full, { env: HOST_ENV })).stdout,
      settle: async () => undefined,
      close: async () => undefined,
    };
  }

  async hold(img: BenchImage, count: number, argv: readonly string[]): Promise<Held> {
    const bgs: Background[] = [];
    const envs: HeldEnv[] = [];
    try {
      for (let i = 0; i < count; i++) {
        const bg = new Background([...Bubblewrap.args(img.rootDir), "sleep", "1000000"], HOST_ENV);
        bgs.push(bg);
        let inner = 0;
        await waitUntil(
          () => {
            if (!bg.running) throw new Error(`bwrap exited: ${bg.stderr}`);
            inner = processTree(bg.pid).find((p) => comm(p) === "sleep") ?? 0;
            return inner > 0;
          },
          10_000,
          "the sandbox's sleep process",
        );
        // `docker exec` for a bubblewrap sandbox: enter its namespaces and root.
        const env: HeldEnv = {
          exec: async (a) => (await check(["nsenter", "-t", String(inner), "-a", "-r", "-w", ...a], { env: HOST_ENV })).stdout,
          pids: () => processTree(bg.pid),
        };
        await env.exec(argv);
        envs.push(env);
      }
    } catch (e) {
      await Promise.all(bgs.map((b) => b.stop()));
      throw e;
    }
    return { envs, sharedPids: () => [], close: async () => void (await Promise.all(bgs.map((b) => b.stop()))) };
  }

  async close(): Promise<void> {}
}

function comm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, "latin1").trim();
  } catch {
    return "";
  }
}

// ------------------------------------------------------------------- gVisor

/** gVisor's runsc: OCI bundles on the same root filesystems, no network. */
export class Gvisor implements System {
  readonly id = "gvisor" as const;
  readonly label = "gVisor runsc (user-space kernel)";
  readonly isolation = "user-space kernel (Sentry), ptrace platform";
  private root = "";
  private work = "";
  private bundles = 0;
  /** Detached containers alive (id → state root), killed on exit whatever happens. */
  private static readonly live = new Map<string, string>();
  constructor(readonly detail: string) {}

  /** Kills every detached container still alive (for exit and signal handlers). */
  static killAllSync(): void {
    for (const [id, root] of Gvisor.live) {
      spawnSync("runsc", ["--root", root, "kill", id, "KILL"], { stdio: "ignore" });
      spawnSync("runsc", ["--root", root, "delete", "-force", id], { stdio: "ignore" });
    }
    Gvisor.live.clear();
  }

  private async dirs(): Promise<void> {
    if (!this.work) {
      this.work = await mkdtemp(join(tmpdir(), "sm-bench-runsc-"));
      this.root = join(this.work, "state");
      await mkdir(this.root);
    }
  }

  /** runsc's global flags (state dir, no network). */
  flags(): string[] {
    return ["runsc", "--root", this.root, "--network=none"];
  }

  /** An OCI bundle running `argv` on the image's root filesystem (read-only). */
  async bundle(img: BenchImage, argv: readonly string[]): Promise<string> {
    await this.dirs();
    const dir = join(this.work, `bundle-${this.bundles++}`);
    await mkdir(dir);
    await writeFile(join(dir, "config.json"), JSON.stringify(ociSpec(img, argv), null, 1));
    return dir;
  }

  async oneShot(img: BenchImage, argv: readonly string[]): Promise<OneShot> {
    const b = await this.bundle(img, argv);
    return {
      run: async () => (await check([...this.flags(), "run", "--bundle", b, `t-${randomBytes(6).toString("hex")}`], { env: HOST_ENV })).stdout,
      settle: async () => undefined,
      close: async () => undefined,
    };
  }

  async hold(img: BenchImage, count: number, argv: readonly string[]): Promise<Held> {
    const ids: { id: string; bundle: string }[] = [];
    const envs: HeldEnv[] = [];
    const stopAll = async () => {
      for (const { id } of ids) {
        await run([...this.flags(), "kill", id, "KILL"]);
        await run([...this.flags(), "delete", "-force", id]);
        Gvisor.live.delete(id);
      }
    };
    try {
      for (let i = 0; i < count; i++) {
        const bundle = await this.bundle(img, ["sleep", "1000000"]);
        const id = `h-${randomBytes(6).toString("hex")}`;
        ids.push({ id, bundle });
        Gvisor.live.set(id, this.root);
        await check([...this.flags(), "run", "-detach", "--bundle", bundle, id], { env: HOST_ENV, detaches: true });
        const state = JSON.parse((await check([...this.flags(), "state", id])).stdout) as { pid: number };
        const env: HeldEnv = {
          exec: async (a) => (await check([...this.flags(), "exec", id, ...a], { env: HOST_ENV })).stdout,
          // The sandbox (Sentry and its stub processes) and the gofer, found by its bundle path.
          pids: () => [...processTree(state.pid), ...goferPids(bundle).flatMap(processTree)],
        };
        await env.exec(argv);
        envs.push(env);
      }
    } catch (e) {
      await stopAll();
      throw e;
    }
    return { envs, sharedPids: () => [], close: stopAll };
  }

  async close(): Promise<void> {
    if (this.work) await rm(this.work, { recursive: true, force: true });
  }
}

function goferPids(bundle: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, "latin1").split("\0");
      if (cmd.includes("gofer") && cmd.includes(bundle)) out.push(Number(d));
    } catch {
      /* gone */
    }
  }
  return out;
}

/** A minimal OCI runtime spec: read-only root, proc, dev, tmpfs /tmp, no network. */
export function ociSpec(img: BenchImage, argv: readonly string[]): Record<string, unknown> {
  return {
    ociVersion: "1.0.0",
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: [...argv],
      env: [...(img.config.env ?? []), "HOME=/root"],
      cwd: img.config.workingDir ?? "/",
      capabilities: Object.fromEntries(["bounding", "effective", "inheritable", "permitted"].map((k) => [k, ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]])),
      rlimits: [{ type: "RLIMIT_NOFILE", hard: 1024, soft: 1024 }],
      noNewPrivileges: true,
    },
    root: { path: img.rootDir, readonly: true },
    hostname: "runsc",
    mounts: [
      { destination: "/proc", type: "proc", source: "proc" },
      { destination: "/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"] },
      { destination: "/sys", type: "sysfs", source: "sysfs", options: ["nosuid", "noexec", "nodev", "ro"] },
      { destination: "/tmp", type: "tmpfs", source: "tmpfs", options: ["nosuid", "nodev"] },
    ],
    linux: { namespaces: ["pid", "network", "ipc", "uts", "mount"].map((type) => ({ type })) },
  };
}

// --------------------------------------------------------------------- host

/** A plain host child_process spawn of the host's own binaries: no isolation. */
export class Host implements System {
  readonly id = "host" as const;
  readonly label = "host spawn (no isolation)";
  readonly isolation = "none (the floor)";
  constructor(readonly detail: string) {}

  async oneShot(_img: BenchImage, argv: readonly string[]): Promise<OneShot> {
    return {
      run: async () => (await check(argv, { env: HOST_ENV })).stdout,
      settle: async () => undefined,
      close: async () => undefined,
    };
  }

  async hold(_img: BenchImage, count: number, argv: readonly string[]): Promise<Held> {
    const bgs = Array.from({ length: count }, () => new Background(["sleep", "1000000"], HOST_ENV));
    await check(argv, { env: HOST_ENV });
    return {
      envs: bgs.map((bg) => ({ exec: async (a) => (await check(a, { env: HOST_ENV })).stdout, pids: () => [bg.pid] })),
      sharedPids: () => [],
      close: async () => void (await Promise.all(bgs.map((b) => b.stop()))),
    };
  }

  async close(): Promise<void> {}
}
