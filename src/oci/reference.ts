/**
 * Image references, normalised the way Docker does it.
 *
 *   alpine                       → docker.io/library/alpine:latest
 *   user/app:1.2                 → docker.io/user/app:1.2
 *   localhost/app                → localhost/app:latest
 *   127.0.0.1:5000/ns/app@sha256:… (no tag: the digest names the image)
 *   ghcr.io/o/app:v1@sha256:…    (tag and digest: the digest wins)
 *
 * The first path component is a registry host when it is `localhost`,
 * contains a `.` or a `:` (a port), or holds an upper-case letter (which a
 * repository never may); otherwise the image lives on Docker Hub.
 * Invalid references throw a TypeError that names the reference.
 */

import { parseDigest } from "./digest.js";

/** The registry of Docker Hub images as written in references. */
export const DOCKER_HUB_DOMAIN = "docker.io";
/** The host that actually serves Docker Hub's registry API. */
export const DOCKER_HUB_REGISTRY = "registry-1.docker.io";
/** The key Docker writes Hub credentials under in config.json. */
export const DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/";
/** Every spelling of Docker Hub's host. */
export const DOCKER_HUB_ALIASES: readonly string[] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

const MAX_NAME_LENGTH = 255;
// One path component: lower-case alphanumerics joined by `.`, `_`, `__` or runs of `-`.
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$/;
const TAG = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const DOMAIN_COMPONENT = /^(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])$/;
const PORT = /^[0-9]{1,5}$/;
const IPV6_BRACKETED = /^\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]$/;

/** A parsed, normalised image reference. */
export interface ImageReference {
  /** Registry as written in the reference after normalisation: "docker.io", "ghcr.io", "127.0.0.1:5000". */
  readonly domain: string;
  /** The host[:port] to talk to: Docker Hub's API host for "docker.io", else `domain`. */
  readonly registry: string;
  /** Repository path inside the registry: "library/alpine". */
  readonly repository: string;
  /** Tag; "latest" when neither a tag nor a digest was given. */
  readonly tag: string | undefined;
  /** Digest ("sha256:<64 hex>"); when present it, not the tag, names the image. */
  readonly digest: string | undefined;
  /** `domain/repository`. */
  readonly name: string;
  /** What to ask the registry for: the digest if any, else the tag. */
  readonly reference: string;
  /** Canonical form: `domain/repository[:tag][@digest]`. */
  toString(): string;
}

function invalid(ref: string, why: string): TypeError {
  return new TypeError(`Invalid image reference ${JSON.stringify(ref)}: ${why}`);
}

function isRegistryHost(component: string): boolean {
  return component === "localhost" || component.includes(".") || component.includes(":") || component !== component.toLowerCase();
}

function validateDomain(ref: string, domain: string): void {
  let host = domain;
  let port: string | undefined;
  if (host.startsWith("[")) {
    const close = host.indexOf("]");
    if (close < 0) throw invalid(ref, `bad registry host ${JSON.stringify(domain)}`);
    const rest = host.slice(close + 1);
    host = host.slice(0, close + 1);
    if (!IPV6_BRACKETED.test(host)) throw invalid(ref, `bad IPv6 registry host ${JSON.stringify(domain)}`);
    if (rest !== "") {
      if (!rest.startsWith(":")) throw invalid(ref, `bad registry host ${JSON.stringify(domain)}`);
      port = rest.slice(1);
    }
  } else {
    const colon = host.indexOf(":");
    if (colon >= 0) {
      port = host.slice(colon + 1);
      host = host.slice(0, colon);
    }
    if (host === "" || !host.split(".").every((c) => DOMAIN_COMPONENT.test(c))) {
      throw invalid(ref, `bad registry host ${JSON.stringify(domain)}`);
    }
  }
  if (port !== undefined && (!PORT.test(port) || Number(port) > 65535 || Number(port) === 0)) {
    throw invalid(ref, `bad registry port in ${JSON.stringify(domain)}`);
  }
}

class Reference implements ImageReference {
  readonly registry: string;
  readonly name: string;
  readonly reference: string;
  constructor(
    readonly domain: string,
    readonly repository: string,
    readonly tag: string | undefined,
    readonly digest: string | undefined,
  ) {
    this.registry = domain === DOCKER_HUB_DOMAIN ? DOCKER_HUB_REGISTRY : domain;
    this.name = `${domain}/${repository}`;
    this.reference = digest ?? tag ?? "latest";
  }
  toString(): string {
    return `${this.name}${this.tag !== undefined ? `:${this.tag}` : ""}${this.digest !== undefined ? `@${this.digest}` : ""}`;
  }
  toJSON(): string {
    return this.toString();
  }
}

/**
 * Parses and normalises an image reference. Throws a TypeError naming the
 * reference when it is not valid.
 */
export function parseReference(ref: string): ImageReference {
  if (typeof ref !== "string") throw new TypeError(`Invalid image reference: expected a string, received ${typeof ref}`);
  if (ref === "") throw invalid(ref, "it is empty");
  if (ref.length > 4096) throw invalid(ref.slice(0, 64) + "…", "it is too long");
  if (/\s/.test(ref)) throw invalid(ref, "it contains white space");
  if (/^[a-f0-9]{64}$/.test(ref)) {
    throw invalid(ref, "a bare 64-hex string is an image ID, not a reference; write name@sha256:<hex>");
  }
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    const d = rest.slice(at + 1);
    rest = rest.slice(0, at);
    try {
      digest = parseDigest(d).digest;
    } catch (err) {
      throw invalid(ref, (err as Error).message);
    }
  }
  // A tag follows the last ':' that comes after the last '/'.
  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf("/");
  const lastColon = rest.lastIndexOf(":");
  if (lastColon > lastSlash) {
    tag = rest.slice(lastColon + 1);
    rest = rest.slice(0, lastColon);
    if (!TAG.test(tag)) throw invalid(ref, `bad tag ${JSON.stringify(tag)} (allowed: [A-Za-z0-9_.-], at most 128, not starting with . or -)`);
  }
  if (rest === "") throw invalid(ref, "no repository name");
  let domain: string;
  let repository: string;
  const firstSlash = rest.indexOf("/");
  const first = firstSlash < 0 ? "" : rest.slice(0, firstSlash);
  if (firstSlash >= 0 && isRegistryHost(first)) {
    domain = first;
    repository = rest.slice(firstSlash + 1);
    validateDomain(ref, domain);
  } else {
    domain = DOCKER_HUB_DOMAIN;
    repository = rest;
  }
  if (domain.toLowerCase() === "index.docker.io" || domain.toLowerCase() === DOCKER_HUB_DOMAIN) domain = DOCKER_HUB_DOMAIN;
  if (repository === "") throw invalid(ref, "no repository name after the registry host");
  if (repository !== repository.toLowerCase()) throw invalid(ref, "repository name must be lowercase");
  for (const component of repository.split("/")) {
    if (!PATH_COMPONENT.test(component)) {
      throw invalid(ref, `bad repository path component ${JSON.stringify(component)} (lower-case letters, digits and single separators . _ __ - only)`);
    }
  }
  if (domain === DOCKER_HUB_DOMAIN && !repository.includes("/")) repository = `library/${repository}`;
  if (domain.length + 1 + repository.length > MAX_NAME_LENGTH) throw invalid(ref, `name longer than ${MAX_NAME_LENGTH} characters`);
  if (tag === undefined && digest === undefined) tag = "latest";
  return new Reference(domain, repository, tag, digest);
}

/** True when `host` names Docker Hub in any of its spellings (with or without scheme/path). */
export function isDockerHub(host: string): boolean {
  return DOCKER_HUB_ALIASES.includes(host.toLowerCase());
}

/**
 * Docker's short form: "alpine:latest" for Hub official images, "user/app:1"
 * for other Hub images, the full name otherwise.
 */
export function familiarName(ref: ImageReference): string {
  let name = ref.name;
  if (ref.domain === DOCKER_HUB_DOMAIN) {
    name = ref.repository.startsWith("library/") && ref.repository.split("/").length === 2 ? ref.repository.slice(8) : ref.repository;
  }
  return `${name}${ref.tag !== undefined ? `:${ref.tag}` : ""}${ref.digest !== undefined ? `@${ref.digest}` : ""}`;
}
