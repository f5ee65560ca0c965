/**
 * Authentication against real registries: HTTP Basic (htpasswd) and Bearer
 * tokens (a token server trusted by the registry), with credentials from a
 * config.json in a temp DOCKER_CONFIG and from a fake docker-credential-*
 * helper on PATH; plus unit tests of config parsing and challenge parsing.
 */

import assert from "node:assert/strict";
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, beforeEach, describe, test } from "node:test";
import { AuthError } from "../../src/errors.js";
import {
  clearTokenCache,
  dockerConfigDir,
  loadDockerConfig,
  normalizeAuthKey,
  parseWwwAuthenticate,
  pullImage,
  resolveCredentials,
} from "../../src/oci/index.js";
import { Authenticator, containersAuthPath, loadContainersAuth } from "../../src/oci/auth.js";
import { BUSYBOX_CONFIG, busyboxTar, newLayout } from "../fixtures/oci/images.js";
import type { BuiltImage } from "../fixtures/oci/layout.js";
import { removeDir, tempDir } from "../fixtures/oci/util.js";
import { pushLayout, type RegistryFixture, startRegistry } from "../fixtures/registry/registry.js";

const b64 = (s: string): string => Buffer.from(s).toString("base64");

async function writeConfig(dir: string, config: unknown): Promise<string> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, "config.json"), JSON.stringify(config));
  return dir;
}

/**
 * A fake docker-credential-<name> in `binDir`: answers `get` for `host` with
 * alice's credentials, "credentials not found" otherwise, and logs its
 * argv and stdin to `<binDir>/<name>.log`.
 */
async function fakeHelper(binDir: string, name: string, host: string, user: string, secret: string): Promise<string> {
  await mkdir(binDir, { recursive: true });
  const path = join(binDir, `docker-credential-${name}`);
  const log = join(binDir, `${name}.log`);
  await writeFile(
    path,
    `#!/bin/sh
IFS= read -r url || true
echo "$1 $url" >> '${log}'
if [ "$1" = "get" ] && [ "$url" = '${host}' ]; then
  printf '{"ServerURL":"%s","Username":"${user}","Secret":"${secret}"}\\n' "$url"
  exit 0
fi
echo "credentials not found in native keychain"
exit 1
`,
  );
  await chmod(path, 0o755);
  return log;
}

describe("registry auth: config parsing and challenges", () => {
  test("normalizeAuthKey: schemes, paths and Docker Hub aliases", () => {
    const table: Array<[string, string]> = [
      ["https://index.docker.io/v1/", "docker.io"],
      ["index.docker.io", "docker.io"],
      ["docker.io", "docker.io"],
      ["registry-1.docker.io", "docker.io"],
      ["http://127.0.0.1:5000/v2/", "127.0.0.1:5000"],
      ["GHCR.io", "ghcr.io"],
      ["https://quay.io", "quay.io"],
    ];
    for (const [input, want] of table) assert.equal(normalizeAuthKey(input), want, input);
  });

  test("dockerConfigDir honours DOCKER_CONFIG, else ~/.docker", () => {
    assert.equal(dockerConfigDir({ DOCKER_CONFIG: "/x/y" }), "/x/y");
    assert.equal(dockerConfigDir({ HOME: "/home/u" }), "/home/u/.docker");
  });

  test("loadDockerConfig: auth, username/password, identitytoken; Hub aliases match each other", async () => {
    const dir = await tempDir("dockercfg");
    try {
      await writeConfig(dir, {
        auths: {
          "https://index.docker.io/v1/": { auth: b64("hubuser:hub:pass") },
          "reg.example:5000": { username: "u2", password: "p2" },
          "https://tok.example": { identitytoken: "refresh-me" },
          "empty.example": {},
        },
        credHelpers: { "helped.example": "fake", "bad.example": "../evil" },
        credsStore: "desktop",
      });
      const cfg = await loadDockerConfig(dir);
      assert.equal(cfg.path, join(dir, "config.json"));
      assert.deepEqual(cfg.auths.get("docker.io")?.credentials, { username: "hubuser", password: "hub:pass" });
      assert.deepEqual(cfg.auths.get("reg.example:5000")?.credentials, { username: "u2", password: "p2" });
      assert.deepEqual(cfg.auths.get("tok.example")?.credentials, { identityToken: "refresh-me" });
      assert.equal(cfg.auths.has("empty.example"), false);
      assert.equal(cfg.credHelpers.get("helped.example"), "fake");
      assert.equal(cfg.credHelpers.has("bad.example"), false, "helper names with path characters are ignored");
      assert.equal(cfg.credsStore, "desktop");
      for (const alias of ["docker.io", "index.docker.io", "registry-1.docker.io"]) {
        const r = await resolveCredentials(alias, { ...cfg, credsStore: undefined });
        assert.deepEqual(r.credentials, { username: "hubuser", password: "hub:pass" }, alias);
        assert.match(r.source, /config\.json auths/);
      }
      const none = await resolveCredentials("other.example", { ...cfg, credsStore: undefined });
      assert.equal(none.credentials, undefined);
      assert.match(none.source, /^none/);
    } finally {
      await removeDir(dir);
    }
  });

  test("podman's auth.json: read when Docker's config has nothing for a registry, named as the source", async () => {
    const dir = await tempDir("podmanauth");
    try {
      const podmanFile = join(dir, "auth.json");
      await writeFile(podmanFile, JSON.stringify({ auths: { "pod.example:5000": { auth: b64("podder:secret") } } }));
      const cfg = await loadContainersAuth(podmanFile);
      assert.deepEqual(cfg.auths.get("pod.example:5000")?.credentials, { username: "podder", password: "secret" });
      assert.equal(containersAuthPath({ REGISTRY_AUTH_FILE: podmanFile }), podmanFile);
      assert.equal(containersAuthPath({ HOME: "/home/u" }), "/home/u/.config/containers/auth.json");
      const dockerDir = join(dir, "docker");
      await writeConfig(dockerDir, { auths: { "docker-only.example": { username: "d", password: "p" } } });
      const transport = { send: () => Promise.reject(new Error("no token server here")), allowHttp: () => true };
      const a = new Authenticator(transport, { dockerConfigDir: dockerDir, containersAuthFile: podmanFile });
      const pod = await a.credentialsFor("pod.example:5000", "pod.example:5000");
      assert.deepEqual(pod.credentials, { username: "podder", password: "secret" });
      assert.match(pod.source, /auth\.json auths/);
      const docker = await a.credentialsFor("docker-only.example", "docker-only.example");
      assert.deepEqual(docker.credentials, { username: "d", password: "p" }, "Docker's config comes first");
      const none = await a.credentialsFor("nobody.example", "nobody.example");
      assert.equal(none.credentials, undefined);
      // With only a Docker config dir given, podman's file is not read (tests and explicit configs stay isolated).
      const isolated = new Authenticator(transport, { dockerConfigDir: dockerDir });
      assert.equal((await isolated.credentialsFor("pod.example:5000", "pod.example:5000")).credentials, undefined);
    } finally {
      await removeDir(dir);
    }
  });

  test("loadDockerConfig: a missing file is empty, a malformed one is a TypeError naming it", async () => {
    const dir = await tempDir("dockercfg");
    try {
      const empty = await loadDockerConfig(join(dir, "nope"));
      assert.equal(empty.path, undefined);
      assert.equal(empty.auths.size, 0);
      await writeFile(join(dir, "config.json"), "{not json");
      await assert.rejects(loadDockerConfig(dir), (err: unknown) => err instanceof TypeError && err.message.includes(join(dir, "config.json")));
      await writeFile(join(dir, "config.json"), JSON.stringify({ auths: { x: { auth: b64("no-colon") } } }));
      await assert.rejects(loadDockerConfig(dir), TypeError);
    } finally {
      await removeDir(dir);
    }
  });

  test("parseWwwAuthenticate: Bearer params, quoting, several challenges", () => {
    assert.deepEqual(parseWwwAuthenticate('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:library/alpine:pull"'), [
      { scheme: "bearer", params: { realm: "https://auth.example/token", service: "registry.example", scope: "repository:library/alpine:pull" } },
    ]);
    assert.deepEqual(parseWwwAuthenticate('Basic realm="Registry Realm"'), [{ scheme: "basic", params: { realm: "Registry Realm" } }]);
    assert.deepEqual(parseWwwAuthenticate('Bearer realm="a\\"b", error="insufficient_scope", Basic realm=x'), [
      { scheme: "bearer", params: { realm: 'a"b', error: "insufficient_scope" } },
      { scheme: "basic", params: { realm: "x" } },
    ]);
    assert.deepEqual(parseWwwAuthenticate(""), []);
  });
});

async function buildAndPush(reg: RegistryFixture, work: string): Promise<BuiltImage> {
  const layout = await newLayout(join(work, "layout"));
  const image = await layout.addImage({ layers: [{ tar: busyboxTar() }], config: BUSYBOX_CONFIG });
  layout.tag(image.manifest, "busybox");
  await layout.save();
  await pushLayout(reg, layout.dir, "busybox", "private/busybox:1");
  return image;
}

for (const mode of ["htpasswd", "token"] as const) {
  describe(`registry auth: ${mode}`, () => {
    let reg: RegistryFixture;
    let work: string;
    let image: BuiltImage;
    let ref: string;
    const savedPath = process.env.PATH;

    before(async () => {
      work = await tempDir(`auth-${mode}`);
      reg = await startRegistry({ auth: mode, users: { alice: "wonderland" } });
      image = await buildAndPush(reg, work);
      ref = `${reg.host}/private/busybox:1`;
    });
    after(async () => {
      process.env.PATH = savedPath;
      await reg?.stop();
      if (work) await removeDir(work);
    });
    beforeEach(() => {
      clearTokenCache();
      reg.resetCounts();
    });

    const pull = async (configDir: string) => {
      const cacheDir = await tempDir("authcache");
      try {
        return await pullImage(ref, { cacheDir, dockerConfigDir: configDir, pullPolicy: "always" });
      } finally {
        await removeDir(cacheDir);
      }
    };

    test("credentials from config.json auths (base64 auth) succeed", async () => {
      const cfg = await writeConfig(join(work, "cfg-auth"), { auths: { [reg.host]: { auth: b64("alice:wonderland") } } });
      const pulled = await pull(cfg);
      assert.equal(pulled.manifestDigest, image.manifest.digest);
      if (mode === "token") {
        assert.equal(reg.tokenRequests.length, 1, "one token for the whole pull");
        assert.match(reg.tokenRequests[0]!.url, /scope=repository%3Aprivate%2Fbusybox%3Apull/);
        assert.match(reg.tokenRequests[0]!.authorization ?? "", /^Basic /);
      } else {
        assert.ok(reg.requests.filter((r) => r.authorization?.startsWith("Basic ")).length >= 3);
      }
    });

    test("DOCKER_CONFIG in the environment is where config.json is read", async () => {
      const cfg = await writeConfig(join(work, "cfg-env"), { auths: { [reg.host]: { auth: b64("alice:wonderland") } } });
      const saved = process.env.DOCKER_CONFIG;
      process.env.DOCKER_CONFIG = cfg;
      const cacheDir = await tempDir("authcache");
      try {
        const pulled = await pullImage(ref, { cacheDir, pullPolicy: "always" });
        assert.equal(pulled.manifestDigest, image.manifest.digest);
      } finally {
        if (saved === undefined) delete process.env.DOCKER_CONFIG;
        else process.env.DOCKER_CONFIG = saved;
        await removeDir(cacheDir);
      }
    });

    test("username/password entry under an https:// key succeeds", async () => {
      const cfg = await writeConfig(join(work, "cfg-userpass"), { auths: { [`https://${reg.host}`]: { username: "alice", password: "wonderland" } } });
      assert.equal((await pull(cfg)).manifestDigest, image.manifest.digest);
    });

    test("no credentials: AuthError naming the registry and that none were found", async () => {
      const cfg = join(work, "cfg-none");
      await mkdir(cfg, { recursive: true });
      await assert.rejects(pull(cfg), (err: unknown) => {
        assert.ok(err instanceof AuthError, String(err));
        assert.equal(err.registry, reg.host);
        assert.match(err.credentialSource, /^none/);
        assert.match(err.message, new RegExp(reg.host.replace(/\./g, "\\.")));
        assert.match(err.message, /docker login/);
        return true;
      });
    });

    test("wrong password: AuthError naming the config.json entry that was tried", async () => {
      const cfg = await writeConfig(join(work, "cfg-wrong"), { auths: { [reg.host]: { auth: b64("alice:wrong") } } });
      await assert.rejects(pull(cfg), (err: unknown) => {
        assert.ok(err instanceof AuthError, String(err));
        assert.match(err.credentialSource, /config\.json auths/);
        assert.match(err.message, /config\.json/);
        return true;
      });
    });

    test("credential helper from credHelpers (fake docker-credential-* on PATH)", async () => {
      const bin = join(work, "bin");
      const log = await fakeHelper(bin, "smtest", reg.host, "alice", "wonderland");
      process.env.PATH = `${bin}:${savedPath}`;
      const cfg = await writeConfig(join(work, "cfg-helper"), { credHelpers: { [reg.host]: "smtest" } });
      assert.equal((await pull(cfg)).manifestDigest, image.manifest.digest);
      assert.match(await readFile(log, "utf8"), new RegExp(`^get ${reg.host.replace(/\./g, "\\.")}$`, "m"));
    });

    test("credsStore default helper, and a helper that has nothing means anonymous (clear error)", async () => {
      const bin = join(work, "bin2");
      await fakeHelper(bin, "store", reg.host, "alice", "wonderland");
      await fakeHelper(bin, "empty", "no-such-host", "x", "y");
      process.env.PATH = `${bin}:${savedPath}`;
      const good = await writeConfig(join(work, "cfg-store"), { credsStore: "store" });
      assert.equal((await pull(good)).manifestDigest, image.manifest.digest);
      clearTokenCache();
      const empty = await writeConfig(join(work, "cfg-empty-helper"), { credsStore: "empty" });
      await assert.rejects(pull(empty), (err: unknown) => {
        assert.ok(err instanceof AuthError, String(err));
        assert.match(err.credentialSource, /docker-credential-empty has none/);
        return true;
      });
      const missing = await writeConfig(join(work, "cfg-missing-helper"), { credHelpers: { [reg.host]: "not-installed" } });
      await assert.rejects(pull(missing), (err: unknown) => err instanceof AuthError && /docker-credential-not-installed not found on PATH/.test(err.credentialSource));
    });

    if (mode === "token") {
      test("tokens are cached per registry and scope and reused across pulls", async () => {
        const cfg = await writeConfig(join(work, "cfg-cache"), { auths: { [reg.host]: { auth: b64("alice:wonderland") } } });
        const cacheDir = await tempDir("authcache");
        try {
          await pullImage(ref, { cacheDir, dockerConfigDir: cfg, pullPolicy: "always" });
          await pullImage(ref, { cacheDir, dockerConfigDir: cfg, pullPolicy: "always" });
          assert.equal(reg.tokenRequests.length, 1, "the second pull reused the token");
          const unauthorized = reg.requests.filter((r) => r.authorization === undefined);
          assert.equal(unauthorized.length, 1, "only the very first request went without a token");
        } finally {
          await removeDir(cacheDir);
        }
      });

      test("anonymous token without pull access: AuthError", async () => {
        const cfg = join(work, "cfg-anon");
        await mkdir(cfg, { recursive: true });
        await assert.rejects(pull(cfg), AuthError);
        assert.equal(reg.tokenRequests.length, 1);
        assert.equal(reg.tokenRequests[0]!.authorization, undefined, "no credentials sent when there are none");
      });
    }
  });
}
