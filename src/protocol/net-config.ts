/**
 * The network fields of CONFIGURE (tags 9–14, docs/protocol.md): the guest's
 * address, prefix, gateway and MTU, and the /etc/resolv.conf and /etc/hosts
 * the agent writes. Pure: validation and encoding only.
 */

import { invalidOption } from "../errors.js";
import type { RecordBuilder } from "./codec.js";
import { Tag } from "./constants.js";

/** The guest side of a VM's network, as the host's stack assigns it. */
export interface GuestNetConfig {
  /** The guest's IPv4 address, dotted quad (e.g. "198.19.0.2"). */
  readonly address: string;
  /** Prefix length of the guest's subnet, 0..32 (e.g. 24). */
  readonly prefixLength: number;
  /** IPv4 address of the default gateway (the host's stack); inside the subnet. */
  readonly gateway: string;
  /** MTU of the guest's interface, 68..65535. */
  readonly mtu: number;
  /** Contents of the guest's /etc/resolv.conf (≤ 4 KiB). */
  readonly resolvConf: string;
  /** Contents of the guest's /etc/hosts (≤ 64 KiB); the agent adds localhost and the hostname when missing. */
  readonly hosts: string;
}

/** Largest resolv.conf the agent accepts. */
export const MAX_RESOLV_CONF_BYTES = 4 * 1024;
/** Largest hosts file the agent accepts. */
export const MAX_HOSTS_BYTES = 64 * 1024;

function ipv4(v: unknown, name: string): Buffer {
  const parts = typeof v === "string" ? v.split(".") : [];
  if (parts.length !== 4 || !parts.every((p) => /^(0|[1-9][0-9]{0,2})$/.test(p) && Number(p) <= 255)) {
    throw invalidOption(name, "a dotted-quad IPv4 address", v);
  }
  return Buffer.from(parts.map(Number));
}

function text(v: unknown, name: string, max: number): Buffer {
  if (typeof v !== "string" || v.includes("\0")) throw invalidOption(name, "a string without NUL bytes", v);
  const b = Buffer.from(v, "utf8");
  if (b.length > max) throw invalidOption(name, `at most ${max} bytes`, `${b.length} bytes`);
  return b;
}

/** Validates `net` (TypeError naming the field) and appends its CONFIGURE fields to `r`. */
export function encodeNetConfig(r: RecordBuilder, net: GuestNetConfig, option = "net"): RecordBuilder {
  if (typeof net !== "object" || net === null) throw invalidOption(option, "an object", net);
  const addr = ipv4(net.address, `${option}.address`);
  const prefix = net.prefixLength;
  if (typeof prefix !== "number" || !Number.isInteger(prefix) || prefix < 0 || prefix > 32) {
    throw invalidOption(`${option}.prefixLength`, "an integer in 0..32", prefix);
  }
  const gw = ipv4(net.gateway, `${option}.gateway`);
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  if ((addr.readUInt32BE(0) & mask) >>> 0 !== (gw.readUInt32BE(0) & mask) >>> 0) {
    throw invalidOption(`${option}.gateway`, `an address inside ${net.address}/${prefix}`, net.gateway);
  }
  const mtu = net.mtu;
  if (typeof mtu !== "number" || !Number.isInteger(mtu) || mtu < 68 || mtu > 65535) {
    throw invalidOption(`${option}.mtu`, "an integer in 68..65535", mtu);
  }
  const resolv = text(net.resolvConf, `${option}.resolvConf`, MAX_RESOLV_CONF_BYTES);
  const hosts = text(net.hosts, `${option}.hosts`, MAX_HOSTS_BYTES);
  return r
    .bytes(Tag.CONFIGURE.net_addr, addr)
    .u32(Tag.CONFIGURE.net_prefix, prefix)
    .bytes(Tag.CONFIGURE.net_gateway, gw)
    .u32(Tag.CONFIGURE.net_mtu, mtu)
    .bytes(Tag.CONFIGURE.resolv_conf, resolv)
    .bytes(Tag.CONFIGURE.hosts_file, hosts);
}
