/**
 * The snapshot hashes on a thread of their own (worker_threads): a bake's
 * snapshot is published behind its Image (src/image/image.ts, sealBake), and
 * its RAM and root-image digests (~0.25 s of CPU for a Python image) then
 * run beside the first pool VM's prewarm instead of on the main thread,
 * which that VM's exec and the derived bake's plan need at the same time.
 *
 * One worker per process, started on first use (its first answer
 * 80–110 ms after the start here), kept while the
 * process lives but never holding its event loop when idle (unref'd; ref'd
 * while a hash is pending, so a script that returns does not exit before
 * its snapshot is published). A worker that cannot start or dies fails over
 * to hashing on the calling thread: same digests, only slower.
 */

import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { sha256FileHere, sparseSha256Here } from "./files.js";

/** A hash to take: a plain sha256, or the sparse RAM digest over the given extents (files.ts). */
export type HashJob = { op: "sha256"; path: string } | { op: "sparse"; path: string; size: number; extents: [number, number][] | undefined };

interface Request {
  id: number;
  job: HashJob;
}
type Reply = { id: number; hex: string } | { id: number; error: string };

const ROLE = "supermachine-hash-thread";

function runHere(job: HashJob): Promise<string> {
  return job.op === "sha256" ? sha256FileHere(job.path) : sparseSha256Here(job.path, job.size, job.extents);
}

// ----------------------------------------------------------------- worker

if (!isMainThread && parentPort && (workerData as { role?: string } | undefined)?.role === ROLE) {
  const port = parentPort;
  port.on("message", (r: Request) => {
    runHere(r.job).then(
      (hex) => port.postMessage({ id: r.id, hex } satisfies Reply),
      (e: unknown) => port.postMessage({ id: r.id, error: e instanceof Error ? e.message : String(e) } satisfies Reply),
    );
  });
}

// ------------------------------------------------------------------ owner

let worker: Worker | undefined;
/** Set once a worker failed: hashes run on the calling thread from then on. */
let broken = false;
let nextId = 1;
/** Jobs the worker answered (tests). */
let doneOnThread = 0;
const pending = new Map<number, { resolve: (hex: string) => void; reject: (e: Error) => void; job: HashJob }>();

function startWorker(): Worker | undefined {
  if (broken) return undefined;
  if (worker) return worker;
  try {
    const w = new Worker(new URL(import.meta.url), { workerData: { role: ROLE } });
    w.unref();
    w.on("message", (m: Reply) => {
      const p = pending.get(m.id);
      if (!p) return;
      pending.delete(m.id);
      if (pending.size === 0) w.unref();
      doneOnThread++;
      if ("hex" in m) p.resolve(m.hex);
      else p.reject(new Error(m.error));
    });
    const fail = (): void => {
      // The jobs it held run here instead.
      broken = true;
      if (worker === w) worker = undefined;
      const left = [...pending.values()];
      pending.clear();
      for (const p of left) runHere(p.job).then(p.resolve, p.reject);
    };
    w.on("error", fail);
    w.on("exit", () => {
      if (pending.size > 0 || worker === w) fail();
    });
    worker = w;
    return w;
  } catch {
    broken = true;
    return undefined;
  }
}

/** Runs `job` on the hash thread (or here, when there is none). Rejects with the read's error. */
export function hashOffThread(job: HashJob): Promise<string> {
  const w = process.env.SUPERMACHINE_HASH_THREAD === "0" ? undefined : startWorker();
  if (!w) return runHere(job);
  return new Promise<string>((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject, job });
    if (pending.size === 1) w.ref();
    w.postMessage({ id, job } satisfies Request);
  });
}

/** @internal (tests) How many jobs the hash thread answered in this process. */
export function _hashThreadJobs(): number {
  return doneOnThread;
}
