/**
 * Registry authentication: credentials from Docker's config.json (inline
 * `auths`, per-registry `credHelpers`, default `credsStore`, through the
 * `docker-credential-<name> get` protocol), WWW-Authenticate challenge
 * parsing, HTTP Basic, and the Bearer token flow of the Docker token spec
 * (GET realm?service&scope with Basic credentials, or the OAuth2
 * refresh-token POST for an `identitytoken`). Tokens are cached per registry,
 * service, scope and credential until shortly before they expire.
 *
 * Credentials are resolved lazily, on the first challenge a registry sends,
 * so anonymous registries never run a helper.
 */

import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { AbortError, AuthError, RegistryError } from "../errors.js";
import { bodyExcerpt, type HttpResponse, NetworkError, readBounded } from "./http.js";
import { DOCKER_HUB_AUTH_KEY, DOCKER_HUB_DOMAIN, isDockerHub } from "./reference.js";

/** Bound on config.json and on token responses. */
const MAX_SMALL_JSON = 4 * 1024 * 1024;
/** Bound on what a credential helper may print. */
const MAX_HELPER_OUTPUT = 256 * 1024;

/** Credentials for one registry. */
export interface Credentials {
  readonly username?: string;
  readonly password?: string;
  /** OAuth2 refresh token (`identitytoken`, or a helper's `<token>` user). */
  readonly identityToken?: string;
  /** A bearer token to send as is (`registrytoken`). */
  readonly registryToken?: string;
}

/** Where credentials came from, for error messages. */
export interface ResolvedCredentials {
  readonly credentials: Credentials | undefined;
  /** e.g. "none", "config.json auths (/home/u/.docker/config.json)", "credential helper docker-credential-pass (credHelpers)". */
  readonly source: string;
}

interface AuthEntry {
  readonly key: string;
  readonly credentials: Credentials;
}

/** The parts of Docker's config.json that concern registry credentials. */
export interface DockerConfig {
  /** The file read, or undefined when none exists. */
  readonly path: string | undefined;
  /** Inline credentials by normalised registry key. */
  readonly auths: ReadonlyMap<string, AuthEntry>;
  /** Helper names by normalised registry key. */
  readonly credHelpers: ReadonlyMap<string, string>;
  readonly credsStore: string | undefined;
}

/** Directory of Docker's config: $DOCKER_CONFIG or ~/.docker. */
export function dockerConfigDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.DOCKER_CONFIG ? env.DOCKER_CONFIG : join(env.HOME || homedir(), ".docker");
}

/**
 * The key a registry is known by in config.json, normalised: scheme and path
 * dropped, lower-case, and every Docker Hub alias mapped to "docker.io".
 */
export function normalizeAuthKey(key: string): string {
  let k = key.trim().toLowerCase();
  k = k.replace(/^[a-z][a-z0-9+.-]*:\/\//, "");
  const slash = k.indexOf("/");
  if (slash >= 0) k = k.slice(0, slash);
  return isDockerHub(k) ? DOCKER_HUB_DOMAIN : k;
}

/** The server URL handed to credential helpers (what `docker login` stores). */
export function helperServerUrl(domain: string): string {
  return normalizeAuthKey(domain) === DOCKER_HUB_DOMAIN ? DOCKER_HUB_AUTH_KEY : domain;
}

const HELPER_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$/;

function str(v: unknown): string | undefined {
  return typeof v === "string" && v !== "" ? v : undefined;
}

function parseAuthEntry(key: string, raw: unknown, path: string): AuthEntry | undefined {
  if (typeof raw !== "object" || raw === null) return undefined;
  const e = raw as Record<string, unknown>;
  let username = str(e.username);
  let password = str(e.password);
  const auth = str(e.auth);
  if (auth !== undefined) {
    const decoded = Buffer.from(auth, "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    if (colon < 0) {
      throw new TypeError(`Invalid "auth" for ${JSON.stringify(key)} in ${path}: expected base64 of user:password`);
    }
    username = decoded.slice(0, colon);
    password = decoded.slice(colon + 1);
  }
  const identityToken = str(e.identitytoken);
  const registryToken = str(e.registrytoken);
  if (username === undefined && password === undefined && identityToken === undefined && registryToken === undefined) return undefined;
  const credentials: Credentials = {
    ...(username !== undefined ? { username } : {}),
    ...(password !== undefined ? { password } : {}),
    ...(identityToken !== undefined ? { identityToken } : {}),
    ...(registryToken !== undefined ? { registryToken } : {}),
  };
  return { key, credentials };
}

/**
 * Reads `<dir>/config.json` (dir defaults to {@link dockerConfigDir}). A
 * missing file is an empty config; a malformed one throws a TypeError naming
 * the file.
 */
export async function loadDockerConfig(dir?: string): Promise<DockerConfig> {
  return loadAuthFile(join(dir ?? dockerConfigDir(), "config.json"));
}

/**
 * Where podman, skopeo and buildah keep registry credentials (the same
 * `auths` format as Docker's): $REGISTRY_AUTH_FILE, else
 * $XDG_RUNTIME_DIR/containers/auth.json when it exists, else
 * ~/.config/containers/auth.json.
 */
export function containersAuthPath(env: NodeJS.ProcessEnv = process.env): string {
  if (env.REGISTRY_AUTH_FILE) return env.REGISTRY_AUTH_FILE;
  if (env.XDG_RUNTIME_DIR) {
    const p = join(env.XDG_RUNTIME_DIR, "containers", "auth.json");
    if (existsSync(p)) return p;
  }
  return join(env.HOME || homedir(), ".config", "containers", "auth.json");
}

/** Reads a containers auth.json (podman's); a missing file is empty. */
export async function loadContainersAuth(path: string = containersAuthPath()): Promise<DockerConfig> {
  return loadAuthFile(path);
}

/** Reads a config.json / auth.json holding `auths`, `credHelpers`, `credsStore`. */
async function loadAuthFile(path: string): Promise<DockerConfig> {
  let text: string;
  try {
    const buf = await readFile(path);
    if (buf.length > MAX_SMALL_JSON) throw new TypeError(`Docker config ${path} is larger than ${MAX_SMALL_JSON} bytes`);
    text = buf.toString("utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") {
      return { path: undefined, auths: new Map(), credHelpers: new Map(), credsStore: undefined };
    }
    throw err;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new TypeError(`Docker config ${path} is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) throw new TypeError(`Docker config ${path} is not a JSON object`);
  const cfg = json as Record<string, unknown>;
  const auths = new Map<string, AuthEntry>();
  if (typeof cfg.auths === "object" && cfg.auths !== null) {
    for (const [key, raw] of Object.entries(cfg.auths as Record<string, unknown>)) {
      const entry = parseAuthEntry(key, raw, path);
      const norm = normalizeAuthKey(key);
      // A scheme-less exact key wins over an https://…/v1/ one for the same host.
      if (entry && (!auths.has(norm) || !/^[a-z]+:\/\//i.test(key))) auths.set(norm, entry);
    }
  }
  const credHelpers = new Map<string, string>();
  if (typeof cfg.credHelpers === "object" && cfg.credHelpers !== null) {
    for (const [key, name] of Object.entries(cfg.credHelpers as Record<string, unknown>)) {
      if (typeof name === "string" && HELPER_NAME.test(name)) credHelpers.set(normalizeAuthKey(key), name);
    }
  }
  const credsStore = typeof cfg.credsStore === "string" && HELPER_NAME.test(cfg.credsStore) ? cfg.credsStore : undefined;
  return { path, auths, credHelpers, credsStore };
}

type HelperResult =
  | { kind: "found"; credentials: Credentials }
  | { kind: "notfound" }
  | { kind: "failed"; reason: string };

/** Runs `docker-credential-<name> get` with the server URL on stdin. */
export function runCredentialHelper(name: string, serverUrl: string, timeoutMs = 30_000, signal?: AbortSignal): Promise<HelperResult> {
  return new Promise((resolve) => {
    const program = `docker-credential-${name}`;
    let child;
    try {
      child = spawn(program, ["get"], { stdio: ["pipe", "pipe", "pipe"], signal });
    } catch (err) {
      resolve({ kind: "failed", reason: (err as Error).message });
      return;
    }
    // Our own timer: spawn's `timeout` option leaks its timer when the program is missing.
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    timer.unref();
    const out: Buffer[] = [];
    let outBytes = 0;
    let tooMuch = false;
    const collect = (b: Buffer): void => {
      outBytes += b.length;
      if (outBytes > MAX_HELPER_OUTPUT) {
        tooMuch = true;
        child.kill("SIGKILL");
        return;
      }
      out.push(b);
    };
    child.stdout.on("data", collect);
    child.stderr.on("data", collect);
    child.stdin.on("error", () => {});
    child.on("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve({ kind: "failed", reason: err.code === "ENOENT" ? `${program} not found on PATH` : `${program}: ${err.message}` });
    });
    child.on("close", (code, sig) => {
      clearTimeout(timer);
      const text = Buffer.concat(out).toString("utf8").trim();
      if (timedOut) return resolve({ kind: "failed", reason: `${program} get did not answer within ${timeoutMs} ms` });
      if (tooMuch) return resolve({ kind: "failed", reason: `${program} printed more than ${MAX_HELPER_OUTPUT} bytes` });
      if (code !== 0) {
        if (/credentials not found/i.test(text)) return resolve({ kind: "notfound" });
        return resolve({ kind: "failed", reason: `${program} get exited with ${sig ?? code}${text ? `: ${text.slice(0, 200)}` : ""}` });
      }
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        return resolve({ kind: "failed", reason: `${program} get printed no valid JSON` });
      }
      const o = (typeof json === "object" && json !== null ? json : {}) as Record<string, unknown>;
      const username = typeof o.Username === "string" ? o.Username : "";
      const secret = typeof o.Secret === "string" ? o.Secret : "";
      if (secret === "") return resolve({ kind: "notfound" });
      if (username === "<token>") return resolve({ kind: "found", credentials: { identityToken: secret } });
      resolve({ kind: "found", credentials: { username, password: secret } });
    });
    child.stdin.end(serverUrl);
  });
}

/**
 * Finds credentials for a registry the way the Docker CLI does: a
 * `credHelpers` entry for the registry first, then the `credsStore`, then
 * inline `auths`. A helper that fails or knows nothing means "anonymous"
 * (the failure is kept in `source` for the error message).
 */
export async function resolveCredentials(
  domain: string,
  config: DockerConfig,
  opts: { signal?: AbortSignal | undefined; helperTimeoutMs?: number } = {},
): Promise<ResolvedCredentials> {
  const key = normalizeAuthKey(domain);
  const serverUrl = helperServerUrl(domain);
  const tried: string[] = [];
  const helpers: Array<[string, string]> = [];
  const perRegistry = config.credHelpers.get(key);
  if (perRegistry) helpers.push([perRegistry, "credHelpers"]);
  else if (config.credsStore) helpers.push([config.credsStore, "credsStore"]);
  for (const [name, how] of helpers) {
    const r = await runCredentialHelper(name, serverUrl, opts.helperTimeoutMs, opts.signal);
    if (opts.signal?.aborted) throw new AbortError("The operation was aborted (signal fired)", { cause: opts.signal.reason });
    if (r.kind === "found") return { credentials: r.credentials, source: `credential helper docker-credential-${name} (${how} in ${config.path})` };
    tried.push(r.kind === "notfound" ? `credential helper docker-credential-${name} has none for ${serverUrl}` : `credential helper failed: ${r.reason}`);
  }
  const entry = config.auths.get(key);
  if (entry) return { credentials: entry.credentials, source: `config.json auths[${JSON.stringify(entry.key)}] (${config.path})` };
  if (config.path === undefined) tried.push("no Docker config.json found");
  else if (helpers.length === 0) tried.push(`no entry for ${key} in ${config.path}`);
  return { credentials: undefined, source: `none (${tried.join("; ")})` };
}

/** One challenge of a WWW-Authenticate header. */
export interface Challenge {
  /** Lower-case scheme: "bearer", "basic". */
  readonly scheme: string;
  /** Parameters with lower-case names. */
  readonly params: Readonly<Record<string, string>>;
}

/**
 * Parses a WWW-Authenticate header (RFC 7235: several challenges, each a
 * scheme and comma-separated `name=value` or `name="quoted"` parameters).
 */
export function parseWwwAuthenticate(header: string): Challenge[] {
  const out: Array<{ scheme: string; params: Record<string, string> }> = [];
  let i = 0;
  const n = header.length;
  const skipWs = (): void => {
    while (i < n && (header[i] === " " || header[i] === "\t")) i++;
  };
  const token = (): string => {
    const start = i;
    while (i < n && /[!#$%&'*+.^_`|~0-9A-Za-z-]/.test(header[i]!)) i++;
    return header.slice(start, i);
  };
  while (i < n) {
    skipWs();
    while (i < n && header[i] === ",") {
      i++;
      skipWs();
    }
    if (i >= n) break;
    const scheme = token();
    if (scheme === "") break; // garbage: stop
    const current = { scheme: scheme.toLowerCase(), params: {} as Record<string, string> };
    out.push(current);
    // parameters until the next scheme
    for (;;) {
      skipWs();
      const save = i;
      const name = token();
      skipWs();
      if (name === "" || header[i] !== "=") {
        i = save;
        break;
      }
      i++; // '='
      skipWs();
      let value = "";
      if (header[i] === '"') {
        i++;
        while (i < n && header[i] !== '"') {
          if (header[i] === "\\" && i + 1 < n) i++;
          value += header[i];
          i++;
        }
        i++; // closing quote
      } else {
        const start = i;
        while (i < n && header[i] !== "," && header[i] !== " " && header[i] !== "\t") i++;
        value = header.slice(start, i);
      }
      current.params[name.toLowerCase()] = value;
      skipWs();
      if (header[i] === ",") {
        i++;
        continue;
      }
      break;
    }
    if (i < n && header[i] !== "," && !/[A-Za-z]/.test(header[i]!)) break;
  }
  return out;
}

interface CachedToken {
  readonly header: string;
  readonly expiresAt: number;
}

/** Process-wide token cache: registry|service|scope|credential → token. */
const tokenCache = new Map<string, CachedToken>();
const TOKEN_CACHE_MAX = 256;

/** Process-wide: the last challenge each registry sent, so a new client can authenticate up front. */
const challengeCache = new Map<string, Challenge>();

/** Forgets every cached token and challenge (tests use this). */
export function clearTokenCache(): void {
  tokenCache.clear();
  challengeCache.clear();
}

function credentialId(c: Credentials | undefined): string {
  if (!c) return "anonymous";
  return createHash("sha256")
    .update(JSON.stringify([c.username ?? "", c.password ?? "", c.identityToken ?? "", c.registryToken ?? ""]))
    .digest("hex")
    .slice(0, 24);
}

/** What an {@link Authenticator} needs from the transport. */
export interface AuthTransport {
  /** Sends a request to a token realm (redirects followed, bounded). */
  send(req: { method: "GET" | "POST"; url: URL; headers: Record<string, string>; body?: Buffer }): Promise<HttpResponse>;
  /** May plain HTTP carry credentials to this host? */
  allowHttp(host: string): boolean;
}

interface RegistryAuthState {
  challenge: Challenge | undefined;
  resolved: Promise<ResolvedCredentials> | undefined;
}

const TOKEN_CHARS = /^[\x21-\x7e]{1,65536}$/;

/**
 * Turns challenges into Authorization headers for one client. Knows, per
 * registry, the last challenge seen, so later requests (other repositories)
 * get a header up front instead of a 401 round trip.
 */
export class Authenticator {
  private readonly state = new Map<string, RegistryAuthState>();
  private config: Promise<DockerConfig> | undefined;
  private podman: Promise<DockerConfig> | undefined;

  constructor(
    private readonly transport: AuthTransport,
    private readonly opts: {
      readonly dockerConfigDir?: string | undefined;
      /**
       * podman's auth.json, consulted when Docker's config has nothing for a
       * registry. @default containersAuthPath() unless dockerConfigDir is given (then none)
       */
      readonly containersAuthFile?: string | undefined;
      readonly signal?: AbortSignal | undefined;
      /** Credentials to use instead of Docker's config, by registry domain. */
      readonly credentials?: ((domain: string) => Credentials | undefined) | undefined;
    } = {},
  ) {}

  private stateOf(registry: string): RegistryAuthState {
    let s = this.state.get(registry);
    if (!s) {
      s = { challenge: undefined, resolved: undefined };
      this.state.set(registry, s);
    }
    return s;
  }

  /** Credentials for `domain` (resolved once per client). */
  credentialsFor(registry: string, domain: string): Promise<ResolvedCredentials> {
    const s = this.stateOf(registry);
    if (!s.resolved) {
      s.resolved = (async () => {
        const explicit = this.opts.credentials?.(domain);
        if (explicit) return { credentials: explicit, source: "credentials option" };
        this.config ??= loadDockerConfig(this.opts.dockerConfigDir);
        const docker = await resolveCredentials(domain, await this.config, { signal: this.opts.signal });
        const podmanFile = this.opts.containersAuthFile ?? (this.opts.dockerConfigDir === undefined ? containersAuthPath() : undefined);
        if (docker.credentials || podmanFile === undefined) return docker;
        this.podman ??= loadContainersAuth(podmanFile);
        const podman = await resolveCredentials(domain, await this.podman, { signal: this.opts.signal });
        if (podman.credentials) return { credentials: podman.credentials, source: podman.source.replace("config.json auths", "auth.json auths") };
        return { credentials: undefined, source: `${docker.source}; podman: ${podman.source.replace(/^none \(|\)$/g, "").replace("no Docker config.json found", `no ${podmanFile}`)}` };
      })();
      // A failed resolution is retried next time.
      s.resolved.catch(() => {
        s.resolved = undefined;
      });
    }
    return s.resolved;
  }

  /** The description of the credential source, if credentials were resolved. */
  async sourceFor(registry: string, domain: string): Promise<string> {
    try {
      return (await this.credentialsFor(registry, domain)).source;
    } catch (err) {
      return `error reading credentials: ${(err as Error).message}`;
    }
  }

  /**
   * A header for a request before any 401: a cached token for the scope, or
   * (when the registry already challenged us) a fresh one.
   */
  async headerFor(registry: string, domain: string, scope: string): Promise<string | undefined> {
    const challenge = this.state.get(registry)?.challenge ?? challengeCache.get(registry);
    if (!challenge) return undefined;
    return this.authorize(registry, domain, scope, challenge, undefined);
  }

  /**
   * Handles a 401: picks the challenge and returns the header to retry with.
   * `sent` is the Authorization header the refused request carried, if any:
   * a cached token equal to it is dropped, any other is reused.
   */
  async onUnauthorized(registry: string, domain: string, scope: string, res: HttpResponse, sent?: string): Promise<string> {
    const raw = res.headers["www-authenticate"];
    const header = Array.isArray(raw) ? raw.join(", ") : raw ?? "";
    const challenges = parseWwwAuthenticate(header);
    const challenge = challenges.find((c) => c.scheme === "bearer") ?? challenges.find((c) => c.scheme === "basic");
    if (!challenge) {
      const { source } = await this.credentialsFor(registry, domain).catch((e: Error) => ({ source: `error: ${e.message}` }));
      throw new AuthError(
        `Registry ${registry} answered 401 Unauthorized without a usable WWW-Authenticate challenge (${JSON.stringify(header.slice(0, 200))}); credentials tried: ${source}`,
        registry,
        source,
      );
    }
    this.stateOf(registry).challenge = challenge;
    challengeCache.set(registry, challenge);
    if (challengeCache.size > TOKEN_CACHE_MAX) challengeCache.delete(challengeCache.keys().next().value as string);
    return this.authorize(registry, domain, scope, challenge, sent);
  }

  private async authorize(registry: string, domain: string, scope: string, challenge: Challenge, refused: string | undefined): Promise<string> {
    const { credentials, source } = await this.credentialsFor(registry, domain);
    if (credentials?.registryToken) return `Bearer ${credentials.registryToken}`;
    if (challenge.scheme === "basic") {
      if (!credentials || credentials.username === undefined || credentials.password === undefined) {
        throw new AuthError(
          `Registry ${registry} requires a user name and password (HTTP Basic) and none were found; credentials tried: ${source}. ` +
            `Run \`docker login ${domain}\` or add an "auths" entry for "${domain}" to ${this.configFileHint()}.`,
          registry,
          source,
        );
      }
      return `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`, "utf8").toString("base64")}`;
    }
    // Bearer: the challenge may carry its own scope (e.g. push,pull); prefer ours for reads.
    const service = challenge.params.service ?? "";
    const realm = challenge.params.realm;
    if (!realm) {
      throw new RegistryError(`Registry ${registry} sent a Bearer challenge without a realm`, registry, 401);
    }
    const wantScope = scope || challenge.params.scope || "";
    const key = `${registry}|${service}|${wantScope}|${credentialId(credentials)}`;
    const cached = tokenCache.get(key);
    if (cached && cached.expiresAt > Date.now()) {
      // A token the registry just refused is dropped; any other is reused.
      if (cached.header !== refused) return cached.header;
      tokenCache.delete(key);
    }
    const token = await this.fetchToken(registry, domain, realm, service, wantScope, credentials, source);
    if (tokenCache.size >= TOKEN_CACHE_MAX) {
      const now = Date.now();
      for (const [k, v] of tokenCache) if (v.expiresAt <= now) tokenCache.delete(k);
      if (tokenCache.size >= TOKEN_CACHE_MAX) tokenCache.delete(tokenCache.keys().next().value as string);
    }
    tokenCache.set(key, token);
    return token.header;
  }

  private configFileHint(): string {
    return join(this.opts.dockerConfigDir ?? dockerConfigDir(), "config.json");
  }

  private async fetchToken(
    registry: string,
    domain: string,
    realm: string,
    service: string,
    scope: string,
    credentials: Credentials | undefined,
    source: string,
  ): Promise<CachedToken> {
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw new RegistryError(`Registry ${registry} sent a token realm that is not a URL: ${JSON.stringify(realm.slice(0, 200))}`, registry);
    }
    if (url.protocol !== "https:" && url.protocol !== "http:") {
      throw new RegistryError(`Registry ${registry} sent a token realm with scheme ${url.protocol}; only https (and http for loopback or insecureRegistries) is used`, registry);
    }
    const hasSecret = credentials !== undefined;
    if (url.protocol === "http:" && hasSecret && !this.transport.allowHttp(url.host)) {
      throw new AuthError(
        `Refusing to send credentials for ${registry} over plain HTTP to token realm ${url.origin}; list ${url.host} in insecureRegistries if that is intended`,
        registry,
        source,
      );
    }
    const started = Date.now();
    let res: HttpResponse;
    // Network failures (a refused redirect included) become a typed error naming the token server.
    const send = async (req: Parameters<AuthTransport["send"]>[0]): Promise<HttpResponse> => {
      try {
        return await this.transport.send(req);
      } catch (err) {
        if (err instanceof NetworkError) throw new RegistryError(`Registry ${registry}: token server ${url.origin} could not be used: ${err.message}`, registry, undefined, { cause: err });
        throw err;
      }
    };
    if (credentials?.identityToken) {
      const form = new URLSearchParams({ grant_type: "refresh_token", refresh_token: credentials.identityToken, client_id: "supermachine" });
      if (service) form.set("service", service);
      if (scope) form.set("scope", scope);
      res = await send({
        method: "POST",
        url,
        headers: { "content-type": "application/x-www-form-urlencoded", accept: "application/json" },
        body: Buffer.from(form.toString()),
      });
    } else {
      if (service) url.searchParams.set("service", service);
      if (scope) url.searchParams.set("scope", scope);
      const headers: Record<string, string> = { accept: "application/json" };
      if (credentials?.username !== undefined && credentials.password !== undefined) {
        headers.authorization = `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`, "utf8").toString("base64")}`;
        url.searchParams.set("account", credentials.username);
      }
      res = await send({ method: "GET", url, headers });
    }
    if (res.status === 401 || res.status === 403) {
      const detail = await bodyExcerpt(res.body);
      throw new AuthError(
        hasSecret
          ? `Registry ${registry}: the token server ${url.origin} refused the credentials from ${source} (${res.status}${detail ? `: ${detail}` : ""}). ` +
              `Check them, or run \`docker login ${domain}\` again.`
          : `Registry ${registry} requires authentication and no credentials were found; credentials tried: ${source}. ` +
              `Run \`docker login ${domain}\` or add an "auths" entry for "${domain}" to ${this.configFileHint()}.`,
        registry,
        source,
      );
    }
    if (res.status !== 200) {
      const detail = await bodyExcerpt(res.body);
      throw new RegistryError(`Registry ${registry}: token server ${url.origin} answered ${res.status}${detail ? `: ${detail}` : ""}`, registry, res.status);
    }
    const body = await readBounded(res.body, MAX_SMALL_JSON, () => new RegistryError(`Registry ${registry}: token response larger than ${MAX_SMALL_JSON} bytes`, registry));
    let json: unknown;
    try {
      json = JSON.parse(body.toString("utf8"));
    } catch {
      throw new RegistryError(`Registry ${registry}: token server ${url.origin} sent a response that is not JSON`, registry);
    }
    const o = (typeof json === "object" && json !== null ? json : {}) as Record<string, unknown>;
    const token = typeof o.token === "string" && o.token ? o.token : typeof o.access_token === "string" ? o.access_token : "";
    if (!TOKEN_CHARS.test(token)) {
      throw new RegistryError(`Registry ${registry}: token server ${url.origin} sent no usable "token" or "access_token"`, registry);
    }
    let expiresIn = typeof o.expires_in === "number" && Number.isFinite(o.expires_in) && o.expires_in > 0 ? o.expires_in : 60;
    expiresIn = Math.min(expiresIn, 24 * 3600);
    let issued = started;
    if (typeof o.issued_at === "string") {
      const t = Date.parse(o.issued_at);
      // Trust the server's clock only when it is close to ours.
      if (Number.isFinite(t) && Math.abs(t - started) < 5 * 60_000) issued = Math.min(t, started);
    }
    // Renew a little early: 10 s, or a quarter of a short lifetime.
    const margin = Math.min(10_000, (expiresIn * 1000) / 4);
    return { header: `Bearer ${token}`, expiresAt: issued + expiresIn * 1000 - margin };
  }
}
