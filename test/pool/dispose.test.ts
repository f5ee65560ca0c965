/**
 * The seed's `using vm = await pool.acquire()` (sync Symbol.dispose) and
 * `await using` give the VM back to its pool, and a released handle refuses
 * every further use with a typed error. Real restored VMs.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { ClosedError } from "../../src/errors.js";
import { Image } from "../../src/image/image.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs, waitFor } from "../helpers.js";

describe("Pool leases and disposal", { timeout: 2 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-dispose-"));
    image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag: `dispose-${randomBytes(3).toString("hex")}` });
  });

  after(async () => {
    await image?.close();
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("`using` (sync Symbol.dispose) returns the VM: inUse is 0 right after the block", async () => {
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      let held: Vm | undefined;
      {
        using vm = await pool.acquire();
        held = vm;
        assert.equal(pool.stats().inUse, 1);
        assert.equal((await vm.exec({ argv: ["echo", "in block"] })).stdout.toString(), "in block\n");
      }
      assert.equal(pool.stats().inUse, 0, "the sync disposer gave the VM back");
      assert.equal(held.status, "closed", "the released handle reports closed");
      await assert.rejects(held.exec({ argv: ["true"] }), ClosedError);
      // The pool hands out a VM again (the released one was replaced in the background).
      await waitFor(() => pool.stats().idle === 1, 120_000, "the replacement");
      const again = await pool.acquire();
      assert.equal((await again.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      await again.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("`await using` returns the VM at the end of the block, also when the block throws", async () => {
    const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      await assert.rejects(
        (async () => {
          await using vm = await pool.acquire();
          assert.equal(pool.stats().inUse, 1);
          await vm.exec({ argv: ["true"] });
          throw new Error("boom");
        })(),
        /boom/,
      );
      assert.equal(pool.stats().inUse, 0);
      assert.equal(pool.stats().idle, 1, "restoreOnRelease: false puts the same VM back to idle");
    } finally {
      await pool.shutdown();
    }
  });

  it("a released handle refuses every use with ClosedError and cannot reach the next holder's VM", async () => {
    const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      const first = await pool.acquire();
      await first.release();
      const second = await pool.acquire();
      for (const call of [
        () => first.exec({ argv: ["true"] }),
        () => first.spawn({ argv: ["true"] }),
        () => first.readFile("/etc/hostname"),
        () => first.writeFile("/tmp/x", Buffer.from("x")),
        () => first.workloadSignal(15),
        () => first.exposeTcp(0, 80),
        () => first.ping(),
        () => first.snapshot(join(snapshotsDir, "never")),
      ]) {
        await assert.rejects(call(), (e: unknown) => e instanceof ClosedError && /released back to its pool/.test((e as Error).message));
      }
      assert.throws(() => first.vsockPath, ClosedError);
      assert.throws(() => first.execPath, ClosedError);
      assert.throws(() => first.consoleTail(), ClosedError);
      // close/destroy/release/dispose on the old handle are harmless no-ops.
      await first.destroy();
      await first.close();
      await first.dispose();
      first[Symbol.dispose]();
      assert.equal(second.status, "ready", "the next holder's VM is untouched");
      assert.equal((await second.exec({ argv: ["echo", "mine"] })).stdout.toString(), "mine\n");
      assert.equal(pool.stats().inUse, 1);
      await second.release();
      assert.equal(pool.stats().inUse, 0);
    } finally {
      await pool.shutdown();
    }
  });

  it("destroy() on a held lease kills that VM and returns it; the pool replaces it", async () => {
    const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      const vm = await pool.acquire();
      await vm.destroy();
      assert.equal(pool.stats().inUse, 0);
      await assert.rejects(vm.exec({ argv: ["true"] }), ClosedError);
      await waitFor(() => pool.stats().idle === 1, 120_000, "the replacement");
      const fresh = await pool.acquire();
      assert.equal((await fresh.exec({ argv: ["echo", "fresh"] })).stdout.toString(), "fresh\n");
      await fresh.release();
    } finally {
      await pool.shutdown();
    }
  });
});
