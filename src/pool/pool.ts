/**
 * Pool: warm VMs restored from one image's snapshot.
 *
 * `acquire()` pops an idle VM if there is one, else restores a new one if
 * fewer than `max` are alive, else waits (FIFO, up to acquireTimeoutMs).
 * A released VM is destroyed and replaced by a fresh restore in the
 * background (restoreOnRelease, the default) or goes back to idle as it is.
 * Each acquire hands out its own lease on the VM: releasing twice is harmless
 * and a released lease cannot touch a VM that someone else holds now.
 */

import { createHash } from "node:crypto";
import { ClosedError, PoolError, SupermachineError, TimeoutError, invalidOption } from "../errors.js";
import type { Image } from "../image/image.js";
import { leaseSnapshot, type SnapshotLease } from "../image/cache-admin.js";
import { reuseQemuFor, type Vm } from "../vm/vm.js";
import { compilePolicy, type CompiledPolicy, type NetworkOption } from "../net/policy.js";
import { channels, trace } from "../diagnostics.js";

/**
 * @internal What every prewarm runs first (bench/refill.ts replays it): the
 * image's own `true` (found in its PATH, as a user's command would be), so
 * that the guest's exec path and the image's usual binary and libc start-up
 * are translated before a user's exec. An image without `true` (exit 127:
 * not found) runs the agent's binary instead (`/proc/1/exe --version`),
 * which warms the kernel's process paths only. Measured in
 * docs/performance.md: both cost the same, but after the image's `true` the
 * first user exec of a busybox image costs ~15 ms of CPU instead of ~72.
 * Image.build runs it once before the snapshot too, so the program's pages
 * are in every restored VM's page cache.
 */
export async function basePrewarm(vm: Vm, timeoutMs: number): Promise<void> {
  const r = await vm.exec({ argv: ["true"], timeoutMs, maxOutputBytes: 1 << 20 });
  if (r.exitCode !== 0) await vm.exec({ argv: ["/proc/1/exe", "--version"], timeoutMs, maxOutputBytes: 1 << 20 });
}

export interface PoolOptions {
  /** Idle VMs to keep warm. @default 1 */
  readonly min?: number;
  /** Maximum total VMs. @default 1 (raised to min when min is larger) */
  readonly max?: number;
  /** Max wait when the pool is saturated; 0 waits forever. @default 60000 */
  readonly acquireTimeoutMs?: number;
  /** Evict VMs idle longer than this, down to min. @default never */
  readonly idleTimeoutMs?: number;
  /** Clean state per acquire (vs. dirty reuse). @default true */
  readonly restoreOnRelease?: boolean;
  /**
   * Runtime memory override (MiB), without re-baking by hand. A snapshot's
   * RAM size is fixed, so the first pool at a new size bakes the image again
   * at that size (its Image.build options rerun, warmup included) and caches
   * the result like any build; later pools (and processes) reuse it.
   * @default the image's
   */
  readonly memoryMib?: number;
  /** Runtime vCPU override, handled like memoryMib. @default the image's */
  readonly vcpus?: number;
  /**
   * (extension) Egress policy of this pool's VMs (see BuildOptions.network);
   * applied at each restore, so pools with different policies can share
   * one snapshot. @default the Image's (BuildOptions.network), else true
   */
  readonly network?: NetworkOption;
  /** Per-VM snapshot-restore deadline. @default 30000 */
  readonly restoreTimeoutMs?: number;
  /**
   * (extension) Commands run on each restored VM before it is handed out,
   * to warm QEMU's translation cache: under TCG a new QEMU process translates
   * every guest code path on first use, which makes the first exec in a
   * fresh VM ~100 ms slower. `true` runs a no-op program (the image's own
   * `true`, else the agent's `--version`) that warms the kernel's process
   * paths and the image's usual program start-up; a list of argv runs that,
   * then those (e.g. [["python3", "-c", "pass"]]). Neither runs on a VM that
   * a waiting acquire() takes at once: its own first exec does the same
   * work, and the prewarm would only delay it; nor on a VM reloaded into a
   * reused QEMU (qemu-reuse.md) when the snapshot ran the list already,
   * nor on a fresh QEMU that translates the blocks an earlier VM of such
   * a pool recorded after it, in a thread of its own (pretranslate.md).
   * Output is discarded; effects on the guest's files stay (a warmup, baked
   * into the snapshot, is the place for setup every VM needs). A list also
   * runs once before a snapshot of its own: the pool's first creation bakes
   * the image again with the commands after its warmup, or runs them in the
   * image's own bake VM when it was just built (cached on disk like any
   * build), so their files are in every restored VM's page cache and,
   * under TCG with the guest's ASLR off, a reused QEMU keeps their
   * translations (docs/performance.md). An image that cannot be baked again (loaded
   * from a snapshot directory) only runs them per VM.
   * @default true under TCG, false under KVM
   */
  readonly prewarm?: boolean | readonly (readonly string[])[];
}

export interface PoolStats {
  /** Total VMs: idle + checked out + being restored. */
  alive: number;
  /** Checked out through acquire(). */
  inUse: number;
  idle: number;
  /** acquire() callers waiting for a VM. */
  waiting: number;
  min: number;
  max: number;
}

interface Waiter {
  resolve: (vm: Vm) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

interface IdleVm {
  vm: Vm;
  since: number;
  /** Set when the pool stops the VM's vCPUs: true once stopped (false: it stayed running). */
  paused?: Promise<boolean>;
  /** While the pool waits for the guest to settle before stopping it: hands it out running instead. */
  take?: () => void;
}

/** How long a fresh VM may stay busy (its workload starting, say) before the pool stops it anyway. */
const SETTLE_MAX_MS = 3_000;
/** A guest is quiet when its vCPUs were seen halted this many times in a row, this far apart. */
const SETTLE_SAMPLE_MS = 8;
const SETTLE_QUIET_SAMPLES = 3;

/**
 * Whether pools stop the vCPUs of the fresh VMs they hold idle (resumed on
 * acquire): under TCG an idle running VM costs ~5 ms of CPU per second, a
 * stopped one nothing, and resuming (clock set included) ~4 ms once (docs/performance.md).
 * SUPERMACHINE_POOL_PAUSE_IDLE=0 or 1 overrides (for benchmarks).
 */
export function pauseIdleFor(accel: "kvm" | "tcg", env: NodeJS.ProcessEnv = process.env): boolean {
  const v = env.SUPERMACHINE_POOL_PAUSE_IDLE;
  if (v === "0" || v === "1") return v === "1";
  return accel === "tcg";
}

/** Vm methods that return a promise: on a released lease they reject (the others throw). */
const ASYNC_METHODS = new Set<PropertyKey>(["exec", "spawn", "writeFile", "readFile", "workloadSignal", "exposeTcp", "snapshot", "ping", "configure", "qmp"]);
/** Vm getters that would reach the VM itself (its sockets, its process): refused on a released lease. */
const GUARDED_GETTERS = new Set<PropertyKey>(["vsockPath", "execPath", "pid", "conn", "qemu", "runtimeDir"]);

/** At most this many restores run at once (each is CPU-heavy under TCG). */
const RESTORE_CONCURRENCY = 2;

export class Pool {
  readonly image: Image;
  private readonly min: number;
  private readonly max: number;
  private readonly acquireTimeoutMs: number;
  private readonly idleTimeoutMs: number | undefined;
  private readonly restoreOnRelease: boolean;
  private readonly restoreTimeoutMs: number;
  /** Whether the base prewarm runs (then the argv of `prewarm`). */
  private readonly basePrewarm: boolean;
  private readonly prewarm: string[][];
  /** The `prewarm` list ran before this pool's snapshot (Image.sibling). */
  private prewarmBaked = false;
  /**
   * Whether a released VM's QEMU process serves the next restore
   * (docs/qemu-reuse.md): expected under TCG, then as last seen.
   */
  private processesReused: boolean;
  /**
   * Whether this pool may still need a new QEMU process (Image.keepSpare):
   * below `max`, or at every refill when a released VM's process is not
   * reused (a VM kept as it is, `restoreOnRelease: false`, needs none).
   */
  private readonly wantsSpare = (): boolean => !this.closed && (this.alive < this.max || (this.restoreOnRelease && !this.processesReused));
  /** Names this pool's prewarm on the block lists its VMs record (src/vmm/pretranslate.ts). */
  private readonly prewarmLabel: string;
  private readonly pauseIdle: boolean;
  private readonly network: CompiledPolicy;
  private readonly memoryMib: number;
  private readonly vcpus: number;
  private idle: IdleVm[] = [];
  private inUse = new Set<Vm>();
  private starting = 0;
  private restoring = 0;
  /** Taken from idle by acquire(), being resumed. */
  private resuming = 0;
  /** shutdown() waiting for `starting` and `resuming` to reach 0 (quiet()). */
  private quietWaiters: (() => void)[] = [];
  /** create() waiting for a restore to end (quiet()) or the pool to close. */
  private restoreWaiters: (() => void)[] = [];
  private queue: (() => void)[] = [];
  private waiters: Waiter[] = [];
  private closed = false;
  /** Aborted by shutdown(): restores in flight stop instead of finishing. */
  private readonly stopping = new AbortController();
  /** Restored VMs running their prewarm (shutdown() destroys them). */
  private readonly warming = new Set<Vm>();
  /** Destroys of VMs that came back after shutdown() (it waits for them). */
  private readonly teardown = new Set<Promise<unknown>>();
  /** Keeps `prune` off the snapshot while the pool lives (cache-admin.ts). */
  private snapshotLease: SnapshotLease | undefined;
  private evictTimer: NodeJS.Timeout | undefined;
  private lastError: Error | undefined;

  private constructor(image: Image, o: PoolOptions) {
    this.image = image;
    const int = (v: unknown, name: string, dflt: number, min: number): number => {
      if (v === undefined) return dflt;
      if (typeof v !== "number" || !Number.isInteger(v) || v < min) throw invalidOption(name, `an integer ≥ ${min}`, v);
      return v;
    };
    this.min = int(o.min, "min", 1, 0);
    this.max = Math.max(int(o.max, "max", 1, 1), o.max === undefined ? this.min : 1);
    if (this.min > this.max) throw invalidOption("min", `at most max (${this.max})`, this.min);
    this.acquireTimeoutMs = int(o.acquireTimeoutMs, "acquireTimeoutMs", 60_000, 0);
    this.idleTimeoutMs = o.idleTimeoutMs === undefined ? undefined : int(o.idleTimeoutMs, "idleTimeoutMs", 0, 1);
    if (o.restoreOnRelease !== undefined && typeof o.restoreOnRelease !== "boolean") throw invalidOption("restoreOnRelease", "a boolean", o.restoreOnRelease);
    this.restoreOnRelease = o.restoreOnRelease ?? true;
    this.restoreTimeoutMs = int(o.restoreTimeoutMs, "restoreTimeoutMs", 30_000, 1);
    const pw = o.prewarm ?? image.manifest.accel === "tcg";
    if (typeof pw !== "boolean" && !(Array.isArray(pw) && pw.every((a) => Array.isArray(a) && a.length > 0 && a.every((x) => typeof x === "string")))) {
      throw invalidOption("prewarm", "a boolean or a list of argv arrays", pw);
    }
    this.basePrewarm = pw !== false;
    this.prewarm = typeof pw === "boolean" ? [] : pw.map((a) => [...a]);
    this.prewarmLabel = createHash("sha256").update(JSON.stringify({ base: this.basePrewarm, list: this.prewarm })).digest("hex").slice(0, 32);
    this.pauseIdle = pauseIdleFor(image.manifest.accel);
    this.network = o.network === undefined ? image.network : compilePolicy(o.network);
    this.processesReused = reuseQemuFor(image.manifest.accel);
    this.memoryMib = int(o.memoryMib, "memoryMib", image.memoryMib, 32);
    this.vcpus = int(o.vcpus, "vcpus", image.vcpus, 1);
  }

  /** @internal Use image.pool(). Resolves when `min` VMs are ready. */
  static async create(image: Image, o: PoolOptions): Promise<Pool> {
    let p = new Pool(image, o);
    // Another size, or prewarm commands: the image baked at that size, with
    // those commands run before its snapshot (once, then cached). An image
    // that cannot be baked again runs the commands in every VM instead.
    // @internal SUPERMACHINE_BAKE_POOL_PREWARM=0: never (for benchmarks).
    const bake = p.prewarm.length > 0 && image._rebakeable && process.env.SUPERMACHINE_BAKE_POOL_PREWARM !== "0";
    if (p.memoryMib !== image.memoryMib || p.vcpus !== image.vcpus || bake) {
      // Takes the base image's bake VM (its warm handoff) when it bakes the
      // list from it (Image.derive). Otherwise that VM would wait for a pool
      // of the base image, holding its memory: the sibling brings its own.
      const sibling = image.sibling(p.memoryMib, p.vcpus, bake ? p.prewarm : [], p.restoreTimeoutMs);
      void image.dropHandoff();
      p = new Pool(await sibling, o);
      p.prewarmBaked = bake;
    }
    const img = p.image;
    img.accelFor();
    p.snapshotLease = leaseSnapshot(img.snapshotPath);
    // The bake's VM, its workload started as a restore starts it.
    const handoff = await img.takeHandoff();
    if (handoff) {
      handoff.net.setPolicy(p.network);
      // A baked list's handoff is the VM that ran it before the snapshot.
      if (p.prewarm.length > 0 && !p.prewarmBaked) void p.prewarmHandoff(handoff);
      else p.offer(handoff, true);
    }
    // After the handoff: a pool it fills wants no spare.
    void img.keepSpare(true, p.wantsSpare);
    p.fill();
    // pool() resolves once min VMs are ready: prewarmed, or pretranslating
    // (runPrewarm), or the first restore failed.
    while (p.idle.length < p.min && !p.closed) {
      if (p.lastError) {
        const e = p.lastError;
        await p.shutdown();
        throw e;
      }
      await new Promise<void>((r) => p.restoreWaiters.push(r));
    }
    if (p.idleTimeoutMs !== undefined) {
      p.evictTimer = setInterval(() => p.evictIdle(), Math.max(10, Math.min(1000, p.idleTimeoutMs / 4)));
      p.evictTimer.unref();
    }
    return p;
  }

  /** Synchronous and exact. */
  stats(): PoolStats {
    return {
      alive: this.alive,
      inUse: this.inUse.size,
      idle: this.idle.length,
      waiting: this.waiters.length,
      min: this.min,
      max: this.max,
    };
  }

  /** VMs of this pool: idle, checked out, being restored or resumed. */
  private get alive(): number {
    return this.idle.length + this.inUse.size + this.starting + this.resuming;
  }

  /**
   * A VM: an idle one, a new restore, or the next one freed (FIFO). What is
   * returned is a lease on it: `release()`, `await using` or `using` give it
   * back (once); after that the handle refuses every use with ClosedError.
   * Rejects with TimeoutError after acquireTimeoutMs, PoolError after
   * shutdown().
   */
  acquire(): Promise<Vm> {
    const t0 = performance.now();
    const fromIdle = this.idle.length > 0;
    const p = this.acquireVm();
    p.then(
      () => trace(channels.poolAcquire, { waitedMs: Math.round(performance.now() - t0), from: fromIdle ? "idle" : "wait" }),
      () => undefined,
    );
    return p;
  }

  private acquireVm(): Promise<Vm> {
    if (this.closed) return Promise.reject(new PoolError("acquire() on a pool that was shut down; create a new pool with image.pool()"));
    while (this.idle.length) {
      const entry = this.idle.pop()!;
      const { vm } = entry;
      if (vm.status !== "ready") continue;
      if (entry.paused) return this.resumeAndLease(entry);
      const leased = this.lease(vm);
      this.fill();
      return Promise.resolve(leased);
    }
    return new Promise<Vm>((resolve, reject) => {
      const w: Waiter = { resolve, reject, timer: undefined };
      if (this.acquireTimeoutMs > 0) {
        w.timer = setTimeout(() => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(
            new TimeoutError(
              `no VM became free within acquireTimeoutMs (${this.acquireTimeoutMs} ms): all ${this.max} are in use. Release VMs sooner, raise max, or raise acquireTimeoutMs (0 waits forever).`,
              this.acquireTimeoutMs,
            ),
          );
        }, this.acquireTimeoutMs);
      }
      this.waiters.push(w);
      this.fill();
    });
  }

  /** Continues a VM the pool stopped while idle, then hands it out (another one if it cannot). */
  private async resumeAndLease(entry: IdleVm): Promise<Vm> {
    const { vm } = entry;
    this.resuming++;
    this.fill();
    let ok = false;
    try {
      entry.take?.();
      if (await entry.paused) await vm._resume();
      ok = true;
    } catch {
      /* dead or unreachable: dropped below */
    } finally {
      this.resuming--;
    }
    if (!ok || this.closed || vm.status !== "ready") {
      this.dispose(vm);
      this.quiet();
      return this.acquire();
    }
    const leased = this.lease(vm);
    this.fill();
    return leased;
  }

  /** Starts restores for waiters (up to max) and to keep min warm. */
  private fill(): void {
    if (this.closed) return;
    const wanted = Math.max(this.min - this.idle.length, 0) + this.waiters.length;
    while (this.starting < wanted && this.alive < this.max) this.startRestore();
  }

  private startRestore(): void {
    this.starting++;
    void this.restoreOne().then(
      (vm) => {
        this.starting--;
        this.lastError = undefined;
        this.offer(vm, true);
        this.quiet();
      },
      (e: unknown) => {
        this.starting--;
        const err = e instanceof Error ? e : new Error(String(e));
        this.lastError = err;
        // One failed restore fails one waiter, instead of leaving it to hang.
        const w = this.waiters.shift();
        if (w) {
          if (w.timer) clearTimeout(w.timer);
          w.reject(err instanceof SupermachineError ? err : new PoolError(`restoring a VM failed: ${err.message}`, { cause: err }));
        }
        this.quiet();
      },
    );
  }

  /**
   * After a restore or resume ended (its VM offered or torn down by then):
   * wakes create(), and shutdown() once none is in flight.
   */
  private quiet(): void {
    for (const r of this.restoreWaiters.splice(0)) r();
    if (this.starting === 0 && this.resuming === 0) for (const r of this.quietWaiters.splice(0)) r();
  }

  private async restoreOne(): Promise<Vm> {
    // Bound concurrent restores; the rest queue here.
    if (this.restoring >= RESTORE_CONCURRENCY) await new Promise<void>((r) => this.queue.push(r));
    this.restoring++;
    try {
      if (this.closed) throw new ClosedError("the pool was shut down");
      const t0 = performance.now();
      try {
        const vm = await this.image.restore({ timeoutMs: this.restoreTimeoutMs, network: this.network, signal: this.stopping.signal });
        let prewarmed: boolean | "pretranslating";
        this.warming.add(vm);
        try {
          if (this.closed) throw new ClosedError("the pool was shut down");
          prewarmed = await this.runPrewarm(vm);
          // The first fresh VM of a snapshot to finish its prewarm leaves
          // the keys of what its QEMU translated for the next fresh ones
          // (src/vmm/pretranslate.ts); a failure only costs their speed.
          if (prewarmed === true) await vm._recordTbHints(this.prewarmLabel).catch(() => 0);
        } catch (e) {
          await vm.destroy();
          throw e;
        } finally {
          this.warming.delete(vm);
        }
        trace(channels.poolRefill, { ms: Math.round(performance.now() - t0), ok: true, prewarmed });
        return vm;
      } catch (e) {
        trace(channels.poolRefill, { ms: Math.round(performance.now() - t0), ok: false, message: (e as Error).message.split("\n")[0] });
        throw e;
      }
    } finally {
      this.restoring--;
      this.queue.shift()?.();
    }
  }

  /**
   * The prewarm of a VM about to be offered: the base prewarm (when `base`),
   * then the `prewarm` argv list. Skipped on a VM that an acquire() already
   * waits for: that caller's own first exec translates what it needs, and
   * under TCG the prewarm would only make it wait, then run its task on top.
   * The prewarm pays off for VMs that wait idle. Returns whether it ran,
   * or "pretranslating" when QEMU's thread does its work instead.
   */
  private async runPrewarm(vm: Vm, base = this.basePrewarm): Promise<boolean | "pretranslating"> {
    if (this.waiters.length > 0 || (!base && this.prewarm.length === 0)) return false;
    // Whether the prewarm has effects of its own to leave in this VM: none
    // when it is the base one (a no-op program) and a baked list (its
    // effects are in the snapshot).
    const translationOnly = this.prewarm.length === 0 || this.prewarmBaked;
    // In a reused QEMU the VMs before this one ran the same programs from the
    // same snapshot pages (the base prewarm's and a baked list's are in its
    // page cache), and their translations stay: nothing left to warm.
    // @internal SUPERMACHINE_PREWARM_RELOADED=1: prewarm them anyway (for benchmarks).
    if (vm._reloaded && translationOnly && process.env.SUPERMACHINE_PREWARM_RELOADED !== "1") return false;
    // A fresh QEMU that got the block list a VM of this pool recorded after
    // this same prewarm translates those blocks in a thread of its own, on
    // another core: the VM is offered at once, and its first exec finds
    // what the thread made by then (docs/pretranslate.md, "Instead of the
    // prewarm"). Running the prewarm on the vCPU as well would only make it
    // wait, and translate in a race with that thread.
    // @internal SUPERMACHINE_PREWARM_PRETRANSLATED=1: prewarm them anyway (for benchmarks).
    if (translationOnly && process.env.SUPERMACHINE_PREWARM_PRETRANSLATED !== "1" && (await vm._pretranslatedBy) === this.prewarmLabel) return "pretranslating";
    if (base) await basePrewarm(vm, this.restoreTimeoutMs);
    for (const argv of this.prewarm) await vm.exec({ argv, timeoutMs: this.restoreTimeoutMs, maxOutputBytes: 1 << 20 });
    return true;
  }

  /**
   * The bake's own VM, handed to this pool (the image's first), when the
   * pool's argv list was not baked (an image that cannot be baked again):
   * it ran the base prewarm before its snapshot, not the list, which it
   * runs now like every restored VM (unless an acquire() waits by then).
   */
  private async prewarmHandoff(vm: Vm): Promise<void> {
    this.starting++;
    this.warming.add(vm);
    let error: Error | undefined;
    try {
      if (this.closed) throw new ClosedError("the pool was shut down");
      await this.runPrewarm(vm, false);
    } catch (e) {
      error = e instanceof Error ? e : new Error(String(e));
    } finally {
      this.warming.delete(vm);
    }
    if (!error) {
      this.starting--;
      this.offer(vm, true);
      this.quiet();
      return;
    }
    this.dispose(vm);
    this.starting--;
    if (!this.closed) {
      this.lastError = error;
      this.fill();
    }
    this.quiet();
  }

  /**
   * A VM became available: to the first waiter, else to idle. A `fresh` one
   * (restored, never handed out) waits there stopped when pauseIdle is on;
   * one reused dirty keeps running (its holder's processes with it).
   */
  private offer(vm: Vm, fresh: boolean): void {
    if (this.closed || vm.status !== "ready") {
      this.dispose(vm);
      this.fill();
      return;
    }
    vm._onDeath = () => {
      this.idle = this.idle.filter((i) => i.vm !== vm);
      this.fill();
    };
    const w = this.waiters.shift();
    if (w) {
      if (w.timer) clearTimeout(w.timer);
      w.resolve(this.lease(vm));
      return;
    }
    const entry: IdleVm = { vm, since: Date.now() };
    if (fresh && this.pauseIdle) entry.paused = this.settleThenPause(entry);
    this.idle.push(entry);
  }

  /**
   * Stops an idle VM once its guest is quiet (its vCPU threads seen halted;
   * QemuProcess.vcpusRunning). What a restore starts (the image's workload,
   * say a `python3` that reads its empty stdin and exits) would otherwise
   * stand stopped and finish on the acquirer's time, beside its exec.
   * Bounded by SETTLE_MAX_MS; an acquire() meanwhile takes the VM running
   * (resolves false).
   */
  private async settleThenPause(entry: IdleVm): Promise<boolean> {
    const { vm } = entry;
    let taken = false;
    let wake: (() => void) | undefined;
    entry.take = () => {
      taken = true;
      wake?.();
    };
    const until = performance.now() + SETTLE_MAX_MS;
    let quiet = 0;
    while (performance.now() < until) {
      await new Promise<void>((r) => {
        const t = setTimeout(r, SETTLE_SAMPLE_MS);
        t.unref();
        wake = () => {
          clearTimeout(t);
          r();
        };
      });
      if (taken || this.closed || vm.status !== "ready") break;
      const running = vm.qemu.vcpusRunning();
      if (running === undefined) break;
      quiet = running ? 0 : quiet + 1;
      if (quiet >= SETTLE_QUIET_SAMPLES) break;
    }
    entry.take = undefined;
    if (taken || this.closed || vm.status !== "ready") return false;
    return vm._pause().then(
      () => true,
      () => false,
    );
  }

  /**
   * Hands `vm` out: a per-acquire view. Its release() (also dispose(),
   * close(), `Symbol.asyncDispose`, and the sync `Symbol.dispose` that starts
   * it) returns the VM once; destroy() kills the VM and returns it. After
   * that the view refuses everything else with ClosedError: it cannot touch
   * the VM that someone else may hold now.
   */
  private lease(vm: Vm): Vm {
    this.inUse.add(vm);
    let released: Promise<void> | undefined;
    const release = (): Promise<void> => (released ??= this.give(vm));
    const refused = () => new ClosedError(`the VM ${vm.id} was released back to its pool; acquire() another`);
    return new Proxy(vm, {
      get: (target, prop, receiver) => {
        switch (prop) {
          case "release":
          case "dispose":
          case "close":
          case Symbol.asyncDispose:
            return release;
          case Symbol.dispose:
            return () => void release().catch(() => undefined);
          case "destroy":
            return (err?: Error): Promise<void> => {
              if (released) return released;
              return target.destroy(err).then(release);
            };
          case "status":
            if (released) return "closed";
            break;
        }
        if (released) {
          if (GUARDED_GETTERS.has(prop)) throw refused();
          const v = Reflect.get(target, prop, receiver) as unknown;
          if (typeof v !== "function") return v;
          return ASYNC_METHODS.has(prop)
            ? () => Promise.reject(refused())
            : () => {
                throw refused();
              };
        }
        return Reflect.get(target, prop, receiver) as unknown;
      },
    });
  }

  /** Destroys a VM nobody waits for; shutdown() waits for it. */
  private dispose(vm: Vm): void {
    this.tearingDown(vm.destroy());
  }

  /** Teardown work that shutdown() waits for (its failure is the caller's to report). */
  private tearingDown(work: Promise<unknown>): void {
    const gone = work.then(
      () => undefined,
      () => undefined,
    );
    this.teardown.add(gone);
    void gone.then(() => this.teardown.delete(gone));
  }

  /** Takes a VM back from its holder. */
  private async give(vm: Vm): Promise<void> {
    this.inUse.delete(vm);
    vm.stopForwarders();
    const released = new ClosedError(`the VM ${vm.id} was released back to its pool; its processes were ended`);
    if (this.closed || vm.status !== "ready" || (this.restoreOnRelease && !vm._mayRecycle())) {
      if (!this.closed && vm.status === "ready" && this.restoreOnRelease) this.processesReused = false;
      // Start its replacement first, then tear it down. The holder's lease
      // ends here: the teardown (QEMU's exit, its files; 50–80 ms under TCG)
      // goes on behind release(), and shutdown() waits for it.
      this.fill();
      this.tearingDown(vm.destroy(released).then(() => this.fill()));
      return;
    }
    if (this.restoreOnRelease) {
      // Its QEMU, stopped, serves the replacement's restore when it can
      // (docs/qemu-reuse.md; the image stops it when no pool uses it any
      // more); else the VM is destroyed.
      const recycled = vm._recycle(released).then((s) => {
        this.processesReused = s !== undefined;
        return s && this.image.recycle(s);
      });
      this.tearingDown(recycled);
      await recycled;
      this.fill();
      return;
    }
    // Reused as it is: the holder's spawned processes and execPath sessions must not outlive the lease.
    vm.endSessions(released);
    this.offer(vm, false);
  }

  private evictIdle(): void {
    if (this.idleTimeoutMs === undefined || this.closed) return;
    const now = Date.now();
    // Oldest first, never below min.
    this.idle.sort((a, b) => a.since - b.since);
    while (this.idle.length > this.min && now - this.idle[0]!.since >= this.idleTimeoutMs) {
      const { vm } = this.idle.shift()!;
      void vm.destroy();
    }
  }

  /** Destroys every VM (idle and checked out) and rejects waiters. */
  async shutdown(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const r of this.restoreWaiters.splice(0)) r();
    this.snapshotLease?.release();
    const spareGone = this.image.keepSpare(false, this.wantsSpare);
    if (this.evictTimer) clearInterval(this.evictTimer);
    for (const w of this.waiters.splice(0)) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(new PoolError("the pool was shut down while this acquire() was waiting"));
    }
    // Restores in flight stop where they are: a prewarm (a Python start-up
    // under TCG takes seconds) must not hold up the caller's exit.
    this.stopping.abort(new ClosedError("the pool was shut down"));
    const all = [...this.idle.map((i) => i.vm), ...this.inUse, ...this.warming];
    this.idle = [];
    this.inUse.clear();
    await Promise.all(all.map((vm) => vm.destroy()));
    // Restores still in flight destroy their VM when they end (offer()).
    if (this.starting > 0 || this.resuming > 0) await new Promise<void>((r) => this.quietWaiters.push(r));
    // Resolved only when every QEMU of the pool is gone.
    await Promise.all([spareGone, ...this.teardown]);
  }
}
