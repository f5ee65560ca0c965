/**
 * loadState with a peer that closes the migration socket before it has read
 * the whole state file (QEMU does this once it has what it needs): the
 * file's read stream must be closed, not left paused with its descriptor.
 * Regression test for a descriptor leaked per such restore (found by
 * bench/soak.ts). A fake QEMU end (a unix socket server) and a fake QMP
 * client; no VM needed.
 */

import assert from "node:assert/strict";
import { readdirSync, readlinkSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { loadState } from "../../src/snapshot/migrate.js";
import { MIGRATION_IN_SOCKET } from "../../src/vmm/qemu.js";
import type { QmpClient } from "../../src/vmm/qmp.js";

function openDescriptorsOf(path: string): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith(path)) n++;
    } catch {
      /* closed meanwhile */
    }
  }
  return n;
}

describe("loadState", () => {
  it("closes the state file when QEMU closes the migration socket first (no descriptor leak)", async () => {
    const dir = await mkdtemp(join(tmpdir(), "sm-migrate-"));
    const state = join(dir, "state");
    // Larger than what the socket and the stream buffer hold, so the read
    // stream is still open when the peer goes away.
    await writeFile(state, Buffer.alloc(16 << 20, 7));
    const qmp = { execute: async (cmd: string) => (cmd === "query-migrate" ? { status: "completed" } : {}) } as unknown as QmpClient;
    try {
      for (let i = 0; i < 5; i++) {
        // QEMU listens from its start; loadState removes the socket when done.
        const server = createServer((s) => {
          s.once("data", () => s.destroy());
        });
        await new Promise<void>((r) => server.listen(join(dir, MIGRATION_IN_SOCKET), r));
        try {
          await loadState(qmp, dir, state, { ignoreShared: true, timeoutMs: 10_000 });
        } finally {
          server.close();
        }
      }
      // Destroy is asynchronous: give the streams a turn to close.
      for (let i = 0; i < 50 && openDescriptorsOf(state) > 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(openDescriptorsOf(state), 0, "no descriptor of the state file stays open");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
