/**
 * Synthetic addresses for names: the VM's DNS answers every allowed name
 * with an address of its own from 198.18.0.0/16 and remembers what the name
 * really resolved to. A connection to that address is then matched to the
 * name the guest asked for, so a name rule cannot be dodged through shared
 * CDN addresses or a lying SNI. Bounded: the least recently used name is
 * forgotten past {@link MAX_NAMES}.
 */

import { numberToIp } from "./wire/ipv4.js";

export const SYNTHETIC_BASE = 0xc6120000; // 198.18.0.0
export const SYNTHETIC_MASK = 0xffff0000;
export const MAX_NAMES = 4096;

export interface NameEntry {
  readonly name: string;
  readonly synthetic: number;
  addresses: Buffer[];
  fromHosts: boolean;
}

export function isSynthetic(ip: number): boolean {
  return ((ip & SYNTHETIC_MASK) >>> 0) === SYNTHETIC_BASE;
}

export class NameTable {
  private byName = new Map<string, NameEntry>();
  private bySynthetic = new Map<number, NameEntry>();
  private next = 1;

  /** The entry for `name` (refreshed), with a synthetic address assigned on first use. */
  assign(name: string, addresses: Buffer[], fromHosts: boolean): NameEntry {
    let e = this.byName.get(name);
    if (e) {
      this.byName.delete(name);
      e.addresses = addresses;
      e.fromHosts = fromHosts;
    } else {
      if (this.byName.size >= MAX_NAMES) {
        const oldest = this.byName.values().next().value as NameEntry;
        this.byName.delete(oldest.name);
        this.bySynthetic.delete(oldest.synthetic);
      }
      let synthetic: number;
      do {
        synthetic = (SYNTHETIC_BASE + this.next) >>> 0;
        this.next = this.next >= 0xfffe ? 1 : this.next + 1;
      } while (this.bySynthetic.has(synthetic));
      e = { name, synthetic, addresses, fromHosts };
      this.bySynthetic.set(synthetic, e);
    }
    this.byName.set(name, e);
    return e;
  }

  lookup(synthetic: number): NameEntry | undefined {
    return this.bySynthetic.get(synthetic);
  }

  static address(e: NameEntry): Buffer {
    return numberToIp(e.synthetic);
  }
}
