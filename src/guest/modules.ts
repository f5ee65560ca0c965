/**
 * Kernel module dependency resolution without depmod: each .ko's `.modinfo`
 * ELF section names its hard dependencies (`depends=`) and soft
 * pre-dependencies (`softdep=pre: ...`); the guest loads them in dependency
 * order (virtio_ring before virtio before virtio_mmio ...).
 */

import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";

/** Modules the guest needs, in the order we want them considered. */
export const GUEST_MODULES = [
  "virtio_mmio",
  "virtio_console",
  "virtio_blk",
  "erofs",
  "overlay",
  // Volumes and the disk-backed writable layer (docs/volumes.md).
  "ext4",
  // The VM's network (virtio-net on QEMU's -netdev stream).
  "virtio_net",
  // For live host mounts (virtio-fs).
  "virtiofs",
];

export interface ModuleInfo {
  name: string;
  depends: string[];
  softPre: string[];
  aliases: string[];
}

/** Module names treat '-' and '_' alike. */
export function normalizeModuleName(n: string): string {
  return n.replace(/-/g, "_");
}

/** Reads the `.modinfo` section of an ELF64 little-endian kernel module. */
export function readModinfo(ko: Buffer): Map<string, string[]> {
  const out = new Map<string, string[]>();
  if (ko.length < 64 || ko.readUInt32BE(0) !== 0x7f454c46 || ko[4] !== 2 || ko[5] !== 1) {
    throw new Error("not an ELF64 little-endian module");
  }
  const shoff = Number(ko.readBigUInt64LE(0x28));
  const shentsize = ko.readUInt16LE(0x3a);
  const shnum = ko.readUInt16LE(0x3c);
  const shstrndx = ko.readUInt16LE(0x3e);
  const section = (i: number) => {
    const base = shoff + i * shentsize;
    return {
      name: ko.readUInt32LE(base),
      offset: Number(ko.readBigUInt64LE(base + 0x18)),
      size: Number(ko.readBigUInt64LE(base + 0x20)),
    };
  };
  const strtab = section(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    const nameStart = strtab.offset + s.name;
    const nameEnd = ko.indexOf(0, nameStart);
    if (ko.toString("latin1", nameStart, nameEnd) !== ".modinfo") continue;
    const body = ko.subarray(s.offset, s.offset + s.size).toString("latin1");
    for (const kv of body.split("\0")) {
      const eq = kv.indexOf("=");
      if (eq <= 0) continue;
      const k = kv.slice(0, eq);
      const list = out.get(k) ?? [];
      list.push(kv.slice(eq + 1));
      out.set(k, list);
    }
  }
  return out;
}

export function moduleInfo(name: string, ko: Buffer): ModuleInfo {
  const mi = readModinfo(ko);
  const depends = (mi.get("depends") ?? []).flatMap((d) => d.split(",")).filter(Boolean).map(normalizeModuleName);
  const softPre: string[] = [];
  for (const sd of mi.get("softdep") ?? []) {
    const m = /pre:\s*([^:]*?)(?:\s+post:|$)/.exec(sd);
    if (m) softPre.push(...m[1]!.trim().split(/\s+/).filter(Boolean));
  }
  return { name: normalizeModuleName(name), depends, softPre, aliases: mi.get("alias") ?? [] };
}

/** Maps module name → .ko path under a kernel's lib/modules/<release>. */
export function indexModules(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".ko")) out.set(normalizeModuleName(e.name.slice(0, -3)), p);
    }
  };
  if (statSync(root, { throwIfNoEntry: false })?.isDirectory()) walk(root);
  return out;
}

export interface ResolvedModules {
  /** Module names in load order (dependencies first). */
  order: string[];
  paths: Map<string, string>;
  /** Requested modules that are not modules in this kernel (built in, or absent). */
  missing: string[];
}

/**
 * Computes the load order of `wanted` and everything they depend on.
 * Soft pre-dependencies are honoured when a module of that name (or with
 * that alias, e.g. `crc32c` → crc32c_generic) exists.
 */
export function resolveModules(index: Map<string, string>, wanted: readonly string[], read = (p: string) => readFileSync(p)): ResolvedModules {
  const infos = new Map<string, ModuleInfo>();
  const info = (n: string): ModuleInfo | undefined => {
    const hit = infos.get(n);
    if (hit) return hit;
    const p = index.get(n);
    if (!p) return undefined;
    const mi = moduleInfo(n, read(p));
    infos.set(n, mi);
    return mi;
  };
  // Aliases are only needed for soft dependencies; look them up lazily among
  // likely candidates (same stem with a _generic suffix), then by scan.
  const byAlias = (alias: string): string | undefined => {
    const a = normalizeModuleName(alias);
    if (index.has(a)) return a;
    const generic = `${a}_generic`;
    if (index.has(generic) && info(generic)?.aliases.some((x) => normalizeModuleName(x) === a)) return generic;
    return undefined;
  };
  const order: string[] = [];
  const seen = new Set<string>();
  const missing: string[] = [];
  const visit = (n: string, stack: string[]) => {
    if (seen.has(n)) return;
    if (stack.includes(n)) return;
    const mi = info(n);
    if (!mi) return;
    for (const s of mi.softPre) {
      const target = byAlias(s);
      if (target) visit(target, [...stack, n]);
    }
    for (const d of mi.depends) visit(d, [...stack, n]);
    seen.add(n);
    order.push(n);
  };
  for (const w of wanted) {
    const n = normalizeModuleName(w);
    if (!index.has(n)) missing.push(n);
    else visit(n, []);
  }
  const paths = new Map<string, string>();
  for (const n of order) paths.set(n, index.get(n)!);
  return { order, paths, missing };
}
