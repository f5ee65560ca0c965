import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, linkSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { ImageError } from "../../src/errors.js";
import { treeFromDirectory } from "../../src/rootfs/directory.js";
import { writeErofs } from "../../src/rootfs/erofs.js";
import { nameFromBytes, type Node } from "../../src/rootfs/tree.js";
import { describeDir, extract, fsck, tryMount } from "../fixtures/rootfs/erofs-check.js";

const isRoot = process.getuid?.() === 0;

/** A source directory with every kind of file a host directory can hold. */
async function makeSource(t: TestContext): Promise<{ dir: string; src: string }> {
  const dir = mkdtempSync(join(tmpdir(), "sm-dir-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const src = join(dir, "src");
  mkdirSync(join(src, "bin"), { recursive: true });
  mkdirSync(join(src, "etc", "deep", "er"), { recursive: true });
  writeFileSync(join(src, "bin", "busybox"), Buffer.alloc(70_000, 0x42));
  chmodSync(join(src, "bin", "busybox"), 0o4755);
  linkSync(join(src, "bin", "busybox"), join(src, "bin", "sh"));
  linkSync(join(src, "bin", "busybox"), join(src, "bin", "ls"));
  symlinkSync("busybox", join(src, "bin", "echo"));
  symlinkSync(Buffer.from([0x2e, 0x2e, 0x2f, 0xff]), Buffer.from(join(src, "etc", "odd-link")));
  writeFileSync(Buffer.concat([Buffer.from(join(src, "etc")), Buffer.from([0x2f, 0x6e, 0xe9])]), "latin1 name");
  writeFileSync(join(src, "etc", "empty"), "");
  writeFileSync(join(src, "etc", "deep", "er", "file"), "deep");
  execFileSync("mkfifo", [join(src, "etc", "fifo")]);
  // A unix socket file: the listening server keeps it in place until closed.
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(join(src, "etc", "sock"), resolve));
  server.unref();
  t.after(() => server.close());
  if (isRoot) execFileSync("mknod", [join(src, "etc", "null"), "c", "1", "3"]);
  execFileSync("touch", ["-h", "-d", "2001-02-03 04:05:06.123456789", join(src, "etc", "deep", "er", "file")]);
  return { dir, src };
}

test("tree from a directory: kinds, hard links by (dev, ino), byte names, original files referenced", async (t) => {
  const { src } = await makeSource(t);
  const tree = await treeFromDirectory(src);
  const get = (p: string): Node | undefined => tree.lookup(p.split("/"));
  const bb = get("bin/busybox");
  assert.ok(bb?.kind === "file");
  assert.equal(bb.size, 70_000);
  assert.deepEqual(bb.content, { path: join(src, "bin", "busybox"), offset: 0, size: 70_000 });
  assert.equal(bb.mode, 0o4755);
  assert.equal(get("bin/sh"), bb);
  assert.equal(get("bin/ls"), bb);
  const echo = get("bin/echo");
  assert.ok(echo?.kind === "symlink" && echo.target === "busybox");
  const odd = get("etc/odd-link");
  assert.ok(odd?.kind === "symlink" && odd.target === nameFromBytes(Buffer.from([0x2e, 0x2e, 0x2f, 0xff])));
  assert.equal(get(`etc/${nameFromBytes(Buffer.from([0x6e, 0xe9]))}`)?.kind, "file");
  assert.equal(get("etc/fifo")?.kind, "fifo");
  assert.equal(get("etc/sock")?.kind, "socket");
  const empty = get("etc/empty");
  assert.ok(empty?.kind === "file" && empty.content === null);
  const deep = get("etc/deep/er/file");
  assert.deepEqual([deep?.mtimeSec, deep?.mtimeNsec], [981173106, 123456789]);
  if (isRoot) {
    const n = get("etc/null");
    assert.ok(n?.kind === "chardev" && n.major === 1 && n.minor === 3);
  }
});

test("ownerRoot records everything as root:root", async (t) => {
  const { src } = await makeSource(t);
  if (isRoot) execFileSync("chown", ["-R", "1234:5678", src]);
  const plain = await treeFromDirectory(src);
  const owned = await treeFromDirectory(src, { ownerRoot: true });
  if (isRoot) assert.equal(plain.lookup(["bin", "busybox"])?.uid, 1234);
  for (const { node } of owned.entries()) assert.deepEqual([node.uid, node.gid], [0, 0]);
  assert.deepEqual([owned.root.uid, owned.root.gid], [0, 0]);
});

test("directory → erofs → extracted/mounted tree equals the source", async (t) => {
  const { dir, src } = await makeSource(t);
  const out = join(dir, "img");
  await writeErofs(await treeFromDirectory(src), out);
  await fsck(out);
  const want = describeDir(src).desc;
  const x = await extract(out);
  t.after(() => rmSync(x, { recursive: true, force: true }));
  const got = describeDir(x).desc;
  assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort());
  for (const [p, w] of want) {
    const g = got.get(p)!;
    assert.deepEqual({ ...g, mode: g.mode & 0o777, mtime: w.type === "file" ? g.mtime : "" }, { ...w, mode: w.mode & 0o777, mtime: w.type === "file" ? w.mtime : "" }, p);
  }
  const mnt = tryMount(out);
  if (mnt === undefined) return;
  try {
    const m = describeDir(mnt.dir);
    assert.deepEqual(m.desc, want);
    assert.equal(m.ino.get("bin/sh"), m.ino.get("bin/busybox"));
    assert.equal(m.nlink.get("bin/busybox"), 3);
  } finally {
    mnt.unmount();
  }
});

test("a root that is missing or not a directory is an ImageError", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sm-dir-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, "file"), "x");
  await assert.rejects(treeFromDirectory(join(dir, "missing")), ImageError);
  await assert.rejects(treeFromDirectory(join(dir, "file")), (e) => e instanceof ImageError && /not a directory/.test(e.message));
});

test("symlinks below the root are not followed", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sm-dir-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, "src"));
  mkdirSync(join(dir, "outside"));
  writeFileSync(join(dir, "outside", "secret"), "s");
  symlinkSync(join(dir, "outside"), join(dir, "src", "escape"));
  const tree = await treeFromDirectory(join(dir, "src"));
  const e = tree.lookup(["escape"]);
  assert.ok(e?.kind === "symlink" && e.target === join(dir, "outside"));
  assert.equal([...tree.entries()].length, 1);
  // A symlinked root is fine: it is the caller's choice.
  symlinkSync(join(dir, "src"), join(dir, "rootlink"));
  assert.equal([...(await treeFromDirectory(join(dir, "rootlink"))).entries()].length, 1);
});
