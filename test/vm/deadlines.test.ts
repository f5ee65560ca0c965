/**
 * Every request has a deadline (docs/protocol.md, "Host limits"), on a real
 * VM whose QEMU is frozen with SIGSTOP: the agent cannot answer, so file
 * transfers, spawn and ping must turn into TimeoutError within their
 * deadlines, and close() must still return.
 */

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { describe, it } from "node:test";
import { TimeoutError } from "../../src/errors.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault, processAlive } from "../helpers.js";

describe("request deadlines on a real VM", { timeout: VM_TEST_TIMEOUT }, () => {
  it("a frozen guest: readFile, writeFile, spawn and ping reject with TimeoutError within their deadlines, and close() returns", async () => {
    const saved = process.env.SUPERMACHINE_REQUEST_TIMEOUT_MS;
    process.env.SUPERMACHINE_REQUEST_TIMEOUT_MS = "3000";
    let vm: Vm;
    try {
      vm = await bootDefault();
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_REQUEST_TIMEOUT_MS;
      else process.env.SUPERMACHINE_REQUEST_TIMEOUT_MS = saved;
    }
    const pid = vm.pid!;
    const dir = vm.runtimeDir;
    try {
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      process.kill(pid, "SIGSTOP");
      const timed = async (what: string, deadlineMs: number, op: () => Promise<unknown>) => {
        const t0 = Date.now();
        const e = await op().then(
          () => new Error(`${what} resolved on a frozen guest`),
          (err: unknown) => err,
        );
        const took = Date.now() - t0;
        assert.ok(e instanceof TimeoutError, `${what}: expected TimeoutError, got ${String(e)}`);
        assert.equal(e.timeoutMs, deadlineMs, what);
        assert.match(e.message, /SUPERMACHINE_REQUEST_TIMEOUT_MS/, what);
        assert.ok(took >= deadlineMs - 50 && took < deadlineMs + 10_000, `${what}: rejected after ${took} ms, deadline ${deadlineMs} ms`);
      };
      await Promise.all([
        timed("readFile", 6000, () => vm.readFile("/etc/hostname")),
        timed("writeFile", 6000, () => vm.writeFile("/tmp/x", Buffer.from("x"))),
        timed("spawn", 3000, () => vm.spawn({ argv: ["sleep", "1"] })),
        timed("ping", 3000, () => vm.ping()),
      ]);
      const t0 = Date.now();
      await vm.close();
      assert.ok(Date.now() - t0 < 30_000, "close() of a frozen VM took too long");
      assert.equal(vm.status, "closed");
      assert.equal(processAlive(pid), false, "QEMU is gone");
      assert.equal(existsSync(dir), false, "the runtime dir is gone");
    } finally {
      try {
        process.kill(pid, "SIGCONT");
      } catch {
        // already gone
      }
      await vm.destroy();
    }
  });
});
