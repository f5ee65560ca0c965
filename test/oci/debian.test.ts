/**
 * A realistic image: Debian bookworm + python3 (mmdebstrap, ≈50 MB
 * compressed, cached in the test cache between runs), pushed to a real
 * registry and pulled back; the decompressed layer must hash to its diff_id.
 */

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { openLayer, type PullProgress, pullImage } from "../../src/oci/index.js";
import { TarIndex } from "../../src/oci/tarindex.js";
import { debianPythonTar, newLayout } from "../fixtures/oci/images.js";
import type { BuiltImage } from "../fixtures/oci/layout.js";
import { removeDir, streamDigest, tempDir } from "../fixtures/oci/util.js";
import { pushLayout, type RegistryFixture, startRegistry } from "../fixtures/registry/registry.js";

describe("Debian + python3 image through a real registry", { timeout: 15 * 60_000 }, () => {
  let reg: RegistryFixture;
  let work: string;
  let image: BuiltImage;
  let tarPath: string;

  before(async () => {
    work = await tempDir("debian");
    tarPath = await debianPythonTar();
    reg = await startRegistry();
    const layout = await newLayout(join(work, "layout"));
    image = await layout.addImage({
      layers: [{ tar: await readFile(tarPath) }],
      config: { config: { Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], Cmd: ["python3"] } },
    });
    layout.tag(image.manifest, "bookworm");
    await layout.save();
    await pushLayout(reg, layout.dir, "bookworm", "debian/python:bookworm");
  });

  after(async () => {
    await reg?.stop();
    if (work) await removeDir(work);
  });

  test("the root filesystem has python3", async () => {
    const index = await TarIndex.open(tarPath, "mmdebstrap output");
    const python = index.get("usr/bin/python3");
    assert.ok(python && python.size > 1_000_000, "usr/bin/python3 resolves to the interpreter");
  });

  test("pull, verify, decompress; a second pull is all cache", async () => {
    const cacheDir = await tempDir("debian-cache");
    try {
      const events: PullProgress[] = [];
      const pulled = await pullImage(`${reg.host}/debian/python:bookworm`, { cacheDir, onProgress: (e) => events.push(e) });
      assert.equal(pulled.layers.length, 1);
      assert.equal(pulled.layers[0]!.digest, image.layers[0]!.digest);
      assert.ok(pulled.layers[0]!.size > 10_000_000);
      assert.deepEqual(pulled.config.cmd, ["python3"]);
      assert.ok(events.length > 2, "progress while downloading");
      assert.equal(events.at(-1)!.bytesDone, pulled.layers[0]!.size);
      assert.equal(await streamDigest(openLayer(pulled.layers[0]!)), image.diffIds[0]);
      reg.resetCounts();
      await pullImage(`${reg.host}/debian/python:bookworm`, { cacheDir });
      assert.equal(reg.totalRequests(), 0);
    } finally {
      await removeDir(cacheDir);
    }
  });
});
