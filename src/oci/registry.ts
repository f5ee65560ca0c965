/**
 * A client for the OCI distribution API (v2): manifests and blobs, reads only.
 *
 * HTTPS by default. Plain HTTP only for loopback hosts and the hosts listed in
 * `insecureRegistries` (those also get TLS without certificate checks, the
 * way Docker treats insecure registries); for them HTTPS is tried first and
 * a failed TLS connection falls back to HTTP, remembered per host.
 *
 * Failures are retried with exponential backoff: 5xx and 429 answers,
 * connection resets and timeouts, and a refused connection to a host that
 * answered before (a restart mid-pull). A refused connection to a host never
 * reached is reported at once ("registry unreachable").
 */

import type { Readable } from "node:stream";
import { AbortError, AuthError, DigestMismatchError, NotFoundError, RegistryError } from "../errors.js";
import { Authenticator, type Credentials } from "./auth.js";
import { Digester, parseDigest } from "./digest.js";
import {
  Agents,
  backoffMs,
  bodyExcerpt,
  delay,
  drain,
  type HttpMethod,
  type HttpResponse,
  isLoopbackHost,
  NetworkError,
  readBounded,
  retryAfterMs,
  sendFollowing,
} from "./http.js";
import { MANIFEST_ACCEPT, MAX_MANIFEST_BYTES } from "./manifest.js";
import { proxySettingsFromEnv } from "./proxy.js";
import type { ImageReference } from "./reference.js";

export interface RegistryClientOptions {
  /**
   * Registries (host[:port]) that may be reached over plain HTTP or TLS
   * without certificate verification. Loopback hosts always may.
   * @default []
   */
  readonly insecureRegistries?: readonly string[];
  /** Inactivity timeout of one request (connect, headers, each body chunk), in ms. @default 30000 */
  readonly timeoutMs?: number;
  /** Retries after the first attempt on 5xx/429/resets/timeouts. @default 4 */
  readonly retries?: number;
  /** Base delay of the exponential backoff, in ms. @default 200 */
  readonly retryBaseMs?: number;
  readonly signal?: AbortSignal | undefined;
  /** Directory holding Docker's config.json. @default $DOCKER_CONFIG or ~/.docker */
  readonly dockerConfigDir?: string | undefined;
  /** Credentials to use instead of Docker's config (by reference domain). */
  readonly credentials?: ((domain: string) => Credentials | undefined) | undefined;
  /**
   * Where the proxy variables are read: `https_proxy`/`HTTPS_PROXY`,
   * `http_proxy`/`HTTP_PROXY`, `all_proxy`/`ALL_PROXY`, `no_proxy`/`NO_PROXY`
   * (lower-case wins; loopback always goes direct; see docs/oci.md).
   * @default process.env
   */
  readonly env?: Readonly<Record<string, string | undefined>> | undefined;
}

export interface FetchedManifest {
  readonly bytes: Buffer;
  /** From Content-Type, parameters dropped ("" when absent). */
  readonly contentType: string;
  readonly digest: string;
}

export interface BlobResponse {
  readonly body: Readable;
  /** Where the body starts in the blob: the requested offset, or 0 when the server ignored the Range. */
  readonly start: number;
  /** Content-Length of this response, when sent. */
  readonly length: number | undefined;
}

const RETRYABLE_NET = new Set(["ECONNRESET", "ETIMEDOUT", "EPIPE", "EAI_AGAIN", "ECONNABORTED", "ENETRESET", "EHOSTUNREACH", "ENETUNREACH", "ERR_STREAM_PREMATURE_CLOSE"]);

function errCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

/** A read-only distribution API client; `close()` it when done. */
export class RegistryClient {
  readonly timeoutMs: number;
  readonly retries: number;
  readonly retryBaseMs: number;
  private readonly agents: Agents;
  private readonly insecure: Set<string>;
  private readonly scheme = new Map<string, "https:" | "http:">();
  private readonly reached = new Set<string>();
  private readonly auth: Authenticator;
  private readonly signal: AbortSignal | undefined;
  /** Number of HTTP requests sent (each redirect hop and retry counts). */
  requests = 0;

  constructor(opts: RegistryClientOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.retries = opts.retries ?? 4;
    this.retryBaseMs = opts.retryBaseMs ?? 200;
    this.signal = opts.signal;
    this.agents = new Agents(proxySettingsFromEnv(opts.env ?? process.env), this.timeoutMs);
    this.insecure = new Set((opts.insecureRegistries ?? []).map((h) => h.toLowerCase().replace(/^[a-z]+:\/\//, "").replace(/\/.*$/, "")));
    this.auth = new Authenticator(
      {
        send: (req) =>
          this.withNetRetries(req.url.host, () =>
            this.sendRaw({ method: req.method, url: req.url, headers: req.headers, ...(req.body ? { body: req.body } : {}) }),
          ),
        allowHttp: (host) => this.allowHttp(host),
      },
      { dockerConfigDir: opts.dockerConfigDir, signal: opts.signal, credentials: opts.credentials },
    );
  }

  close(): void {
    this.agents.destroy();
  }

  /** Plain HTTP allowed for this host (loopback or listed as insecure)? */
  allowHttp(host: string): boolean {
    const h = host.toLowerCase();
    return isLoopbackHost(h) || this.insecure.has(h) || this.insecure.has(h.replace(/:\d+$/, ""));
  }

  /** TLS without certificate checks: loopback and insecureRegistries (as Docker treats them). */
  private tlsInsecure(host: string): boolean {
    return this.allowHttp(host);
  }

  private sendRaw(req: { method: HttpMethod; url: URL; headers: Record<string, string>; body?: Buffer }): Promise<HttpResponse> {
    this.requests++;
    return sendFollowing(
      { ...req, signal: this.signal, timeoutMs: this.timeoutMs },
      this.agents,
      { allowHttp: (h) => this.allowHttp(h), tlsInsecure: (h) => this.tlsInsecure(h), maxRedirects: 8 },
    );
  }

  private checkAbort(): void {
    if (this.signal?.aborted) throw new AbortError("The operation was aborted (signal fired)", { cause: this.signal.reason });
  }

  /** Retries network-level failures (not statuses) with backoff. */
  private async withNetRetries<T>(host: string, fn: () => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        const r = await fn();
        this.reached.add(host);
        return r;
      } catch (err) {
        if (!(err instanceof NetworkError) || attempt >= this.retries || !this.isRetryableNet(host, err)) throw err;
        await delay(backoffMs(attempt, this.retryBaseMs), this.signal);
      }
    }
  }

  /** Is a network error worth another try? */
  isRetryableNet(host: string, err: unknown): boolean {
    const code = errCode(err);
    if (code === undefined) return false;
    if (code === "ECONNREFUSED") return this.reached.has(host);
    return RETRYABLE_NET.has(code) || (err instanceof NetworkError && err.duringTransfer && code !== "EBADREDIRECT" && code !== "ETOOMANYREDIRECTS");
  }

  private unreachable(ref: ImageReference, err: NetworkError): RegistryError {
    const cause = err.cause as NodeJS.ErrnoException | undefined;
    const detail = cause?.message ?? err.message;
    let hint = "";
    if (err.code === "ECONNREFUSED") hint = " Is the registry running and the host:port right?";
    else if (err.code === "ENOTFOUND" || err.code === "EAI_AGAIN") hint = " The host name does not resolve; check the reference and your network.";
    else if (/certificate|self[- ]signed|CERT_/i.test(detail)) hint = ` If this registry uses a private CA or self-signed certificate, list "${ref.registry}" in insecureRegistries.`;
    return new RegistryError(`Registry ${ref.registry} is unreachable (${err.code}): ${detail}.${hint}`, ref.registry, undefined, { cause: err });
  }

  /**
   * One API call against `ref`'s registry: scheme choice and fallback, auth
   * (401 → challenge → retry), and retries on 5xx/429/network failures.
   * Returns any other response (2xx, 3xx without Location, 4xx) to the caller.
   */
  async call(ref: ImageReference, method: HttpMethod, path: string, headers: Record<string, string>): Promise<HttpResponse> {
    const host = ref.registry;
    const scope = `repository:${ref.repository}:pull`;
    let authHeader: string | undefined;
    let authTried = false;
    for (let attempt = 0; ; attempt++) {
      this.checkAbort();
      if (!authTried) authHeader = await this.auth.headerFor(host, ref.domain, scope);
      const scheme = this.scheme.get(host) ?? "https:";
      const url = new URL(`${scheme}//${host}${path}`);
      let res: HttpResponse;
      try {
        res = await this.sendRaw({ method, url, headers: { ...headers, ...(authHeader ? { authorization: authHeader } : {}) } });
      } catch (err) {
        if (!(err instanceof NetworkError)) throw err;
        if (scheme === "https:" && !this.scheme.has(host) && this.allowHttp(host) && !err.duringTransfer) {
          // A loopback/insecure registry that does not speak TLS: use HTTP from now on.
          this.scheme.set(host, "http:");
          attempt--;
          continue;
        }
        if (attempt < this.retries && this.isRetryableNet(host, err)) {
          await delay(backoffMs(attempt, this.retryBaseMs), this.signal);
          continue;
        }
        throw this.unreachable(ref, err);
      }
      this.reached.add(host);
      if (!this.scheme.has(host)) this.scheme.set(host, scheme);
      if (res.status === 401 && res.url.origin !== url.origin) {
        // A redirect target (blob storage, or anything a registry points at)
        // asking for credentials: the registry's are never sent there.
        await drain(res.body);
        const source = await this.auth.sourceFor(host, ref.domain);
        throw new AuthError(
          `Registry ${host} redirected to ${res.url.origin}, which asked for credentials (401); the registry's credentials are only sent to ${url.origin}, never to another host`,
          host,
          source,
        );
      }
      if (res.status === 401) {
        if (authTried) {
          const detail = await bodyExcerpt(res.body);
          const source = await this.auth.sourceFor(host, ref.domain);
          throw new AuthError(
            `Registry ${host} refused access to ${ref.name} (401${detail ? `: ${detail}` : ""}); credentials tried: ${source}. ` +
              (source.startsWith("none")
                ? `The repository may not exist, or it is private: run \`docker login ${ref.domain}\` or add credentials to Docker's config.json.`
                : `Check that these credentials may pull ${ref.repository}.`),
            host,
            source,
          );
        }
        authTried = true;
        try {
          authHeader = await this.auth.onUnauthorized(host, ref.domain, scope, res, authHeader);
        } finally {
          await drain(res.body);
        }
        attempt--;
        continue;
      }
      if (res.status === 403) {
        const detail = await bodyExcerpt(res.body);
        const source = await this.auth.sourceFor(host, ref.domain);
        throw new AuthError(
          `Registry ${host} denied access to ${ref.name} (403 Forbidden${detail ? `: ${detail}` : ""}); credentials tried: ${source}.`,
          host,
          source,
        );
      }
      if ((res.status >= 500 || res.status === 429) && attempt < this.retries) {
        const wait = retryAfterMs(res.headers["retry-after"], 30_000);
        await drain(res.body);
        await delay(wait ?? backoffMs(attempt, this.retryBaseMs), this.signal);
        continue;
      }
      return res;
    }
  }

  private async failure(ref: ImageReference, res: HttpResponse, what: string, reference: string): Promise<never> {
    const detail = await bodyExcerpt(res.body);
    if (res.status === 404) {
      throw new NotFoundError(
        `${what} not found: registry ${ref.registry} has no ${ref.name}${reference.includes(":") ? `@${reference}` : `:${reference}`} (404${detail ? `: ${detail}` : ""}). ` +
          `Check the repository name and tag.`,
        ref.toString(),
        ref.registry,
      );
    }
    throw new RegistryError(`Registry ${ref.registry} answered ${res.status} for ${what} of ${ref.name}${detail ? `: ${detail}` : ""}`, ref.registry, res.status);
  }

  /**
   * HEAD of a manifest: its digest (from Docker-Content-Digest) without the
   * body, or undefined when the registry does not say.
   */
  async headManifest(ref: ImageReference, reference: string): Promise<{ digest: string | undefined; contentType: string }> {
    const res = await this.call(ref, "HEAD", `/v2/${ref.repository}/manifests/${encodeURIComponent(reference)}`, { accept: MANIFEST_ACCEPT });
    await drain(res.body);
    if (res.status !== 200) {
      if (res.status === 404) {
        throw new NotFoundError(
          `Manifest not found: registry ${ref.registry} has no ${ref.name}:${reference} (404). Check the repository name and tag.`,
          ref.toString(),
          ref.registry,
        );
      }
      throw new RegistryError(`Registry ${ref.registry} answered ${res.status} for HEAD of manifest ${ref.name}:${reference}`, ref.registry, res.status);
    }
    const d = res.headers["docker-content-digest"];
    let digest: string | undefined;
    try {
      digest = typeof d === "string" ? parseDigest(d.trim()).digest : undefined;
    } catch {
      digest = undefined;
    }
    return { digest, contentType: contentTypeOf(res) };
  }

  /** GET of a manifest by tag or digest, size-bounded and digest-checked. */
  async getManifest(ref: ImageReference, reference: string): Promise<FetchedManifest> {
    const res = await this.call(ref, "GET", `/v2/${ref.repository}/manifests/${encodeURIComponent(reference)}`, { accept: MANIFEST_ACCEPT });
    if (res.status !== 200) await this.failure(ref, res, "Manifest", reference);
    const len = Number(res.headers["content-length"]);
    const tooLarge = (): RegistryError =>
      new RegistryError(`Registry ${ref.registry}: manifest of ${ref.name}:${reference} is larger than ${MAX_MANIFEST_BYTES} bytes`, ref.registry);
    if (Number.isFinite(len) && len > MAX_MANIFEST_BYTES) {
      res.body.destroy();
      throw tooLarge();
    }
    const bytes = await readBounded(res.body, MAX_MANIFEST_BYTES, tooLarge);
    const headerDigest = res.headers["docker-content-digest"];
    let expected: string | undefined;
    let what = "";
    if (reference.includes(":")) {
      expected = reference;
      what = "the digest asked for";
    } else if (typeof headerDigest === "string") {
      try {
        expected = parseDigest(headerDigest.trim()).digest;
        what = "the registry's Docker-Content-Digest header";
      } catch {
        expected = undefined;
      }
    }
    const algorithm = expected ? parseDigest(expected).algorithm : "sha256";
    const d = new Digester(algorithm);
    d.update(bytes);
    const actual = d.digest();
    if (expected && actual !== expected) {
      throw new DigestMismatchError(
        `Manifest of ${ref.name}:${reference} from ${ref.registry} hashes to ${actual}, not ${expected} (${what}); it was discarded`,
        expected,
        actual,
      );
    }
    // The image is named by its sha256 digest even when the header used another algorithm.
    const digest = algorithm === "sha256" ? actual : (() => {
      const s = new Digester("sha256");
      s.update(bytes);
      return s.digest();
    })();
    return { bytes, contentType: contentTypeOf(res), digest };
  }

  /** GET of a blob from `offset` (Range); 404 → NotFoundError. */
  async getBlob(ref: ImageReference, digest: string, offset = 0): Promise<BlobResponse> {
    const headers: Record<string, string> = {};
    if (offset > 0) headers.range = `bytes=${offset}-`;
    const res = await this.call(ref, "GET", `/v2/${ref.repository}/blobs/${digest}`, headers);
    if (res.status === 206 && offset > 0) {
      const m = /^bytes (\d+)-\d+\/(?:\d+|\*)$/.exec(String(res.headers["content-range"] ?? ""));
      if (m && Number(m[1]) === offset) {
        return { body: res.body, start: offset, length: lengthOf(res) };
      }
      // A range we did not ask for: start over without one.
      res.body.destroy();
      return this.getBlob(ref, digest, 0);
    }
    if (res.status === 200) return { body: res.body, start: 0, length: lengthOf(res) };
    if (res.status === 404) {
      const detail = await bodyExcerpt(res.body);
      throw new NotFoundError(
        `Blob ${digest} of ${ref.name} not found on registry ${ref.registry} (404${detail ? `: ${detail}` : ""}); the image may be incomplete on the registry`,
        ref.toString(),
        ref.registry,
      );
    }
    return this.failure(ref, res, `Blob ${digest}`, ref.reference);
  }

  /**
   * GET of a blob from a foreign-layer URL (no credentials). Refused unless
   * the URL is on a loopback host: an image must not send us to fetch (and
   * reveal our address to) hosts it picks.
   */
  async getUrl(url: URL, offset = 0): Promise<BlobResponse> {
    if (!isLoopbackHost(url.host)) {
      throw new RegistryError(`Refusing to fetch a foreign layer from ${url.origin}: layers are only fetched from the image's registry (push the layer there)`, url.host);
    }
    if (url.protocol !== "https:" && url.protocol !== "http:") {
      throw new RegistryError(`Refusing to fetch foreign layer from ${url.origin}: only https and loopback http are allowed`, url.host);
    }
    const res = await this.withNetRetries(url.host, () =>
      this.sendRaw({ method: "GET", url, headers: offset > 0 ? { range: `bytes=${offset}-` } : {} }),
    );
    if (res.status === 206 && offset > 0) return { body: res.body, start: offset, length: lengthOf(res) };
    if (res.status === 200) return { body: res.body, start: 0, length: lengthOf(res) };
    const detail = await bodyExcerpt(res.body);
    throw new RegistryError(`Foreign layer URL ${url.origin}${url.pathname} answered ${res.status}${detail ? `: ${detail}` : ""}`, url.host, res.status);
  }
}

function contentTypeOf(res: HttpResponse): string {
  const ct = res.headers["content-type"];
  return typeof ct === "string" ? (ct.split(";")[0] ?? "").trim().toLowerCase() : "";
}

function lengthOf(res: HttpResponse): number | undefined {
  const n = Number(res.headers["content-length"]);
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}
