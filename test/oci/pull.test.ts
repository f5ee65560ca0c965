/**
 * pullImage against a real distribution registry (docker-registry) on
 * 127.0.0.1: busybox, multi-layer, multi-platform, zstd and Docker-schema-2
 * images pushed with skopeo; pullPolicy request counts; corruption; retries;
 * two processes pulling at once.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { AbortError, DigestMismatchError, NotFoundError, PlatformError, RegistryError } from "../../src/errors.js";
import { openLayer, type PullProgress, pullImage } from "../../src/oci/index.js";
import { BUSYBOX_CONFIG, addMultiPlatform, busyboxTar, multiLayerTars, newLayout, type MultiPlatform } from "../fixtures/oci/images.js";
import type { BuiltImage } from "../fixtures/oci/layout.js";
import { listTar } from "../fixtures/oci/tar.js";
import { blobDirEntries, readAll, removeDir, streamDigest, tempDir } from "../fixtures/oci/util.js";
import { freePort, pushLayout, pushRaw, type RegistryFixture, startRegistry } from "../fixtures/registry/registry.js";
import { randomBytes } from "node:crypto";

const execFileP = promisify(execFile);

describe("pullImage from a real registry", () => {
  let reg: RegistryFixture;
  let work: string;
  let busybox: BuiltImage;
  let busyboxLayerTar: Buffer;
  let multi: BuiltImage;
  let multiTars: Buffer[];
  let platforms: MultiPlatform;
  let zstdImage: BuiltImage;
  let zstdTar: Buffer;
  let dockerPlatforms: MultiPlatform;
  let corrupt: BuiltImage;
  const caches: string[] = [];
  const newCache = async (): Promise<string> => {
    const d = await tempDir("cache");
    caches.push(d);
    return d;
  };

  before(async () => {
    work = await tempDir("pull");
    reg = await startRegistry();
    const layout = await newLayout(join(work, "layout"));
    busyboxLayerTar = busyboxTar();
    busybox = await layout.addImage({ layers: [{ tar: busyboxLayerTar }], config: BUSYBOX_CONFIG });
    layout.tag(busybox.manifest, "busybox");
    multiTars = multiLayerTars();
    multi = await layout.addImage({ layers: multiTars.map((tar, i) => ({ tar, compression: i === 1 ? "tar" : "gzip" })) });
    layout.tag(multi.manifest, "multi");
    platforms = await addMultiPlatform(layout);
    layout.tag(platforms.index, "multi-platform");
    zstdTar = multiTars[0]!;
    zstdImage = await layout.addImage({ layers: [{ tar: zstdTar, compression: "zstd" }], config: { config: { Cmd: ["zstd-image"] } } });
    layout.tag(zstdImage.manifest, "zstd");
    const dockerLayout = await newLayout(join(work, "docker-layout"));
    dockerPlatforms = await addMultiPlatform(dockerLayout, true);
    const readBlob = (digest: string): Promise<Buffer> => readFile(join(dockerLayout.dir, "blobs", "sha256", digest.slice(7)));
    const dockerImages = [dockerPlatforms.amd64, dockerPlatforms.arm64, dockerPlatforms.armv7];
    const dockerBlobs = await Promise.all(dockerImages.flatMap((img) => [...img.layers.map((l) => l.digest), img.config.digest]).map(readBlob));
    const unique = randomBytes(4096);
    corrupt = await layout.addImage({ layers: [{ tar: (await import("../fixtures/oci/tar.js")).buildTar([{ name: "random.bin", content: unique }]) }] });
    layout.tag(corrupt.manifest, "corrupt");
    await layout.save();
    await pushLayout(reg, layout.dir, "busybox", "test/busybox:1");
    await pushLayout(reg, layout.dir, "multi", "test/multi:latest");
    await pushLayout(reg, layout.dir, "multi-platform", "test/platforms:latest", { all: true });
    await pushLayout(reg, layout.dir, "zstd", "test/zstd:latest");
    await pushRaw(reg, "test/docker-list", "latest", dockerBlobs, [
      ...dockerImages.map((img) => ({ bytes: img.manifestBytes, mediaType: img.manifest.mediaType })),
      { bytes: await readBlob(dockerPlatforms.index.digest), mediaType: dockerPlatforms.index.mediaType },
    ]);
    await pushLayout(reg, layout.dir, "corrupt", "test/corrupt:latest");
  });

  after(async () => {
    await reg?.stop();
    for (const c of caches) await removeDir(c);
    if (work) await removeDir(work);
  });

  test("pulls busybox: normalised ref, config, verified layers, progress", async () => {
    const cacheDir = await newCache();
    const events: PullProgress[] = [];
    const image = await pullImage(`${reg.host}/test/busybox:1`, { cacheDir, onProgress: (e) => events.push(e) });
    assert.equal(image.ref, `${reg.host}/test/busybox:1`);
    assert.equal(image.manifestDigest, busybox.manifest.digest);
    assert.equal(image.resolvedDigest, busybox.manifest.digest);
    assert.equal(image.configDigest, busybox.config.digest);
    assert.deepEqual(image.platform, { os: "linux", architecture: "amd64" });
    assert.deepEqual(image.config.cmd, ["sh"]);
    assert.equal(image.config.entrypoint, null);
    assert.deepEqual(image.config.env, ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"]);
    assert.equal(image.config.workingDir, "/root");
    assert.equal(image.config.user, "0:0");
    assert.deepEqual(image.config.exposedPorts, ["8080/tcp"]);
    assert.deepEqual(image.config.labels, { "org.opencontainers.image.title": "busybox-test" });
    assert.equal(image.layers.length, 1);
    const layer = image.layers[0]!;
    assert.equal(layer.digest, busybox.layers[0]!.digest);
    assert.equal(layer.mediaType, "application/vnd.oci.image.layer.v1.tar+gzip");
    assert.equal(layer.compression, "gzip");
    assert.equal(layer.diffId, busybox.diffIds[0]);
    assert.equal(layer.path, join(cacheDir, "blobs", "sha256", layer.digest.slice(7)));
    assert.equal((await stat(layer.path)).size, layer.size);
    assert.equal(await streamDigest(openLayer(layer)), layer.diffId, "decompressed layer hashes to its diff_id");
    const entries = listTar(await readAll(openLayer(layer)));
    assert.ok(entries.some((e) => e.name === "bin/busybox" && e.type === "0"));
    assert.ok(entries.some((e) => e.name === "bin/sh" && e.type === "2" && e.linkname === "busybox"));
    const mine = events.filter((e) => e.layer === 0);
    assert.equal(mine[0]?.phase, "download");
    assert.equal(mine.at(-1)?.bytesDone, layer.size);
    assert.ok(mine.every((e) => e.bytesTotal === layer.size && e.digest === layer.digest));
    assert.deepEqual(
      (await blobDirEntries(cacheDir)).filter((n) => n.includes(".")),
      [],
      "no temp or lock files left",
    );
  });

  test("pullPolicy: missing with a full cache and never make no request; always re-resolves the manifest only", async () => {
    const cacheDir = await newCache();
    const ref = `${reg.host}/test/busybox:1`;
    await pullImage(ref, { cacheDir });
    reg.resetCounts();
    const events: PullProgress[] = [];
    const again = await pullImage(ref, { cacheDir, onProgress: (e) => events.push(e) });
    assert.equal(reg.totalRequests(), 0, `missing made requests: ${JSON.stringify(reg.requests)}`);
    assert.equal(again.manifestDigest, busybox.manifest.digest);
    assert.deepEqual(events.map((e) => e.phase), ["cached"]);
    await pullImage(ref, { cacheDir, pullPolicy: "never" });
    assert.equal(reg.totalRequests(), 0, "never made requests");
    await pullImage(ref, { cacheDir, pullPolicy: "always" });
    const manifestRequests = reg.requests.filter((r) => r.url.includes("/manifests/"));
    assert.ok(manifestRequests.length >= 1, "always asked for the manifest");
    assert.deepEqual(manifestRequests.map((r) => r.method), ["HEAD"], "a known manifest costs one HEAD, no GET");
    assert.equal(reg.requests.filter((r) => r.url.includes("/blobs/")).length, 0, "blobs are reused by digest");
  });

  test("pullPolicy never on an empty cache fails naming the ref and the policy, with no request", async () => {
    const cacheDir = await newCache();
    reg.resetCounts();
    await assert.rejects(pullImage(`${reg.host}/test/busybox:1`, { cacheDir, pullPolicy: "never" }), (err: unknown) => {
      assert.ok(err instanceof NotFoundError);
      assert.match(err.message, /test\/busybox:1/);
      assert.match(err.message, /pullPolicy is "never"/);
      assert.match(err.message, /"missing"/);
      return true;
    });
    assert.equal(reg.totalRequests(), 0);
  });

  test("missing fetches only the layers that were removed from the cache", async () => {
    const cacheDir = await newCache();
    const ref = `${reg.host}/test/multi:latest`;
    const first = await pullImage(ref, { cacheDir });
    const { unlink } = await import("node:fs/promises");
    await unlink(first.layers[1]!.path);
    reg.resetCounts();
    await pullImage(ref, { cacheDir });
    assert.deepEqual(
      reg.requests.filter((r) => r.method === "GET").map((r) => r.url),
      [`/v2/test/multi/blobs/${first.layers[1]!.digest}`],
    );
    await assert.rejects(
      (async () => {
        await unlink(first.layers[0]!.path);
        await pullImage(ref, { cacheDir, pullPolicy: "never" });
      })(),
      (err: unknown) => err instanceof NotFoundError && /layer 0/.test(err.message),
    );
  });

  test("multi-layer image: plain and gzip layers decompress to the original tars (whiteouts, links, long names)", async () => {
    const cacheDir = await newCache();
    const image = await pullImage(`${reg.host}/test/multi`, { cacheDir });
    assert.equal(image.ref, `${reg.host}/test/multi:latest`);
    assert.deepEqual(image.layers.map((l) => l.compression), ["gzip", "tar", "gzip"]);
    for (let i = 0; i < 3; i++) {
      assert.deepEqual(await readAll(openLayer(image.layers[i]!)), multiTars[i]);
    }
    const middle = listTar(multiTars[1]!);
    assert.ok(middle.some((e) => e.name === "a/.wh.gone"));
    assert.ok(middle.some((e) => e.name === "opaque/.wh..wh..opq"));
    assert.ok(middle.some((e) => e.type === "1" && e.linkname === "hard/orig"));
    assert.ok(listTar(multiTars[0]!).some((e) => e.name.length > 100));
  });

  test("multi-platform index: host default, explicit platforms, variants, and the error listing what exists", async () => {
    const cacheDir = await newCache();
    const ref = `${reg.host}/test/platforms:latest`;
    const marker = async (platform?: string): Promise<string> => {
      const image = await pullImage(ref, { cacheDir, ...(platform ? { platform } : {}) });
      assert.equal(image.resolvedDigest, platforms.index.digest);
      const entries = listTar(await readAll(openLayer(image.layers[0]!)));
      return entries.find((e) => e.name === "arch")!.content.toString().trim();
    };
    assert.equal(await marker(), "amd64");
    assert.equal(await marker("linux/amd64"), "amd64");
    assert.equal(await marker("linux/arm64"), "arm64/v8");
    assert.equal(await marker("linux/arm64/v8"), "arm64/v8");
    assert.equal(await marker("linux/arm/v7"), "arm/v7");
    const arm64 = await pullImage(ref, { cacheDir, platform: { os: "linux", architecture: "aarch64" } });
    assert.equal(arm64.manifestDigest, platforms.arm64.manifest.digest);
    assert.deepEqual(arm64.platform, { os: "linux", architecture: "arm64", variant: "v8" });
    await assert.rejects(pullImage(ref, { cacheDir, platform: "linux/s390x" }), (err: unknown) => {
      assert.ok(err instanceof PlatformError);
      assert.equal(err.wanted, "linux/s390x");
      assert.deepEqual([...err.available].sort(), ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"]);
      assert.match(err.message, /linux\/arm64\/v8/);
      return true;
    });
    await assert.rejects(pullImage(ref, { cacheDir, platform: "linux/arm/v6" }), PlatformError);
  });

  test("Docker manifest list and schema 2 manifests", async () => {
    const cacheDir = await newCache();
    const image = await pullImage(`${reg.host}/test/docker-list:latest`, { cacheDir, platform: "linux/arm64" });
    assert.equal(image.resolvedDigest, dockerPlatforms.index.digest);
    assert.equal(image.manifestDigest, dockerPlatforms.arm64.manifest.digest);
    assert.equal(image.layers[0]!.mediaType, "application/vnd.docker.image.rootfs.diff.tar.gzip");
    assert.equal(image.config.architecture, "arm64");
  });

  test("zstd layers decompress (zstd command)", async () => {
    const cacheDir = await newCache();
    const image = await pullImage(`${reg.host}/test/zstd:latest`, { cacheDir });
    assert.equal(image.layers[0]!.mediaType, "application/vnd.oci.image.layer.v1.tar+zstd");
    assert.equal(image.layers[0]!.compression, "zstd");
    assert.deepEqual(image.config.cmd, ["zstd-image"]);
    assert.deepEqual(await readAll(openLayer(image.layers[0]!)), zstdTar);
  });

  test("pull by digest, and tag+digest (the digest wins)", async () => {
    const cacheDir = await newCache();
    const byDigest = await pullImage(`${reg.host}/test/busybox@${busybox.manifest.digest}`, { cacheDir });
    assert.equal(byDigest.manifestDigest, busybox.manifest.digest);
    assert.equal(byDigest.ref, `${reg.host}/test/busybox@${busybox.manifest.digest}`);
    const both = await pullImage(`${reg.host}/test/multi:nonexistent-tag@${multi.manifest.digest}`, { cacheDir });
    assert.equal(both.manifestDigest, multi.manifest.digest);
  });

  test("unknown tag and unknown repository: NotFoundError naming ref and registry", async () => {
    const cacheDir = await newCache();
    for (const ref of [`${reg.host}/test/busybox:nope`, `${reg.host}/test/does-not-exist:1`]) {
      await assert.rejects(pullImage(ref, { cacheDir }), (err: unknown) => {
        assert.ok(err instanceof NotFoundError, String(err));
        assert.equal(err.where, reg.host);
        assert.match(err.message, new RegExp(ref.split("/").slice(1).join("/").replace(/[.:]/g, "\\$&")));
        assert.match(err.message, new RegExp(reg.host.replace(/\./g, "\\.")));
        return true;
      });
    }
  });

  test("an unreachable registry fails fast, naming host and cause", async () => {
    const cacheDir = await newCache();
    const port = await freePort();
    const started = Date.now();
    await assert.rejects(pullImage(`127.0.0.1:${port}/x/y:1`, { cacheDir }), (err: unknown) => {
      assert.ok(err instanceof RegistryError, String(err));
      assert.equal(err.registry, `127.0.0.1:${port}`);
      assert.match(err.message, /unreachable/);
      assert.match(err.message, /ECONNREFUSED/);
      return true;
    });
    assert.ok(Date.now() - started < 5000, "no retry storm on a host never reached");
  });

  test("a corrupted blob on the registry: DigestMismatchError and nothing cached", async () => {
    const cacheDir = await newCache();
    const layer = corrupt.layers[0]!;
    const path = reg.blobDataPath(layer.digest);
    const original = await readFile(path);
    const bad = Buffer.from(original);
    bad[bad.length - 20] = bad[bad.length - 20]! ^ 0xff;
    await writeFile(path, bad);
    try {
      await assert.rejects(pullImage(`${reg.host}/test/corrupt:latest`, { cacheDir }), (err: unknown) => {
        assert.ok(err instanceof DigestMismatchError, String(err));
        assert.equal(err.expected, layer.digest);
        assert.notEqual(err.actual, layer.digest);
        assert.match(err.message, /discarded/);
        return true;
      });
      const left = await blobDirEntries(cacheDir);
      assert.ok(!left.includes(layer.digest.slice(7)), "the bad blob is not in the cache");
      assert.deepEqual(left.filter((n) => n.includes(".")), [], "no temp or lock files left");
    } finally {
      await writeFile(path, original);
    }
    const ok = await pullImage(`${reg.host}/test/corrupt:latest`, { cacheDir });
    assert.equal(ok.layers[0]!.digest, layer.digest);
  });

  test("503s from the registry are retried", async () => {
    const cacheDir = await newCache();
    reg.resetCounts();
    reg.failNext(2, 503);
    const image = await pullImage(`${reg.host}/test/busybox:1`, { cacheDir });
    assert.equal(image.manifestDigest, busybox.manifest.digest);
    assert.ok(reg.requests.length >= 2 + 3, "two failures, then HEAD, GET manifest, GET config, GET layer");
  });

  test("an aborted signal stops the pull with AbortError", async () => {
    const cacheDir = await newCache();
    const ac = new AbortController();
    ac.abort(new Error("stop"));
    await assert.rejects(pullImage(`${reg.host}/test/busybox:1`, { cacheDir, signal: ac.signal }), AbortError);
    const ac2 = new AbortController();
    const p = pullImage(`${reg.host}/test/multi:latest`, {
      cacheDir,
      signal: ac2.signal,
      onProgress: () => ac2.abort(new Error("stop")),
    });
    await assert.rejects(p, AbortError);
    assert.deepEqual((await blobDirEntries(cacheDir)).filter((n) => n.includes(".")), []);
  });

  test("two processes pulling the same image at once: both succeed, each blob downloaded once", async () => {
    const cacheDir = await newCache();
    const child = fileURLToPath(new URL("../fixtures/oci/pull-child.js", import.meta.url));
    reg.resetCounts();
    // Slow blobs make the two downloads overlap, so one process must wait for the other's lock.
    reg.slowBlobs(400);
    const ref = `${reg.host}/test/multi:latest`;
    const run = (): Promise<{ ok: boolean; manifestDigest: string; layers: string[] }> =>
      execFileP(process.execPath, [child, ref, cacheDir], { timeout: 120_000 }).then((r) => JSON.parse(r.stdout) as { ok: boolean; manifestDigest: string; layers: string[] });
    const started = Date.now();
    const [a, b] = await Promise.all([run(), run()]).finally(() => reg.slowBlobs(0));
    assert.ok(Date.now() - started >= 800, "the blob downloads were slow enough to overlap");
    assert.ok(a.ok && b.ok);
    assert.equal(a.manifestDigest, multi.manifest.digest);
    assert.deepEqual(a.layers, b.layers);
    for (const digest of [...a.layers, multi.config.digest]) {
      const gets = reg.requests.filter((r) => r.method === "GET" && r.url.endsWith(`/blobs/${digest}`));
      assert.equal(gets.length, 1, `${digest} downloaded ${gets.length} times`);
    }
    const entries = await blobDirEntries(cacheDir);
    assert.deepEqual(entries.filter((n) => n.includes(".")), [], "no temp or lock files left");
    for (const digest of a.layers) assert.ok(entries.includes(digest.slice(7)));
  });
});
