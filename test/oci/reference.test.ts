/** Reference normalisation, table-driven, against Docker's rules. */

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { familiarName, parseDigest, parseReference } from "../../src/oci/index.js";

const D = `sha256:${"a".repeat(64)}`;

// input → [domain, registry, repository, tag, digest, canonical]
const valid: Array<[string, string, string, string, string | undefined, string | undefined, string]> = [
  ["alpine", "docker.io", "registry-1.docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest"],
  ["alpine:3.19", "docker.io", "registry-1.docker.io", "library/alpine", "3.19", undefined, "docker.io/library/alpine:3.19"],
  ["library/alpine", "docker.io", "registry-1.docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest"],
  ["user/app:v1.2_x-y", "docker.io", "registry-1.docker.io", "user/app", "v1.2_x-y", undefined, "docker.io/user/app:v1.2_x-y"],
  ["docker.io/alpine", "docker.io", "registry-1.docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest"],
  ["index.docker.io/library/alpine", "docker.io", "registry-1.docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest"],
  ["ghcr.io/owner/img:tag", "ghcr.io", "ghcr.io", "owner/img", "tag", undefined, "ghcr.io/owner/img:tag"],
  ["ghcr.io/owner/sub/deep/img", "ghcr.io", "ghcr.io", "owner/sub/deep/img", "latest", undefined, "ghcr.io/owner/sub/deep/img:latest"],
  ["localhost/app", "localhost", "localhost", "app", "latest", undefined, "localhost/app:latest"],
  ["localhost:5000/app:1", "localhost:5000", "localhost:5000", "app", "1", undefined, "localhost:5000/app:1"],
  ["127.0.0.1:5000/ns/name:tag", "127.0.0.1:5000", "127.0.0.1:5000", "ns/name", "tag", undefined, "127.0.0.1:5000/ns/name:tag"],
  ["myhost:5000/x", "myhost:5000", "myhost:5000", "x", "latest", undefined, "myhost:5000/x:latest"],
  ["[::1]:5000/x:1", "[::1]:5000", "[::1]:5000", "x", "1", undefined, "[::1]:5000/x:1"],
  ["Registry.Example.com/a/b", "Registry.Example.com", "Registry.Example.com", "a/b", "latest", undefined, "Registry.Example.com/a/b:latest"],
  ["UpperHost/app", "UpperHost", "UpperHost", "app", "latest", undefined, "UpperHost/app:latest"],
  [`alpine@${D}`, "docker.io", "registry-1.docker.io", "library/alpine", undefined, D, `docker.io/library/alpine@${D}`],
  [`ghcr.io/o/i:v1@${D}`, "ghcr.io", "ghcr.io", "o/i", "v1", D, `ghcr.io/o/i:v1@${D}`],
  ["ns/a.b-c__d", "docker.io", "registry-1.docker.io", "ns/a.b-c__d", "latest", undefined, "docker.io/ns/a.b-c__d:latest"],
  ["ns/a--b", "docker.io", "registry-1.docker.io", "ns/a--b", "latest", undefined, "docker.io/ns/a--b:latest"],
  ["ghcr.io", "docker.io", "registry-1.docker.io", "library/ghcr.io", "latest", undefined, "docker.io/library/ghcr.io:latest"],
];

const invalid: Array<[string, RegExp]> = [
  ["", /empty/],
  ["Alpine", /lowercase/],
  ["ghcr.io/Owner/img", /lowercase/],
  ["alpine:", /bad tag/],
  ["alpine:.hidden", /bad tag/],
  [`alpine:${"t".repeat(129)}`, /bad tag/],
  ["alpine@sha256:abc", /64 lower-case hex/],
  [`alpine@sha256:${"A".repeat(64)}`, /64 lower-case hex/],
  [`alpine@md5:${"a".repeat(32)}`, /Unsupported digest algorithm/],
  ["a".repeat(64), /image ID/],
  ["has space", /white space/],
  ["ns//img", /bad repository path component/],
  ["ns/-img", /bad repository path component/],
  ["ns/img_", /bad repository path component/],
  ["ns/a___b", /bad repository path component/],
  ["host:99999/x", /bad registry port/],
  ["host:0/x", /bad registry port/],
  ["-host.com/x", /bad registry host/],
  ["bad_host.example/x", /bad registry host/],
  ["ghcr.io/", /no repository name/],
  [`ns/${"a".repeat(260)}`, /longer than 255/],
];

describe("image references", () => {
  for (const [input, domain, registry, repository, tag, digest, canonical] of valid) {
    test(`parses ${JSON.stringify(input)}`, () => {
      const r = parseReference(input);
      assert.equal(r.domain, domain);
      assert.equal(r.registry, registry);
      assert.equal(r.repository, repository);
      assert.equal(r.tag, tag);
      assert.equal(r.digest, digest);
      assert.equal(r.name, `${domain}/${repository}`);
      assert.equal(r.reference, digest ?? tag);
      assert.equal(r.toString(), canonical);
      assert.equal(String(parseReference(canonical)), canonical, "canonical form is a fixed point");
    });
  }

  for (const [input, why] of invalid) {
    test(`rejects ${JSON.stringify(input.length > 40 ? `${input.slice(0, 40)}…` : input)}`, () => {
      assert.throws(
        () => parseReference(input),
        (err: unknown) => {
          assert.ok(err instanceof TypeError, String(err));
          assert.match(err.message, why);
          if (input.length > 0 && input.length < 200) assert.ok(err.message.includes(JSON.stringify(input)), `message names the reference: ${err.message}`);
          return true;
        },
      );
    });
  }

  test("rejects non-strings with a TypeError", () => {
    assert.throws(() => parseReference(42 as unknown as string), TypeError);
  });

  test("familiarName gives Docker's short form", () => {
    assert.equal(familiarName(parseReference("alpine")), "alpine:latest");
    assert.equal(familiarName(parseReference("docker.io/user/app:1")), "user/app:1");
    assert.equal(familiarName(parseReference("ghcr.io/o/i:2")), "ghcr.io/o/i:2");
  });

  test("parseDigest accepts sha256 and sha512, nothing else", () => {
    assert.equal(parseDigest(D).hex, "a".repeat(64));
    assert.equal(parseDigest(`sha512:${"b".repeat(128)}`).algorithm, "sha512");
    for (const bad of ["sha256:../../etc/passwd", `sha256:${"a".repeat(63)}`, `sha512:${"a".repeat(64)}`, "plain", 7]) {
      assert.throws(() => parseDigest(bad), TypeError);
    }
  });
});
