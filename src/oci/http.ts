/**
 * The small HTTP layer under the registry client: one request at a time over
 * node:http/node:https with an inactivity timeout and an AbortSignal, manual
 * redirects (Authorization never crosses to another origin), bounded body
 * reads, and a retry helper with exponential backoff.
 *
 * Everything a server sends is hostile: sizes are bounded, redirects counted,
 * and a scheme downgrade (https → http) is refused unless the target host is
 * allowed plain HTTP.
 *
 * Requests go through the proxy the environment names (HTTPS_PROXY,
 * HTTP_PROXY, NO_PROXY: src/oci/proxy.ts), decided per URL, so each redirect
 * hop is routed on its own.
 */

import * as http from "node:http";
import * as https from "node:https";
import type { Duplex, Readable } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import * as tls from "node:tls";
import { AbortError, ProxyError } from "../errors.js";
import { connectTunnel, proxyAuthorization, proxyFor, type ProxyRoute, type ProxySettings, proxyRefused, proxyUnreachable } from "./proxy.js";

export type HttpMethod = "GET" | "HEAD" | "POST";

export interface HttpRequestOptions {
  readonly method: HttpMethod;
  readonly url: URL;
  readonly headers?: Readonly<Record<string, string>>;
  readonly body?: Buffer;
  readonly signal?: AbortSignal | undefined;
  /** Socket inactivity limit (connect, headers and each body chunk), in ms. */
  readonly timeoutMs: number;
}

export interface HttpResponse {
  readonly status: number;
  readonly headers: http.IncomingHttpHeaders;
  /** The final URL (after redirects). */
  readonly url: URL;
  /** The body; must be consumed or destroyed. */
  readonly body: http.IncomingMessage;
}

/** A network failure before or while a response was read (not an HTTP status). */
export class NetworkError extends Error {
  readonly code: string;
  readonly url: URL;
  /** True when the failure happened after the server had started answering. */
  readonly duringTransfer: boolean;
  constructor(message: string, code: string, url: URL, duringTransfer: boolean, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.code = code;
    this.url = url;
    this.duringTransfer = duringTransfer;
  }
}

/**
 * An https agent whose connections are CONNECT tunnels through one proxy:
 * TLS runs end to end inside the tunnel (certificates checked against the
 * target host), keep-alive pooling as usual.
 */
class TunnelAgent extends https.Agent {
  private readonly pending = new Set<AbortController>();
  constructor(
    private readonly route: ProxyRoute,
    private readonly connectTimeoutMs: number,
    options: https.AgentOptions,
  ) {
    super(options);
  }

  override createConnection(options: https.RequestOptions, callback?: (err: Error | null, stream: Duplex) => void): undefined {
    const ac = new AbortController();
    this.pending.add(ac);
    const host = options.host ?? options.hostname ?? "localhost";
    const port = Number(options.port ?? 443);
    connectTunnel(this.route, host, port, this.connectTimeoutMs, ac.signal).then(
      (socket) => {
        this.pending.delete(ac);
        callback?.(null, tls.connect({ ...(options as tls.ConnectionOptions), socket }));
      },
      (err: Error) => {
        this.pending.delete(ac);
        callback?.(err, undefined as unknown as Duplex);
      },
    );
    return undefined;
  }

  override destroy(): void {
    for (const ac of this.pending) ac.abort(new Error("agent destroyed"));
    this.pending.clear();
    super.destroy();
  }
}

/** Errors on connecting to a forwarding proxy that mean "the proxy is not there". */
const PROXY_CONNECT_ERRORS = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "EADDRNOTAVAIL"]);

/** Keep-alive agents for one client; `destroy()` closes their sockets. */
export class Agents {
  readonly http = new http.Agent({ keepAlive: true, maxSockets: 8 });
  readonly https = new https.Agent({ keepAlive: true, maxSockets: 8 });
  /** For registries listed as insecure: TLS without certificate verification. */
  readonly httpsInsecure = new https.Agent({ keepAlive: true, maxSockets: 8, rejectUnauthorized: false });
  private readonly tunnels = new Map<string, TunnelAgent>();

  /**
   * @param proxy where requests go (none: always direct)
   * @param connectTimeoutMs bound on connecting to a proxy and its answer to CONNECT
   */
  constructor(
    readonly proxy: ProxySettings = { https: undefined, http: undefined, noProxy: [] },
    private readonly connectTimeoutMs = 30_000,
  ) {}

  /** The tunnelling agent for `route` (one per proxy and TLS mode). */
  tunnel(route: ProxyRoute, tlsInsecure: boolean): https.Agent {
    const key = `${tlsInsecure ? "insecure" : "verify"} ${route.url.href}`;
    let agent = this.tunnels.get(key);
    if (agent === undefined) {
      agent = new TunnelAgent(route, this.connectTimeoutMs, { keepAlive: true, maxSockets: 8, ...(tlsInsecure ? { rejectUnauthorized: false } : {}) });
      this.tunnels.set(key, agent);
    }
    return agent;
  }

  destroy(): void {
    this.http.destroy();
    this.https.destroy();
    this.httpsInsecure.destroy();
    for (const agent of this.tunnels.values()) agent.destroy();
    this.tunnels.clear();
  }
}

function abortError(signal: AbortSignal): AbortError {
  return new AbortError("The operation was aborted (signal fired)", { cause: signal.reason });
}

/** Sends one request (no redirects followed). Resolves once headers arrived. */
export function sendOnce(
  opts: HttpRequestOptions,
  agents: Agents,
  tlsInsecure: boolean,
): Promise<HttpResponse> {
  const { url, signal } = opts;
  if (signal?.aborted) return Promise.reject(abortError(signal));
  return new Promise<HttpResponse>((resolve, reject) => {
    const isHttps = url.protocol === "https:";
    const route = proxyFor(agents.proxy, url);
    const headers: Record<string, string> = { "user-agent": "supermachine", ...opts.headers };
    if (opts.body) headers["content-length"] = String(opts.body.length);
    let settled = false;
    let gotResponse = false;
    let req: http.ClientRequest;
    if (route === undefined) {
      const agent = isHttps ? (tlsInsecure ? agents.httpsInsecure : agents.https) : agents.http;
      req = (isHttps ? https : http).request(url, { method: opts.method, headers, agent });
    } else if (isHttps) {
      req = https.request(url, { method: opts.method, headers, agent: agents.tunnel(route, tlsInsecure) });
    } else {
      // Plain http through a proxy: the absolute URI in the request line.
      const auth = proxyAuthorization(route.url);
      req = http.request({
        host: route.url.hostname.replace(/^\[|\]$/g, ""),
        port: Number(route.url.port || 80),
        method: opts.method,
        path: url.href,
        headers: { ...headers, host: url.host, ...(auth ? { "proxy-authorization": auth } : {}) },
        agent: agents.http,
      });
    }
    const onAbort = (): void => {
      req.destroy(abortError(signal!));
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    req.setTimeout(opts.timeoutMs, () => {
      const e = new Error(`no data for ${opts.timeoutMs} ms`) as NodeJS.ErrnoException;
      e.code = "ETIMEDOUT";
      req.destroy(e);
    });
    req.on("error", (err: NodeJS.ErrnoException) => {
      signal?.removeEventListener("abort", onAbort);
      if (settled) return;
      settled = true;
      if (err instanceof AbortError || err instanceof ProxyError) return reject(err);
      if (route !== undefined && !isHttps && !gotResponse && PROXY_CONNECT_ERRORS.has(err.code ?? "")) return reject(proxyUnreachable(route, err));
      reject(new NetworkError(`${err.code ?? "error"}: ${err.message}`, err.code ?? "EUNKNOWN", url, gotResponse, err));
    });
    req.on("response", (res) => {
      gotResponse = true;
      settled = true;
      if (route !== undefined && !isHttps && res.statusCode === 407) {
        // The forwarding proxy wants credentials (an origin never sends 407).
        res.resume();
        signal?.removeEventListener("abort", onAbort);
        reject(proxyRefused(route, url.host, 407, `HTTP/${res.httpVersion} 407 ${res.statusMessage ?? ""}`.trim()));
        return;
      }
      // Errors while the body streams surface on the body stream itself.
      res.on("error", () => {});
      res.on("close", () => signal?.removeEventListener("abort", onAbort));
      resolve({ status: res.statusCode ?? 0, headers: res.headers, url, body: res });
    });
    req.end(opts.body);
  });
}

/** Reads a whole body, failing with `tooLarge()` when it passes `limit` bytes. */
export async function readBounded(body: Readable, limit: number, tooLarge: () => Error): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  try {
    for await (const chunk of body) {
      const b = chunk as Buffer;
      total += b.length;
      if (total > limit) throw tooLarge();
      chunks.push(b);
    }
  } finally {
    body.destroy();
  }
  return Buffer.concat(chunks, total);
}

/** Reads and drops a body (up to 64 KiB; beyond that the socket is closed). */
export async function drain(body: Readable): Promise<void> {
  try {
    await readBounded(body, 64 * 1024, () => new Error("drain limit"));
  } catch {
    // ignore: the socket is destroyed
  }
}

/** A short, printable excerpt of a response body for error messages. */
export async function bodyExcerpt(body: Readable, max = 512): Promise<string> {
  let text: string;
  try {
    text = (await readBounded(body, 16 * 1024, () => new Error("too large"))).toString("utf8");
  } catch {
    return "";
  }
  // Registry errors are {"errors":[{"code","message","detail"}]}: show code: message.
  try {
    const parsed = JSON.parse(text) as { errors?: Array<{ code?: unknown; message?: unknown }> };
    if (Array.isArray(parsed.errors) && parsed.errors.length > 0) {
      text = parsed.errors
        .slice(0, 4)
        .map((e) => [e.code, e.message].filter((x) => typeof x === "string" && x).join(": "))
        .filter(Boolean)
        .join("; ");
    }
  } catch {
    // not JSON
  }
  // eslint-disable-next-line no-control-regex
  text = text.replace(/[\u0000-\u001f\u007f]+/g, " ").trim();
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

export interface RedirectPolicy {
  /** May a redirect go to plain http on this host? */
  allowHttp(host: string): boolean;
  /** Skip TLS verification for this host? */
  tlsInsecure(host: string): boolean;
  readonly maxRedirects: number;
}

/**
 * Sends a request and follows redirects by hand. The Authorization header is
 * sent only to the origin of the first URL: a redirect to another host (blob
 * storage, a CDN) goes without it. 303 turns into GET. A request body (a
 * refresh-token POST) is never re-sent to another origin: such a redirect is
 * refused. A redirect to plain http is refused unless the target host is
 * allowed plain HTTP (loopback, insecureRegistries), whatever the scheme it
 * came from. The response's `url` is where the answer came from: a caller
 * must not answer its 401 with credentials meant for the first origin.
 */
export async function sendFollowing(opts: HttpRequestOptions, agents: Agents, policy: RedirectPolicy): Promise<HttpResponse> {
  let current = opts;
  const origin = opts.url.origin;
  for (let hop = 0; ; hop++) {
    const res = await sendOnce(current, agents, policy.tlsInsecure(current.url.host));
    const location = res.headers.location;
    if (![301, 302, 303, 307, 308].includes(res.status) || typeof location !== "string") return res;
    await drain(res.body);
    if (hop >= policy.maxRedirects) {
      throw new NetworkError(`more than ${policy.maxRedirects} redirects`, "ETOOMANYREDIRECTS", current.url, true);
    }
    let next: URL;
    try {
      next = new URL(location, current.url);
    } catch {
      throw new NetworkError(`bad redirect location ${JSON.stringify(location.slice(0, 200))}`, "EBADREDIRECT", current.url, true);
    }
    if (next.protocol !== "https:" && next.protocol !== "http:") {
      throw new NetworkError(`redirect to unsupported scheme ${next.protocol}`, "EBADREDIRECT", current.url, true);
    }
    if (next.protocol === "http:" && !policy.allowHttp(next.host)) {
      throw new NetworkError(`refusing redirect to plain http (${next.host}); only loopback and insecureRegistries hosts may be reached without TLS`, "EBADREDIRECT", current.url, true);
    }
    const headers: Record<string, string> = { ...current.headers };
    if (next.origin !== origin) {
      for (const k of Object.keys(headers)) if (k.toLowerCase() === "authorization" || k.toLowerCase() === "cookie") delete headers[k];
    }
    const method = res.status === 303 ? "GET" : current.method;
    if (current.body !== undefined && method !== "GET" && method !== "HEAD" && next.origin !== origin) {
      throw new NetworkError(`refusing to re-send a ${method} body to another origin (${next.origin}) on a redirect from ${current.url.origin}`, "EBADREDIRECT", current.url, true);
    }
    current = { ...current, url: next, headers, method, body: method === "GET" || method === "HEAD" ? undefined : current.body };
  }
}

/** Backoff delay for attempt `n` (0-based): base·2ⁿ with ±25 % jitter, capped. */
export function backoffMs(attempt: number, baseMs: number, capMs = 10_000): number {
  const raw = Math.min(capMs, baseMs * 2 ** attempt);
  return Math.round(raw * (0.75 + Math.random() * 0.5));
}

/** Sleeps, failing early with AbortError when the signal fires. */
export async function delay(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) throw abortError(signal);
  try {
    await sleep(ms, undefined, signal ? { signal } : undefined);
  } catch (err) {
    if (signal?.aborted) throw abortError(signal);
    throw err;
  }
}

/** Parses Retry-After (seconds or an HTTP date) into ms, bounded. */
export function retryAfterMs(value: string | string[] | undefined, capMs: number): number | undefined {
  if (typeof value !== "string") return undefined;
  const secs = Number(value);
  if (Number.isFinite(secs) && secs >= 0) return Math.min(capMs, secs * 1000);
  const date = Date.parse(value);
  if (Number.isFinite(date)) return Math.max(0, Math.min(capMs, date - Date.now()));
  return undefined;
}

/** Is this host loopback (127.0.0.0/8, ::1, localhost)? */
export function isLoopbackHost(hostPort: string): boolean {
  let host = hostPort.toLowerCase();
  if (host.startsWith("[")) {
    host = host.slice(1, host.indexOf("]"));
  } else {
    const colon = host.lastIndexOf(":");
    if (colon >= 0 && host.indexOf(":") === colon) host = host.slice(0, colon);
  }
  if (host === "localhost" || host.endsWith(".localhost")) return true;
  if (host === "::1" || host === "0:0:0:0:0:0:0:1") return true;
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}
