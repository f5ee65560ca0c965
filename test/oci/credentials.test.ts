/**
 * Registry credentials never reach another host: a redirect target that
 * answers 401 gets none (Basic or Bearer), a POST body (refresh token) is
 * never re-sent to another origin, foreign layer URLs off loopback and
 * redirects to plain HTTP off loopback are refused. Loopback fake servers;
 * a second server on another port is another origin.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { after, describe, test } from "node:test";
import { AuthError, RegistryError } from "../../src/errors.js";
import { clearTokenCache, parseReference, RegistryClient } from "../../src/oci/index.js";

const sha = (b: Buffer): string => `sha256:${createHash("sha256").update(b).digest("hex")}`;

interface Fake {
  host: string;
  log: Array<{ method: string; url: string; headers: http.IncomingHttpHeaders; body: string }>;
  close(): Promise<void>;
}

const servers: Fake[] = [];
after(async () => {
  for (const s of servers) await s.close();
});

async function fake(handler: (req: http.IncomingMessage, res: http.ServerResponse) => void): Promise<Fake> {
  const log: Fake["log"] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      log.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers, body: Buffer.concat(chunks).toString() });
      handler(req, res);
    });
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

const blob = Buffer.from("layer bytes");
const ref = (host: string) => parseReference(`${host}/fake/img:latest`);
const BASIC = `Basic ${Buffer.from("user:secret").toString("base64")}`;

/** A registry wanting Basic credentials that redirects blob GETs to `target`. */
async function redirectingRegistry(target: () => string, status = 307): Promise<Fake> {
  return fake((req, res) => {
    if (req.headers.authorization !== BASIC) {
      res.writeHead(401, { "www-authenticate": 'Basic realm="registry"' });
      res.end();
      return;
    }
    res.writeHead(status, { location: target() });
    res.end();
  });
}

function noSecretIn(f: Fake): void {
  for (const r of f.log) {
    assert.equal(r.headers.authorization, undefined, `no Authorization sent to ${f.host}`);
    assert.ok(!JSON.stringify(r).includes("secret") && !JSON.stringify(r).includes("rt-123"), `no credential in any request to ${f.host}`);
  }
}

describe("registry credentials stay with the registry", () => {
  test("redirect-then-401 (Basic) from a foreign origin: no credentials are sent there", async () => {
    const storage = await fake((_req, res) => {
      res.writeHead(401, { "www-authenticate": 'Basic realm="storage"' });
      res.end();
    });
    const reg = await redirectingRegistry(() => `http://${storage.host}/bucket/blob?sig=1`);
    const client = new RegistryClient({ credentials: () => ({ username: "user", password: "secret" }), retryBaseMs: 1 });
    try {
      await assert.rejects(client.getBlob(ref(reg.host), sha(blob)), (e: unknown) => {
        assert.ok(e instanceof AuthError, String(e));
        assert.match(e.message, new RegExp(`redirected to http://${storage.host}.*never to another host`));
        return true;
      });
      assert.equal(storage.log.length, 1, "the foreign host is asked once, and not again with credentials");
      noSecretIn(storage);
      assert.ok(reg.log.some((r) => r.headers.authorization === BASIC), "the registry itself did get its credentials");
    } finally {
      client.close();
    }
  });

  test("redirect-then-401 (Bearer) from a foreign origin: its token realm is never contacted", async () => {
    clearTokenCache();
    const realm = await fake((_req, res) => {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ token: "stolen" }));
    });
    const storage = await fake((_req, res) => {
      res.writeHead(401, { "www-authenticate": `Bearer realm="http://${realm.host}/token",service="evil"` });
      res.end();
    });
    const reg = await redirectingRegistry(() => `http://${storage.host}/blob`, 302);
    const client = new RegistryClient({ credentials: () => ({ username: "user", password: "secret" }), retryBaseMs: 1 });
    try {
      await assert.rejects(client.getBlob(ref(reg.host), sha(blob)), AuthError);
      assert.equal(realm.log.length, 0, "the foreign realm got nothing");
      noSecretIn(storage);
    } finally {
      client.close();
    }
  });

  test("a refresh-token POST is never re-sent to another origin on a redirect", async () => {
    clearTokenCache();
    const elsewhere = await fake((_req, res) => {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ access_token: "t" }));
    });
    const tokens = await fake((_req, res) => {
      res.writeHead(307, { location: `http://${elsewhere.host}/oauth` });
      res.end();
    });
    const reg = await fake((req, res) => {
      res.writeHead(401, { "www-authenticate": `Bearer realm="http://${tokens.host}/oauth",service="svc"` });
      res.end();
    });
    const client = new RegistryClient({ credentials: () => ({ identityToken: "rt-123" }), retryBaseMs: 1 });
    try {
      await assert.rejects(client.getManifest(ref(reg.host), "latest"), (e: unknown) => {
        assert.ok(e instanceof RegistryError || e instanceof AuthError, String(e));
        assert.match(String((e as Error).message) + String((e as Error).cause), /re-send a POST body to another origin/);
        return true;
      });
      assert.equal(tokens.log.length, 1);
      assert.match(tokens.log[0]!.body, /refresh_token=rt-123/, "the realm itself got the refresh token");
      assert.equal(elsewhere.log.length, 0, "the redirect target got no request at all");
    } finally {
      client.close();
    }
  });

  test("a same-origin 307 of the refresh-token POST keeps working", async () => {
    clearTokenCache();
    const tokens = await fake((req, res) => {
      if (req.url === "/oauth") {
        res.writeHead(307, { location: "/oauth2" });
        res.end();
        return;
      }
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ access_token: "good", expires_in: 300 }));
    });
    const reg = await fake((req, res) => {
      if (req.headers.authorization !== "Bearer good") {
        res.writeHead(401, { "www-authenticate": `Bearer realm="http://${tokens.host}/oauth",service="svc"` });
        res.end();
        return;
      }
      res.writeHead(404);
      res.end();
    });
    const client = new RegistryClient({ credentials: () => ({ identityToken: "rt-123" }), retryBaseMs: 1 });
    try {
      await assert.rejects(client.getManifest(ref(reg.host), "latest"), /404|not found/i);
      assert.deepEqual(tokens.log.map((r) => r.url), ["/oauth", "/oauth2"]);
      assert.match(tokens.log[1]!.body, /refresh_token=rt-123/);
    } finally {
      client.close();
    }
  });

  test("foreign layer URLs off loopback are refused without a request", async () => {
    const client = new RegistryClient();
    try {
      for (const u of ["https://192.0.2.10/layers/x.tar.gz", "http://192.0.2.10/layers/x.tar.gz"]) {
        await assert.rejects(client.getUrl(new URL(u)), (e: unknown) => {
          assert.ok(e instanceof RegistryError, String(e));
          assert.match(e.message, /Refusing to fetch a foreign layer from .*only fetched from the image's registry/);
          return true;
        });
      }
      assert.equal(client.requests, 0);
    } finally {
      client.close();
    }
  });

  test("a redirect to plain HTTP off loopback is refused, even from a plain-HTTP registry", async () => {
    const reg = await fake((_req, res) => {
      res.writeHead(302, { location: "http://192.0.2.10:9/blob" });
      res.end();
    });
    const client = new RegistryClient({ retryBaseMs: 1 });
    try {
      await assert.rejects(client.getBlob(ref(reg.host), sha(blob)), (e: unknown) => {
        assert.ok(e instanceof RegistryError, String(e));
        assert.match(e.message, /refusing redirect to plain http \(192\.0\.2\.10:9\)/);
        return true;
      });
    } finally {
      client.close();
    }
  });
});
