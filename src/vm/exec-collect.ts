/**
 * Collects an exec's output for `vm.exec()`: both channels into one growing
 * buffer each (ByteQueue), credited back to the guest as it arrives, until
 * `maxOutputBytes` in total, where the process is cancelled. Memory is the
 * output's bytes (at most twice while a buffer grows), whatever the sizes
 * of the guest's frames.
 */

import { ByteQueue } from "../agent-client/byte-queue.js";
import type { ExecStream } from "../agent-client/connection.js";

export interface CollectedOutput {
  /** Total bytes went over maxOutputBytes: the process was cancelled, the rest dropped. */
  readonly overLimit: boolean;
  /** Takes stdout (once). */
  stdout(): Buffer;
  /** Takes stderr (once). */
  stderr(): Buffer;
}

export function collectOutput(s: ExecStream, maxOutputBytes: number): CollectedOutput {
  const out = new ByteQueue();
  const err = new ByteQueue();
  let total = 0;
  let overLimit = false;
  s.onData = (ch, chunk) => {
    if (overLimit) return;
    total += chunk.length;
    if (total > maxOutputBytes) {
      overLimit = true;
      s.cancel();
      return;
    }
    (ch === 1 ? out : err).push(chunk);
    s.ack(ch, chunk.length);
  };
  return {
    get overLimit() {
      return overLimit;
    },
    stdout: () => out.takeAll(),
    stderr: () => err.takeAll(),
  };
}
