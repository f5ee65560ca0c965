/**
 * Clones are unique before any guest code runs (real VMs, the default
 * busybox image): SNAPSHOT_PREPARE stops every guest process and the next
 * CONFIGURE continues them; a process started during warmup, continued in
 * each clone, reads different random bytes on its first read, and sees the
 * clone's stepped clock and hostname (docs/snapshots.md).
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { MsgType, Tag } from "../../src/protocol/constants.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault, defaultRootfs, waitFor } from "../helpers.js";

/** The state letter of a guest process (R, S, T, Z, …), or "" when it is gone. */
async function guestState(vm: Vm, pid: number): Promise<string> {
  const r = await vm.exec({ argv: ["sh", "-c", `cat /proc/${pid}/stat 2>/dev/null || true`] });
  const m = /\) (\S) /.exec(r.stdout.toString());
  return m ? m[1]! : "";
}

async function sh(vm: Vm, script: string): Promise<string> {
  const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs: 60_000 });
  assert.equal(r.exitCode, 0, `${script}: ${r.stderr.toString()}`);
  return r.stdout.toString();
}

describe("SNAPSHOT_PREPARE freezes the guest until CONFIGURE", { timeout: VM_TEST_TIMEOUT }, () => {
  it("stops every guest process (not one the user stopped before) and CONFIGURE continues only its own", async () => {
    const vm = await bootDefault();
    try {
      // A detached background loop, and a process the user stopped.
      const loop = Number((await sh(vm, "setsid sh -c 'while :; do sleep 0.05; done' </dev/null >/dev/null 2>&1 & echo $!")).trim());
      const parked = Number((await sh(vm, "setsid sleep 1000 </dev/null >/dev/null 2>&1 & p=$!; kill -STOP $p; echo $p")).trim());
      await waitFor(async () => (await guestState(vm, parked)) === "T", 30_000, "the parked process to stop");
      assert.match(await guestState(vm, loop), /^[RS]$/);

      const ok = await vm.conn.request(MsgType.SNAPSHOT_PREPARE);
      const stopped = ok.u32(Tag.SNAPSHOT_PREPARE_OK.stopped) ?? 0;
      assert.ok(stopped >= 1, `the agent stopped ${stopped} process(es)`);
      // The agent's next frame from the host ends its quiet period; the exec
      // it starts now is a new process and runs.
      assert.equal(await guestState(vm, loop), "T", "the background loop is stopped after SNAPSHOT_PREPARE");
      assert.equal(await guestState(vm, parked), "T");

      await vm.configure({ identity: "reseed" });
      await waitFor(async () => /^[RS]$/.test(await guestState(vm, loop)), 30_000, "the loop to run again after CONFIGURE");
      assert.equal(await guestState(vm, parked), "T", "a process the user stopped stays stopped");
      // A second CONFIGURE is harmless (nothing is frozen any more).
      await vm.configure({ identity: "reseed" });
      assert.equal(await guestState(vm, parked), "T");
    } finally {
      await vm.destroy();
    }
  });
});

describe("clones of a snapshot", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;
  let bakedAt: number;

  // Waits on a fifo (blocked in open(2) when the snapshot is taken); once
  // triggered, its first read of /dev/urandom, the clock and the hostname go
  // to files.
  const WATCHER =
    "mkfifo /root/go && setsid sh -c '" +
    "read x < /root/go; " +
    "head -c 16 /dev/urandom | od -An -tx1 | tr -d \" \\n\" > /root/rand; " +
    "date +%s > /root/clock; hostname > /root/host; echo $$ > /root/done" +
    "' </dev/null >/dev/null 2>&1 & echo $! > /root/watcher.pid";

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-clones-"));
    image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir,
      warmupTag: `clones-${randomBytes(3).toString("hex")}`,
      warmup: async (vm) => {
        await sh(vm, WATCHER);
        // The watcher is blocked on the fifo when the snapshot is taken.
        const pid = Number((await sh(vm, "cat /root/watcher.pid")).trim());
        await waitFor(async () => (await guestState(vm, pid)) === "S", 30_000, "the watcher to block on its fifo");
      },
    });
    bakedAt = Date.now();
  });

  after(async () => {
    await image?.close();
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("a process started in warmup reads different random bytes in each clone and sees its clock and hostname (the bake's own VM included)", async () => {
    assert.equal(image.baked, true, "this test bakes its own snapshot (a fresh warmupTag)");
    // Restores happen well after the snapshot, so that a clock that was
    // not stepped (snapshot time + time since restore) would show.
    const wait = bakedAt + 5_000 - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const pool = await image.pool({ min: 2, max: 2 });
    try {
      const a = await pool.acquire();
      const b = await pool.acquire();
      try {
        const results: { rand: string; clock: number; host: string; ownHost: string; before: number; after: number }[] = [];
        for (const vm of [a, b]) {
          const pid = Number((await sh(vm, "cat /root/watcher.pid")).trim());
          assert.notEqual(await guestState(vm, pid), "T", `the warmup process is continued in VM ${vm.id}`);
          assert.equal(await sh(vm, "test -e /root/done && echo yes || echo no"), "no\n", "the watcher has not run yet");
          const beforeS = Math.floor(Date.now() / 1000);
          await sh(vm, "echo go > /root/go");
          await waitFor(async () => (await sh(vm, "test -e /root/done && echo yes || echo no")) === "yes\n", 60_000, `the watcher in VM ${vm.id}`);
          const afterS = Math.ceil(Date.now() / 1000);
          const [rand, clock, host, ownHost] = (await sh(vm, "cat /root/rand; echo; cat /root/clock /root/host; hostname")).trim().split("\n");
          results.push({ rand: rand!, clock: Number(clock), host: host!, ownHost: ownHost!, before: beforeS, after: afterS });
        }
        const [ra, rb] = results as [(typeof results)[0], (typeof results)[0]];
        assert.match(ra.rand, /^[0-9a-f]{32}$/);
        assert.match(rb.rand, /^[0-9a-f]{32}$/);
        assert.notEqual(ra.rand, rb.rand, "the first read of /dev/urandom after restore differs between clones");
        for (const r of results) {
          assert.equal(r.host, r.ownHost, "the process sees its VM's hostname");
          assert.ok(r.clock >= r.before - 1 && r.clock <= r.after + 1, `the process sees the stepped clock (${r.clock} vs host ${r.before}..${r.after}, snapshot at ${Math.floor(bakedAt / 1000)})`);
        }
        assert.notEqual(ra.host, rb.host, "each clone has its own hostname");
      } finally {
        await a.release();
        await b.release();
      }
    } finally {
      await pool.shutdown();
    }
  });
});
