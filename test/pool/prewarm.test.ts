/**
 * The pool's base prewarm (src/pool/pool.ts basePrewarm): the image's own
 * `true`, else the agent's binary. The order of the two on a fake exec, and
 * a real pool of an image that has no `true`: its VMs are still handed out.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { cp, mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { basePrewarm } from "../../src/pool/pool.js";
import type { ExecOptions, ExecOutput } from "../../src/vm/options.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, defaultRootfs } from "../helpers.js";

/** A stand-in with only exec(): records each argv, answers with `exitOf(argv)`. */
function fakeVm(exitOf: (argv: readonly string[]) => number): { vm: Vm; calls: string[][] } {
  const calls: string[][] = [];
  const vm = {
    exec: async (o: ExecOptions): Promise<ExecOutput> => {
      const argv = o.argv.map(String);
      calls.push(argv);
      return { stdout: Buffer.alloc(0), stderr: Buffer.alloc(0), exitCode: exitOf(argv) } as ExecOutput;
    },
  } as unknown as Vm;
  return { vm, calls };
}

describe("basePrewarm", () => {
  it("runs the image's `true` only, when it exists", async () => {
    const { vm, calls } = fakeVm(() => 0);
    await basePrewarm(vm, 1000);
    assert.deepEqual(calls, [["true"]]);
  });

  it("runs the agent's binary when the image has no `true` (exit 127)", async () => {
    const { vm, calls } = fakeVm((argv) => (argv[0] === "true" ? 127 : 0));
    await basePrewarm(vm, 1000);
    assert.deepEqual(calls, [["true"], ["/proc/1/exe", "--version"]]);
  });
});

describe("a pool of an image without `true`", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let dir: string;
  let image: Image | undefined;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-prewarm-"));
    const rootfs = join(dir, "rootfs");
    await cp(await defaultRootfs(), rootfs, { recursive: true, verbatimSymlinks: true });
    for (const d of ["bin", "sbin", "usr/bin", "usr/sbin"]) {
      const names = await readdir(join(rootfs, d)).catch(() => [] as string[]);
      if (names.includes("true")) await rm(join(rootfs, d, "true"));
    }
    image = await Image.build({ ref: `dir:${rootfs}`, snapshotsDir: join(dir, "snapshots"), warmupTag: `prewarm-${randomBytes(3).toString("hex")}` });
  });

  after(async () => {
    await image?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("hands out prewarmed VMs (the prewarm falls back to the agent's binary)", async () => {
    const pool = await image!.pool({ min: 1, max: 1, prewarm: true });
    try {
      const vm = await pool.acquire();
      // The image really has no `true` program (the shell's builtin aside).
      const r = await vm.exec({ argv: ["true"] });
      assert.equal(r.exitCode, 127);
      assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
      await vm.release();
    } finally {
      await pool.shutdown();
    }
  });
});
