/**
 * A layer blob's announced size is capped (limits.maxBlobBytes,
 * SUPERMACHINE_BLOB_MAX_BYTES) before any of its bytes are fetched.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readdirSync } from "node:fs";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { gzipSync } from "node:zlib";
import { LayerLimitError } from "../../src/errors.js";
import { pullImage } from "../../src/oci/index.js";
import { buildTar } from "../fixtures/oci/tar.js";
import { removeDir, tempDir } from "../fixtures/oci/util.js";

const sha = (b: Buffer): string => `sha256:${createHash("sha256").update(b).digest("hex")}`;

test("a layer announced larger than maxBlobBytes is refused before it is fetched", async () => {
  const tar = buildTar([{ name: "a", content: "x".repeat(10_000) }]);
  const layer = gzipSync(tar);
  const config = Buffer.from(JSON.stringify({ architecture: "amd64", os: "linux", rootfs: { type: "layers", diff_ids: [sha(tar)] } }));
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: sha(config), size: config.length },
      layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: sha(layer), size: layer.length }],
    }),
  );
  const urls: string[] = [];
  const server = http.createServer((req, res) => {
    urls.push(req.url ?? "");
    if (req.url?.includes("/manifests/")) {
      res.writeHead(200, { "content-type": "application/vnd.oci.image.manifest.v1+json", "docker-content-digest": sha(manifest) });
      res.end(req.method === "HEAD" ? undefined : manifest);
    } else if (req.url?.endsWith(sha(config))) res.end(config);
    else if (req.url?.endsWith(sha(layer))) res.end(layer);
    else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const host = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  const cacheDir = await tempDir("bloblimit");
  try {
    await assert.rejects(pullImage(`${host}/fake/img:latest`, { cacheDir, limits: { maxBlobBytes: layer.length - 1 } }), (e: unknown) => {
      assert.ok(e instanceof LayerLimitError, String(e));
      assert.equal(e.limit, "maxBlobBytes");
      assert.match(e.message, new RegExp(`layer 0 \\(${sha(layer)}\\) .* is ${layer.length} bytes, over the cap of ${layer.length - 1}`));
      assert.match(e.message, /SUPERMACHINE_BLOB_MAX_BYTES/);
      return true;
    });
    assert.ok(!urls.some((u) => u.endsWith(sha(layer))), "the layer was never requested");
    const blobs = readdirSync(join(cacheDir, "blobs", "sha256")).filter((f) => !f.startsWith("."));
    assert.ok(!blobs.includes(sha(layer).slice(7)), "nothing of the layer in the cache");
    // At the cap, the same image pulls.
    const image = await pullImage(`${host}/fake/img:latest`, { cacheDir, limits: { maxBlobBytes: layer.length } });
    assert.equal(image.layers[0]!.digest, sha(layer));
  } finally {
    server.closeAllConnections();
    await new Promise<void>((r) => server.close(() => r()));
    await removeDir(cacheDir);
  }
});
