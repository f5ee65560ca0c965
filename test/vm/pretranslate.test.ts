/**
 * Pretranslation (docs/pretranslate.md; qemu/supermachine-pretranslate.patch):
 * a fresh restore's QEMU translates the blocks an earlier fresh restore of
 * the same snapshot made, in a thread of its own, while the guest runs.
 * On real VMs under TCG, with the QEMU setup build:
 * - a pool's first fresh VM records the keys after its prewarm, once,
 *   under its prewarm's label; a later fresh VM of such a pool, given that
 *   list, is offered without running the prewarm;
 * - a later fresh restore gets them, translates them, and its guest runs
 *   as before (programs give their results);
 * - a block whose guest code changed between its translation and the
 *   moment it would become visible is thrown away: the guest runs its
 *   new code (a held pretranslation makes that moment the test's);
 * - a hostile key list is refused whole (bad header) or key by key
 *   (outside RAM, other CPU modes, other compile flags), and the guest
 *   runs on;
 * - nothing is left running.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chmod, lstat, mkdtemp, readFile, rm, symlink, unlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import { defaultImageRef } from "../../src/guest/default-image.js";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { findQemu } from "../../src/vmm/qemu.js";
import {
  type PretranslateInfo,
  TB_HINTS_FILE,
  TB_HINTS_LABEL_FILE,
  checkTbHints,
  deprioritizePretranslator,
  pretranslate,
  pretranslateInfo,
  readTbHints,
  readTbHintsLabel,
  releasePretranslation,
} from "../../src/vmm/pretranslate.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, descendantsMatching } from "../helpers.js";
import { exitProgram } from "../fixtures/exit-elf.js";

const tcg = chooseAccelerator().accel === "tcg";

async function run(vm: Vm, script: string): Promise<{ code: number; out: string }> {
  const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs: 120_000 });
  return { code: r.exitCode, out: r.stdout.toString() + r.stderr.toString() };
}

/** A fresh restore whose QEMU gets no list (the test hands it one over QMP). */
async function restoreWithoutPretranslation(image: Image): Promise<Vm> {
  process.env.SUPERMACHINE_PRETRANSLATE = "0";
  try {
    return await image.restore();
  } finally {
    delete process.env.SUPERMACHINE_PRETRANSLATE;
  }
}

/** Waits until QEMU's pretranslator is done and the vCPU has processed every batch handed to it. */
async function settled(vm: Vm, o: { held?: boolean } = {}): Promise<PretranslateInfo> {
  const qmp = await vm.qmp();
  const end = Date.now() + 5 * 60_000;
  for (;;) {
    const info = await pretranslateInfo(qmp);
    if (!info.running && info.pending === 0 && (o.held || info.held === 0)) return info;
    if (Date.now() > end) throw new Error(`pretranslation did not settle: ${JSON.stringify(info)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** What the guest computes must not depend on who translated its code. */
async function guestWorks(vm: Vm): Promise<void> {
  const want = createHash("md5")
    .update(Array.from({ length: 3000 }, (_, i) => `${i + 1}\n`).join(""))
    .digest("hex");
  const r = await run(vm, "seq 1 3000 | md5sum; /tmp/p; echo rc=$?");
  assert.equal(r.out, `${want}  -\nrc=1\n`);
}

describe("pretranslation of a snapshot's blocks (x-supermachine-pretranslate)", { timeout: 6 * VM_TEST_TIMEOUT }, () => {
  let dir: string;
  let image: Image | undefined;
  let hintsFile: string;

  before(async () => {
    if (!tcg) return;
    assert.match(findQemu(), /\/qemu\/bin\/qemu-system-x86_64$/, "npm run setup -- --test builds the QEMU with the pretranslation commands; the tests need it");
    dir = await mkdtemp(join(tmpdir(), "sm-pretranslate-"));
    image = await Image.build({
      ref: await defaultImageRef(),
      snapshotsDir: join(dir, "snapshots"),
      warmupTag: `pretranslate-${randomBytes(3).toString("hex")}`,
      warmup: async (vm) => {
        await vm.writeFile("/tmp/p", exitProgram(1));
        assert.equal((await run(vm, "chmod 755 /tmp/p && /tmp/p; echo rc=$?")).out, "rc=1\n");
      },
    });
    hintsFile = join(image.snapshotPath, TB_HINTS_FILE);
  });

  after(async () => {
    await image?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
    assert.deepEqual(descendantsMatching(/qemu-system/), [], "no QEMU of this process remains");
  });

  it("a pool's first fresh VM records the keys of its blocks after its prewarm, once", async (t) => {
    if (!tcg) return t.skip("KVM: the guest's code runs on the CPU, nothing is translated");
    await assert.rejects(lstat(hintsFile), "no key list before a fresh restore");
    // The image's first VM is the bake's own (not a restore); the second is a fresh restore.
    const pool = await image!.pool({ min: 2, max: 2 });
    try {
      const end = Date.now() + 5 * 60_000;
      while (!(await lstat(hintsFile).then(() => true, () => false))) {
        if (Date.now() > end) throw new Error("the pool wrote no key list");
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      await pool.shutdown();
    }
    const st = await lstat(hintsFile);
    assert.equal(st.mode & 0o777, 0o600);
    const n = checkTbHints(await readFile(hintsFile));
    assert.ok(n > 1000, `${n} keys`);
  });

  it("a fresh restore without a list records one (Vm._recordTbHints), and only then", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    await unlink(hintsFile);
    const vm = await image!.restore();
    try {
      assert.equal(await vm._pretranslated, false, "no list: no pretranslation");
      assert.equal((await run(vm, "/tmp/p; echo rc=$?")).out, "rc=1\n");
      const n = await vm._recordTbHints();
      assert.ok(n > 1000, `${n} keys`);
      assert.equal(checkTbHints(await readFile(hintsFile)), n);
      assert.equal(await vm._recordTbHints(), 0, "a list exists: not written again");
    } finally {
      await vm.destroy();
    }
  });

  it("a later fresh restore translates the list ahead of the guest, which runs as before", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    const vm = await image!.restore();
    try {
      assert.equal(await vm._pretranslated, true);
      // The VM idles while the thread works (at nice 19, however busy the
      // host is): most keys are its to make, whatever the guest reached first.
      const info = await settled(vm);
      t.diagnostic(JSON.stringify(info));
      assert.ok(info.linked > 1000, JSON.stringify(info));
      assert.equal(info.invalid, 0, JSON.stringify(info));
      assert.ok(info.linked <= info.translated, JSON.stringify(info));
      await guestWorks(vm);
      assert.equal(await vm._recordTbHints(), 0, "a pretranslated VM does not record");
    } finally {
      await vm.destroy();
    }
  });

  it("throws away a block whose guest code changed before it became visible", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    const hints = await readTbHints(hintsFile);
    assert.ok(hints, "the list recorded above");
    const vm = await restoreWithoutPretranslation(image!);
    try {
      assert.equal(await vm._pretranslated, false);
      const qmp = await vm.qmp();
      await pretranslate(qmp, vm.runtimeDir, hints, { hold: true });
      const made = await settled(vm, { held: true });
      assert.ok(made.held > 0 && made.linked === 0, JSON.stringify(made));
      // /tmp/p's code page changes in place (same inode, same page cache page):
      // the held block of its entry was made from the old bytes.
      await vm.writeFile("/tmp/q", exitProgram(2));
      assert.equal((await run(vm, "dd if=/tmp/q of=/tmp/p conv=notrunc 2>/dev/null; echo done")).out, "done\n");
      await releasePretranslation(qmp);
      const info = await settled(vm);
      // What the vCPU translated for itself while they were held is not linked twice.
      assert.equal((await run(vm, "/tmp/p; echo rc=$?")).out, "rc=2\n", "the new code runs, not the block made from the old");
      assert.ok(info.linked > 0, JSON.stringify(info));
      assert.ok(info.stale >= 1, JSON.stringify(info));
    } finally {
      await vm.destroy();
    }
  });

  it("a block made before a reload from code the reload puts back is thrown away (pools reuse the process)", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    const hints = (await readTbHints(hintsFile))!;
    // No list for the pool's VMs: this test hands one over itself.
    process.env.SUPERMACHINE_PRETRANSLATE = "0";
    let pool: Awaited<ReturnType<Image["pool"]>> | undefined;
    try {
      pool = await image!.pool({ min: 0, max: 1 });
      // A must be a fresh restore (its QEMU has not run /tmp/p): the image's
      // bake VM, if it is still there, is not a restore.
      let a = await pool.acquire();
      if (!a.launch.incomingState || a.launch.template) {
        await a.release();
        a = await pool.acquire();
      }
      assert.equal(a._reloaded, false, "A runs in a fresh QEMU process");
      // A changes /tmp/p's code in place (without running it), then its QEMU
      // translates the list (/tmp/p's entry from A's bytes) and holds the blocks.
      await a.writeFile("/tmp/q", exitProgram(2));
      assert.equal((await run(a, "dd if=/tmp/q of=/tmp/p conv=notrunc 2>/dev/null; cmp /tmp/p /tmp/q && echo same")).out, "same\n");
      const pid = a.qemu.pid;
      await pretranslate(await a.qmp(), a.runtimeDir, hints, { hold: true });
      const made = await settled(a, { held: true });
      assert.ok(made.held > 0, JSON.stringify(made));
      await a.release();
      // B runs in the same process, reloaded from the snapshot (/tmp/p exits 1 again).
      const b = await pool.acquire();
      try {
        assert.equal(b.qemu.pid, pid, "the next VM runs in A's QEMU process");
        await releasePretranslation(await b.qmp());
        const info = await settled(b);
        assert.equal((await run(b, "/tmp/p; echo rc=$?")).out, "rc=1\n", "the snapshot's code runs, not a block made from A's");
        assert.ok(info.stale >= 1, JSON.stringify(info));
        await guestWorks(b);
      } finally {
        await b.release();
      }
    } finally {
      delete process.env.SUPERMACHINE_PRETRANSLATE;
      await pool?.shutdown();
    }
  });

  it("refuses a hostile key list whole or key by key; the guest runs on", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    const good = (await readTbHints(hintsFile))!;
    const vm = await restoreWithoutPretranslation(image!);
    try {
      const qmp = await vm.qmp();
      // Whole: bad magic, a count the length does not match.
      const badMagic = Buffer.from(good);
      badMagic.write("XXXXXXXX", 0, "latin1");
      await assert.rejects(pretranslate(qmp, vm.runtimeDir, badMagic), /block key list/);
      const badCount = Buffer.from(good.subarray(0, 16 + 32 * 10));
      badCount.writeUInt32LE(11, 8);
      await assert.rejects(pretranslate(qmp, vm.runtimeDir, badCount), /block key list/);
      // Key by key: take real keys and break one field each.
      const rec = (i: number) => Buffer.from(good.subarray(16 + 32 * i, 16 + 32 * (i + 1)));
      const bad: Buffer[] = [];
      let r = rec(0);
      r.writeBigUInt64LE(1n << 40n, 16); // code page outside guest RAM
      bad.push(r);
      r = rec(1);
      r.writeUInt32LE((r.readUInt32LE(24) & ~(1 << 15)) >>> 0, 24); // not 64-bit code (HF_CS64)
      bad.push(r);
      r = rec(2);
      r.writeUInt32LE((r.readUInt32LE(24) | (1 << 17)) >>> 0, 24); // vm86
      bad.push(r);
      r = rec(3);
      r.writeUInt32LE((r.readUInt32LE(28) ^ 0x100) >>> 0, 28); // other compile flags
      bad.push(r);
      r = rec(4);
      r.writeBigUInt64LE(r.readBigUInt64LE(16) + 1n, 16); // page offset unlike the pc's
      bad.push(r);
      // Valid keys at pcs the guest never runs: translated from whatever bytes are there.
      const junk: Buffer[] = [];
      for (let i = 0; i < 64; i++) {
        r = rec(5 + i);
        const shift = BigInt(1 + (i % 7));
        r.writeBigUInt64LE(r.readBigUInt64LE(0) + shift, 0);
        r.writeBigUInt64LE(r.readBigUInt64LE(16) + shift, 16);
        junk.push(r);
      }
      const keys = [...bad, ...junk, ...Array.from({ length: 200 }, (_, i) => rec(100 + i))];
      const head = Buffer.from(good.subarray(0, 16));
      head.writeUInt32LE(keys.length, 8);
      await pretranslate(qmp, vm.runtimeDir, Buffer.concat([head, ...keys]));
      const info = await settled(vm);
      assert.equal(info.hints, keys.length, JSON.stringify(info));
      assert.equal(info.invalid, bad.length, JSON.stringify(info));
      await guestWorks(vm);
      await assert.rejects(pretranslate(qmp, vm.runtimeDir, good), /pretranslated already/);
      await guestWorks(vm);
    } finally {
      await vm.destroy();
    }
  });

  it("a corrupt list is not used (the restore goes on), and the next recording replaces it", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    const good = await readFile(hintsFile);
    const bad = Buffer.from(good);
    bad.write("XXXXXXXX", 0, "latin1");
    await writeFile(hintsFile, bad, { mode: 0o600 });
    const vm = await image!.restore();
    try {
      assert.equal(await vm._pretranslated, false, "QEMU refused the list");
      await guestWorks(vm);
      const n = await vm._recordTbHints();
      assert.ok(n > 1000, `${n} keys`);
      assert.ok(await readTbHints(hintsFile), "a usable list again");
    } finally {
      await vm.destroy();
    }
  });

  it("a pool offers a fresh VM pretranslated from the list its own prewarm left without running the prewarm", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    // The list is now one a restore recorded (above): no label.
    assert.equal(await readTbHintsLabel(hintsFile), undefined);
    const refills: { prewarmed?: unknown }[] = [];
    const onRefill = (m: unknown) => void refills.push(m as { prewarmed?: unknown });
    subscribe("supermachine:pool:refill", onRefill);
    const vmOf = async (): Promise<{ prewarmed: unknown; by: string | undefined }> => {
      refills.length = 0;
      const pool = await image!.pool({ min: 1, max: 1 });
      try {
        const vm = await pool.acquire();
        try {
          assert.equal(vm._reloaded, false, "a fresh QEMU");
          await guestWorks(vm);
          return { prewarmed: refills[0]?.prewarmed, by: await vm._pretranslatedBy };
        } finally {
          await vm.release();
        }
      } finally {
        await pool.shutdown();
      }
    };
    try {
      // Another's list: the VM is pretranslated from it, runs the prewarm,
      // and records what its QEMU made by then under the pool's label.
      const a = await vmOf();
      assert.deepEqual(a, { prewarmed: true, by: "" });
      const label = await readTbHintsLabel(hintsFile);
      assert.match(label ?? "", /^[0-9a-f]{32}$/);
      assert.ok(checkTbHints(await readFile(hintsFile)) > 1000, "a list again");
      // The pool's own list: no prewarm on the vCPU, the thread does its work.
      const b = await vmOf();
      assert.deepEqual(b, { prewarmed: "pretranslating", by: label });
      // A pool with another prewarm (none) does not take the list as its own.
      refills.length = 0;
      const pool = await image!.pool({ min: 1, max: 1, prewarm: false });
      await pool.shutdown();
      assert.equal(refills[0]?.prewarmed, false);
      assert.equal(await readTbHintsLabel(hintsFile), label, "nothing recorded without a prewarm");
    } finally {
      unsubscribe("supermachine:pool:refill", onRefill);
    }
  });

  it("lowers the pretranslator thread to nice 19, also when it names itself after the command's answer", async () => {
    // A stand-in: a process whose (only) thread takes the name a moment later.
    const child = spawn("sh", ["-c", "sleep 0.2; printf pretranslate > /proc/$$/comm; while :; do sleep 1; done"], { stdio: "ignore" });
    try {
      const pid = child.pid!;
      const niceOf = async () => Number((await readFile(`/proc/${pid}/stat`, "latin1")).split(") ")[1]!.split(" ")[16]);
      assert.equal(await niceOf(), 0);
      assert.equal(await deprioritizePretranslator(pid, { tries: 1 }), false, "not named yet");
      assert.equal(await deprioritizePretranslator(pid, { tries: 400, intervalMs: 5 }), true);
      assert.equal(await niceOf(), 19);
      assert.equal(await deprioritizePretranslator(999_999_999), false, "no such process");
    } finally {
      child.kill();
    }
  });

  it("reads only a regular file of ours, not writable by others, well formed", async (t) => {
    if (!tcg) return t.skip("KVM: nothing is translated");
    const good = await readFile(hintsFile);
    const d = await mkdtemp(join(dir, "files-"));
    const f = join(d, "h");
    await writeFile(f, good, { mode: 0o600 });
    assert.ok(await readTbHints(f));
    await chmod(f, 0o666);
    assert.equal(await readTbHints(f), undefined, "writable by others");
    await chmod(f, 0o600);
    const l = join(d, "link");
    await symlink(f, l);
    assert.equal(await readTbHints(l), undefined, "a symlink");
    await writeFile(f, good.subarray(0, good.length - 1));
    assert.equal(await readTbHints(f), undefined, "truncated");
    await writeFile(f, Buffer.alloc(16 + (1 << 17) * 32 + 32));
    assert.equal(await readTbHints(f), undefined, "over the cap");
    assert.equal(await readTbHints(join(d, "missing")), undefined);
    // Its label, beside it: the same checks, and only a hex digest.
    const lf = join(d, TB_HINTS_LABEL_FILE);
    await writeFile(lf, "0123456789abcdef0123456789abcdef\n", { mode: 0o600 });
    assert.equal(await readTbHintsLabel(f), "0123456789abcdef0123456789abcdef");
    await chmod(lf, 0o666);
    assert.equal(await readTbHintsLabel(f), undefined, "writable by others");
    await chmod(lf, 0o600);
    await writeFile(lf, "../../etc/passwd\n");
    assert.equal(await readTbHintsLabel(f), undefined, "not a digest");
    await writeFile(lf, "a".repeat(200));
    assert.equal(await readTbHintsLabel(f), undefined, "too long");
  });
});
