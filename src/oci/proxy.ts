/**
 * HTTP proxies for registry pulls, configured the way curl reads them:
 * `https_proxy`/`HTTPS_PROXY` for https targets, `http_proxy`/`HTTP_PROXY`
 * for http targets, `all_proxy`/`ALL_PROXY` for both when the specific one is
 * unset, and `no_proxy`/`NO_PROXY` for the hosts that go direct. The
 * lower-case form wins when both are set; an empty value counts as unset.
 *
 * https targets go through a CONNECT tunnel (TLS end to end: the proxy sees
 * only host:port); http targets are sent to the proxy as absolute-URI
 * requests, as curl and Go do. Proxy credentials come from the proxy URL
 * (`http://user:password@proxy:3128`, percent-encoded) and are sent as
 * `Proxy-Authorization: Basic`. Loopback targets (localhost, 127.0.0.0/8,
 * ::1) always go direct.
 *
 * The proxy is trusted no more than the registry: its answer to CONNECT is
 * read up to {@link MAX_PROXY_HEADER_BYTES}, with the request's inactivity
 * timeout.
 */

import * as net from "node:net";
import { ProxyError } from "../errors.js";
import { isLoopbackHost } from "./http.js";
import { ipToNumber, parseIpv4Address } from "../net/wire/ipv4.js";

/** Largest answer to CONNECT (status line and headers) read from a proxy. */
export const MAX_PROXY_HEADER_BYTES = 16 * 1024;

/** A proxy chosen for one target. */
export interface ProxyRoute {
  /** The proxy URL, credentials included (never print it: see {@link redactedProxy}). */
  readonly url: URL;
  /** The environment variable it came from, e.g. "HTTPS_PROXY" or "https_proxy". */
  readonly variable: string;
  /**
   * Set when the variable holds no usable proxy (a socks5:// URL, garbage):
   * thrown only when a request would go through it, so that loopback and
   * NO_PROXY hosts still work.
   */
  readonly error?: ProxyError;
}

/** One NO_PROXY entry, parsed. */
type NoProxyRule =
  | { readonly kind: "all" }
  | { readonly kind: "domain"; readonly domain: string; readonly port: number | undefined }
  | { readonly kind: "ip"; readonly address: string; readonly port: number | undefined }
  | { readonly kind: "cidr4"; readonly base: number; readonly bits: number };

/** Proxy settings read once from an environment. */
export interface ProxySettings {
  readonly https: ProxyRoute | undefined;
  readonly http: ProxyRoute | undefined;
  readonly noProxy: readonly NoProxyRule[];
}

type Env = Readonly<Record<string, string | undefined>>;

/** The first of `names` set to a non-empty value in `env`, lower-case form first. */
function pick(env: Env, name: string): { value: string; variable: string } | undefined {
  for (const variable of [name.toLowerCase(), name.toUpperCase()]) {
    const value = env[variable]?.trim();
    if (value) return { value, variable };
  }
  return undefined;
}

function parseProxyUrl(value: string, variable: string): ProxyRoute {
  let url: URL;
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(value) ? value : `http://${value}`);
  } catch {
    const error = new ProxyError(`${variable} is not a proxy URL (${JSON.stringify(redactedString(value))}); set it to http://[user:password@]host:port`, redactedString(value), variable);
    return { url: new URL("http://invalid.invalid"), variable, error };
  }
  if (url.protocol !== "http:") {
    const error = new ProxyError(
      `${variable} names a ${url.protocol.replace(/:$/, "")} proxy (${redactedProxy(url)}); only http:// proxies are supported (https targets are tunnelled with CONNECT through them): set ${variable} to http://host:port, or list the registry in NO_PROXY`,
      redactedProxy(url),
      variable,
    );
    return { url, variable, error };
  }
  if (url.hostname === "") {
    return { url, variable, error: new ProxyError(`${variable} has no host (${redactedProxy(url)}); set it to http://host:port`, redactedProxy(url), variable) };
  }
  return { url, variable };
}

function parsePort(text: string): number | undefined {
  if (!/^\d{1,5}$/.test(text)) return undefined;
  const n = Number(text);
  return n > 0 && n < 65536 ? n : undefined;
}

function ipv4ToInt(text: string): number | undefined {
  const a = parseIpv4Address(text);
  return a === undefined ? undefined : ipToNumber(a);
}

/** Parses NO_PROXY: a comma (or space) separated list; unparsable entries are skipped. */
export function parseNoProxy(value: string): NoProxyRule[] {
  const rules: NoProxyRule[] = [];
  for (const raw of value.split(/[,\s]+/)) {
    let entry = raw.trim().toLowerCase();
    if (entry === "") continue;
    if (entry === "*") {
      rules.push({ kind: "all" });
      continue;
    }
    const slash = entry.indexOf("/");
    if (slash >= 0) {
      const base = ipv4ToInt(entry.slice(0, slash));
      const bits = Number(entry.slice(slash + 1));
      if (base !== undefined && Number.isInteger(bits) && bits >= 0 && bits <= 32) rules.push({ kind: "cidr4", base, bits });
      continue;
    }
    let port: number | undefined;
    if (entry.startsWith("[")) {
      const close = entry.indexOf("]");
      if (close < 0) continue;
      const rest = entry.slice(close + 1);
      if (rest.startsWith(":")) port = parsePort(rest.slice(1));
      entry = entry.slice(1, close);
    } else if (!net.isIPv6(entry)) {
      const colon = entry.lastIndexOf(":");
      if (colon >= 0) {
        port = parsePort(entry.slice(colon + 1));
        if (port === undefined) continue;
        entry = entry.slice(0, colon);
      }
    }
    if (net.isIP(entry)) {
      rules.push({ kind: "ip", address: net.isIPv6(entry) ? normalizeIpv6(entry) : entry, port });
      continue;
    }
    const domain = entry.replace(/^\*?\.+/, "");
    if (domain !== "") rules.push({ kind: "domain", domain, port });
  }
  return rules;
}

function normalizeIpv6(address: string): string {
  // URL's serialiser gives the canonical (compressed, lower-case) form.
  try {
    return new URL(`http://[${address}]/`).hostname.slice(1, -1);
  } catch {
    return address;
  }
}

/** Reads the proxy variables of `env` (a proxy URL we cannot use fails the requests that would use it). */
export function proxySettingsFromEnv(env: Env = process.env): ProxySettings {
  const all = pick(env, "all_proxy");
  const https = pick(env, "https_proxy") ?? all;
  const http = pick(env, "http_proxy") ?? all;
  const noProxy = pick(env, "no_proxy");
  return {
    https: https ? parseProxyUrl(https.value, https.variable) : undefined,
    http: http ? parseProxyUrl(http.value, http.variable) : undefined,
    noProxy: noProxy ? parseNoProxy(noProxy.value) : [],
  };
}

/** Does a NO_PROXY rule (or loopback) send `target` direct? */
export function bypassesProxy(noProxy: readonly NoProxyRule[], target: URL): boolean {
  if (isLoopbackHost(target.host)) return true;
  let host = target.hostname.toLowerCase();
  if (host.startsWith("[")) host = normalizeIpv6(host.slice(1, -1));
  host = host.replace(/\.$/, "");
  const port = Number(target.port || (target.protocol === "https:" ? 443 : 80));
  const v4 = ipv4ToInt(host);
  for (const rule of noProxy) {
    switch (rule.kind) {
      case "all":
        return true;
      case "cidr4":
        if (v4 !== undefined) {
          const mask = rule.bits === 0 ? 0 : (~0 << (32 - rule.bits)) >>> 0;
          if (((v4 & mask) >>> 0) === ((rule.base & mask) >>> 0)) return true;
        }
        break;
      case "ip":
        if (host === rule.address && (rule.port === undefined || rule.port === port)) return true;
        break;
      case "domain":
        if ((host === rule.domain || host.endsWith(`.${rule.domain}`)) && (rule.port === undefined || rule.port === port)) return true;
        break;
    }
  }
  return false;
}

/**
 * The proxy to use for `target`, or undefined for a direct connection.
 * Throws the ProxyError of a variable that holds no usable proxy.
 */
export function proxyFor(settings: ProxySettings, target: URL): ProxyRoute | undefined {
  const route = target.protocol === "https:" ? settings.https : target.protocol === "http:" ? settings.http : undefined;
  if (route === undefined || bypassesProxy(settings.noProxy, target)) return undefined;
  if (route.error) throw route.error;
  return route;
}

/** The proxy URL without credentials, for messages. */
export function redactedProxy(url: URL): string {
  const copy = new URL(url.href);
  if (copy.username || copy.password) {
    copy.username = "***";
    copy.password = "";
  }
  return copy.href.replace(/\/$/, "");
}

function redactedString(value: string): string {
  return value.replace(/\/\/[^/@]*@/, "//***@").slice(0, 200);
}

/** `Proxy-Authorization` for the credentials in the proxy URL, if any. */
export function proxyAuthorization(url: URL): string | undefined {
  if (!url.username && !url.password) return undefined;
  let user: string;
  let password: string;
  try {
    user = decodeURIComponent(url.username);
    password = decodeURIComponent(url.password);
  } catch {
    user = url.username;
    password = url.password;
  }
  return `Basic ${Buffer.from(`${user}:${password}`).toString("base64")}`;
}

/** host:port for a CONNECT request line (brackets around IPv6). */
function authority(host: string, port: number): string {
  const h = host.startsWith("[") ? host : host.includes(":") ? `[${host}]` : host;
  return `${h}:${port}`;
}

function hint407(route: ProxyRoute, hadCredentials: boolean): string {
  return hadCredentials
    ? `the credentials in ${route.variable} were refused: fix the user and password in ${route.variable} (http://user:password@host:port, percent-encoded)`
    : `it wants credentials: put them in ${route.variable} as http://user:password@host:port (percent-encoded)`;
}

/** The ProxyError for a proxy's refusal (status line `statusLine`). */
export function proxyRefused(route: ProxyRoute, target: string, status: number, statusLine: string): ProxyError {
  const had = proxyAuthorization(route.url) !== undefined;
  const why = status === 407 ? hint407(route, had) : `check ${route.variable}, or list ${target.replace(/:\d+$/, "")} in NO_PROXY to go direct`;
  return new ProxyError(
    `Proxy ${redactedProxy(route.url)} (from ${route.variable}) refused ${target}: ${JSON.stringify(statusLine.slice(0, 200))}; ${why}.`,
    redactedProxy(route.url),
    route.variable,
    status,
  );
}

/** The ProxyError for a proxy that could not be reached or dropped the tunnel. */
export function proxyUnreachable(route: ProxyRoute, err: NodeJS.ErrnoException | Error): ProxyError {
  const code = (err as NodeJS.ErrnoException).code ?? "error";
  return new ProxyError(
    `Proxy ${redactedProxy(route.url)} (from ${route.variable}) could not be used (${code}): ${err.message}. ` +
      `Check ${route.variable} (is the proxy running at that host:port?), or unset it or list the registry in NO_PROXY to connect directly.`,
    redactedProxy(route.url),
    route.variable,
    undefined,
    { cause: err },
  );
}

/**
 * Opens a TCP tunnel to `host:port` through the proxy of `route`
 * (`CONNECT host:port HTTP/1.1`). Resolves with the raw socket once the proxy
 * answered 2xx; rejects with ProxyError on a refusal, an oversized or
 * malformed answer, or when the proxy cannot be reached. `timeoutMs` bounds
 * the connect and each wait for the proxy's bytes.
 */
export function connectTunnel(route: ProxyRoute, host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<net.Socket> {
  const target = authority(host, port);
  const proxyHost = route.url.hostname.replace(/^\[|\]$/g, "");
  const proxyPort = Number(route.url.port || 80);
  return new Promise<net.Socket>((resolve, reject) => {
    const sock = net.connect({ host: proxyHost, port: proxyPort });
    let buffered = Buffer.alloc(0);
    let done = false;
    const finish = (err: Error | undefined): void => {
      if (done) return;
      done = true;
      sock.off("data", onData);
      sock.pause();
      sock.off("error", onError);
      sock.off("close", onClose);
      sock.off("timeout", onTimeout);
      signal?.removeEventListener("abort", onAbort);
      sock.setTimeout(0);
      if (err) {
        sock.destroy();
        reject(err);
      } else {
        resolve(sock);
      }
    };
    const onError = (err: Error): void => finish(proxyUnreachable(route, err));
    const onClose = (): void => finish(proxyUnreachable(route, Object.assign(new Error(`the proxy closed the connection before answering CONNECT ${target}`), { code: "ECONNRESET" })));
    const onTimeout = (): void => finish(proxyUnreachable(route, Object.assign(new Error(`no answer to CONNECT ${target} for ${timeoutMs} ms`), { code: "ETIMEDOUT" })));
    const onAbort = (): void => finish(signal?.reason instanceof Error ? signal.reason : new Error("aborted"));
    const onData = (chunk: Buffer): void => {
      buffered = Buffer.concat([buffered, chunk]);
      const end = buffered.indexOf("\r\n\r\n");
      if (end < 0) {
        if (buffered.length > MAX_PROXY_HEADER_BYTES) {
          finish(proxyUnreachable(route, Object.assign(new Error(`its answer to CONNECT ${target} passed ${MAX_PROXY_HEADER_BYTES} bytes without ending`), { code: "EPROXYHEADER" })));
        }
        return;
      }
      if (end > MAX_PROXY_HEADER_BYTES) {
        finish(proxyUnreachable(route, Object.assign(new Error(`its answer to CONNECT ${target} is larger than ${MAX_PROXY_HEADER_BYTES} bytes`), { code: "EPROXYHEADER" })));
        return;
      }
      const head = buffered.subarray(0, end).toString("latin1");
      const statusLine = head.split("\r\n", 1)[0] ?? "";
      const m = /^HTTP\/1\.[01] (\d{3})(?: .*)?$/.exec(statusLine);
      if (!m) {
        // eslint-disable-next-line no-control-regex
        const shown = statusLine.replace(/[\u0000-\u001f\u007f-\uffff]/g, "?").slice(0, 100);
        finish(proxyUnreachable(route, Object.assign(new Error(`it answered CONNECT ${target} with ${JSON.stringify(shown)}, not an HTTP/1.x status line`), { code: "EPROXYHEADER" })));
        return;
      }
      const status = Number(m[1]);
      if (status < 200 || status > 299) {
        // eslint-disable-next-line no-control-regex
        finish(proxyRefused(route, target, status, statusLine.replace(/[\u0000-\u001f\u007f-\uffff]/g, "?")));
        return;
      }
      if (buffered.length > end + 4) {
        // Nothing may come before our TLS ClientHello: a proxy that sends
        // more is confused or hostile.
        finish(proxyUnreachable(route, Object.assign(new Error(`it sent ${buffered.length - end - 4} bytes after its answer to CONNECT ${target}`), { code: "EPROXYHEADER" })));
        return;
      }
      finish(undefined);
    };
    if (signal?.aborted) {
      onAbort();
      return;
    }
    signal?.addEventListener("abort", onAbort, { once: true });
    sock.setTimeout(timeoutMs);
    sock.on("timeout", onTimeout);
    sock.on("error", onError);
    sock.on("close", onClose);
    sock.on("data", onData);
    sock.once("connect", () => {
      const auth = proxyAuthorization(route.url);
      sock.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n${auth ? `Proxy-Authorization: ${auth}\r\n` : ""}\r\n`);
    });
  });
}
