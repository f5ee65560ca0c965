/**
 * Registry pulls through an HTTP proxy named by HTTPS_PROXY / HTTP_PROXY /
 * NO_PROXY, against a real registry (docker-registry) and a real proxy
 * written here (node:http: CONNECT tunnels and absolute-URI forwarding) that
 * records what it carried. Loopback always goes direct, so the registry is
 * addressed by names under the reserved `.test` TLD that only the proxy
 * resolves (to 127.0.0.1): a request that reaches the registry under such a
 * name went through the proxy.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import * as http from "node:http";
import * as https from "node:https";
import * as net from "node:net";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { ProxyError, RegistryError } from "../../src/errors.js";
import { pullImage } from "../../src/oci/index.js";
import { connectTunnel, parseNoProxy, proxyFor, proxySettingsFromEnv, type ProxyRoute } from "../../src/oci/proxy.js";
import { newLayout } from "../fixtures/oci/images.js";
import type { BuiltImage } from "../fixtures/oci/layout.js";
import { buildTar } from "../fixtures/oci/tar.js";
import { removeDir, tempDir } from "../fixtures/oci/util.js";
import { freePort, pushLayout, type RegistryFixture, startRegistry } from "../fixtures/registry/registry.js";

const execFileP = promisify(execFile);

const PROXY_VARS = ["https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"];

/** Runs `fn` with exactly `vars` of the proxy variables set in process.env. */
async function withProxyEnv<T>(vars: Record<string, string>, fn: () => Promise<T>): Promise<T> {
  const saved = new Map(PROXY_VARS.map((k) => [k, process.env[k]]));
  for (const k of PROXY_VARS) delete process.env[k];
  Object.assign(process.env, vars);
  try {
    return await fn();
  } finally {
    for (const [k, v] of saved) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

interface ProxyLogEntry {
  readonly method: string;
  /** host:port for CONNECT, the absolute URI otherwise. */
  readonly target: string;
  readonly proxyAuthorization: string | undefined;
}

interface TestProxy {
  readonly url: string;
  readonly log: ProxyLogEntry[];
  /** Client connections the proxy still has open. */
  openConnections(): number;
  close(): Promise<void>;
}

/** `*.test` names resolve to 127.0.0.1 here, and only here. */
const resolveName = (host: string): string => (host.toLowerCase().endsWith(".test") ? "127.0.0.1" : host);

async function startProxy(opts: { credentials?: string } = {}): Promise<TestProxy> {
  const log: ProxyLogEntry[] = [];
  const clients = new Set<net.Socket>();
  const upstreams = new Set<net.Socket>();
  const expected = opts.credentials ? `Basic ${Buffer.from(opts.credentials).toString("base64")}` : undefined;
  const server = http.createServer((req, res) => {
    const auth = req.headers["proxy-authorization"];
    log.push({ method: req.method ?? "", target: req.url ?? "", proxyAuthorization: auth });
    if (expected !== undefined && auth !== expected) {
      res.writeHead(407, { "proxy-authenticate": 'Basic realm="test proxy"', "content-length": "0" });
      res.end();
      return;
    }
    let target: URL;
    try {
      target = new URL(req.url ?? "");
    } catch {
      res.writeHead(400).end();
      return;
    }
    const headers = { ...req.headers };
    delete headers["proxy-authorization"];
    const up = http.request({ host: resolveName(target.hostname), port: Number(target.port || 80), method: req.method, path: `${target.pathname}${target.search}`, headers }, (ur) => {
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      ur.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  server.on("connection", (s: net.Socket) => {
    clients.add(s);
    s.on("close", () => clients.delete(s));
  });
  server.on("connect", (req: http.IncomingMessage, client: net.Socket, head: Buffer) => {
    const auth = req.headers["proxy-authorization"];
    log.push({ method: "CONNECT", target: req.url ?? "", proxyAuthorization: auth });
    client.on("error", () => {});
    if (expected !== undefined && auth !== expected) {
      client.end('HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test proxy"\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    const m = /^(.+):(\d+)$/.exec(req.url ?? "");
    if (!m) {
      client.end("HTTP/1.1 400 Bad Request\r\n\r\n");
      return;
    }
    const up = net.connect(Number(m[2]), resolveName(m[1]!.replace(/^\[|\]$/g, "")), () => {
      client.write("HTTP/1.1 200 Connection Established\r\n\r\n");
      if (head.length) up.write(head);
      up.pipe(client);
      client.pipe(up);
    });
    upstreams.add(up);
    up.on("close", () => {
      upstreams.delete(up);
      client.destroy();
    });
    up.on("error", () => client.end("HTTP/1.1 502 Bad Gateway\r\n\r\n"));
    client.on("close", () => up.destroy());
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    log,
    openConnections: () => clients.size,
    close: async () => {
      for (const u of upstreams) u.destroy();
      server.closeAllConnections();
      for (const c of clients) c.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** Waits until the proxy has no client connection open (the pull closed its sockets). */
async function assertNoLeftSockets(proxy: TestProxy): Promise<void> {
  const deadline = Date.now() + 5_000;
  while (proxy.openConnections() > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.equal(proxy.openConnections(), 0, "the pull left connections to the proxy open");
}

/** A TLS front (self-signed) for the registry: an https registry on loopback. */
async function startTlsFront(dir: string, backend: string): Promise<{ port: number; requests: string[]; close(): Promise<void> }> {
  await execFileP("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2", "-subj", "/CN=secure.test", "-keyout", join(dir, "tls.key"), "-out", join(dir, "tls.crt")]);
  const requests: string[] = [];
  const [host, port] = backend.split(":") as [string, string];
  const server = https.createServer({ key: await readFile(join(dir, "tls.key")), cert: await readFile(join(dir, "tls.crt")) }, (req, res) => {
    requests.push(`${req.method} ${req.url}`);
    const up = http.request({ host, port: Number(port), method: req.method, path: req.url, headers: req.headers }, (ur) => {
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      ur.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as AddressInfo).port,
    requests,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

describe("proxy settings from the environment", () => {
  test("lower-case wins, ALL_PROXY fills in, empty counts as unset", () => {
    const s = proxySettingsFromEnv({ HTTPS_PROXY: "http://upper:1", https_proxy: "http://lower:2", HTTP_PROXY: "", ALL_PROXY: "all.example:3" });
    assert.equal(s.https?.url.host, "lower:2");
    assert.equal(s.https?.variable, "https_proxy");
    assert.equal(s.http?.url.href, "http://all.example:3/");
    assert.equal(s.http?.variable, "ALL_PROXY");
    const none = proxySettingsFromEnv({});
    assert.equal(none.https, undefined);
    assert.equal(none.http, undefined);
  });

  test("a proxy URL of another scheme fails the requests that would use it, naming the variable; loopback and NO_PROXY hosts still go direct", () => {
    const s = proxySettingsFromEnv({ HTTPS_PROXY: "socks5://user:secret@proxy.example:1080", NO_PROXY: "internal.example" });
    assert.throws(
      () => proxyFor(s, new URL("https://registry.example/v2/")),
      (e: unknown) => e instanceof ProxyError && e.variable === "HTTPS_PROXY" && /only http:\/\/ proxies/.test(e.message) && !e.message.includes("secret"),
    );
    assert.equal(proxyFor(s, new URL("https://127.0.0.1:5000/v2/")), undefined);
    assert.equal(proxyFor(s, new URL("https://internal.example/v2/")), undefined);
    const bad = proxySettingsFromEnv({ http_proxy: "http://[::1" });
    assert.throws(() => proxyFor(bad, new URL("http://registry.example/v2/")), (e: unknown) => e instanceof ProxyError && /http_proxy is not a proxy URL/.test(e.message));
  });

  test("NO_PROXY: suffixes with or without a dot, host:port, IPs, CIDR, *; loopback always direct", () => {
    const s = proxySettingsFromEnv({ HTTPS_PROXY: "http://p.example:3128", HTTP_PROXY: "http://p.example:3128", NO_PROXY: "corp.example, .internal.example ,reg.test:5000,10.0.0.0/8,192.0.2.7,[2001:db8::1]" });
    const via = (u: string): boolean => proxyFor(s, new URL(u)) !== undefined;
    assert.equal(via("https://corp.example/v2/"), false);
    assert.equal(via("https://a.b.corp.example/v2/"), false);
    assert.equal(via("https://notcorp.example/v2/"), true);
    assert.equal(via("https://internal.example/v2/"), false);
    assert.equal(via("https://x.internal.example/v2/"), false);
    assert.equal(via("https://reg.test:5000/v2/"), false);
    assert.equal(via("https://reg.test/v2/"), true, "host:port matches that port only");
    assert.equal(via("https://10.1.2.3/v2/"), false);
    assert.equal(via("https://11.1.2.3/v2/"), true);
    assert.equal(via("http://192.0.2.7:8080/v2/"), false);
    assert.equal(via("https://[2001:db8:0:0::1]/v2/"), false);
    assert.equal(via("https://127.0.0.5:5000/v2/"), false, "loopback goes direct");
    assert.equal(via("http://localhost:5000/v2/"), false);
    assert.equal(via("https://[::1]:5000/v2/"), false);
    const all = proxySettingsFromEnv({ https_proxy: "http://p.example:1", no_proxy: "*", NO_PROXY: "" });
    assert.equal(proxyFor(all, new URL("https://anything.example/")), undefined);
    assert.equal(parseNoProxy("bad:port:x, ,").length, 0);
  });
});

describe("a hostile or broken proxy answering CONNECT", () => {
  const servers: net.Server[] = [];
  after(() => {
    for (const s of servers) s.close();
  });
  const rawProxy = async (answer: (sock: net.Socket) => void): Promise<ProxyRoute> => {
    const server = net.createServer((sock) => {
      sock.on("error", () => {});
      sock.once("data", () => answer(sock));
    });
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    return { url: new URL(`http://127.0.0.1:${(server.address() as AddressInfo).port}`), variable: "HTTPS_PROXY" };
  };

  test("an endless header is cut at 16 KiB", async () => {
    const route = await rawProxy((sock) => {
      sock.write("HTTP/1.1 200 OK\r\n");
      const line = `X-Junk: ${"a".repeat(1000)}\r\n`;
      const timer = setInterval(() => (sock.destroyed ? clearInterval(timer) : sock.write(line)), 1);
      sock.on("close", () => clearInterval(timer));
    });
    await assert.rejects(connectTunnel(route, "reg.test", 443, 10_000), (e: unknown) => e instanceof ProxyError && /16384 bytes/.test(e.message) && /HTTPS_PROXY/.test(e.message));
  });

  test("a reply that is not HTTP is refused", async () => {
    const route = await rawProxy((sock) => sock.end("SSH-2.0-OpenSSH\r\n\r\n"));
    await assert.rejects(connectTunnel(route, "reg.test", 443, 10_000), (e: unknown) => e instanceof ProxyError && /not an HTTP\/1\.x status line/.test(e.message));
  });

  test("a 403 names the variable and the target", async () => {
    const route = await rawProxy((sock) => sock.end("HTTP/1.1 403 Forbidden\r\n\r\n"));
    await assert.rejects(connectTunnel(route, "reg.test", 443, 10_000), (e: unknown) => e instanceof ProxyError && e.status === 403 && /reg\.test:443/.test(e.message) && /HTTPS_PROXY/.test(e.message));
  });

  test("a silent proxy times out", async () => {
    const route = await rawProxy(() => {});
    await assert.rejects(connectTunnel(route, "reg.test", 443, 300), (e: unknown) => e instanceof ProxyError && /ETIMEDOUT/.test(e.message));
  });
});

describe("pullImage through a proxy (real registry)", () => {
  let reg: RegistryFixture;
  let work: string;
  let image: BuiltImage;
  let regPort: string;
  const caches: string[] = [];
  const newCache = async (): Promise<string> => {
    const d = await tempDir("proxy-cache");
    caches.push(d);
    return d;
  };

  before(async () => {
    work = await tempDir("proxy");
    reg = await startRegistry();
    regPort = reg.host.split(":")[1]!;
    const layout = await newLayout(join(work, "layout"));
    image = await layout.addImage({ layers: [{ tar: buildTar([{ name: "hello.txt", content: "through the proxy\n".repeat(2000) }]) }] });
    layout.tag(image.manifest, "tiny");
    await layout.save();
    await pushLayout(reg, layout.dir, "tiny", "test/tiny:1");
  });

  after(async () => {
    await reg?.stop();
    for (const c of caches) await removeDir(c);
    if (work) await removeDir(work);
  });

  test("an https registry through HTTPS_PROXY: CONNECT tunnels with Proxy-Authorization, TLS end to end", async () => {
    const proxy = await startProxy({ credentials: "alice:s3cr:t" });
    const front = await startTlsFront(work, reg.host);
    try {
      const secure = `secure.test:${front.port}`;
      const proxyUrl = proxy.url.replace("http://", "http://alice:s3cr%3At@");
      const pulled = await withProxyEnv({ HTTPS_PROXY: proxyUrl }, async () => pullImage(`${secure}/test/tiny:1`, { cacheDir: await newCache(), insecureRegistries: [secure], retries: 0 }));
      assert.equal(pulled.layers[0]?.digest, image.layers[0]!.digest);
      assert.ok(proxy.log.length > 0, "the proxy saw nothing");
      for (const e of proxy.log) {
        assert.equal(e.method, "CONNECT");
        assert.equal(e.target, secure);
        assert.equal(e.proxyAuthorization, `Basic ${Buffer.from("alice:s3cr:t").toString("base64")}`);
      }
      assert.ok(front.requests.some((r) => r.startsWith("GET /v2/test/tiny/blobs/")), `the registry got no blob request through the tunnel: ${front.requests.join(", ")}`);
      await assertNoLeftSockets(proxy);
    } finally {
      await front.close();
      await proxy.close();
    }
  });

  test("an http registry through http_proxy (lower-case wins over HTTP_PROXY): absolute-URI requests", async () => {
    const proxy = await startProxy();
    const dead = `http://127.0.0.1:${await freePort()}`;
    try {
      const name = `registry.test:${regPort}`;
      reg.resetCounts();
      const pulled = await withProxyEnv({ http_proxy: proxy.url, HTTP_PROXY: dead, https_proxy: proxy.url }, async () =>
        pullImage(`${name}/test/tiny:1`, { cacheDir: await newCache(), insecureRegistries: [name], retries: 0 }),
      );
      assert.equal(pulled.layers[0]?.digest, image.layers[0]!.digest);
      const forwarded = proxy.log.filter((e) => e.method !== "CONNECT").map((e) => e.target);
      assert.ok(forwarded.includes(`http://${name}/v2/test/tiny/manifests/1`), `proxy log: ${forwarded.join(", ")}`);
      assert.ok(forwarded.some((t) => t.startsWith(`http://${name}/v2/test/tiny/blobs/${image.layers[0]!.digest}`)));
      assert.ok(reg.requests.length >= forwarded.length, "the registry did not get what the proxy forwarded");
      await assertNoLeftSockets(proxy);
    } finally {
      await proxy.close();
    }
  });

  test("NO_PROXY sends a matching host direct: the proxy sees nothing", async () => {
    const proxy = await startProxy();
    try {
      const name = `registry.test:${regPort}`;
      // Direct, `registry.test` does not resolve: the failure proves the bypass.
      await assert.rejects(
        withProxyEnv({ HTTPS_PROXY: proxy.url, HTTP_PROXY: proxy.url, NO_PROXY: "example.com,.test" }, async () =>
          pullImage(`${name}/test/tiny:1`, { cacheDir: await newCache(), insecureRegistries: [name], retries: 0 }),
        ),
        (e: unknown) => e instanceof RegistryError && /ENOTFOUND|EAI_AGAIN/.test(e.message),
      );
      // Loopback always goes direct, and works.
      const pulled = await withProxyEnv({ HTTPS_PROXY: proxy.url, HTTP_PROXY: proxy.url }, async () => pullImage(`${reg.host}/test/tiny:1`, { cacheDir: await newCache(), retries: 0 }));
      assert.equal(pulled.layers[0]?.digest, image.layers[0]!.digest);
      assert.deepEqual(proxy.log, []);
    } finally {
      await proxy.close();
    }
  });

  test("a proxy answering 407 gives ProxyError naming HTTPS_PROXY (CONNECT) or HTTP_PROXY (forwarding)", async () => {
    const proxy = await startProxy({ credentials: "alice:right" });
    try {
      const name = `registry.test:${regPort}`;
      const pull = (vars: Record<string, string>): Promise<unknown> =>
        withProxyEnv(vars, async () => pullImage(`${name}/test/tiny:1`, { cacheDir: await newCache(), insecureRegistries: [name], retries: 2 }));
      await assert.rejects(pull({ HTTPS_PROXY: proxy.url }), (e: unknown) => {
        assert.ok(e instanceof ProxyError, String(e));
        assert.equal(e.code, "ERR_SM_PROXY");
        assert.equal(e.status, 407);
        assert.equal(e.variable, "HTTPS_PROXY");
        assert.match(e.message, /407 Proxy Authentication Required/);
        assert.match(e.message, /put them in HTTPS_PROXY/);
        return true;
      });
      const wrong = proxy.url.replace("http://", "http://alice:wrong@");
      await assert.rejects(pull({ HTTPS_PROXY: wrong }), (e: unknown) => e instanceof ProxyError && /credentials in HTTPS_PROXY were refused/.test(e.message) && !e.message.includes("wrong"));
      // An http registry: HTTPS goes direct (and fails: the name does not resolve), HTTP through the proxy.
      await assert.rejects(pull({ HTTP_PROXY: proxy.url }), (e: unknown) => e instanceof ProxyError && e.variable === "HTTP_PROXY" && e.status === 407 && /HTTP_PROXY/.test(e.message));
      const connects = proxy.log.filter((e) => e.method === "CONNECT").length;
      assert.equal(connects, 2, "a 407 is not retried");
      await assertNoLeftSockets(proxy);
    } finally {
      await proxy.close();
    }
  });

  test("an unreachable proxy gives ProxyError naming the variable, leaving nothing open", async () => {
    const port = await freePort();
    const name = `registry.test:${regPort}`;
    await assert.rejects(
      withProxyEnv({ https_proxy: `http://user:pw@127.0.0.1:${port}` }, async () => pullImage(`${name}/test/tiny:1`, { cacheDir: await newCache(), insecureRegistries: [name], retries: 0 })),
      (e: unknown) => {
        assert.ok(e instanceof ProxyError, String(e));
        assert.equal(e.variable, "https_proxy");
        assert.match(e.message, /ECONNREFUSED/);
        assert.match(e.message, /Check https_proxy/);
        assert.ok(!e.message.includes("pw"), "credentials leaked into the message");
        return true;
      },
    );
    await assert.rejects(
      withProxyEnv({ HTTP_PROXY: `http://127.0.0.1:${port}` }, async () => pullImage(`${name}/test/tiny:1`, { cacheDir: await newCache(), insecureRegistries: [name], retries: 0 })),
      (e: unknown) => e instanceof ProxyError && e.variable === "HTTP_PROXY" && /ECONNREFUSED/.test(e.message),
    );
  });

  test("redirects are routed per hop: a direct registry's blob redirect to a proxied host goes through the proxy", async () => {
    const proxy = await startProxy();
    // Blob storage under a .test name (only the proxy resolves it): the real registry's blobs.
    const storage = http.createServer((req, res) => {
      const up = http.request({ host: "127.0.0.1", port: Number(regPort), method: req.method, path: req.url, headers: { ...req.headers, host: reg.host } }, (ur) => {
        res.writeHead(ur.statusCode ?? 502, ur.headers);
        ur.pipe(res);
      });
      up.on("error", () => res.destroy());
      up.end();
    });
    await new Promise<void>((r) => storage.listen(0, "127.0.0.1", r));
    const storageHost = `blobs.test:${(storage.address() as AddressInfo).port}`;
    // The registry, direct on loopback, redirecting every blob GET to that storage.
    const front = http.createServer((req, res) => {
      if (req.method === "GET" && /\/blobs\/sha256:/.test(req.url ?? "")) {
        res.writeHead(307, { location: `http://${storageHost}${req.url}` });
        res.end();
        return;
      }
      const up = http.request({ host: "127.0.0.1", port: Number(regPort), method: req.method, path: req.url, headers: req.headers }, (ur) => {
        res.writeHead(ur.statusCode ?? 502, ur.headers);
        ur.pipe(res);
      });
      up.on("error", () => res.destroy());
      req.pipe(up);
    });
    await new Promise<void>((r) => front.listen(0, "127.0.0.1", r));
    try {
      const frontHost = `127.0.0.1:${(front.address() as AddressInfo).port}`;
      const pulled = await withProxyEnv({ HTTP_PROXY: proxy.url, NO_PROXY: "example.com" }, async () =>
        pullImage(`${frontHost}/test/tiny:1`, { cacheDir: await newCache(), insecureRegistries: [storageHost], retries: 0 }),
      );
      assert.equal(pulled.layers[0]?.digest, image.layers[0]!.digest);
      const targets = proxy.log.map((e) => e.target);
      assert.ok(targets.length >= 2, `proxy log: ${targets.join(", ")}`);
      for (const t of targets) assert.ok(t.startsWith(`http://${storageHost}/v2/test/tiny/blobs/`), `only the redirected blob hops go through the proxy, not ${t}`);
      await assertNoLeftSockets(proxy);
    } finally {
      front.closeAllConnections();
      storage.closeAllConnections();
      await new Promise<void>((r) => front.close(() => r()));
      await new Promise<void>((r) => storage.close(() => r()));
      await proxy.close();
    }
  });
});
