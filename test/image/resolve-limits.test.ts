/**
 * The whole image path (source → cache → rootfs build) under a layer bomb:
 * a LayerLimitError, and nothing left in the rootfs cache (no image, no
 * spool, no temp file, no lock). No VM needed.
 */

import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { LayerLimitError } from "../../src/errors.js";
import { resolveImage } from "../../src/image/resolve.js";
import { header } from "../fixtures/rootfs/tar-writer.js";
import { newLayout } from "../fixtures/oci/images.js";
import { removeDir, tempDir } from "../fixtures/oci/util.js";

const MiB = 1 << 20;

for (const compression of ["gzip", "zstd"] as const) {
  test(`a ${compression} layer expanding past limits.maxBytes: LayerLimitError, nothing left in the rootfs cache`, async () => {
    const dir = await tempDir("resolve-bomb");
    try {
      const size = 64 * MiB;
      const bomb = Buffer.concat([header({ name: "zeros", size }), Buffer.alloc(size), Buffer.alloc(1024)]);
      const layout = await newLayout(join(dir, "layout"));
      const img = await layout.addImage({ layers: [{ tar: bomb, compression }] });
      layout.tag(img.manifest, "bomb");
      await layout.save();
      assert.ok(img.layers[0]!.size < MiB, "a small blob");
      const cacheDir = join(dir, "cache");
      await assert.rejects(resolveImage(`oci:${join(dir, "layout")}:bomb`, { cacheDir, limits: { maxBytes: 8 * MiB } }), (e: unknown) => {
        assert.ok(e instanceof LayerLimitError, String(e));
        assert.equal(e.limit, "maxBytes");
        assert.equal(e.layer, 0);
        return true;
      });
      const rootfsDir = join(cacheDir, "rootfs");
      assert.deepEqual(existsSync(rootfsDir) ? readdirSync(rootfsDir) : [], [], "no image, spool, temp file or lock left");
      // The same image builds once the cap allows it.
      const ok = await resolveImage(`oci:${join(dir, "layout")}:bomb`, { cacheDir, limits: { maxBytes: 65 * MiB } });
      assert.ok(existsSync(ok.rootfsImage));
    } finally {
      await removeDir(dir);
    }
  });
}
