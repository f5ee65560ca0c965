/**
 * Egress policy: a pure function from (name, address, port) to allow or
 * deny with a reason. Compiled once from the user's `network` option.
 *
 *   network: true                    the public internet; special ranges denied
 *   network: false                   nothing leaves, DNS fails
 *   network: { allow, deny, hosts }  allow-list mode when `allow` is given
 *
 * Entries: "example.com", "*.example.com" (any subdomain, not the apex),
 * "*" (any name), "203.0.113.7", "203.0.113.0/24", each optionally with
 * ":PORT" or ":LOW-HIGH". Deny wins over allow.
 */

import { ipToNumber, ipToString, parseIpv4Address } from "./wire/ipv4.js";

export interface NetworkPolicy {
  /** Only what these entries name is reachable (allow-list mode). */
  readonly allow?: readonly string[];
  /** Never reachable, even when an allow entry matches. */
  readonly deny?: readonly string[];
  /** name → IPv4 address, like `docker run --add-host`. Answered by the VM's DNS. */
  readonly hosts?: Readonly<Record<string, string>>;
}

/** The `network` option of BuildOptions, PoolOptions and `vm.setNetwork`. */
export type NetworkOption = boolean | NetworkPolicy;

interface PortRange {
  lo: number;
  hi: number;
}

type Rule =
  | { kind: "name"; text: string; exact?: string; suffix?: string; any?: true; port?: PortRange }
  | { kind: "cidr"; text: string; net: number; mask: number; port?: PortRange };

export interface CompiledPolicy {
  readonly enabled: boolean;
  readonly allow: readonly Rule[] | undefined;
  readonly deny: readonly Rule[];
  readonly hosts: ReadonlyMap<string, Buffer>;
  /** A description for logs and errors. */
  readonly summary: string;
}

export interface Decision {
  readonly allow: boolean;
  readonly reason: string;
}

const LABEL = /^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$/;

/** A DNS name: lowercase labels, ≤ 253 characters. */
export function validName(name: string): boolean {
  if (name.length === 0 || name.length > 253) return false;
  return name.split(".").every((l) => LABEL.test(l));
}

function fail(option: string, what: string, got: unknown): never {
  throw new TypeError(`${option}: ${what} (got ${JSON.stringify(got)})`);
}

function parsePort(s: string, option: string, entry: string): PortRange {
  const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(s);
  const lo = m ? Number(m[1]) : NaN;
  const hi = m ? Number(m[2] ?? m[1]) : NaN;
  if (!m || lo < 1 || hi > 65535 || lo > hi) fail(option, "a port must be 1..65535 or a range LOW-HIGH", entry);
  return { lo, hi };
}

function parseRule(entry: unknown, option: string): Rule {
  if (typeof entry !== "string" || entry.length === 0 || entry.length > 300) fail(option, 'each entry must be a name ("pypi.org", "*.npmjs.org"), an IPv4 address or CIDR ("203.0.113.0/24"), optionally with ":PORT"', entry);
  const text = entry.trim().toLowerCase();
  const colon = text.lastIndexOf(":");
  if (text.indexOf(":") !== colon) fail(option, "IPv6 entries are not supported (the guest network is IPv4)", entry);
  const host = colon >= 0 ? text.slice(0, colon) : text;
  const port = colon >= 0 ? parsePort(text.slice(colon + 1), option, entry) : undefined;
  const withPort = <T extends object>(r: T): T & { port?: PortRange } => (port ? { ...r, port } : r);
  const slash = host.indexOf("/");
  if (slash >= 0 || /^\d+(\.\d+){3}$/.test(host)) {
    const addr = parseIpv4Address(slash >= 0 ? host.slice(0, slash) : host);
    const bits = slash >= 0 ? Number(host.slice(slash + 1)) : 32;
    if (!addr || !/^\d{1,2}$/.test(slash >= 0 ? host.slice(slash + 1) : "32") || bits > 32) fail(option, "not a valid IPv4 address or CIDR", entry);
    const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0;
    return withPort({ kind: "cidr" as const, text: entry, net: (ipToNumber(addr) & mask) >>> 0, mask });
  }
  if (host === "*") return withPort({ kind: "name" as const, text: entry, any: true as const });
  if (host.startsWith("*.")) {
    const suffix = host.slice(2);
    if (!validName(suffix)) fail(option, "not a valid wildcard name", entry);
    return withPort({ kind: "name" as const, text: entry, suffix });
  }
  const name = host.endsWith(".") ? host.slice(0, -1) : host;
  if (!validName(name)) fail(option, "not a valid host name", entry);
  return withPort({ kind: "name" as const, text: entry, exact: name });
}

/** Validates and compiles the `network` option; TypeErrors name the option. */
export function compilePolicy(opt: unknown, option = "network"): CompiledPolicy {
  if (opt === undefined || opt === true) return { enabled: true, allow: undefined, deny: [], hosts: new Map(), summary: "public internet" };
  if (opt === false) return { enabled: false, allow: undefined, deny: [], hosts: new Map(), summary: "disabled" };
  if (typeof opt !== "object" || opt === null || Array.isArray(opt)) fail(option, "must be true, false or { allow?, deny?, hosts? }", opt);
  const o = opt as Record<string, unknown>;
  for (const k of Object.keys(o)) if (!["allow", "deny", "hosts"].includes(k)) fail(option, `unknown key "${k}" (expected allow, deny, hosts)`, opt);
  const list = (v: unknown, name: string): Rule[] | undefined => {
    if (v === undefined) return undefined;
    if (!Array.isArray(v) || v.length > 10_000) fail(`${option}.${name}`, "must be an array of strings (at most 10000)", v);
    return v.map((e) => parseRule(e, `${option}.${name}`));
  };
  const allow = list(o.allow, "allow");
  const deny = list(o.deny, "deny") ?? [];
  const hosts = new Map<string, Buffer>();
  if (o.hosts !== undefined) {
    if (typeof o.hosts !== "object" || o.hosts === null || Array.isArray(o.hosts)) fail(`${option}.hosts`, "must be an object mapping names to IPv4 addresses", o.hosts);
    const entries = Object.entries(o.hosts as Record<string, unknown>);
    if (entries.length > 10_000) fail(`${option}.hosts`, "at most 10000 entries", entries.length);
    for (const [k, v] of entries) {
      const name = k.toLowerCase().replace(/\.$/, "");
      if (!validName(name)) fail(`${option}.hosts`, "keys must be host names", k);
      const addr = typeof v === "string" ? parseIpv4Address(v) : undefined;
      if (!addr) fail(`${option}.hosts["${k}"]`, "must be an IPv4 address", v);
      hosts.set(name, addr);
    }
  }
  const summary = allow ? `allow-list (${allow.length} entries)` : "public internet";
  return { enabled: true, allow, deny, hosts, summary: deny.length ? `${summary}, ${deny.length} denied` : summary };
}

/** Special-purpose ranges, denied unless an address allow entry names them. */
const SPECIAL: readonly { net: number; mask: number; what: string }[] = [
  ["0.0.0.0/8", "a 'this network' address"],
  ["10.0.0.0/8", "a private address (RFC 1918)"],
  ["100.64.0.0/10", "a carrier-grade NAT address"],
  ["127.0.0.0/8", "a loopback address (the host's own services)"],
  ["169.254.0.0/16", "a link-local address (cloud metadata)"],
  ["172.16.0.0/12", "a private address (RFC 1918)"],
  ["192.0.0.0/24", "an IETF protocol address"],
  ["192.168.0.0/16", "a private address (RFC 1918)"],
  ["198.18.0.0/15", "the VM network's own range (gateway, DNS names)"],
  ["224.0.0.0/4", "a multicast address"],
  ["240.0.0.0/4", "a reserved or broadcast address"],
].map(([cidr, what]) => {
  const [a, b] = cidr!.split("/");
  const mask = (0xffffffff << (32 - Number(b))) >>> 0;
  return { net: ipToNumber(parseIpv4Address(a!)!) & mask, mask, what: what! };
});

/** Why `ip` is special (private, loopback, ...), or undefined for a public address. */
export function specialRange(ip: Uint8Array): string | undefined {
  const n = ipToNumber(ip);
  for (const s of SPECIAL) if (((n & s.mask) >>> 0) === s.net >>> 0) return s.what;
  return undefined;
}

function portOk(r: Rule, port: number | undefined): boolean {
  return !r.port || (port !== undefined && port >= r.port.lo && port <= r.port.hi);
}

function nameMatches(r: Rule, name: string): boolean {
  if (r.kind !== "name") return false;
  if (r.any) return true;
  if (r.exact !== undefined) return name === r.exact;
  return r.suffix !== undefined && name.endsWith("." + r.suffix);
}

function ipMatches(r: Rule, ip: Uint8Array): boolean {
  return r.kind === "cidr" && ((ipToNumber(ip) & r.mask) >>> 0) === r.net;
}

/** May the guest resolve `name` at all? (DNS stage: no upstream query when not.) */
export function decideName(p: CompiledPolicy, name: string): Decision {
  if (!p.enabled) return { allow: false, reason: "the VM's network is disabled" };
  for (const r of p.deny) if (!r.port && nameMatches(r, name)) return { allow: false, reason: `denied by "${r.text}"` };
  if (!p.allow) return { allow: true, reason: "public internet" };
  for (const r of p.allow) if (nameMatches(r, name)) return { allow: true, reason: `allowed by "${r.text}"` };
  const mapped = p.hosts.get(name);
  if (mapped) for (const r of p.allow) if (ipMatches(r, mapped)) return { allow: true, reason: `allowed by "${r.text}"` };
  return { allow: false, reason: `${name} is not on the allow list` };
}

export interface ConnectTarget {
  /** The name the guest resolved (through our DNS), if any. */
  name?: string;
  /** The real address the host would connect to. */
  ip: Uint8Array;
  port: number;
  /** The address came from the policy's `hosts` map (not from a resolver). */
  fromHosts?: boolean;
}

/** May the guest connect to this target? */
export function decideConnect(p: CompiledPolicy, t: ConnectTarget): Decision {
  if (!p.enabled) return { allow: false, reason: "the VM's network is disabled" };
  const ip = ipToString(t.ip);
  const dest = t.name ? `${t.name} (${ip}) port ${t.port}` : `${ip} port ${t.port}`;
  for (const r of p.deny) {
    if ((t.name !== undefined && nameMatches(r, t.name)) || ipMatches(r, t.ip)) {
      if (portOk(r, t.port)) return { allow: false, reason: `${dest} is denied by "${r.text}"` };
    }
  }
  const special = specialRange(t.ip);
  if (p.allow) {
    for (const r of p.allow) if (ipMatches(r, t.ip) && portOk(r, t.port)) return { allow: true, reason: `allowed by "${r.text}"` };
    for (const r of p.allow) {
      if (t.name !== undefined && nameMatches(r, t.name) && portOk(r, t.port)) {
        if (special && !t.fromHosts) {
          return { allow: false, reason: `${dest}: the name resolves to ${special}; add an allow entry for the address, or a hosts entry, to reach it` };
        }
        return { allow: true, reason: `allowed by "${r.text}"` };
      }
    }
    return { allow: false, reason: `${dest} is not on the allow list` };
  }
  if (special) return { allow: false, reason: `${dest} is ${special}; denied unless an allow entry names it` };
  return { allow: true, reason: "public internet" };
}
