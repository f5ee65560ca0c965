/** Manifest, index and config parsing; platform choice; layer media types. */

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { ImageError, PlatformError } from "../../src/errors.js";
import {
  formatPlatform,
  hostPlatform,
  type ImageIndex,
  layerCompression,
  MEDIA_TYPES,
  normalizePlatform,
  parseImageConfig,
  parseManifest,
  parsePlatformOption,
  pickManifest,
} from "../../src/oci/index.js";

const d = (c: string): string => `sha256:${c.repeat(64)}`;
const entry = (c: string, architecture: string, variant?: string, os = "linux") => ({
  mediaType: MEDIA_TYPES.ociManifest,
  digest: d(c),
  size: 100,
  platform: { os, architecture, ...(variant ? { variant } : {}) },
});

function index(...manifests: unknown[]): ImageIndex {
  const parsed = parseManifest(Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPES.ociIndex, manifests })));
  assert.equal(parsed.kind, "index");
  return parsed as ImageIndex;
}

describe("platforms", () => {
  test("host platform is linux/<node arch> (amd64 here, arm64 → v8)", () => {
    const p = hostPlatform();
    assert.equal(p.os, "linux");
    if (process.arch === "x64") assert.deepEqual(p, { os: "linux", architecture: "amd64" });
    if (process.arch === "arm64") assert.deepEqual(p, { os: "linux", architecture: "arm64", variant: "v8" });
  });

  test("normalisation and option parsing", () => {
    assert.deepEqual(normalizePlatform({ os: "linux", architecture: "aarch64" }), { os: "linux", architecture: "arm64", variant: "v8" });
    assert.deepEqual(normalizePlatform({ os: "linux", architecture: "x86_64" }), { os: "linux", architecture: "amd64" });
    assert.deepEqual(normalizePlatform({ os: "linux", architecture: "arm" }), { os: "linux", architecture: "arm", variant: "v7" });
    assert.deepEqual(parsePlatformOption("linux/arm64/v8"), { os: "linux", architecture: "arm64", variant: "v8" });
    assert.equal(formatPlatform(parsePlatformOption("linux/arm/6")), "linux/arm/v6");
    for (const bad of ["linux", "linux/", "a/b/c/d", "linux/amd 64"]) assert.throws(() => parsePlatformOption(bad), /Invalid option platform/);
  });

  test("pickManifest: exact variant first, arm64 without variant is v8, attestations ignored", () => {
    const idx = index(
      entry("1", "arm", "v6"),
      entry("2", "arm", "v7"),
      entry("3", "arm64"),
      entry("4", "amd64"),
      entry("5", "amd64", "v3"),
      entry("6", "unknown", undefined, "unknown"),
      entry("7", "s390x"),
    );
    assert.equal(pickManifest(idx, parsePlatformOption("linux/amd64"), "x").digest, d("4"));
    assert.equal(pickManifest(idx, parsePlatformOption("linux/amd64/v3"), "x").digest, d("5"));
    assert.equal(pickManifest(idx, parsePlatformOption("linux/amd64/v2"), "x").digest, d("4"), "a v2 host runs v1 images");
    assert.equal(pickManifest(idx, parsePlatformOption("linux/arm64/v8"), "x").digest, d("3"));
    assert.equal(pickManifest(idx, parsePlatformOption("linux/arm/v7"), "x").digest, d("2"));
    assert.equal(pickManifest(idx, parsePlatformOption("linux/arm/v6"), "x").digest, d("1"));
    assert.equal(pickManifest(index(entry("1", "arm", "v6")), parsePlatformOption("linux/arm/v7"), "x").digest, d("1"), "v7 runs v6");
  });

  test("no match: PlatformError listing what exists (without attestations)", () => {
    const idx = index(entry("1", "arm64", "v8"), entry("2", "s390x"), entry("3", "unknown", undefined, "unknown"));
    assert.throws(
      () => pickManifest(idx, parsePlatformOption("linux/amd64"), "docker.io/library/x:1"),
      (err: unknown) => {
        assert.ok(err instanceof PlatformError);
        assert.equal(err.wanted, "linux/amd64");
        assert.deepEqual(err.available, ["linux/arm64/v8", "linux/s390x"]);
        assert.match(err.message, /docker\.io\/library\/x:1/);
        assert.match(err.message, /linux\/arm64\/v8, linux\/s390x/);
        assert.match(err.message, /platform/);
        return true;
      },
    );
  });
});

describe("documents", () => {
  test("layer media types: OCI, nondistributable, Docker, foreign; unknown is a clear error", () => {
    assert.equal(layerCompression("application/vnd.oci.image.layer.v1.tar"), "tar");
    assert.equal(layerCompression("application/vnd.oci.image.layer.v1.tar+gzip"), "gzip");
    assert.equal(layerCompression("application/vnd.oci.image.layer.v1.tar+zstd"), "zstd");
    assert.equal(layerCompression("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"), "gzip");
    assert.equal(layerCompression("application/vnd.docker.image.rootfs.diff.tar.gzip"), "gzip");
    assert.equal(layerCompression("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"), "gzip");
    assert.throws(() => layerCompression("application/vnd.cncf.helm.chart.content.v1.tar+gzip"), (err: unknown) => err instanceof ImageError && /helm/.test(err.message));
  });

  test("manifest kinds from mediaType, Content-Type or shape", () => {
    const m = { schemaVersion: 2, config: { mediaType: MEDIA_TYPES.ociConfig, digest: d("c"), size: 2 }, layers: [] };
    assert.equal(parseManifest(Buffer.from(JSON.stringify(m))).kind, "manifest");
    assert.equal(parseManifest(Buffer.from(JSON.stringify({ schemaVersion: 2, manifests: [] }))).kind, "index");
    assert.equal(parseManifest(Buffer.from(JSON.stringify(m)), MEDIA_TYPES.dockerManifest).mediaType, MEDIA_TYPES.dockerManifest);
  });

  test("malformed documents are ImageErrors that say what is wrong", () => {
    const cases: Array<[unknown, RegExp]> = [
      [[], /not a JSON object/],
      [{ schemaVersion: 1 }, /schema 1/],
      [{ schemaVersion: 3 }, /schemaVersion/],
      [{ schemaVersion: 2, mediaType: MEDIA_TYPES.ociManifest, layers: [] }, /config/],
      [{ schemaVersion: 2, mediaType: MEDIA_TYPES.ociManifest, config: { mediaType: "x", digest: "sha256:../../x", size: 1 }, layers: [] }, /hex/],
      [{ schemaVersion: 2, mediaType: MEDIA_TYPES.ociManifest, config: { mediaType: "x", digest: d("a"), size: -1 }, layers: [] }, /size/],
      [{ schemaVersion: 2, mediaType: MEDIA_TYPES.ociManifest, config: { mediaType: "x", digest: d("a"), size: 1 }, layers: {} }, /layers/],
      [{ schemaVersion: 2, mediaType: "application/vnd.example+json" }, /Unsupported/],
      [{ schemaVersion: 2, mediaType: MEDIA_TYPES.ociIndex, manifests: [{ mediaType: "x", digest: d("a"), size: 1, platform: { os: 1 } }] }, /platform/],
    ];
    for (const [doc, why] of cases) {
      assert.throws(() => parseManifest(Buffer.from(JSON.stringify(doc))), (err: unknown) => err instanceof ImageError && why.test(err.message), JSON.stringify(doc));
    }
    assert.throws(() => parseManifest(Buffer.from("{")), /not JSON/);
  });

  test("image config: the fields a VM needs, with defaults", () => {
    const cfg = parseImageConfig(
      Buffer.from(
        JSON.stringify({
          architecture: "amd64",
          os: "linux",
          config: {
            Entrypoint: ["/entry"],
            Cmd: ["a", "b"],
            Env: ["A=1", "B=2"],
            WorkingDir: "/srv",
            User: "app",
            ExposedPorts: { "443/tcp": {}, "80/tcp": {} },
            Labels: { k: "v", __proto__: "x" },
            StopSignal: "SIGINT",
          },
          rootfs: { type: "layers", diff_ids: [d("1")] },
        }),
      ),
    );
    assert.deepEqual(cfg.entrypoint, ["/entry"]);
    assert.deepEqual(cfg.cmd, ["a", "b"]);
    assert.deepEqual(cfg.env, ["A=1", "B=2"]);
    assert.equal(cfg.workingDir, "/srv");
    assert.equal(cfg.user, "app");
    assert.deepEqual(cfg.exposedPorts, ["443/tcp", "80/tcp"]);
    assert.equal(cfg.labels.k, "v");
    assert.equal(Object.getPrototypeOf(cfg.labels), Object.prototype, "a __proto__ label stays a plain key");
    assert.equal(cfg.stopSignal, "SIGINT");
    assert.deepEqual(cfg.diffIds, [d("1")]);
    const empty = parseImageConfig(Buffer.from("{}"));
    assert.deepEqual([empty.entrypoint, empty.cmd, empty.env, empty.workingDir, empty.user, empty.exposedPorts], [null, null, [], "", "", []]);
    assert.throws(() => parseImageConfig(Buffer.from(JSON.stringify({ config: { Env: "A=1" } }))), /Env/);
    assert.throws(() => parseImageConfig(Buffer.from(JSON.stringify({ config: { Cmd: [1] } }))), /Cmd/);
  });
});
