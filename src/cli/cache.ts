/**
 * `pull`, `build`, `images`, `snapshots`, `rm`, `prune`: thin over
 * resolveImage, Image.build and src/image/cache-admin.ts.
 */

import { readFileSync } from "node:fs";
import { ImageError } from "../errors.js";
import { ensureDefaultImage } from "../guest/default-image.js";
import { findImages, listImages, listSnapshots, prune, removeImage, removeSnapshot, type PruneResult } from "../image/cache-admin.js";
import { Image, type BuildOptions } from "../image/image.js";
import { resolveImage } from "../image/resolve.js";
import type { PullPolicy } from "../oci/pull.js";
import { defaultCacheDir, defaultSnapshotsDir } from "../paths.js";
import type { AcceleratorOption } from "../vmm/accel.js";
import { parseBytes, parseCommand, parseCount, parseDurationMs, parseMib, UsageError, type CommandSpec } from "./args.js";
import { BUILD, IMAGES, PRUNE, PULL_CMD, RM, SNAPSHOTS } from "./commands.js";
import { formatBytes, ProgressView } from "./progress.js";
import { parseEnv, parseNetwork } from "./run.js";

function ago(d: Date | null): string {
  if (!d) return "-";
  const s = Math.max(0, Math.round((Date.now() - d.getTime()) / 1000));
  if (s < 60) return `${s} seconds ago`;
  if (s < 3600) return `${Math.round(s / 60)} minutes ago`;
  if (s < 86400) return `${Math.round(s / 3600)} hours ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function table(header: string[], rows: string[][]): string {
  const w = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [header, ...rows].map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(w[i]!))).join("   ").trimEnd()).join("\n") + "\n";
}

function noPositionals(spec: CommandSpec, positionals: string[]): void {
  if (positionals.length) throw new UsageError(`supermachine ${spec.name}: unexpected argument ${JSON.stringify(positionals[0])}; see \`supermachine ${spec.name} --help\``);
}

/** The `default` image name. */
async function refOf(image: string): Promise<string> {
  return image === "default" ? `dir:${await ensureDefaultImage(defaultCacheDir())}` : image;
}

export async function pullCommand(args: string[]): Promise<number> {
  const p = parseCommand(PULL_CMD, args);
  if (p.help) return -1;
  if (p.positionals.length !== 1) throw new UsageError("supermachine pull: give exactly one IMAGE, e.g. `supermachine pull alpine`");
  const ref = p.positionals[0]!;
  if (ref.startsWith("dir:") || ref === "default") throw new UsageError(`supermachine pull: ${ref} is local; nothing to pull (run or build it)`);
  const view = new ProgressView(process.stderr, p.values.quiet !== true);
  try {
    const r = await resolveImage(ref, {
      pullPolicy: "always",
      onProgress: view.onProgress,
      ...(p.values.platform ? { platform: p.values.platform as string } : {}),
      ...(p.values.insecure ? { insecureRegistries: [ref.split("/")[0]!] } : {}),
    });
    view.done();
    process.stdout.write(`${r.ref}@${r.manifestDigest}\n`);
  } finally {
    view.done();
  }
  return 0;
}

const BUILD_KEYS = new Set(["ref", "name", "memoryMib", "vcpus", "pullPolicy", "cmd", "env", "guestPort", "listenerRequired", "extraFiles", "network", "warmupTag", "snapshotsDir", "accel", "cacheDir", "insecureRegistries", "layerLimits", "platform", "bootTimeoutMs", "listenerTimeoutMs", "runWorkload", "volumes", "mounts"]);

export async function buildCommand(args: string[]): Promise<number> {
  const p = parseCommand(BUILD, args);
  if (p.help) return -1;
  const v = p.values;
  const str = (k: string) => v[k] as string | undefined;
  let file: Record<string, unknown> = {};
  if (str("file") !== undefined) {
    let parsed: unknown;
    try {
      const text = readFileSync(str("file")!, "utf8");
      if (text.length > 1 << 20) throw new Error("over 1 MiB");
      parsed = JSON.parse(text);
    } catch (e) {
      throw new UsageError(`supermachine build -f ${str("file")}: ${(e as Error).message}`);
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new UsageError(`supermachine build -f ${str("file")}: expected a JSON object of BuildOptions`);
    for (const k of Object.keys(parsed)) if (!BUILD_KEYS.has(k)) throw new UsageError(`supermachine build -f ${str("file")}: unknown key ${JSON.stringify(k)} (BuildOptions keys: ${[...BUILD_KEYS].join(", ")})`);
    file = parsed as Record<string, unknown>;
  }
  const [image, ...cmd] = p.positionals;
  const ref = image ?? (file.ref as string | undefined);
  if (typeof ref !== "string" || ref === "") throw new UsageError("supermachine build: give an IMAGE, or a file (-f) with a ref");
  const env = { ...((file.env as Record<string, string> | undefined) ?? {}), ...parseEnv((v.env as string[] | undefined) ?? [], []) };
  const network = parseNetwork(str("network"));
  const pull = str("pull");
  if (pull !== undefined && !["always", "missing", "never"].includes(pull)) throw new UsageError(`--pull expects always, missing or never, got ${JSON.stringify(pull)}`);
  const view = new ProgressView(process.stderr, v.quiet !== true);
  const o: BuildOptions = {
    ...(file as Partial<BuildOptions>),
    ref: await refOf(ref),
    onProgress: view.onProgress,
    ...(Object.keys(env).length ? { env } : {}),
    ...(cmd.length ? { cmd } : {}),
    ...(str("name") ? { name: str("name")! } : {}),
    ...(str("memory") ? { memoryMib: parseMib(str("memory")!, "--memory") } : {}),
    ...(str("cpus") ? { vcpus: parseCount(str("cpus")!, "--cpus", 1, 64) } : {}),
    ...(str("listen") ? { guestPort: parseCount(str("listen")!, "--listen", 1, 65535), listenerRequired: true } : {}),
    ...(v["no-workload"] ? { runWorkload: false } : {}),
    ...(network !== undefined ? { network } : {}),
    ...(pull ? { pullPolicy: pull as PullPolicy } : {}),
    ...(str("platform") ? { platform: str("platform")! } : {}),
    ...(str("accel") ? { accel: str("accel") as AcceleratorOption } : {}),
  };
  const img = await Image.build(o);
  try {
    // The snapshot is written behind the Image: the command reports it once it is on disk.
    await img.saved();
    view.done();
    const m = img.manifest;
    if (v.json) process.stdout.write(`${JSON.stringify({ name: m.name, path: img.snapshotPath, baked: img.baked, ref: m.image.ref, digest: m.image.digest, memoryMib: m.memoryMib, vcpus: m.vcpus }, null, 2)}\n`);
    else process.stdout.write(`${m.name}\t${img.snapshotPath}\n`);
  } finally {
    await img.close();
  }
  return 0;
}

export async function imagesCommand(args: string[]): Promise<number> {
  const p = parseCommand(IMAGES, args);
  if (p.help) return -1;
  noPositionals(IMAGES, p.positionals);
  const list = await listImages();
  if (p.values.json) {
    process.stdout.write(`${JSON.stringify(list.map((i) => ({ ...i, lastUsedAt: i.lastUsedAt.toISOString() })), null, 2)}\n`);
    return 0;
  }
  process.stdout.write(table(["IMAGE", "ID", "SIZE", "LAST USED"], list.map((i) => [i.refs.length ? i.refs.join(", ") : "<none>", i.id, formatBytes(i.sizeBytes), ago(i.lastUsedAt)])));
  return 0;
}

export async function snapshotsCommand(args: string[]): Promise<number> {
  const p = parseCommand(SNAPSHOTS, args);
  if (p.help) return -1;
  const [sub, ...names] = p.positionals;
  if (sub === undefined || sub === "ls" || sub === "list") {
    noPositionals(SNAPSHOTS, names);
    const list = await listSnapshots();
    if (p.values.json) {
      process.stdout.write(
        `${JSON.stringify(
          list.map((s) => ({ ...s, createdAt: s.createdAt?.toISOString() ?? null, lastUsedAt: s.lastUsedAt.toISOString(), inUse: s.inUse.map((l) => ({ ...l, since: l.since.toISOString() })) })),
          null,
          2,
        )}\n`,
      );
      return 0;
    }
    process.stdout.write(
      table(
        ["NAME", "IMAGE", "MEMORY", "SIZE", "LAST USED", "IN USE"],
        list.map((s) => [s.name, s.ref ?? `(unusable: ${s.problem?.slice(0, 60)})`, s.memoryMib ? `${s.memoryMib} MiB` : "-", formatBytes(s.sizeBytes), ago(s.lastUsedAt), s.inUse.length ? `pid ${s.inUse.map((l) => l.pid).join(",")}` : "-"]),
      ),
    );
    return 0;
  }
  if (sub === "rm") {
    if (!names.length) throw new UsageError("supermachine snapshots rm: give a snapshot NAME (`supermachine snapshots ls` lists them)");
    for (const n of names) {
      await removeSnapshot(n, { force: p.values.force === true });
      process.stdout.write(`${n}\n`);
    }
    return 0;
  }
  throw new UsageError(`supermachine snapshots: unknown subcommand ${JSON.stringify(sub)} (ls or rm)`);
}

export async function rmCommand(args: string[]): Promise<number> {
  const p = parseCommand(RM, args);
  if (p.help) return -1;
  if (!p.positionals.length) throw new UsageError("supermachine rm: give a snapshot name or an image (reference, id or digest)");
  const removed: { kind: string; name: string }[] = [];
  for (const n of p.positionals) {
    const snaps = await listSnapshots();
    if (snaps.some((s) => s.name === n)) {
      await removeSnapshot(n, { force: p.values.force === true });
      removed.push({ kind: "snapshot", name: n });
    } else if ((await findImages(n)).length > 0) {
      for (const i of await removeImage(n)) removed.push({ kind: "image", name: i.refs[0] ?? i.id });
    } else {
      throw new ImageError(`no snapshot or image ${JSON.stringify(n)} (snapshots in ${defaultSnapshotsDir()}, images in ${defaultCacheDir()}); \`supermachine snapshots ls\` and \`supermachine images\` list them`);
    }
  }
  if (p.values.json) process.stdout.write(`${JSON.stringify(removed, null, 2)}\n`);
  else for (const r of removed) process.stdout.write(`removed ${r.kind} ${r.name}\n`);
  return 0;
}

export async function pruneCommand(args: string[]): Promise<number> {
  const p = parseCommand(PRUNE, args);
  if (p.help) return -1;
  noPositionals(PRUNE, p.positionals);
  const v = p.values;
  if (v["unused-for"] === undefined && v["max-size"] === undefined && v.all !== true) {
    throw new UsageError("supermachine prune: say what to remove: --unused-for 7d, --max-size 10g, or --all");
  }
  if (v.images && v.snapshots) throw new UsageError("supermachine prune: --images and --snapshots each restrict to one cache; give at most one");
  const r: PruneResult = await prune({
    ...(v["unused-for"] !== undefined ? { unusedForMs: parseDurationMs(v["unused-for"] as string, "--unused-for", "d") } : {}),
    ...(v["max-size"] !== undefined ? { maxBytes: parseBytes(v["max-size"] as string, "--max-size") } : {}),
    ...(v.all ? { all: true } : {}),
    ...(v.images ? { snapshots: false } : {}),
    ...(v.snapshots ? { images: false } : {}),
    dryRun: v["dry-run"] === true,
  });
  if (v.json) {
    const j = (e: PruneResult["removed"][number]) => ({ ...e, lastUsedAt: e.lastUsedAt.toISOString() });
    process.stdout.write(`${JSON.stringify({ dryRun: v["dry-run"] === true, removed: r.removed.map(j), keptInUse: r.keptInUse.map(j), freedBytes: r.freedBytes, remainingBytes: r.remainingBytes }, null, 2)}\n`);
    return 0;
  }
  const verb = v["dry-run"] ? "would remove" : "removed";
  for (const e of r.removed) process.stdout.write(`${verb} ${e.kind} ${e.name}${e.refs.length ? ` (${e.refs.join(", ")})` : ""}  ${formatBytes(e.sizeBytes)}, last used ${ago(e.lastUsedAt)}\n`);
  for (const e of r.keptInUse) process.stdout.write(`kept ${e.kind} ${e.name}: in use\n`);
  process.stdout.write(`${v["dry-run"] ? "would free" : "freed"} ${formatBytes(r.freedBytes)}; ${formatBytes(r.remainingBytes)} ${v["dry-run"] ? "would remain" : "remain"}\n`);
  return 0;
}
