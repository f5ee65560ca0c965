/**
 * Cache administration: what the image cache and the snapshots directory
 * hold, when each entry was last used, and removing entries (by name or by
 * LRU pruning) without touching anything in use.
 *
 *   <cacheDir>/rootfs/<id>.erofs        a root filesystem image (id: manifest hex, or dir-<hash>)
 *   <cacheDir>/rootfs/<id>.json         its record: references, digest, blobs (written by resolveImage);
 *                                       its mtime is the image's last use
 *   <snapshotsDir>/<name>/              a snapshot (docs/snapshots.md)
 *   <snapshotsDir>/.leases/<name>/      leases on it: one file per Image object using it;
 *                                       the directory's mtime is the snapshot's last use
 *
 * A lease is a file holding its owner's pid, the pid's start time (from
 * /proc, so a reused pid is not mistaken for the owner) and host. It is
 * written when an Image object is made (Image.build, Image.fromSnapshot,
 * vm.snapshot) and removed by image.close(); a process that dies without
 * closing leaves a lease whose owner is gone, which counts as released. A
 * lease from another host (a shared directory) always counts as held. No
 * timer keeps a lease alive: it holds nothing on the event loop.
 *
 * Removing a snapshot first renames it out of the way, checks the leases
 * again, and puts it back if one appeared in between; a build finds the
 * snapshot missing and bakes it again. Removing an image never breaks a
 * running VM or a snapshot: a snapshot holds its own link to its root
 * filesystem image, and a VM's open file outlives the unlink.
 *
 * Everything read here (records, manifests, lease files) is bounded and
 * validated; a broken entry is listed with what is known and can be removed.
 */

import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, rmdirSync, unlinkSync, utimesSync, writeFileSync } from "node:fs";
import { lstat, readdir, readFile, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { ImageError, SnapshotError, invalidOption } from "../errors.js";
import { defaultCacheDir, defaultSnapshotsDir } from "../paths.js";
import { readManifest } from "../snapshot/manifest.js";
import { pidAlive } from "../oci/lock.js";

const MAX_RECORD_BYTES = 64 * 1024;
const MAX_LEASE_BYTES = 4096;
const MAX_REFS = 64;
const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;
const ID_RE = /^(?:[0-9a-f]{64}|dir-[0-9a-f]{8,64})$/;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** Where the caches are; each defaults as the rest of the library does. */
export interface CacheDirs {
  /** @default SUPERMACHINE_CACHE_DIR, else ~/.cache/supermachine */
  readonly cacheDir?: string;
  /** @default SUPERMACHINE_SNAPSHOTS_DIR, else ~/.local/supermachine-snapshots */
  readonly snapshotsDir?: string;
}

/** One image in the cache (a root filesystem image and the blobs it came from). */
export interface CachedImage {
  /** Short id: the first 12 hex digits of the manifest digest (or dir-… for dir: images). */
  readonly id: string;
  /** References that resolved to it ("docker.io/library/alpine:latest", "dir:/path"). */
  readonly refs: readonly string[];
  /** Manifest digest (sha256:…). */
  readonly digest: string;
  /** Bytes on disk: root filesystem image + blobs only this image uses. */
  readonly sizeBytes: number;
  readonly rootfsPath: string;
  readonly lastUsedAt: Date;
}

/** A process holding a snapshot (see the module comment). */
export interface SnapshotLeaseInfo {
  readonly pid: number;
  readonly host: string;
  readonly since: Date;
}

/** One snapshot in the snapshots directory. */
export interface CachedSnapshot {
  readonly name: string;
  readonly path: string;
  /** The image it was baked from, when the manifest is readable. */
  readonly ref: string | null;
  readonly digest: string | null;
  readonly memoryMib: number | null;
  readonly vcpus: number | null;
  readonly createdAt: Date | null;
  readonly lastUsedAt: Date;
  readonly sizeBytes: number;
  /** Why the snapshot is unusable (then `ref` etc. are null), else null. */
  readonly problem: string | null;
  /** Live leases: non-empty means in use. */
  readonly inUse: readonly SnapshotLeaseInfo[];
}

function dirsOf(o: CacheDirs): { cacheDir: string; snapshotsDir: string } {
  if (typeof o !== "object" || o === null) throw invalidOption("options", "an object", o);
  return { cacheDir: resolve(o.cacheDir ?? defaultCacheDir()), snapshotsDir: resolve(o.snapshotsDir ?? defaultSnapshotsDir()) };
}

// ---------- image records ----------

interface ImageRecord {
  refs: string[];
  digest: string;
  blobs: { digest: string; size: number }[];
}

function parseRecord(text: string): ImageRecord | undefined {
  try {
    const j = JSON.parse(text) as Partial<ImageRecord>;
    if (!Array.isArray(j.refs) || typeof j.digest !== "string" || !Array.isArray(j.blobs)) return undefined;
    const refs = j.refs.filter((r): r is string => typeof r === "string" && r.length > 0 && r.length <= 4096).slice(0, MAX_REFS);
    const blobs = j.blobs.filter((b) => typeof b === "object" && b !== null && typeof b.digest === "string" && DIGEST_RE.test(b.digest) && Number.isSafeInteger(b.size) && b.size >= 0);
    return { refs, digest: j.digest.slice(0, 200), blobs };
  } catch {
    return undefined;
  }
}

async function readBounded(path: string, max: number): Promise<string | undefined> {
  const st = await lstat(path).catch(() => undefined);
  if (!st || !st.isFile() || st.size > max) return undefined;
  return readFile(path, "utf8").catch(() => undefined);
}

/**
 * @internal Records that `rootfsImage` was used for `ref` (resolveImage and
 * Image.build call it): adds the reference to the image's record and
 * touches it (its mtime is the image's last use). Best effort: a read-only
 * cache only loses the bookkeeping.
 */
export async function recordImageUse(rootfsImage: string, p: { ref: string; digest: string; blobs: readonly { digest: string; size: number; path?: string }[]; cacheDir: string }): Promise<void> {
  const path = rootfsImage.replace(/\.erofs$/, ".json");
  if (path === rootfsImage) return;
  try {
    const old = parseRecord((await readBounded(path, MAX_RECORD_BYTES)) ?? "");
    const blobDir = join(p.cacheDir, "blobs", "sha256");
    const blobs = p.blobs.filter((b) => DIGEST_RE.test(b.digest) && (b.path === undefined || resolve(b.path) === join(blobDir, b.digest.slice(7)))).map((b) => ({ digest: b.digest, size: b.size }));
    const refs = old?.refs.includes(p.ref) ? old.refs : [...(old?.refs ?? []), p.ref].slice(-MAX_REFS);
    if (!old || refs !== old.refs || old.blobs.length !== blobs.length) {
      const rec: ImageRecord = { refs, digest: p.digest, blobs: blobs.length ? blobs : old?.blobs ?? [] };
      const tmp = `${path}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
      await writeFile(tmp, JSON.stringify(rec));
      await rename(tmp, path);
    } else {
      const now = new Date();
      await utimes(path, now, now);
    }
  } catch {
    // bookkeeping only
  }
}

/** The images in the cache, most recently used first. */
export async function listImages(o: CacheDirs = {}): Promise<CachedImage[]> {
  const { cacheDir } = dirsOf(o);
  const dir = join(cacheDir, "rootfs");
  const names = await readdir(dir).catch(() => [] as string[]);
  const found: { id: string; rec: ImageRecord | undefined; rootfsPath: string; rootfsBytes: number; lastUsed: Date }[] = [];
  for (const n of names) {
    if (!n.endsWith(".erofs")) continue;
    const id = n.slice(0, -".erofs".length);
    if (!ID_RE.test(id)) continue;
    const rootfsPath = join(dir, n);
    const st = await lstat(rootfsPath).catch(() => undefined);
    if (!st?.isFile()) continue;
    const recPath = join(dir, `${id}.json`);
    const rst = await lstat(recPath).catch(() => undefined);
    const rec = rst ? parseRecord((await readBounded(recPath, MAX_RECORD_BYTES)) ?? "") : undefined;
    found.push({ id, rec, rootfsPath, rootfsBytes: st.size, lastUsed: rst?.isFile() ? rst.mtime : st.mtime });
  }
  // A blob counts toward every image that uses it once, and only images
  // using it alone would free it: size = rootfs + the blobs it alone holds.
  const users = new Map<string, number>();
  for (const f of found) for (const b of f.rec?.blobs ?? []) users.set(b.digest, (users.get(b.digest) ?? 0) + 1);
  const out: CachedImage[] = [];
  for (const f of found) {
    let size = f.rootfsBytes;
    for (const b of f.rec?.blobs ?? []) if (users.get(b.digest) === 1) size += b.size;
    out.push({
      id: f.id.startsWith("dir-") ? f.id : f.id.slice(0, 12),
      refs: f.rec?.refs ?? [],
      digest: f.rec?.digest ?? (f.id.startsWith("dir-") ? f.id : `sha256:${f.id}`),
      sizeBytes: size,
      rootfsPath: f.rootfsPath,
      lastUsedAt: f.lastUsed,
    });
  }
  return out.sort((a, b) => b.lastUsedAt.getTime() - a.lastUsedAt.getTime());
}

/** Does `what` (an id prefix, digest, or reference) name this image? */
function imageMatches(img: CachedImage, what: string): boolean {
  if (img.refs.includes(what)) return true;
  if (img.refs.some((r) => r === `docker.io/library/${what}` || r === `docker.io/library/${what}:latest` || r === `${what}:latest` || r === `docker.io/${what}`)) return true;
  const hex = basename(img.rootfsPath, ".erofs");
  if (what.length >= 6 && (hex.startsWith(what) || img.digest.startsWith(what) || `sha256:${hex}`.startsWith(what))) return true;
  return false;
}

/** Images named by `what`: a reference it was pulled as, an id or digest prefix (≥ 6 characters). */
export async function findImages(what: string, o: CacheDirs = {}): Promise<CachedImage[]> {
  if (typeof what !== "string" || what === "") throw invalidOption("image", "a reference, id or digest", what);
  return (await listImages(o)).filter((i) => imageMatches(i, what));
}

/**
 * Removes an image from the cache: its root filesystem image, its record,
 * the blobs no other image uses and the references naming it. Snapshots
 * baked from it keep working (they hold their own copy).
 */
export async function removeImage(what: string, o: CacheDirs = {}): Promise<CachedImage[]> {
  const all = await listImages(o);
  const hit = all.filter((i) => imageMatches(i, what));
  if (hit.length === 0) throw new ImageError(`no image ${JSON.stringify(what)} in the cache (${dirsOf(o).cacheDir}); \`supermachine images\` lists what is there`);
  if (hit.length > 1 && !hit.every((h) => h.refs.includes(what))) {
    throw new ImageError(`${JSON.stringify(what)} names ${hit.length} images (${hit.map((h) => h.id).join(", ")}); give a longer id or the full reference`);
  }
  await removeImages(hit, all, dirsOf(o).cacheDir);
  return hit;
}

async function removeImages(hit: readonly CachedImage[], all: readonly CachedImage[], cacheDir: string): Promise<void> {
  const gone = new Set(hit.map((h) => h.rootfsPath));
  const kept = new Set<string>();
  for (const i of all) {
    if (gone.has(i.rootfsPath)) continue;
    const rec = parseRecord((await readBounded(i.rootfsPath.replace(/\.erofs$/, ".json"), MAX_RECORD_BYTES)) ?? "");
    for (const b of rec?.blobs ?? []) kept.add(b.digest);
    kept.add(i.digest);
  }
  const drop = new Set<string>();
  for (const h of hit) {
    const rec = parseRecord((await readBounded(h.rootfsPath.replace(/\.erofs$/, ".json"), MAX_RECORD_BYTES)) ?? "");
    for (const b of rec?.blobs ?? []) if (!kept.has(b.digest)) drop.add(b.digest);
    if (DIGEST_RE.test(h.digest) && !kept.has(h.digest)) drop.add(h.digest);
    for (const suffix of [".erofs", ".erofs.sha256", ".json"]) await rm(h.rootfsPath.replace(/\.erofs$/, suffix), { force: true });
  }
  for (const d of drop) await rm(join(cacheDir, "blobs", "sha256", d.slice(7)), { force: true });
  // References whose digest is gone (an index digest is dropped with its last manifest).
  const refsDir = join(cacheDir, "refs");
  for (const n of await readdir(refsDir).catch(() => [] as string[])) {
    if (!n.endsWith(".json")) continue;
    const text = await readBounded(join(refsDir, n), MAX_RECORD_BYTES);
    let digest: unknown;
    try {
      digest = (JSON.parse(text ?? "null") as { digest?: unknown } | null)?.digest;
    } catch {
      digest = undefined;
    }
    if (typeof digest === "string" && (drop.has(digest) || (!kept.has(digest) && hit.some((h) => h.digest === digest)))) await rm(join(refsDir, n), { force: true });
  }
}

// ---------- snapshot leases ----------

function procStartTime(pid: number): string | null {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "latin1");
    // Fields after the command (which may hold spaces and parentheses).
    const rest = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return rest[19] ?? null;
  } catch {
    return null;
  }
}

interface LeaseFile {
  pid: number;
  start: string | null;
  host: string;
  since: number;
}

function leaseLive(l: LeaseFile): boolean {
  if (l.host !== hostname()) return true;
  if (!pidAlive(l.pid)) return false;
  const now = procStartTime(l.pid);
  return l.start === null || now === null || now === l.start;
}

/** A held lease on a snapshot; release() is idempotent. */
export interface SnapshotLease {
  release(): void;
}

/**
 * @internal Takes a lease on the snapshot at `snapshotPath` for this
 * process (synchronous, no timer) and touches its last use. Best effort: a
 * snapshot directory we cannot write to cannot be pruned by us either.
 */
export function leaseSnapshot(snapshotPath: string): SnapshotLease {
  const dir = join(dirname(snapshotPath), ".leases", basename(snapshotPath));
  const file = join(dir, `${process.pid}.${randomBytes(6).toString("hex")}`);
  let held = false;
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const l: LeaseFile = { pid: process.pid, start: procStartTime(process.pid), host: hostname(), since: Date.now() };
    writeFileSync(file, JSON.stringify(l), { mode: 0o600 });
    held = true;
    const now = new Date();
    utimesSync(dir, now, now);
  } catch {
    // bookkeeping only
  }
  return {
    release() {
      if (!held) return;
      held = false;
      try {
        unlinkSync(file);
        const now = new Date();
        utimesSync(dir, now, now);
      } catch {
        // already gone
      }
    },
  };
}

/** Live leases on snapshot `name`; stale ones (dead owners) are removed. */
async function liveLeases(snapshotsDir: string, name: string): Promise<SnapshotLeaseInfo[]> {
  const dir = join(snapshotsDir, ".leases", name);
  const out: SnapshotLeaseInfo[] = [];
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const n of names.slice(0, 10_000)) {
    const path = join(dir, n);
    const text = await readBounded(path, MAX_LEASE_BYTES);
    let l: LeaseFile | undefined;
    try {
      const j = JSON.parse(text ?? "null") as Partial<LeaseFile> | null;
      if (j && Number.isSafeInteger(j.pid) && j.pid! > 0 && typeof j.host === "string" && Number.isFinite(j.since)) l = { pid: j.pid!, start: typeof j.start === "string" ? j.start : null, host: j.host, since: j.since! };
    } catch {
      l = undefined;
    }
    if (l === undefined) {
      // Unreadable: a lease being written right now, or junk; junk older than a minute goes.
      const st = await lstat(path).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs > 60_000) await rm(path, { force: true });
      else if (st) out.push({ pid: 0, host: "?", since: st.mtime });
      continue;
    }
    if (leaseLive(l)) out.push({ pid: l.pid, host: l.host, since: new Date(l.since) });
    else await rm(path, { force: true });
  }
  return out;
}

// ---------- snapshots ----------

async function duBytes(path: string, depth = 0): Promise<number> {
  const st = await lstat(path).catch(() => undefined);
  if (!st) return 0;
  if (!st.isDirectory() || depth > 2) return st.isFile() ? st.blocks * 512 : 0;
  let n = 0;
  for (const e of await readdir(path).catch(() => [] as string[])) n += await duBytes(join(path, e), depth + 1);
  return n;
}

/** The snapshots in the snapshots directory, most recently used first. */
export async function listSnapshots(o: CacheDirs = {}): Promise<CachedSnapshot[]> {
  const { snapshotsDir } = dirsOf(o);
  const out: CachedSnapshot[] = [];
  for (const name of await readdir(snapshotsDir).catch(() => [] as string[])) {
    if (!NAME_RE.test(name)) continue; // .leases, .stage dirs, lock files
    const path = join(snapshotsDir, name);
    const st = await lstat(path).catch(() => undefined);
    if (!st?.isDirectory()) continue;
    let m: Awaited<ReturnType<typeof readManifest>> | undefined;
    let problem: string | null = null;
    try {
      m = await readManifest(path, "quick");
    } catch (e) {
      problem = (e as Error).message;
    }
    const lst = await stat(join(snapshotsDir, ".leases", name)).catch(() => undefined);
    out.push({
      name,
      path,
      ref: m?.image.ref ?? null,
      digest: m?.image.digest ?? null,
      memoryMib: m?.memoryMib ?? null,
      vcpus: m?.vcpus ?? null,
      createdAt: m ? new Date(m.createdAt) : null,
      lastUsedAt: lst && lst.mtimeMs > st.mtimeMs ? lst.mtime : st.mtime,
      sizeBytes: await duBytes(path),
      problem,
      inUse: await liveLeases(snapshotsDir, name),
    });
  }
  return out.sort((a, b) => b.lastUsedAt.getTime() - a.lastUsedAt.getTime());
}

/**
 * Removes snapshot `name`. Refuses (SnapshotError naming the holders) while
 * a process holds a lease on it, unless `force`.
 */
export async function removeSnapshot(name: string, o: CacheDirs & { readonly force?: boolean } = {}): Promise<CachedSnapshot> {
  if (typeof name !== "string" || !NAME_RE.test(name)) throw invalidOption("name", "a snapshot name (`supermachine snapshots ls` lists them)", name);
  const { snapshotsDir } = dirsOf(o);
  const snap = (await listSnapshots(o)).find((s) => s.name === name);
  if (!snap) throw new SnapshotError(`no snapshot ${JSON.stringify(name)} in ${snapshotsDir}; \`supermachine snapshots ls\` lists them`);
  if (snap.inUse.length > 0 && o.force !== true) throw inUseError(snap);
  await removeSnapshotDir(snapshotsDir, snap, o.force === true);
  return snap;
}

function inUseError(s: CachedSnapshot): SnapshotError {
  return new SnapshotError(`snapshot ${s.name} is in use by process ${s.inUse.map((l) => (l.host === hostname() ? l.pid : `${l.pid}@${l.host}`)).join(", ")}; stop it (pool.shutdown() and image.close()) first, or pass force`);
}

async function removeSnapshotDir(snapshotsDir: string, s: CachedSnapshot, force: boolean): Promise<void> {
  const aside = join(snapshotsDir, `.${s.name}.removing-${randomBytes(4).toString("hex")}`);
  await rename(s.path, aside);
  // A lease taken between the listing and the rename: put the snapshot back.
  if (!force && (await liveLeases(snapshotsDir, s.name)).length > 0) {
    await rename(aside, s.path).catch(() => rm(aside, { recursive: true, force: true }));
    throw inUseError({ ...s, inUse: await liveLeases(snapshotsDir, s.name) });
  }
  await rm(aside, { recursive: true, force: true });
  try {
    rmdirSync(join(snapshotsDir, ".leases", s.name));
  } catch {
    // leases left (force) or none
  }
}

// ---------- prune ----------

export interface PruneOptions extends CacheDirs {
  /** Remove entries not used for this long. */
  readonly unusedForMs?: number;
  /** Then remove least recently used entries until the total is at most this. */
  readonly maxBytes?: number;
  /** Remove every unused entry. @default false */
  readonly all?: boolean;
  /** Which caches. @default both */
  readonly images?: boolean;
  readonly snapshots?: boolean;
  /** Report what would go, remove nothing. @default false */
  readonly dryRun?: boolean;
}

export interface PruneEntry {
  readonly kind: "image" | "snapshot";
  /** Snapshot name, or the image's id. */
  readonly name: string;
  /** The image's references, or the snapshot's image. */
  readonly refs: readonly string[];
  readonly sizeBytes: number;
  readonly lastUsedAt: Date;
}

export interface PruneResult {
  readonly removed: readonly PruneEntry[];
  /** Snapshots that matched but are in use (kept). */
  readonly keptInUse: readonly PruneEntry[];
  readonly freedBytes: number;
  /** Bytes left in the caches (images + snapshots considered). */
  readonly remainingBytes: number;
}

/**
 * LRU pruning of the image cache and the snapshots directory: entries
 * unused for `unusedForMs`, then the least recently used until the total
 * fits in `maxBytes` (or every unused entry with `all`). A snapshot in use
 * (a live lease) is never removed. Needs one of unusedForMs, maxBytes, all.
 */
export async function prune(o: PruneOptions): Promise<PruneResult> {
  if (typeof o !== "object" || o === null) throw invalidOption("options", "an object", o);
  if (o.unusedForMs !== undefined && (typeof o.unusedForMs !== "number" || !(o.unusedForMs >= 0))) throw invalidOption("unusedForMs", "a duration in ms (≥ 0)", o.unusedForMs);
  if (o.maxBytes !== undefined && (typeof o.maxBytes !== "number" || !(o.maxBytes >= 0))) throw invalidOption("maxBytes", "a size in bytes (≥ 0)", o.maxBytes);
  if (o.unusedForMs === undefined && o.maxBytes === undefined && o.all !== true) throw invalidOption("prune", "one of unusedForMs, maxBytes or all: true", o);
  const { cacheDir, snapshotsDir } = dirsOf(o);
  const imgs = o.images === false ? [] : await listImages(o);
  const snaps = o.snapshots === false ? [] : await listSnapshots(o);
  type Cand = PruneEntry & { inUse: boolean; img?: CachedImage; snap?: CachedSnapshot };
  const cands: Cand[] = [
    ...imgs.map((i): Cand => ({ kind: "image", name: i.id, refs: i.refs, sizeBytes: i.sizeBytes, lastUsedAt: i.lastUsedAt, inUse: false, img: i })),
    ...snaps.map((s): Cand => ({ kind: "snapshot", name: s.name, refs: s.ref ? [s.ref] : [], sizeBytes: s.sizeBytes, lastUsedAt: s.lastUsedAt, inUse: s.inUse.length > 0, snap: s })),
  ].sort((a, b) => a.lastUsedAt.getTime() - b.lastUsedAt.getTime());
  const pick = new Set<Cand>();
  const keptInUse = new Set<Cand>();
  const now = Date.now();
  for (const c of cands) {
    const match = o.all === true || (o.unusedForMs !== undefined && now - c.lastUsedAt.getTime() >= o.unusedForMs);
    if (!match) continue;
    if (c.inUse) keptInUse.add(c);
    else pick.add(c);
  }
  if (o.maxBytes !== undefined) {
    let total = cands.filter((c) => !pick.has(c)).reduce((n, c) => n + c.sizeBytes, 0);
    for (const c of cands) {
      if (total <= o.maxBytes) break;
      if (pick.has(c)) continue;
      if (c.inUse) {
        keptInUse.add(c);
        continue;
      }
      pick.add(c);
      total -= c.sizeBytes;
    }
  }
  const removed: PruneEntry[] = [];
  if (!o.dryRun && o.snapshots !== false) await removeLeftovers(snapshotsDir);
  if (!o.dryRun) {
    const goneImages = [...pick].filter((c) => c.img).map((c) => c.img!);
    if (goneImages.length) await removeImages(goneImages, imgs, cacheDir);
    for (const c of pick) {
      if (!c.snap) continue;
      try {
        await removeSnapshotDir(snapshotsDir, c.snap, false);
      } catch (e) {
        if (e instanceof SnapshotError) {
          pick.delete(c);
          keptInUse.add(c);
          continue;
        }
        throw e;
      }
    }
  }
  const strip = (c: Cand): PruneEntry => ({ kind: c.kind, name: c.name, refs: c.refs, sizeBytes: c.sizeBytes, lastUsedAt: c.lastUsedAt });
  for (const c of cands) if (pick.has(c)) removed.push(strip(c));
  const freedBytes = removed.reduce((n, c) => n + c.sizeBytes, 0);
  return { removed, keptInUse: [...keptInUse].map(strip), freedBytes, remainingBytes: cands.reduce((n, c) => n + c.sizeBytes, 0) - freedBytes };
}

/**
 * What interrupted work left in the snapshots directory: bake stages of dead
 * processes (`.<name>.tmp-<pid>-<rand>`), and the `.old-` / `.removing-`
 * directories a crash left between a rename and its removal.
 */
async function removeLeftovers(snapshotsDir: string): Promise<void> {
  for (const n of await readdir(snapshotsDir).catch(() => [] as string[])) {
    if (!n.startsWith(".")) continue;
    const tmp = /\.tmp-(\d+)-[0-9a-f]+$/.exec(n);
    const gone = tmp ? !pidAlive(Number(tmp[1])) : /\.(?:old|removing)-[0-9a-f]+$/.test(n);
    if (gone) await rm(join(snapshotsDir, n), { recursive: true, force: true });
  }
}
