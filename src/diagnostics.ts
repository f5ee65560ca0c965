/**
 * Host-side observability, on Node's own conventions:
 * `node:diagnostics_channel` channels a program can subscribe to, and the
 * same events as `NODE_DEBUG=supermachine` lines on stderr.
 *
 *   supermachine:vm:start     { id, how: "boot" | "restore", accel, ms, phases }
 *   supermachine:vm:death     { id, code, message }       (died on its own)
 *   supermachine:pool:acquire { waitedMs, from: "idle" | "wait" }
 *   supermachine:pool:refill  { ms, ok, prewarmed?, message? } (one restore + prewarm;
 *                             prewarmed: the prewarm ran (false: skipped for a waiting acquire
 *                             or a reused QEMU; "pretranslating": QEMU's thread does its work)
 *   supermachine:image        ImageProgress               (pull, unpack, pack, bake phases)
 *
 * Publishing costs nothing when nobody subscribes and NODE_DEBUG is unset.
 */

import { channel, type Channel } from "node:diagnostics_channel";
import { debuglog } from "node:util";

export const channels = {
  vmStart: channel("supermachine:vm:start"),
  vmDeath: channel("supermachine:vm:death"),
  poolAcquire: channel("supermachine:pool:acquire"),
  poolRefill: channel("supermachine:pool:refill"),
  image: channel("supermachine:image"),
} as const;

const log = debuglog("supermachine");

/** Publishes `data` on `ch` and, with NODE_DEBUG=supermachine, logs it. */
export function trace(ch: Channel, data: Record<string, unknown>): void {
  if (ch.hasSubscribers) ch.publish(data);
  if (log.enabled) log("%s %j", String(ch.name), data);
}

const TRACED = Symbol("supermachine.traced");

/** Wraps an onProgress callback so every event is also traced (once). */
export function tracedProgress<T extends object>(cb: ((p: T) => void) | undefined): (p: T) => void {
  if (cb && (cb as unknown as Record<symbol, boolean>)[TRACED]) return cb;
  const f = (p: T) => {
    trace(channels.image, p as Record<string, unknown>);
    cb?.(p);
  };
  Object.defineProperty(f, TRACED, { value: true });
  return f;
}
