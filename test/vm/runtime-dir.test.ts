/**
 * The runtime directory ($TMPDIR/supermachine-<uid>) holds the VMs' QMP and
 * agent sockets: one someone else made first is refused. No VM needed.
 */

import assert from "node:assert/strict";
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { UnsafePathError } from "../../src/errors.js";
import { createRuntimeDir, removeRuntimeDir } from "../../src/vm/runtime-dir.js";

const uid = process.getuid?.() ?? 0;

/** A fresh SUPERMACHINE_RUNTIME_DIR for one test; returns the per-user parent path. */
function runtimeRoot(t: TestContext): string {
  const base = mkdtempSync(join(tmpdir(), "sm-rtdir-"));
  const saved = process.env.SUPERMACHINE_RUNTIME_DIR;
  process.env.SUPERMACHINE_RUNTIME_DIR = base;
  t.after(() => {
    if (saved === undefined) delete process.env.SUPERMACHINE_RUNTIME_DIR;
    else process.env.SUPERMACHINE_RUNTIME_DIR = saved;
    rmSync(base, { recursive: true, force: true });
  });
  return join(base, `supermachine-${uid}`);
}

function refused(p: string, re: RegExp): void {
  assert.throws(
    () => createRuntimeDir(),
    (e: unknown) => {
      assert.ok(e instanceof UnsafePathError, `UnsafePathError expected, got ${String(e)}`);
      assert.equal(e.code, "ERR_SM_UNSAFE_PATH");
      assert.equal(e.path, p);
      assert.match(e.message, re);
      assert.match(e.message, /SUPERMACHINE_RUNTIME_DIR/, "the message names the fix");
      return true;
    },
  );
}

test("a fresh runtime directory is made 0700 and used", async (t) => {
  const p = runtimeRoot(t);
  const dir = createRuntimeDir();
  assert.ok(dir.startsWith(`${p}/`));
  assert.equal(statSync(p).mode & 0o777, 0o700);
  assert.equal(statSync(dir).mode & 0o777, 0o700);
  await removeRuntimeDir(dir);
  // An existing one that is ours and private is reused.
  const again = createRuntimeDir();
  await removeRuntimeDir(again);
});

test("a pre-created runtime directory of mode 0777 is refused", (t) => {
  const p = runtimeRoot(t);
  mkdirSync(p);
  chmodSync(p, 0o777);
  refused(p, /writable by others \(mode 777\)/);
});

test("a pre-created runtime directory writable by its group is refused", (t) => {
  const p = runtimeRoot(t);
  mkdirSync(p);
  chmodSync(p, 0o770);
  refused(p, /writable by its group/);
});

test("a pre-created runtime directory owned by another user is refused", { skip: uid !== 0 ? "needs root to chown" : false }, (t) => {
  const p = runtimeRoot(t);
  mkdirSync(p, { mode: 0o700 });
  chownSync(p, 65534, 65534);
  refused(p, /owned by uid 65534/);
});

test("a symlink in place of the runtime directory is refused, even to a private directory", (t) => {
  const p = runtimeRoot(t);
  const elsewhere = join(p, "..", "elsewhere");
  mkdirSync(elsewhere, { mode: 0o700 });
  symlinkSync(elsewhere, p);
  refused(p, /is a symlink/);
  const dangling = join(p, "..", "gone");
  rmSync(p);
  symlinkSync(dangling, p);
  refused(p, /is a symlink/);
  assert.equal(existsSync(dangling), false, "nothing was created through the symlink");
});

test("a file in place of the runtime directory is refused", (t) => {
  const p = runtimeRoot(t);
  writeFileSync(p, "");
  refused(p, /not a directory/);
});
