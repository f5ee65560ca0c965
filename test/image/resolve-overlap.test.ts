/**
 * resolveImage unpacks layers while they download: against a small fake
 * registry whose layer bodies the test holds back, the unpack of a layer
 * starts before its download ends; bytes that do not match their digest fail
 * the build with the pull's DigestMismatchError and leave nothing behind; a
 * source that restarts from byte 0 still gives the right image and blob; a
 * hostile first layer stops the download of the others. No VM needed.
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { after, test } from "node:test";
import { gzipSync } from "node:zlib";
import { DigestMismatchError, LayerError } from "../../src/errors.js";
import { resolveImage, type ImageProgress } from "../../src/image/resolve.js";
import { extract } from "../fixtures/rootfs/erofs-check.js";
import { blobFor, serveManifest } from "../fixtures/registry/fake-serve.js";
import { tar } from "../fixtures/rootfs/tar-writer.js";
import { removeDir, tempDir } from "../fixtures/oci/util.js";

const sha = (b: Buffer): string => `sha256:${createHash("sha256").update(b).digest("hex")}`;

interface Img {
  manifest: Buffer;
  blobs: Map<string, Buffer>;
  layers: Buffer[];
}

/** An image of gzip layers made from tar buffers. */
function image(tars: Buffer[]): Img {
  const layers = tars.map((t) => gzipSync(t, { level: 1 }));
  const config = Buffer.from(JSON.stringify({ architecture: "amd64", os: "linux", config: {}, rootfs: { type: "layers", diff_ids: tars.map(sha) } }));
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: sha(config), size: config.length },
      layers: layers.map((l) => ({ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: sha(l), size: l.length })),
    }),
  );
  return { manifest, layers, blobs: new Map([[sha(config), config], ...layers.map((l): [string, Buffer] => [sha(l), l])]) };
}

type Layer = (req: http.IncomingMessage, res: http.ServerResponse, blob: Buffer, n: number) => void;

const servers: http.Server[] = [];
after(async () => {
  for (const s of servers) {
    s.closeAllConnections();
    await new Promise<void>((r) => s.close(() => r()));
  }
});

/** Serves `img`; a layer GET goes to `layer` (with how many layer GETs came before), everything else is served whole. */
async function serve(img: Img, layer: Layer): Promise<string> {
  let n = 0;
  const server = http.createServer((req, res) => {
    if (serveManifest(req, res, img.manifest)) return;
    const blob = blobFor(req, img.blobs);
    if (!blob) {
      res.writeHead(404);
      res.end();
      return;
    }
    if (img.layers.includes(blob)) return layer(req, res, blob, n++);
    res.writeHead(200, { "content-length": blob.length });
    res.end(blob);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  servers.push(server);
  return `127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/** What the cache holds besides finished blobs and images: temp files, spools, locks. */
function leftovers(cacheDir: string): string[] {
  const out: string[] = [];
  for (const d of ["rootfs", join("blobs", "sha256")]) {
    const dir = join(cacheDir, d);
    if (!existsSync(dir)) continue;
    for (const n of readdirSync(dir)) if (n.endsWith(".tmp") || n.startsWith(".spool") || n.endsWith(".lock")) out.push(join(d, n));
  }
  return out;
}

const files = (n: number, size: number) => Array.from({ length: n }, (_, i) => ({ name: `d/f${i}`, data: randomBytes(size) }));

test("a layer is unpacked while it downloads: unpacking starts before its last byte arrives", async () => {
  const entries = files(64, 64 * 1024);
  const img = image([tar(entries)]);
  let unpacking = false;
  const unpacked = new Promise<void>((resolve) => {
    const check = setInterval(() => {
      if (unpacking) {
        clearInterval(check);
        resolve();
      }
    }, 10);
    // Without overlap nothing unpacks before the end: the body is sent anyway after 10 s, and the assertion below fails.
    setTimeout(() => {
      clearInterval(check);
      resolve();
    }, 10_000).unref();
  });
  let sawUnpackFirst: boolean | undefined;
  const host = await serve(img, (_req, res, blob) => {
    res.writeHead(200, { "content-length": blob.length });
    const half = Math.floor(blob.length / 2);
    res.write(blob.subarray(0, half));
    void unpacked.then(() => {
      sawUnpackFirst = unpacking;
      res.end(blob.subarray(half));
    });
  });
  const dir = await tempDir("overlap");
  try {
    const cacheDir = join(dir, "cache");
    const events: ImageProgress[] = [];
    const r = await resolveImage(`${host}/fake/img:latest`, {
      cacheDir,
      onProgress: (p) => {
        events.push(p);
        if (p.stage === "unpack" && p.bytes > 0) unpacking = true;
      },
    });
    assert.equal(sawUnpackFirst, true, "the unpack had started when the second half of the layer was sent");
    const x = await extract(r.rootfsImage);
    try {
      for (const e of entries) assert.ok(readFileSync(join(x, e.name)).equals(e.data), e.name);
    } finally {
      await removeDir(x);
    }
    assert.ok(readFileSync(join(cacheDir, "blobs", "sha256", sha(img.layers[0]!).slice(7))).equals(img.layers[0]!), "the verified blob is cached");
    assert.deepEqual(leftovers(cacheDir), []);
  } finally {
    await removeDir(dir);
  }
});

test("bytes that do not match the layer's digest fail the build with DigestMismatchError, leaving no image, spool or temp file", async () => {
  const img = image([tar(files(16, 32 * 1024))]);
  const host = await serve(img, (_req, res, blob) => {
    const bad = Buffer.from(blob);
    bad[bad.length - 9] = bad[bad.length - 9]! ^ 0xff; // in the gzip trailer: the tar itself parses fine
    res.writeHead(200, { "content-length": bad.length });
    res.end(bad);
  });
  const dir = await tempDir("overlap-bad");
  try {
    const cacheDir = join(dir, "cache");
    await assert.rejects(resolveImage(`${host}/fake/img:latest`, { cacheDir }), (e: unknown) => e instanceof DigestMismatchError || (e instanceof LayerError && e.cause instanceof DigestMismatchError));
    const rootfs = join(cacheDir, "rootfs");
    assert.deepEqual(existsSync(rootfs) ? readdirSync(rootfs) : [], [], "no image, spool or lock");
    assert.deepEqual(leftovers(cacheDir), []);
    assert.ok(!existsSync(join(cacheDir, "blobs", "sha256", sha(img.layers[0]!).slice(7))), "no blob cached");
  } finally {
    await removeDir(dir);
  }
});

test("a source that restarts from byte 0 after a reset still gives the right image and the right cached blob", async () => {
  const entries = files(32, 48 * 1024);
  const img = image([tar(entries)]);
  const host = await serve(img, (req, res, blob, n) => {
    if (n === 0) {
      res.writeHead(200, { "content-length": blob.length });
      res.write(blob.subarray(0, Math.floor((blob.length * 2) / 3)), () => setTimeout(() => req.socket.destroy(), 50));
      return;
    }
    // The retry asks for a Range; this server ignores it and starts over.
    res.writeHead(200, { "content-length": blob.length });
    res.end(blob);
  });
  const dir = await tempDir("overlap-restart");
  try {
    const cacheDir = join(dir, "cache");
    const r = await resolveImage(`${host}/fake/img:latest`, { cacheDir, retries: 3 });
    const x = await extract(r.rootfsImage);
    try {
      for (const e of entries) assert.ok(readFileSync(join(x, e.name)).equals(e.data), e.name);
    } finally {
      await removeDir(x);
    }
    assert.ok(readFileSync(join(cacheDir, "blobs", "sha256", sha(img.layers[0]!).slice(7))).equals(img.layers[0]!), "the cached blob is the layer, byte for byte");
    assert.deepEqual(leftovers(cacheDir), []);
  } finally {
    await removeDir(dir);
  }
});

test("a hostile first layer fails the build with its LayerError and stops the other layers' downloads", async () => {
  const hostile = tar([{ name: "etc", type: "2", linkname: "/" }, { name: "etc/passwd", data: "x" }]);
  const img = image([hostile, tar(files(8, 1024))]);
  let held: http.ServerResponse | undefined;
  const host = await serve(img, (_req, res, blob) => {
    if (blob === img.layers[0]) {
      res.writeHead(200, { "content-length": blob.length });
      res.end(blob);
      return;
    }
    // The second layer never finishes on its own: only the abort ends it.
    held = res;
    res.writeHead(200, { "content-length": blob.length });
    res.write(blob.subarray(0, 10));
  });
  const dir = await tempDir("overlap-hostile");
  try {
    const cacheDir = join(dir, "cache");
    await assert.rejects(resolveImage(`${host}/fake/img:latest`, { cacheDir, timeoutMs: 60_000 }), (e: unknown) => e instanceof LayerError && e.layer === 0);
    assert.ok(held === undefined || held.destroyed || held.socket === null || held.socket.destroyed, "the second layer's request was dropped");
    const rootfs = join(cacheDir, "rootfs");
    assert.deepEqual(existsSync(rootfs) ? readdirSync(rootfs) : [], []);
    assert.deepEqual(leftovers(cacheDir), []);
  } finally {
    await removeDir(dir);
  }
});
