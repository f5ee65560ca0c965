import assert from "node:assert/strict";
import { test } from "node:test";
import { compilePolicy, decideConnect, decideName, specialRange } from "../../src/net/policy.js";
import { parseIpv4Address } from "../../src/net/wire/ipv4.js";

const ip = (s: string) => parseIpv4Address(s)!;

test("default policy: the public internet, special ranges denied with a reason", () => {
  const p = compilePolicy(true);
  assert.equal(decideConnect(p, { ip: ip("203.0.113.9"), port: 443 }).allow, true);
  for (const [a, why] of [
    ["127.0.0.1", /loopback/],
    ["10.1.2.3", /private/],
    ["172.20.0.1", /private/],
    ["192.168.1.1", /private/],
    ["169.254.169.254", /metadata/],
    ["100.64.0.1", /carrier-grade/],
    ["198.19.0.1", /VM network/],
    ["224.0.0.251", /multicast/],
    ["255.255.255.255", /broadcast/],
    ["0.0.0.0", /this network/],
  ] as const) {
    const d = decideConnect(p, { ip: ip(a), port: 80 });
    assert.equal(d.allow, false, a);
    assert.match(d.reason, why, a);
  }
  assert.equal(decideName(p, "pypi.org").allow, true);
  // A public name that resolves to a private address (DNS rebinding) is denied.
  assert.equal(decideConnect(p, { name: "evil.example", ip: ip("127.0.0.1"), port: 80 }).allow, false);
  assert.equal(specialRange(ip("8.8.8.8")), undefined);
});

test("false: nothing resolves, nothing connects", () => {
  const p = compilePolicy(false);
  assert.equal(decideName(p, "pypi.org").allow, false);
  assert.match(decideConnect(p, { ip: ip("203.0.113.9"), port: 443 }).reason, /disabled/);
});

test("allow-list mode: names, wildcards, CIDRs and ports", () => {
  const p = compilePolicy({ allow: ["pypi.org", "*.npmjs.org", "203.0.113.0/24", "api.example.com:443", "192.0.2.7:8000-8100"] });
  assert.equal(decideName(p, "pypi.org").allow, true);
  assert.equal(decideName(p, "registry.npmjs.org").allow, true);
  assert.equal(decideName(p, "a.b.npmjs.org").allow, true);
  assert.equal(decideName(p, "npmjs.org").allow, false, "a wildcard does not match the apex");
  assert.equal(decideName(p, "evil.org").allow, false);
  assert.equal(decideName(p, "api.example.com").allow, true);
  assert.equal(decideConnect(p, { name: "api.example.com", ip: ip("198.51.100.1"), port: 443 }).allow, true);
  assert.equal(decideConnect(p, { name: "api.example.com", ip: ip("198.51.100.1"), port: 80 }).allow, false);
  assert.equal(decideConnect(p, { ip: ip("203.0.113.200"), port: 22 }).allow, true);
  assert.equal(decideConnect(p, { ip: ip("198.51.100.1"), port: 443 }).allow, false, "an IP literal not on the list");
  assert.equal(decideConnect(p, { ip: ip("192.0.2.7"), port: 8050 }).allow, true);
  assert.equal(decideConnect(p, { ip: ip("192.0.2.7"), port: 8101 }).allow, false);
  // A name matched by a rule whose address is private: refused unless a hosts entry gave it.
  const d = decideConnect(p, { name: "pypi.org", ip: ip("10.0.0.1"), port: 443 });
  assert.equal(d.allow, false);
  assert.match(d.reason, /hosts entry/);
});

test("hosts + allow expose a host service; hosts alone do not; deny wins", () => {
  const p = compilePolicy({ allow: ["registry.local"], hosts: { "registry.local": "127.0.0.1" } });
  assert.equal(decideName(p, "registry.local").allow, true);
  assert.equal(decideConnect(p, { name: "registry.local", ip: ip("127.0.0.1"), port: 5000, fromHosts: true }).allow, true);
  const q = compilePolicy({ hosts: { "registry.local": "127.0.0.1" } });
  assert.equal(decideConnect(q, { name: "registry.local", ip: ip("127.0.0.1"), port: 5000, fromHosts: true }).allow, false);
  const r = compilePolicy({ allow: ["*"], deny: ["*.evil.example", "203.0.113.0/24:25"] });
  assert.equal(decideName(r, "x.evil.example").allow, false);
  assert.equal(decideConnect(r, { name: "ok.example", ip: ip("203.0.113.1"), port: 25 }).allow, false);
  assert.equal(decideConnect(r, { name: "ok.example", ip: ip("203.0.113.1"), port: 443 }).allow, true);
  // A port-specific deny does not stop the name from resolving.
  assert.equal(decideName(compilePolicy({ deny: ["mail.example:25"] }), "mail.example").allow, true);
});

test("invalid policies are TypeErrors naming the option and the entry", () => {
  assert.throws(() => compilePolicy("yes"), /network: must be true, false/);
  assert.throws(() => compilePolicy({ allow: "pypi.org" }), /network\.allow: must be an array/);
  assert.throws(() => compilePolicy({ allow: ["exa mple.com"] }), /network\.allow: not a valid host name.*exa mple/);
  assert.throws(() => compilePolicy({ allow: ["10.0.0.0/33"] }), /CIDR/);
  assert.throws(() => compilePolicy({ allow: ["::1"] }), /IPv6/);
  assert.throws(() => compilePolicy({ allow: ["a.com:0"] }), /port/);
  assert.throws(() => compilePolicy({ hosts: { "a.com": "localhost" } }), /network\.hosts\["a\.com"\]: must be an IPv4 address/);
  assert.throws(() => compilePolicy({ allows: [] }), /unknown key "allows"/);
});
