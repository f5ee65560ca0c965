/**
 * Offline sources give what a registry pull of the same image gives:
 * oci:DIR[:tag], oci-archive:FILE[:tag], docker-archive:FILE[:ref] (our own
 * docker-save writer and skopeo's), and the Docker daemon source (missing
 * daemon → clear error; a fake daemon on a unix socket → the image).
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import * as http from "node:http";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { DigestMismatchError, ImageError, NotFoundError } from "../../src/errors.js";
import { openLayer, type PulledImage, pullImage } from "../../src/oci/index.js";
import { BUSYBOX_CONFIG, addMultiPlatform, busyboxTar, dockerArchiveTar, multiLayerTars, newLayout, type MultiPlatform } from "../fixtures/oci/images.js";
import type { BuiltImage } from "../fixtures/oci/layout.js";
import { readAll, removeDir, streamDigest, tempDir } from "../fixtures/oci/util.js";
import { pushLayout, type RegistryFixture, startRegistry } from "../fixtures/registry/registry.js";

const execFileP = promisify(execFile);

/** The parts of a pull result that must agree between sources. */
function essence(image: PulledImage) {
  return {
    configDigest: image.configDigest,
    config: image.config,
    platform: image.platform,
    diffIds: image.layers.map((l) => l.diffId),
  };
}

describe("offline image sources", () => {
  let reg: RegistryFixture;
  let work: string;
  let layoutDir: string;
  let busybox: BuiltImage;
  let busyboxLayer: Buffer;
  let multi: BuiltImage;
  let multiTars: Buffer[];
  let platforms: MultiPlatform;
  let fromRegistry: PulledImage;
  const caches: string[] = [];
  const newCache = async (): Promise<string> => {
    const d = await tempDir("srccache");
    caches.push(d);
    return d;
  };

  before(async () => {
    work = await tempDir("sources");
    reg = await startRegistry();
    const layout = await newLayout(join(work, "layout"));
    layoutDir = layout.dir;
    busyboxLayer = busyboxTar();
    busybox = await layout.addImage({ layers: [{ tar: busyboxLayer }], config: BUSYBOX_CONFIG });
    layout.tag(busybox.manifest, "busybox");
    multiTars = multiLayerTars();
    multi = await layout.addImage({ layers: multiTars.map((tar) => ({ tar })) });
    layout.tag(multi.manifest, "multi");
    platforms = await addMultiPlatform(layout);
    layout.tag(platforms.index, "platforms");
    await layout.save();
    await pushLayout(reg, layoutDir, "busybox", "src/busybox:1");
    fromRegistry = await pullImage(`${reg.host}/src/busybox:1`, { cacheDir: await newCache() });
  });

  after(async () => {
    await reg?.stop();
    for (const c of caches) await removeDir(c);
    if (work) await removeDir(work);
  });

  test("oci:DIR:tag gives the registry pull's digests and config", async () => {
    const image = await pullImage(`oci:${layoutDir}:busybox`, { cacheDir: await newCache() });
    assert.equal(image.ref, `oci:${layoutDir}:busybox`);
    assert.equal(image.manifestDigest, fromRegistry.manifestDigest);
    assert.deepEqual(image.layers.map((l) => [l.digest, l.mediaType, l.size]), fromRegistry.layers.map((l) => [l.digest, l.mediaType, l.size]));
    assert.deepEqual(essence(image), essence(fromRegistry));
    assert.equal(await streamDigest(openLayer(image.layers[0]!)), busybox.diffIds[0]);
  });

  test("oci-archive:FILE:tag (tar of the layout, ./-prefixed names) gives the same", async () => {
    const file = join(work, "layout.tar");
    await execFileP("tar", ["-C", layoutDir, "-cf", file, "."]);
    const image = await pullImage(`oci-archive:${file}:busybox`, { cacheDir: await newCache() });
    assert.equal(image.manifestDigest, fromRegistry.manifestDigest);
    assert.deepEqual(image.layers.map((l) => l.digest), fromRegistry.layers.map((l) => l.digest));
    assert.deepEqual(essence(image), essence(fromRegistry));
  });

  test("oci: selects platforms from an index, by tag or by full reference annotation", async () => {
    const cacheDir = await newCache();
    const arm = await pullImage(`oci:${layoutDir}:platforms`, { cacheDir, platform: "linux/arm64" });
    assert.equal(arm.manifestDigest, platforms.arm64.manifest.digest);
    assert.equal(arm.resolvedDigest, platforms.index.digest);
    const amd = await pullImage(`oci:${layoutDir}:platforms`, { cacheDir });
    assert.equal(amd.manifestDigest, platforms.amd64.manifest.digest);
  });

  test("oci: errors: unknown tag lists tags, several images need a tag, missing dir, tampered blob", async () => {
    const cacheDir = await newCache();
    await assert.rejects(pullImage(`oci:${layoutDir}:nope`, { cacheDir }), (err: unknown) => {
      assert.ok(err instanceof NotFoundError);
      assert.match(err.message, /"busybox", "multi", "platforms"/);
      return true;
    });
    await assert.rejects(pullImage(`oci:${layoutDir}`, { cacheDir }), (err: unknown) => err instanceof ImageError && /name one/.test(err.message));
    await assert.rejects(pullImage(`oci:${join(work, "nowhere")}:x`, { cacheDir }), NotFoundError);
    const copy = join(work, "tampered");
    await execFileP("cp", ["-r", layoutDir, copy]);
    const layerFile = join(copy, "blobs", "sha256", multi.layers[2]!.digest.slice(7));
    const bytes = await readFile(layerFile);
    bytes[10] = bytes[10]! ^ 1;
    await writeFile(layerFile, bytes);
    await assert.rejects(pullImage(`oci:${copy}:multi`, { cacheDir }), (err: unknown) => err instanceof DigestMismatchError && err.expected === multi.layers[2]!.digest);
  });

  test("docker-archive (our docker-save writer, plain tar layers): same config and diff_ids; layers verified by diff_id", async () => {
    const file = join(work, "busybox-save.tar");
    await writeFile(file, dockerArchiveTar({ configBytes: busybox.configBytes, layers: [busyboxLayer], repoTags: ["src/busybox:1"] }));
    const cacheDir = await newCache();
    for (const ref of [`docker-archive:${file}`, `docker-archive:${file}:src/busybox:1`, `docker-archive:${file}:docker.io/src/busybox:1`, `docker-archive:${file}:@0`]) {
      const image = await pullImage(ref, { cacheDir });
      assert.deepEqual(essence(image), essence(fromRegistry), ref);
      assert.deepEqual(image.layers.map((l) => l.digest), busybox.diffIds, "plain tar layers are named by their diff_id");
      assert.equal(image.layers[0]!.mediaType, "application/vnd.oci.image.layer.v1.tar");
      assert.deepEqual(await readAll(openLayer(image.layers[0]!)), busyboxLayer);
    }
    await assert.rejects(pullImage(`docker-archive:${file}:other:1`, { cacheDir }), (err: unknown) => err instanceof NotFoundError && /src\/busybox:1/.test(err.message));
    // A layer that does not match its diff_id is refused.
    const bad = join(work, "bad-save.tar");
    const tampered = Buffer.from(busyboxLayer);
    tampered[1000] = tampered[1000]! ^ 1;
    await writeFile(bad, dockerArchiveTar({ configBytes: busybox.configBytes, layers: [tampered], repoTags: [] }));
    await assert.rejects(pullImage(`docker-archive:${bad}`, { cacheDir: await newCache() }), DigestMismatchError);
  });

  test("docker-archive with gzip layers and a layer repeated through a symlink", async () => {
    const file = join(work, "multi-save.tar");
    const layers = [gzipSync(multiTars[0]!), multiTars[1]!, gzipSync(multiTars[2]!)];
    const configJson = JSON.parse(multi.configBytes.toString()) as { rootfs: { diff_ids: string[] } };
    configJson.rootfs.diff_ids.push(configJson.rootfs.diff_ids[2]!);
    const configBytes = Buffer.from(JSON.stringify(configJson));
    await writeFile(file, dockerArchiveTar({ configBytes, layers, repoTags: ["multi:latest"], duplicateLast: true }));
    const image = await pullImage(`docker-archive:${file}:multi`, { cacheDir: await newCache() });
    assert.deepEqual(image.layers.map((l) => l.compression), ["gzip", "tar", "gzip", "gzip"]);
    for (let i = 0; i < 4; i++) assert.deepEqual(await readAll(openLayer(image.layers[i]!)), multiTars[Math.min(i, 2)]);
    assert.equal(image.layers[3]!.digest, image.layers[2]!.digest);
  });

  test("docker-archive written by skopeo gives the registry pull's config and diff_ids", async () => {
    const file = join(work, "skopeo-save.tar");
    await execFileP("skopeo", ["--insecure-policy", "copy", "--quiet", `oci:${layoutDir}:busybox`, `docker-archive:${file}:src/busybox:1`]);
    const image = await pullImage(`docker-archive:${file}:src/busybox:1`, { cacheDir: await newCache() });
    assert.deepEqual(essence(image), essence(fromRegistry));
    assert.equal(await streamDigest(openLayer(image.layers[0]!)), busybox.diffIds[0]);
  });

  test("SUPERMACHINE_IMAGE_SOURCE=docker without a daemon: a clear error", async () => {
    const saved = { ...process.env };
    process.env.SUPERMACHINE_IMAGE_SOURCE = "docker";
    process.env.DOCKER_HOST = `unix://${join(work, "no-daemon.sock")}`;
    try {
      await assert.rejects(pullImage("alpine:latest", { cacheDir: await newCache() }), (err: unknown) => {
        assert.ok(err instanceof ImageError, String(err));
        assert.match(err.message, /SUPERMACHINE_IMAGE_SOURCE=docker/);
        assert.match(err.message, /Docker daemon/);
        assert.match(err.message, /no-daemon\.sock/);
        assert.match(err.message, /unset SUPERMACHINE_IMAGE_SOURCE/);
        return true;
      });
      await assert.rejects(pullImage("alpine:latest", { cacheDir: await newCache(), source: "docker", dockerHost: "tcp://127.0.0.1:2375" }), /not a unix socket/);
    } finally {
      process.env = saved;
    }
  });

  test("the Docker daemon source (fake daemon on a unix socket): image, 404, and pullPolicy", async () => {
    const sock = join(work, "fake-docker.sock");
    const save = dockerArchiveTar({ configBytes: busybox.configBytes, layers: [busyboxLayer], repoTags: ["src/busybox:1"] });
    const seen: string[] = [];
    const daemon = http.createServer((req, res) => {
      seen.push(req.url ?? "");
      if (req.url === `/images/${encodeURIComponent("docker.io/src/busybox:1")}/get`) {
        res.writeHead(200, { "content-type": "application/x-tar" });
        res.end(save);
        return;
      }
      res.writeHead(404, { "content-type": "application/json" });
      res.end(JSON.stringify({ message: "reference does not exist" }));
    });
    await new Promise<void>((r) => daemon.listen(sock, r));
    try {
      const cacheDir = await newCache();
      const opts = { cacheDir, source: "docker" as const, dockerHost: `unix://${sock}` };
      const image = await pullImage("src/busybox:1", opts);
      assert.equal(image.ref, "docker.io/src/busybox:1");
      assert.deepEqual(essence(image), essence(fromRegistry));
      assert.equal(seen.length, 1);
      const again = await pullImage("src/busybox:1", { ...opts, pullPolicy: "never" });
      assert.equal(again.manifestDigest, image.manifestDigest);
      await pullImage("src/busybox:1", opts);
      assert.equal(seen.length, 1, "never and a cached missing do not ask the daemon");
      await pullImage("src/busybox:1", { ...opts, pullPolicy: "always" });
      assert.equal(seen.length, 2);
      await assert.rejects(pullImage("src/other:1", opts), (err: unknown) => err instanceof NotFoundError && /docker pull/.test(err.message));
    } finally {
      daemon.closeAllConnections();
      await new Promise<void>((r) => daemon.close(() => r()));
    }
  });
});
