/**
 * Hostile layers have limits: layer bombs fail with a LayerLimitError (or
 * succeed) within a stated heap bound, and leave nothing on disk.
 *
 * Heap is measured with process.memoryUsage().heapUsed: the peak sampled
 * every 20 ms during the run (garbage included) against the heap after a
 * gc() before it, against bounds far below what the unfixed code used (the
 * global-PAX layer below took 3.9 GB); where the tree stays alive, also the
 * retained growth after a gc().
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createWriteStream, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { test, type TestContext } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { gzipSync, createGzip } from "node:zlib";
import { LayerError, LayerLimitError } from "../../src/errors.js";
import { openLayer } from "../../src/oci/pull.js";
import { buildRootfsImage } from "../../src/rootfs/index.js";
import { applyLayer } from "../../src/rootfs/layers.js";
import { DEFAULT_LAYER_LIMITS, resolveLayerLimits } from "../../src/rootfs/limits.js";
import { Spool } from "../../src/rootfs/spool.js";
import { FsTree, treeStats } from "../../src/rootfs/tree.js";
import { fsck } from "../fixtures/rootfs/erofs-check.js";
import { chunks, header, tar } from "../fixtures/rootfs/tar-writer.js";

const MiB = 1 << 20;

function scratch(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "sm-limits-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

// A real gc() for measurements, without a command-line flag.
setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

function heapNow(): number {
  gc();
  return process.memoryUsage().heapUsed;
}

/** Tracks the peak heap while `fn` runs (sampled every 20 ms and on demand). */
async function peakHeapGrowth<T>(fn: (sample: () => void) => Promise<T>): Promise<{ result: T | undefined; error: unknown; growth: number }> {
  const base = heapNow();
  let peak = base;
  const sample = (): void => {
    const h = process.memoryUsage().heapUsed;
    if (h > peak) peak = h;
  };
  const timer = setInterval(sample, 20);
  try {
    const result = await fn(sample);
    sample();
    return { result, error: undefined, growth: peak - base };
  } catch (error) {
    sample();
    return { result: undefined, error, growth: peak - base };
  } finally {
    clearInterval(timer);
  }
}

function assertLimit(e: unknown, limit: string, env: string): asserts e is LayerLimitError {
  assert.ok(e instanceof LayerLimitError, `LayerLimitError expected, got ${String(e)}`);
  assert.ok(e instanceof LayerError, "a LayerLimitError is also a LayerError");
  assert.equal(e.code, "ERR_SM_LAYER_LIMIT");
  assert.equal(e.limit, limit);
  assert.match(e.message, new RegExp(`limits\\.${limit}`));
  assert.match(e.message, new RegExp(env));
}

/** A global PAX header giving every entry `n` xattrs, then `entries` directories. */
function globalPaxLayer(n: number, entries: number): Buffer {
  const g: Record<string, string> = {};
  for (let i = 0; i < n; i++) g[`SCHILY.xattr.user.a${i}`] = "x";
  const specs = [];
  for (let i = 0; i < entries; i++) specs.push({ name: `d${i}/`, type: "5" });
  return tar(specs, { global: g });
}

test("global PAX header: a 70 KB layer giving 2000 entries 30000 xattrs each is refused with bounded heap (it took 3.9 GB)", async (t) => {
  const dir = scratch(t);
  const layer = globalPaxLayer(30000, 2000);
  assert.ok(gzipSync(layer, { level: 9 }).length < 100_000, "the layer is small once compressed");
  const spool = await Spool.create(join(dir, "spool"));
  const { error, growth } = await peakHeapGrowth(() => applyLayer(new FsTree(), chunks(layer, 64 * 1024), spool));
  await spool.remove();
  assertLimit(error, "maxXattrsPerEntry", "SUPERMACHINE_LAYER_MAX_XATTRS_PER_ENTRY");
  assert.match(error.message, /PAX global header/);
  t.diagnostic(`heap growth: ${(growth / MiB).toFixed(1)} MiB`);
  assert.ok(growth < 64 * MiB, `heap grew ${growth} bytes`);
  assert.deepEqual(readdirSync(dir), []);
});

test("global PAX header: with the xattr cap raised, the same layer builds and its entries share one xattr set", async (t) => {
  const dir = scratch(t);
  const layer = globalPaxLayer(30000, 2000);
  const tree = new FsTree();
  const spool = await Spool.create(join(dir, "spool"));
  const { error, growth } = await peakHeapGrowth(() => applyLayer(tree, chunks(layer, 64 * 1024), spool, { limits: { maxXattrsPerEntry: 100_000 } }));
  await spool.remove();
  assert.equal(error, undefined);
  t.diagnostic(`heap growth: ${(growth / MiB).toFixed(1)} MiB`);
  assert.ok(growth < 64 * MiB, `heap grew ${growth} bytes`);
  const d0 = tree.root.children.get("d0")!;
  const d1999 = tree.root.children.get("d1999")!;
  assert.equal(d0.xattrs.size, 30000);
  assert.equal(d0.xattrs, d1999.xattrs, "one shared set, not a copy per entry");
});

test("global PAX header of 1 MiB of other records over 100000 entries: no per-entry copy, bounded heap", async (t) => {
  const dir = scratch(t);
  const g: Record<string, string> = {};
  for (let i = 0; i < 20000; i++) g[`comment.${i}`] = "y".repeat(30);
  const body = tar([], { global: g, end: false });
  const entries = 100_000;
  async function* gen(): AsyncGenerator<Buffer> {
    yield body;
    for (let i = 0; i < entries; i += 1000) {
      const parts: Buffer[] = [];
      for (let j = i; j < i + 1000; j++) parts.push(header({ name: `f${j}` }));
      yield Buffer.concat(parts);
    }
    yield Buffer.alloc(1024);
  }
  const tree = new FsTree();
  const spool = await Spool.create(join(dir, "spool"));
  const { error, growth } = await peakHeapGrowth(() => applyLayer(tree, gen(), spool));
  await spool.remove();
  assert.equal(error, undefined);
  assert.equal(tree.root.children.size, entries);
  t.diagnostic(`heap growth: ${(growth / MiB).toFixed(1)} MiB`);
  assert.ok(growth < 128 * MiB, `heap grew ${growth} bytes`);
});

test("an entry's own xattrs on top of the global ones are capped per entry", async (t) => {
  const dir = scratch(t);
  const g: Record<string, string> = {};
  for (let i = 0; i < 200; i++) g[`SCHILY.xattr.user.g${i}`] = "x";
  const pax: Record<string, string> = {};
  for (let i = 0; i < 100; i++) pax[`SCHILY.xattr.user.l${i}`] = "y";
  const layer = tar([{ name: "ok" }, { name: "f", pax }], { global: g });
  const spool = await Spool.create(join(dir, "spool"));
  await assert.rejects(applyLayer(new FsTree(), chunks(layer), spool), (e: unknown) => {
    assertLimit(e, "maxXattrsPerEntry", "SUPERMACHINE_LAYER_MAX_XATTRS_PER_ENTRY");
    assert.equal(e.entry, '"f"');
    return true;
  });
  await spool.remove();
});

test("xattr data over the whole image is capped (distinct sets, each charged)", async (t) => {
  const dir = scratch(t);
  const specs = [];
  for (let i = 0; i < 100; i++) specs.push({ name: `f${i}`, pax: { "SCHILY.xattr.user.big": "v".repeat(60_000) } });
  const spool = await Spool.create(join(dir, "spool"));
  await assert.rejects(applyLayer(new FsTree(), chunks(tar(specs)), spool, { limits: { maxXattrBytes: MiB } }), (e: unknown) => {
    assertLimit(e, "maxXattrBytes", "SUPERMACHINE_LAYER_MAX_XATTR_BYTES");
    return true;
  });
  await spool.remove();
});

/** A tar holding one regular file of `size` zero bytes, produced lazily. */
async function* zeroFileTar(size: number): AsyncGenerator<Buffer> {
  yield header({ name: "bomb", size });
  const chunk = Buffer.alloc(MiB);
  for (let left = size; left > 0; left -= chunk.length) yield left >= chunk.length ? chunk : chunk.subarray(0, left);
  yield Buffer.alloc(1024 + ((512 - (size % 512)) % 512));
}

/** Counts the bytes a consumer pulled out of a stream. */
function counted(src: Readable): { stream: AsyncIterable<Buffer>; bytes: () => number } {
  let n = 0;
  async function* gen(): AsyncGenerator<Buffer> {
    try {
      for await (const c of src) {
        n += (c as Buffer).length;
        yield c as Buffer;
      }
    } finally {
      src.destroy();
    }
  }
  return { stream: gen(), bytes: () => n };
}

async function bombTest(t: TestContext, compression: "gzip" | "zstd"): Promise<void> {
  const dir = scratch(t);
  const blob = join(dir, `bomb.tar.${compression === "gzip" ? "gz" : "zst"}`);
  const expanded = 512 * MiB;
  if (compression === "gzip") {
    await pipeline(Readable.from(zeroFileTar(expanded)), createGzip({ level: 1 }), createWriteStream(blob));
  } else {
    const child = spawn("zstd", ["-q", "-1", "-c"], { stdio: ["pipe", "pipe", "inherit"] });
    await Promise.all([pipeline(Readable.from(zeroFileTar(expanded)), child.stdin), pipeline(child.stdout, createWriteStream(blob))]);
  }
  const cap = 32 * MiB;
  const out = join(dir, "out", "rootfs.erofs");
  const { mkdirSync } = await import("node:fs");
  mkdirSync(join(dir, "out"));
  let input: { stream: AsyncIterable<Buffer>; bytes: () => number } | undefined;
  const { error, growth } = await peakHeapGrowth(() =>
    buildRootfsImage({
      source: { kind: "layers", layers: [() => (input = counted(openLayer({ path: blob }))).stream], spoolPath: join(dir, "out", "spool") },
      out,
      limits: { maxBytes: cap },
    }),
  );
  assertLimit(error, "maxBytes", "SUPERMACHINE_LAYER_MAX_BYTES");
  assert.equal(error.layer, 0);
  // Stopped at the crossing: at most one stream buffer past the cap, not the 512 MiB.
  assert.ok(input !== undefined);
  t.diagnostic(`read ${input.bytes()} bytes of tar for a ${cap}-byte cap`);
  assert.ok(input.bytes() > cap && input.bytes() <= cap + 2 * MiB, `read ${input.bytes()} bytes for a ${cap}-byte cap`);
  t.diagnostic(`heap growth: ${(growth / MiB).toFixed(1)} MiB`);
  assert.ok(growth < 64 * MiB, `heap grew ${growth} bytes`);
  assert.deepEqual(readdirSync(join(dir, "out")), [], "no spool, no image, no temp file");
}

test("a gzip bomb is stopped where it crosses limits.maxBytes; nothing left on disk", async (t) => {
  await bombTest(t, "gzip");
});

test("a zstd bomb is stopped where it crosses limits.maxBytes; nothing left on disk", async (t) => {
  await bombTest(t, "zstd");
});

test("maxBytes holds over all layers of an image, not per layer", async (t) => {
  const dir = scratch(t);
  const l = tar([{ name: "f", data: Buffer.alloc(300 * 1024) }]);
  await assert.rejects(
    buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([l]), Readable.from([l]), Readable.from([l])], spoolPath: join(dir, "spool") }, out: join(dir, "img"), limits: { maxBytes: 700 * 1024 } }),
    (e: unknown) => {
      assertLimit(e, "maxBytes", "SUPERMACHINE_LAYER_MAX_BYTES");
      assert.equal(e.layer, 2);
      return true;
    },
  );
  assert.deepEqual(readdirSync(dir), []);
});

/** `n` empty files in directories of 1000, as a lazily produced tar. */
async function* tinyEntries(n: number): AsyncGenerator<Buffer> {
  for (let i = 0; i < n; i += 1000) {
    const parts: Buffer[] = [];
    for (let j = i; j < Math.min(n, i + 1000); j++) parts.push(header({ name: `d${Math.floor(j / 1000)}/f${j % 1000}` }));
    yield Buffer.concat(parts);
  }
  yield Buffer.alloc(1024);
}

test("10^6 tiny entries build within a bounded heap; the next one crosses maxEntries", async (t) => {
  const dir = scratch(t);
  const n = 1_000_000;
  assert.equal(DEFAULT_LAYER_LIMITS.maxEntries, n);
  const tree = new FsTree();
  const spool = await Spool.create(join(dir, "spool"));
  const base = heapNow();
  // One pass (this is slow on an emulated, shared host): 10^6 entries apply, the 10^6+1st is refused.
  const run = await peakHeapGrowth(() => applyLayer(tree, tinyEntries(n + 1), spool));
  const retained = heapNow() - base;
  await spool.remove();
  assertLimit(run.error, "maxEntries", "SUPERMACHINE_LAYER_MAX_ENTRIES");
  assert.match(run.error.message, /more than 1000000 entries/);
  assert.equal(run.error.entry, '"d1000/f0"');
  assert.equal(treeStats(tree).inodes, n + n / 1000 + 1, "every entry before the cap was applied");
  t.diagnostic(`heap growth: peak ${(run.growth / MiB).toFixed(1)} MiB, retained with the tree ${(retained / MiB).toFixed(1)} MiB`);
  // The tree itself: ~ 300 bytes per entry (node object, name, Map slot).
  assert.ok(retained < 384 * MiB, `the tree of ${n} entries holds ${retained} bytes`);
  assert.ok(run.growth < 768 * MiB, `heap peaked ${run.growth} bytes above the start`);
  assert.deepEqual(readdirSync(dir), []);
});

function deepName(levels: number): string {
  return `${Array.from({ length: levels - 1 }, () => "d").join("/")}/file`;
}

test("a 100-level deep path builds (and the image checks out); one deeper than maxPathDepth is refused", async (t) => {
  const dir = scratch(t);
  const deep = tar([{ name: "long", pax: { path: deepName(100) }, data: "deep\n" }]);
  const img = await buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([deep])], spoolPath: join(dir, "spool") }, out: join(dir, "ok.erofs") });
  assert.equal(img.inodes, 101);
  fsck(img.path);

  const tooDeep = tar([{ name: "long", pax: { path: deepName(DEFAULT_LAYER_LIMITS.maxPathDepth + 1) } }]);
  await assert.rejects(buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([tooDeep])], spoolPath: join(dir, "spool2") }, out: join(dir, "bad.erofs") }), (e: unknown) => {
    assertLimit(e, "maxPathDepth", "SUPERMACHINE_LAYER_MAX_DEPTH");
    return true;
  });
  // A smaller cap from the options; hard-link targets are held to it too.
  const link = tar([{ name: "a/b/c" }, { name: "l", type: "1", linkname: "a/b/c" }]);
  await assert.rejects(applyLayer(new FsTree(), chunks(link), await Spool.create(join(dir, "spool3")), { limits: { maxPathDepth: 2 } }), (e: unknown) => {
    assertLimit(e, "maxPathDepth", "SUPERMACHINE_LAYER_MAX_DEPTH");
    return true;
  });
  rmSync(join(dir, "spool3"));
  assert.deepEqual(readdirSync(dir).sort(), ["ok.erofs"]);
});

test("a PAX header over maxPaxBytes is a LayerLimitError naming the option", async (t) => {
  const dir = scratch(t);
  const layer = tar([{ name: "f", pax: { comment: "c".repeat(5000) } }]);
  const spool = await Spool.create(join(dir, "spool"));
  await assert.rejects(applyLayer(new FsTree(), chunks(layer), spool, { limits: { maxPaxBytes: 4096 } }), (e: unknown) => {
    assertLimit(e, "maxPaxBytes", "SUPERMACHINE_LAYER_MAX_PAX_BYTES");
    return true;
  });
  await spool.remove();
});

test("limits: options, then environment variables, then defaults; bad values are TypeErrors naming them", () => {
  assert.deepEqual(resolveLayerLimits(undefined, {}), DEFAULT_LAYER_LIMITS);
  assert.equal(resolveLayerLimits(undefined, { SUPERMACHINE_LAYER_MAX_ENTRIES: "5" }).maxEntries, 5);
  assert.equal(resolveLayerLimits({ maxEntries: 7 }, { SUPERMACHINE_LAYER_MAX_ENTRIES: "5" }).maxEntries, 7);
  assert.equal(resolveLayerLimits(undefined, { SUPERMACHINE_BLOB_MAX_BYTES: "1024" }).maxBlobBytes, 1024);
  assert.throws(() => resolveLayerLimits(undefined, { SUPERMACHINE_LAYER_MAX_DEPTH: "lots" }), (e: unknown) => e instanceof TypeError && /SUPERMACHINE_LAYER_MAX_DEPTH/.test(e.message));
  assert.throws(() => resolveLayerLimits({ maxBytes: 0 }, {}), (e: unknown) => e instanceof TypeError && /limits\.maxBytes/.test(e.message));
  assert.throws(() => resolveLayerLimits({ maxBytes: 1.5 }, {}), TypeError);
});

test("the environment caps a build when no option is given", async (t) => {
  const dir = scratch(t);
  const saved = process.env.SUPERMACHINE_LAYER_MAX_ENTRIES;
  process.env.SUPERMACHINE_LAYER_MAX_ENTRIES = "3";
  try {
    const layer = tar([{ name: "a" }, { name: "b" }, { name: "c" }, { name: "d" }]);
    writeFileSync(join(dir, "unused"), "");
    await assert.rejects(buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([layer])], spoolPath: join(dir, "spool") }, out: join(dir, "img") }), (e: unknown) => {
      assertLimit(e, "maxEntries", "SUPERMACHINE_LAYER_MAX_ENTRIES");
      assert.equal(e.entry, '"d"');
      return true;
    });
  } finally {
    if (saved === undefined) delete process.env.SUPERMACHINE_LAYER_MAX_ENTRIES;
    else process.env.SUPERMACHINE_LAYER_MAX_ENTRIES = saved;
  }
  assert.deepEqual(readdirSync(dir), ["unused"]);
});
