/**
 * The file server against a real kernel FUSE client (the host's kernel: no
 * VM). Shell commands act on the mount from child processes, the way guest
 * programs will.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, unlinkSync, writeFileSync, existsSync, lstatSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { FuseServer, type FuseServerOptions, type MountSpec } from "../../src/mounts/server.js";
import { hostKernelUnavailable, mountOnHostKernel, type HostMount } from "./host-kernel.js";

const unavailable = hostKernelUnavailable();

async function setup(t: TestContext, spec: Partial<MountSpec> = {}, options: FuseServerOptions = {}): Promise<{ host: string; m: HostMount; server: FuseServer }> {
  const base = mkdtempSync(join(tmpdir(), "sm-kmount-"));
  const host = join(base, "host");
  const mnt = join(base, "mnt");
  mkdirSync(host);
  mkdirSync(mnt);
  const server = await FuseServer.open({ hostPath: host, guestTag: "work", ...spec }, options);
  let m: HostMount;
  try {
    m = await mountOnHostKernel(server, mnt, { readOnly: spec.readOnly ?? false });
  } catch (err) {
    await server.close();
    rmSync(base, { recursive: true, force: true });
    throw err;
  }
  t.after(async () => {
    await m.unmount();
    await server.close();
    rmSync(base, { recursive: true, force: true });
  });
  return { host, m, server };
}

test("kernel: shell round trips (ls, cat, write, cp of 3 MiB, mkdir, mv, ln -s, chmod, truncate, touch, rm, df)", { skip: unavailable, timeout: 120_000 }, async (t) => {
  const { host, m } = await setup(t);
  writeFileSync(join(host, "hello.txt"), "hello from the host\n");
  const big = randomBytes(3 * 1024 * 1024 + 123);
  writeFileSync(join(host, "big.bin"), big);
  const r = await m.sh(
    [
      "set -e",
      "cat hello.txt",
      "echo 'from the guest' > guest.txt",
      "cp big.bin copy.bin",
      "mkdir -p a/b/c",
      "mv guest.txt a/b/c/moved.txt",
      "ln -s ../../hello.txt a/b/rel-link",
      "cat a/b/rel-link",
      "chmod 640 a/b/c/moved.txt",
      "truncate -s 5 copy2.bin 2>/dev/null || : > copy2.bin",
      "touch -d '2001-02-03 04:05:06' hello.txt",
      "stat -c '%s %a %U' a/b/c/moved.txt",
      "ls a/b | sort | tr '\\n' ' '; echo",
      "rm copy2.bin",
      "mkdir gone && rmdir gone",
      "df -k . | tail -1 | awk '{print ($2 > 0)}'",
    ].join("\n"),
  );
  assert.equal(r.code, 0, r.out);
  assert.match(r.out, /^hello from the host\nhello from the host\n15 640 root\nc rel-link \n1\n$/);
  assert.equal(readFileSync(join(host, "a/b/c/moved.txt"), "utf8"), "from the guest\n");
  assert.equal(statSync(join(host, "a/b/c/moved.txt")).mode & 0o777, 0o640);
  assert.deepEqual(readFileSync(join(host, "copy.bin")), big);
  assert.equal(readlinkSync(join(host, "a/b/rel-link")), "../../hello.txt");
  assert.equal(statSync(join(host, "hello.txt")).mtime.getUTCFullYear(), 2001);
  assert.ok(!existsSync(join(host, "copy2.bin")) && !existsSync(join(host, "gone")));
  const cmp = await m.sh("cmp big.bin copy.bin && echo same");
  assert.equal(cmp.out.trim(), "same");
});

test("kernel: host edits, new files and deletions are seen once the 0.5 s cache timeout has passed", { skip: unavailable, timeout: 120_000 }, async (t) => {
  const { host, m } = await setup(t);
  writeFileSync(join(host, "f"), "version 1\n");
  writeFileSync(join(host, "doomed"), "x");
  // Keep a reader holding the file open across the edit too (cached pages must not win).
  let r = await m.sh("cat f; ls; stat -c %s f");
  assert.equal(r.out, "version 1\ndoomed\nf\n10\n");
  writeFileSync(join(host, "f"), "version 2, longer\n");
  writeFileSync(join(host, "born"), "new\n");
  unlinkSync(join(host, "doomed"));
  await new Promise((resolve) => setTimeout(resolve, 700));
  r = await m.sh("cat f; stat -c %s f; cat born; ls | tr '\\n' ' '; test -e doomed || echo doomed-gone");
  assert.equal(r.out, "version 2, longer\n18\nnew\nborn f doomed-gone\n");
});

test("kernel: npm-workspace symlinks work under opaque; guest symlink targets stay verbatim on the host", { skip: unavailable, timeout: 120_000 }, async (t) => {
  const { host, m } = await setup(t, { symlinks: "opaque" });
  mkdirSync(join(host, "packages", "lib"), { recursive: true });
  writeFileSync(join(host, "packages", "lib", "index.js"), "module.exports = 42;\n");
  const r = await m.sh(
    [
      "set -e",
      "mkdir -p node_modules/@scope",
      "ln -s ../../packages/lib node_modules/@scope/lib",
      "cat node_modules/@scope/lib/index.js",
      "ln -s /etc/passwd escape",
      "readlink escape",
    ].join("\n"),
  );
  assert.equal(r.code, 0, r.out);
  assert.equal(r.out, "module.exports = 42;\n/etc/passwd\n");
  assert.equal(readlinkSync(join(host, "node_modules/@scope/lib")), "../../packages/lib");
  assert.equal(readlinkSync(join(host, "escape")), "/etc/passwd");
  assert.ok(lstatSync(join(host, "escape")).isSymbolicLink());
});

test("kernel: deny refuses ln -s (EPERM) and host symlinks (EACCES)", { skip: unavailable, timeout: 120_000 }, async (t) => {
  const { host, m } = await setup(t, { symlinks: "deny" });
  writeFileSync(join(host, "real"), "real\n");
  symlinkSync("real", join(host, "link"));
  // One stream: stderr and stdout arrive through two pipes, in no fixed order.
  const r = await m.sh("exec 2>&1; ln -s real mine; echo rc=$?; cat link; echo rc=$?; cat real");
  assert.match(r.out, /Operation not permitted\nrc=1\n/);
  assert.match(r.out, /Permission denied\nrc=1\nreal\n$/);
  assert.ok(!existsSync(join(host, "mine")));
});

test("kernel: readOnly mount refuses writes with EROFS", { skip: unavailable, timeout: 120_000 }, async (t) => {
  const { host, m } = await setup(t, { readOnly: true });
  writeFileSync(join(host, "f"), "keep\n");
  const r = await m.sh("echo x > f; echo rc=$?; touch new; echo rc=$?; rm f; echo rc=$?; cat f");
  assert.equal((r.out.match(/Read-only file system/g) ?? []).length, 3, r.out);
  assert.match(r.out, /keep\n$/);
  assert.deepEqual(readFileSync(join(host, "f"), "utf8"), "keep\n");
});

test("kernel: a node table smaller than the tree still serves it (INVAL_ENTRY notifications make the kernel forget)", { skip: unavailable, timeout: 300_000 }, async (t) => {
  const { host, m, server } = await setup(t, {}, { maxNodes: 256 });
  for (let d = 0; d < 10; d++) {
    mkdirSync(join(host, `d${d}`));
    for (let f = 0; f < 40; f++) writeFileSync(join(host, `d${d}`, `f${f}`), `${d}/${f}\n`);
  }
  let notes = 0;
  let most = 0;
  const write = server.onNotify!;
  server.onNotify = (msg) => {
    notes++;
    write(msg);
  };
  const handle = server.handle.bind(server);
  server.handle = async (req) => {
    const reply = await handle(req);
    most = Math.max(most, server.nodeCount);
    return reply;
  };
  // 411 nodes through a table of 256, three times: only possible if the kernel forgot nodes when asked.
  const r = await m.sh("for pass in 1 2 3; do cat d*/f* | wc -l; done");
  assert.equal(r.out, "400\n400\n400\n", r.out);
  assert.ok(notes > 0, "the server asked the kernel to forget");
  assert.ok(most <= 256, `node table stayed bounded (${most})`);
});
