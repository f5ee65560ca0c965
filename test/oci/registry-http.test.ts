/**
 * The registry client's HTTP behaviour against small fake servers: retries
 * (503/429/500, connection resets with Range resume), redirects that must
 * not carry Authorization to another host, bounds on hostile responses,
 * timeouts, refused connections, and hostile token/manifests documents.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import * as http from "node:http";
import * as https from "node:https";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { gzipSync } from "node:zlib";
import { AuthError, DigestMismatchError, ImageError, RegistryError } from "../../src/errors.js";
import { clearTokenCache, parseReference, pullImage, RegistryClient } from "../../src/oci/index.js";
import { buildTar } from "../fixtures/oci/tar.js";
import { readAll, removeDir, tempDir } from "../fixtures/oci/util.js";
import { freePort } from "../fixtures/registry/registry.js";
import { blobFor, serveManifest } from "../fixtures/registry/fake-serve.js";

const sha = (b: Buffer): string => `sha256:${createHash("sha256").update(b).digest("hex")}`;

interface Fake {
  host: string;
  log: Array<{ method: string; url: string; headers: http.IncomingHttpHeaders }>;
  close(): Promise<void>;
}

const servers: Fake[] = [];
after(async () => {
  for (const s of servers) await s.close();
});

async function fake(handler: (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void): Promise<Fake> {
  const log: Fake["log"] = [];
  const server = http.createServer((req, res) => {
    log.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers });
    handler(req, res, log.length);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const f: Fake = {
    host: `127.0.0.1:${(server.address() as AddressInfo).port}`,
    log,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
  servers.push(f);
  return f;
}

/** A one-image registry: manifest under "latest", config and layer blobs. */
function tinyImage(opts: { layerMediaType?: string; urls?: string[] } = {}) {
  const tar = buildTar([{ name: "hello.txt", content: "hello\n".repeat(5000) }]);
  const layer = gzipSync(tar);
  const config = Buffer.from(JSON.stringify({ architecture: "amd64", os: "linux", config: { Cmd: ["/hello"] }, rootfs: { type: "layers", diff_ids: [sha(tar)] } }));
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: sha(config), size: config.length },
      layers: [{ mediaType: opts.layerMediaType ?? "application/vnd.oci.image.layer.v1.tar+gzip", digest: sha(layer), size: layer.length, ...(opts.urls ? { urls: opts.urls } : {}) }],
    }),
  );
  const blobs = new Map([
    [sha(config), config],
    [sha(layer), layer],
  ]);
  return { tar, layer, config, manifest, blobs };
}

function serveImage(img: ReturnType<typeof tinyImage>, req: http.IncomingMessage, res: http.ServerResponse): void {
  if (serveManifest(req, res, img.manifest)) return;
  const blob = blobFor(req, img.blobs);
  if (!blob) {
    res.writeHead(404, { "content-type": "application/json" });
    res.end(JSON.stringify({ errors: [{ code: "BLOB_UNKNOWN", message: "blob unknown" }] }));
    return;
  }
  const range = /^bytes=(\d+)-$/.exec(String(req.headers.range ?? ""));
  if (range) {
    const start = Number(range[1]);
    res.writeHead(206, { "content-range": `bytes ${start}-${blob.length - 1}/${blob.length}`, "content-length": blob.length - start });
    res.end(blob.subarray(start));
    return;
  }
  res.writeHead(200, { "content-length": blob.length });
  res.end(blob);
}

const ref = (host: string, repo = "fake/img:latest") => parseReference(`${host}/${repo}`);

describe("registry client over HTTP", () => {
  test("503, 503, then 200: retried with backoff", async () => {
    const img = tinyImage();
    const srv = await fake((req, res, n) => {
      if (n <= 2) {
        res.writeHead(503);
        res.end();
        return;
      }
      serveImage(img, req, res);
    });
    const client = new RegistryClient({ retryBaseMs: 10 });
    try {
      const m = await client.getManifest(ref(srv.host), "latest");
      assert.equal(m.digest, sha(img.manifest));
      assert.equal(srv.log.length, 3);
    } finally {
      client.close();
    }
  });

  test("429 with Retry-After is honoured", async () => {
    const img = tinyImage();
    const srv = await fake((req, res, n) => {
      if (n === 1) {
        res.writeHead(429, { "retry-after": "0" });
        res.end();
        return;
      }
      serveImage(img, req, res);
    });
    const client = new RegistryClient({ retryBaseMs: 10 });
    try {
      assert.equal((await client.getManifest(ref(srv.host), "latest")).digest, sha(img.manifest));
      assert.equal(srv.log.length, 2);
    } finally {
      client.close();
    }
  });

  test("500 forever: a bounded number of attempts, then RegistryError with the status", async () => {
    const srv = await fake((_req, res) => {
      res.writeHead(500, { "content-type": "application/json" });
      res.end(JSON.stringify({ errors: [{ code: "UNKNOWN", message: "storage on fire" }] }));
    });
    const client = new RegistryClient({ retries: 2, retryBaseMs: 5 });
    try {
      await assert.rejects(client.getManifest(ref(srv.host), "latest"), (err: unknown) => {
        assert.ok(err instanceof RegistryError);
        assert.equal(err.status, 500);
        assert.match(err.message, /storage on fire/);
        return true;
      });
      assert.equal(srv.log.length, 3);
    } finally {
      client.close();
    }
  });

  test("a connection reset mid-blob resumes with a Range request", async () => {
    const img = tinyImage();
    let cut = false;
    const srv = await fake((req, res) => {
      if (!cut && req.url?.includes(sha(img.layer))) {
        cut = true;
        res.writeHead(200, { "content-length": img.layer.length });
        res.write(img.layer.subarray(0, Math.floor(img.layer.length / 2)), () => setTimeout(() => req.socket.destroy(), 20));
        return;
      }
      serveImage(img, req, res);
    });
    const cacheDir = await tempDir("resume");
    try {
      const image = await pullImage(`${srv.host}/fake/img:latest`, { cacheDir, retries: 3 });
      assert.deepEqual(await readAll((await import("../../src/oci/index.js")).openLayer(image.layers[0]!)), img.tar);
      const layerGets = srv.log.filter((r) => r.url.includes(sha(img.layer)));
      assert.equal(layerGets.length, 2);
      assert.match(String(layerGets[1]!.headers.range), /^bytes=\d+-$/);
      assert.notEqual(layerGets[1]!.headers.range, "bytes=0-");
    } finally {
      await removeDir(cacheDir);
    }
  });

  test("redirects: Authorization goes to the same origin only", async () => {
    const img = tinyImage();
    const storage = await fake((_req, res) => {
      res.writeHead(200);
      res.end(img.layer);
    });
    const auth = `Basic ${Buffer.from("u:p").toString("base64")}`;
    const reg = await fake((req, res) => {
      if (req.headers.authorization !== auth) {
        res.writeHead(401, { "www-authenticate": 'Basic realm="fake"' });
        res.end();
        return;
      }
      if (req.url === `/v2/fake/img/blobs/${sha(img.layer)}`) {
        res.writeHead(307, { location: `http://${storage.host}/bucket/${sha(img.layer)}?sig=abc` });
        res.end();
        return;
      }
      if (req.url === `/v2/fake/img/blobs/${sha(img.config)}`) {
        res.writeHead(302, { location: `/v2/fake/img/blobs/elsewhere` });
        res.end();
        return;
      }
      if (req.url === "/v2/fake/img/blobs/elsewhere") {
        res.writeHead(200);
        res.end(img.config);
        return;
      }
      serveImage(img, req, res);
    });
    const client = new RegistryClient({ credentials: () => ({ username: "u", password: "p" }) });
    try {
      const r = await client.getBlob(ref(reg.host), sha(img.layer));
      assert.deepEqual(await readAll(r.body), img.layer);
      assert.equal(storage.log.length, 1);
      assert.equal(storage.log[0]!.headers.authorization, undefined, "no Authorization to another host");
      const c = await client.getBlob(ref(reg.host), sha(img.config));
      assert.deepEqual(await readAll(c.body), img.config);
      assert.equal(reg.log.at(-1)!.url, "/v2/fake/img/blobs/elsewhere");
      assert.equal(reg.log.at(-1)!.headers.authorization, auth, "same-origin redirect keeps Authorization");
    } finally {
      client.close();
    }
  });

  test("hostile responses are bounded: a huge manifest, a wrong Docker-Content-Digest", async () => {
    const huge = Buffer.alloc(5 * 1024 * 1024, 0x20);
    const srv = await fake((req, res) => {
      if (req.url?.endsWith("/huge")) {
        res.writeHead(200, { "content-type": "application/vnd.oci.image.manifest.v1+json" });
        res.end(huge);
        return;
      }
      res.writeHead(200, { "content-type": "application/vnd.oci.image.manifest.v1+json", "docker-content-digest": sha(Buffer.from("other")) });
      res.end("{}");
    });
    const client = new RegistryClient();
    try {
      await assert.rejects(client.getManifest(ref(srv.host), "huge"), (err: unknown) => err instanceof RegistryError && /larger than/.test(err.message));
      await assert.rejects(client.getManifest(ref(srv.host), "liar"), DigestMismatchError);
    } finally {
      client.close();
    }
  });

  test("a server that never answers times out (timeoutMs)", async () => {
    const srv = await fake(() => {
      /* never answer */
    });
    const client = new RegistryClient({ timeoutMs: 200, retries: 0 });
    try {
      const started = Date.now();
      await assert.rejects(client.getManifest(ref(srv.host), "latest"), (err: unknown) => err instanceof RegistryError && /ETIMEDOUT/.test(err.message));
      assert.ok(Date.now() - started < 3000);
    } finally {
      client.close();
    }
  });

  test("a refused connection is 'unreachable' with host and ECONNREFUSED", async () => {
    const port = await freePort();
    const client = new RegistryClient();
    try {
      await assert.rejects(client.getManifest(ref(`127.0.0.1:${port}`), "latest"), (err: unknown) => {
        assert.ok(err instanceof RegistryError);
        assert.match(err.message, new RegExp(`127\\.0\\.0\\.1:${port} is unreachable \\(ECONNREFUSED\\)`));
        return true;
      });
    } finally {
      client.close();
    }
  });

  test("plain HTTP only for loopback and insecureRegistries", () => {
    const client = new RegistryClient({ insecureRegistries: ["10.1.2.3:5000", "myreg.local"] });
    try {
      assert.equal(client.allowHttp("127.0.0.1:5000"), true);
      assert.equal(client.allowHttp("127.8.9.10"), true);
      assert.equal(client.allowHttp("localhost:5000"), true);
      assert.equal(client.allowHttp("[::1]:5000"), true);
      assert.equal(client.allowHttp("10.1.2.3:5000"), true);
      assert.equal(client.allowHttp("myreg.local:443"), true);
      assert.equal(client.allowHttp("10.1.2.3:5001"), false);
      assert.equal(client.allowHttp("registry.example.com"), false);
      assert.equal(client.allowHttp("128.0.0.1"), false);
    } finally {
      client.close();
    }
  });

  test("hostile token servers: non-JSON, header-injecting token, 401 with credentials", async () => {
    clearTokenCache();
    let mode = "";
    const tokens = await fake((_req, res) => {
      if (mode === "garbage") {
        res.writeHead(200);
        res.end("<html>");
      } else if (mode === "crlf") {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify({ token: "abc\r\nX-Evil: 1" }));
      } else {
        res.writeHead(401);
        res.end("nope");
      }
    });
    const reg = await fake((_req, res) => {
      res.writeHead(401, { "www-authenticate": `Bearer realm="http://${tokens.host}/token",service="fake"` });
      res.end();
    });
    for (const m of ["garbage", "crlf"]) {
      mode = m;
      clearTokenCache();
      const client = new RegistryClient();
      try {
        await assert.rejects(client.getManifest(ref(reg.host), "latest"), (err: unknown) => err instanceof RegistryError && /token/.test(err.message));
      } finally {
        client.close();
      }
    }
    mode = "deny";
    clearTokenCache();
    const client = new RegistryClient({ credentials: () => ({ username: "u", password: "p" }) });
    try {
      await assert.rejects(client.getManifest(ref(reg.host), "latest"), (err: unknown) => err instanceof AuthError && err.credentialSource === "credentials option");
    } finally {
      client.close();
    }
  });

  test("hostile documents: schema 1, unknown layer media type, non-JSON manifest", async () => {
    const cacheDir = await tempDir("hostile");
    try {
      const schema1 = await fake((_req, res) => {
        res.writeHead(200, { "content-type": "application/vnd.docker.distribution.manifest.v1+prettyjws" });
        res.end(JSON.stringify({ schemaVersion: 1, name: "x", tag: "latest", fsLayers: [] }));
      });
      await assert.rejects(pullImage(`${schema1.host}/fake/img:latest`, { cacheDir }), (err: unknown) => err instanceof ImageError && /schema 1/.test(err.message));
      const odd = tinyImage({ layerMediaType: "application/vnd.example.weird" });
      const weird = await fake((req, res) => serveImage(odd, req, res));
      await assert.rejects(pullImage(`${weird.host}/fake/img:latest`, { cacheDir }), (err: unknown) => err instanceof ImageError && /Unsupported layer media type "application\/vnd\.example\.weird"/.test(err.message));
      const junk = await fake((_req, res) => {
        res.writeHead(200, { "content-type": "application/vnd.oci.image.manifest.v1+json" });
        res.end("not json at all");
      });
      await assert.rejects(pullImage(`${junk.host}/fake/img:latest`, { cacheDir }), (err: unknown) => err instanceof ImageError && /not JSON/.test(err.message));
    } finally {
      await removeDir(cacheDir);
    }
  });
  test("a body that stalls times out (inactivity) and the download resumes", async () => {
    const img = tinyImage();
    const half = Math.floor(img.layer.length / 2);
    let stalled = false;
    const srv = await fake((req, res) => {
      if (!stalled && req.url?.includes(sha(img.layer))) {
        stalled = true;
        res.writeHead(200, { "content-length": img.layer.length });
        res.write(img.layer.subarray(0, half)); // …and then nothing
        return;
      }
      serveImage(img, req, res);
    });
    const cacheDir = await tempDir("stall");
    try {
      const image = await pullImage(`${srv.host}/fake/img:latest`, { cacheDir, timeoutMs: 300, retries: 2 });
      assert.equal(image.layers[0]!.digest, sha(img.layer));
      const gets = srv.log.filter((r) => r.url.includes(sha(img.layer)));
      assert.equal(gets.length, 2, JSON.stringify(srv.log.map((r) => [r.method, r.url, r.headers.range])));
      assert.equal(gets[1]!.headers.range, `bytes=${half}-`);
    } finally {
      await removeDir(cacheDir);
    }
  });

  test("identitytoken: OAuth2 refresh-token POST to the realm", async () => {
    clearTokenCache();
    const img = tinyImage();
    const forms: URLSearchParams[] = [];
    const tokens = await fake((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const form = new URLSearchParams(Buffer.concat(chunks).toString());
        forms.push(form);
        if (req.method !== "POST" || form.get("grant_type") !== "refresh_token" || form.get("refresh_token") !== "rt-123") {
          res.writeHead(401);
          res.end();
          return;
        }
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify({ access_token: "oauth-token", expires_in: 300 }));
      });
    });
    const reg = await fake((req, res) => {
      if (req.headers.authorization !== "Bearer oauth-token") {
        res.writeHead(401, { "www-authenticate": `Bearer realm="http://${tokens.host}/oauth",service="fake-svc"` });
        res.end();
        return;
      }
      serveImage(img, req, res);
    });
    const client = new RegistryClient({ credentials: () => ({ identityToken: "rt-123" }) });
    try {
      assert.equal((await client.getManifest(ref(reg.host), "latest")).digest, sha(img.manifest));
      assert.equal(forms.length, 1);
      assert.equal(forms[0]!.get("service"), "fake-svc");
      assert.equal(forms[0]!.get("scope"), "repository:fake/img:pull");
    } finally {
      client.close();
    }
  });

  test("a loopback registry with a self-signed TLS certificate is used over HTTPS", async () => {
    const dir = await tempDir("tls");
    try {
      execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", `${dir}/k.pem`, "-out", `${dir}/c.pem`], { stdio: "ignore" });
      const img = tinyImage();
      const seen: string[] = [];
      const server = https.createServer({ key: readFileSync(`${dir}/k.pem`), cert: readFileSync(`${dir}/c.pem`) }, (req, res) => {
        seen.push(req.url ?? "");
        serveImage(img, req, res);
      });
      await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
      try {
        const port = (server.address() as AddressInfo).port;
        const image = await pullImage(`127.0.0.1:${port}/fake/img:latest`, { cacheDir: join(dir, "cache") });
        assert.equal(image.layers[0]!.digest, sha(img.layer));
        assert.ok(seen.length >= 3, "served over TLS");
      } finally {
        server.closeAllConnections();
        await new Promise<void>((r) => server.close(() => r()));
      }
    } finally {
      await removeDir(dir);
    }
  });

  test("foreign layers missing from the registry come from their urls", async () => {
    const storage = await fake((_req, res) => {
      res.writeHead(200);
      res.end(foreign.layer);
    });
    const foreign = tinyImage({ layerMediaType: "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", urls: [`http://${storage.host}/layers/one.tar.gz`] });
    const reg = await fake((req, res) => {
      if (req.url?.includes(sha(foreign.layer))) {
        res.writeHead(404);
        res.end();
        return;
      }
      serveImage(foreign, req, res);
    });
    const cacheDir = await tempDir("foreign");
    try {
      const image = await pullImage(`${reg.host}/fake/img:latest`, { cacheDir });
      assert.deepEqual(await readAll((await import("../../src/oci/index.js")).openLayer(image.layers[0]!)), foreign.tar);
      assert.deepEqual(storage.log.map((r) => r.url), ["/layers/one.tar.gz"]);
    } finally {
      await removeDir(cacheDir);
    }
  });
});
