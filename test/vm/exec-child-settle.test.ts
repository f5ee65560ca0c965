/**
 * A spawned process's reads, Node streams, `for await` and wait() settle
 * when its VM is destroyed, dies, or is released back to a pool; wait() does
 * not need the caller to read; a death by signal is reported. Real VMs.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable, type Readable } from "node:stream";
import { after, before, describe, it } from "node:test";
import { ClosedError, GuestDiedError } from "../../src/errors.js";
import { Image } from "../../src/image/image.js";
import { DRAINED_KEEP_BYTES } from "../../src/vm/exec-child.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault, defaultRootfs } from "../helpers.js";

const FOUR_MIB = 4 * 1024 * 1024;

async function drain(r: Readable): Promise<number> {
  let n = 0;
  for await (const c of r) n += (c as Buffer).length;
  return n;
}

/** A promise's outcome: its error, or {value}. Attach at once (no unhandled rejection while others are checked). */
function outcome<T>(p: Promise<T>): Promise<unknown> {
  return p.then((v) => ({ value: v }), (e: unknown) => e);
}

/** What a promise (made with outcome()) settled with, without waiting past `ms`. */
async function settledWithin(p: Promise<unknown>, ms: number, what: string): Promise<unknown> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms)));
  try {
    return await Promise.race([p, hang]);
  } finally {
    clearTimeout(timer);
  }
}

describe("ExecChild settles with its VM", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let vm: Vm;

  before(async () => {
    vm = await bootDefault();
  });

  after(async () => {
    await vm?.destroy();
  });

  it("wait() resolves for a process that wrote 4 MiB nobody reads; the first 1 MiB stays readable, the rest is counted as discarded", async () => {
    const child = await vm.spawn({ argv: ["sh", "-c", `head -c ${FOUR_MIB} /dev/zero; echo done >&2`] });
    const r = await child.wait();
    assert.deepEqual({ exitCode: r.exitCode, signal: r.signal, timedOut: r.timedOut }, { exitCode: 0, signal: null, timedOut: false });
    let kept = 0;
    for (;;) {
      const b = await child.readStdout(1 << 20);
      if (b.length === 0) break;
      assert.ok(b.every((x) => x === 0));
      kept += b.length;
    }
    assert.equal(kept, DRAINED_KEEP_BYTES);
    assert.deepEqual(child.discardedBytes, { stdout: FOUR_MIB - DRAINED_KEEP_BYTES, stderr: 0 });
    assert.equal((await child.readStderr()).toString(), "done\n");
  });

  it("a channel being read stays lossless while wait() runs concurrently", async () => {
    const child = await vm.spawn({ argv: ["sh", "-c", `head -c ${FOUR_MIB} /dev/zero; head -c 100000 /dev/zero >&2`] });
    const [n, r] = await Promise.all([drain(child.stdout), child.wait()]);
    assert.equal(n, FOUR_MIB);
    assert.equal(r.exitCode, 0);
    assert.deepEqual(child.discardedBytes, { stdout: 0, stderr: 0 }, "stderr fits the kept window");
    assert.equal((await drain(child.stderr)), 100000);
  });

  it("a death by signal is reported: exitCode -1 and the signal number", async () => {
    const out = await vm.exec({ argv: ["sh", "-c", "kill -TERM $$"] });
    assert.deepEqual({ exitCode: out.exitCode, signal: out.signal }, { exitCode: -1, signal: 15 });
    const child = await vm.spawn({ argv: ["sh", "-c", "kill -KILL $$"] });
    const r = await child.wait();
    assert.deepEqual({ exitCode: r.exitCode, signal: r.signal }, { exitCode: -1, signal: 9 });
    const ok = await vm.exec({ argv: ["sh", "-c", "exit 3"] });
    assert.deepEqual({ exitCode: ok.exitCode, signal: ok.signal }, { exitCode: 3, signal: null });
  });

  it("destroying the VM settles pending readStdout/readStderr, Node streams, for await and wait() with ClosedError", async () => {
    const own = await bootDefault();
    try {
      const a = await own.spawn({ argv: ["sleep", "1000"] });
      const b = await own.spawn({ argv: ["sleep", "1000"] });
      const c = await own.spawn({ argv: ["sh", "-c", "echo early; sleep 1000"] });
      const pendingOut = outcome(a.readStdout());
      const pendingErr = outcome(a.readStderr());
      const streamed = outcome(drain(b.stdout));
      const early: string[] = [];
      const iterated = outcome(
        (async () => {
          for await (const chunk of c) early.push(chunk.toString());
        })(),
      );
      // A bare pipe() (no 'error' listener on the source) must not crash the process: the Readable ends.
      const d = await own.spawn({ argv: ["sh", "-c", "echo piped; sleep 1000"] });
      let piped = "";
      const sink = new Writable({
        write: (chunk: Buffer, _enc, cb) => {
          piped += chunk.toString();
          cb();
        },
      });
      const sinkDone = new Promise<void>((res) => sink.once("finish", () => res()));
      d.stdout.pipe(sink);
      const waits = [a, b, c, d].map((x) => outcome(x.wait()));
      // c's and d's first lines arrive before the VM goes.
      const t0 = Date.now();
      while ((early.length === 0 || piped === "") && Date.now() - t0 < 30_000) await new Promise((r) => setTimeout(r, 10));
      assert.deepEqual(early, ["early\n"]);
      await own.destroy();
      for (const [what, p] of [
        ["readStdout", pendingOut],
        ["readStderr", pendingErr],
        ["Readable", streamed],
        ["for await", iterated],
        ["wait a", waits[0]!],
        ["wait b", waits[1]!],
        ["wait c", waits[2]!],
        ["wait d", waits[3]!],
      ] as const) {
        const got = await settledWithin(p, 30_000, what);
        assert.ok(got instanceof ClosedError, `${what} settled with ${String(got)}`);
      }
      await settledWithin(outcome(sinkDone), 30_000, "the piped Readable's end");
      assert.equal(piped, "piped\n");
      await assert.rejects(a.readStdout(), ClosedError, "a later read rejects too");
    } finally {
      await own.destroy();
    }
  });

  it("a VM that dies (QEMU killed) settles pending reads and wait() with GuestDiedError", async () => {
    const own = await bootDefault();
    try {
      const child = await own.spawn({ argv: ["sleep", "1000"] });
      const pending = outcome(child.readStdout());
      const streamed = outcome(drain(child.stderr));
      const waited = outcome(child.wait());
      process.kill(own.pid!, "SIGKILL");
      for (const [what, p] of [
        ["readStdout", pending],
        ["Readable", streamed],
        ["wait", waited],
      ] as const) {
        const got = await settledWithin(p, 60_000, what);
        assert.ok(got instanceof GuestDiedError, `${what} settled with ${String(got)}`);
      }
    } finally {
      await own.destroy();
    }
  });

  describe("released back to a pool", () => {
    let snapshotsDir: string;
    let image: Image;

    before(async () => {
      snapshotsDir = await mkdtemp(join(tmpdir(), "sm-settle-"));
      image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag: `settle-${randomBytes(3).toString("hex")}` });
    });

    after(async () => {
      await image?.close();
      await rm(snapshotsDir, { recursive: true, force: true });
    });

    for (const restoreOnRelease of [true, false]) {
      it(`pending reads and wait() reject with ClosedError on release (restoreOnRelease: ${restoreOnRelease}); the process does not outlive the lease`, async () => {
        const pool = await image.pool({ min: 1, max: 1, restoreOnRelease });
        try {
          const leased = await pool.acquire();
          const child = await leased.spawn({ argv: ["sleep", "4242"] });
          const pending = outcome(child.readStdout());
          const waited = outcome(child.wait());
          await leased.release();
          for (const [what, p] of [
            ["readStdout", pending],
            ["wait", waited],
          ] as const) {
            const got = await settledWithin(p, 60_000, what);
            assert.ok(got instanceof ClosedError && /released back to its pool/.test(got.message), `${what} settled with ${String(got)}`);
          }
          const next = await pool.acquire();
          try {
            const ps = await next.exec({ argv: ["ps"] });
            assert.doesNotMatch(ps.stdout.toString(), /sleep 4242/, "the previous holder's process is gone");
          } finally {
            await next.release();
          }
        } finally {
          await pool.shutdown();
        }
      });
    }
  });
});
