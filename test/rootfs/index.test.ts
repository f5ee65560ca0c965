import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { test, type TestContext } from "node:test";
import { LayerError } from "../../src/errors.js";
import { buildRootfsImage, type LayerProgress } from "../../src/rootfs/index.js";
import { describeDir, dumpSuper, extract, fsck, tryMount, xattrsOf } from "../fixtures/rootfs/erofs-check.js";
import { tar } from "../fixtures/rootfs/tar-writer.js";

function scratch(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "sm-rootfs-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("layers → image: whiteouts, opaque dirs, hard links, progress; spool removed", async (t) => {
  const dir = scratch(t);
  const base = tar([
    { name: "bin/", mode: 0o755 },
    { name: "bin/busybox", data: Buffer.alloc(5000, 1), mode: 0o755 },
    { name: "bin/sh", type: "1", linkname: "bin/busybox" },
    { name: "etc/passwd", data: "root:x:0:0::/root:/bin/sh\n" },
    { name: "etc/old", data: "old" },
    { name: "var/cache/a", data: "a" },
  ]);
  const top = tar([
    { name: "etc/.wh.old" },
    { name: "var/cache/.wh..wh..opq" },
    { name: "var/cache/b", data: "b" },
    { name: "etc/hostname", data: "vm\n" },
  ]);
  const progress: LayerProgress[] = [];
  const opened: number[] = [];
  const img = await buildRootfsImage({
    source: {
      kind: "layers",
      layers: [Readable.from([base]), () => (opened.push(1), Readable.from([top]))],
      spoolPath: join(dir, "spool"),
    },
    out: join(dir, "rootfs.img"),
    onProgress: (p) => progress.push(p),
  });
  assert.equal(img.path, join(dir, "rootfs.img"));
  assert.equal(img.inodes, 9); // / bin busybox(=sh) etc passwd hostname var cache b
  assert.equal(dumpSuper(img.path).inodes, img.inodes);
  assert.equal(img.sizeBytes % 4096, 0);
  assert.deepEqual(opened, [1]);
  assert.deepEqual(progress.map((p) => [p.layer, p.bytes]), [[0, base.length], [1, top.length]]);
  assert.deepEqual(readdirSync(dir).sort(), ["rootfs.img"], "spool removed");
  await fsck(img.path);
  const x = await extract(img.path);
  t.after(() => rmSync(x, { recursive: true, force: true }));
  const d = describeDir(x).desc;
  assert.deepEqual([...d.keys()].sort(), ["", "bin", "bin/busybox", "bin/sh", "etc", "etc/hostname", "etc/passwd", "var", "var/cache", "var/cache/b"]);
  assert.equal(readFileSync(join(x, "etc/hostname"), "utf8"), "vm\n");
});

test("a layer breaking a rule fails the build with its index; nothing is left behind", async (t) => {
  const dir = scratch(t);
  const later = Readable.from([tar([{ name: "z", data: "z" }])]);
  await assert.rejects(
    buildRootfsImage({
      source: {
        kind: "layers",
        layers: [Readable.from([tar([{ name: "etc", type: "2", linkname: "/" }])]), Readable.from([tar([{ name: "etc/shadow", data: "pwned" }])]), later],
        spoolPath: join(dir, "spool"),
      },
      out: join(dir, "img"),
    }),
    (e) => e instanceof LayerError && e.layer === 1 && /etc\/shadow/.test(e.message),
  );
  assert.deepEqual(readdirSync(dir), []);
  assert.ok(later.destroyed, "later layers are destroyed");
});

test("keepSpool keeps the spool file (and so copies)", async (t) => {
  const dir = scratch(t);
  const img = await buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([tar([{ name: "f", data: "x" }])])], spoolPath: join(dir, "spool"), keepSpool: true }, out: join(dir, "img") });
  assert.ok(existsSync(join(dir, "spool")));
  assert.equal(img.inPlace, false);
  await fsck(img.path);
});

test("the spool becomes the image in place: every size, links, xattrs, big directories; readable by erofs-utils and the kernel", async (t) => {
  const dir = scratch(t);
  const sizes = [0, 1, 4095, 4096, 4097, 8192, 100_003];
  const files = new Map<string, Buffer>(sizes.map((n, i) => [`data/f${n}`, randomBytes(n).fill(i + 1, 0, Math.min(n, 1))]));
  const many = Array.from({ length: 400 }, (_, i) => ({ name: `many/entry-with-a-longish-name-${i}`, data: `${i}\n` }));
  const layer = tar([
    { name: "data/", mode: 0o755 },
    ...[...files].map(([name, data]) => ({ name, data, mode: 0o644 })),
    { name: "data/hard", type: "1", linkname: "data/f4097" },
    { name: "data/link", type: "2", linkname: "f100003" },
    { name: "data/x", data: "with xattr", pax: { "SCHILY.xattr.user.note": "hello" } },
    { name: "many/", mode: 0o755 },
    ...many,
  ]);
  const img = await buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([layer])], spoolPath: join(dir, "spool") }, out: join(dir, "rootfs.img") });
  assert.equal(img.inPlace, true);
  assert.deepEqual(readdirSync(dir), ["rootfs.img"], "the spool is the image now");
  assert.equal(statSync(img.path).size, img.sizeBytes);
  assert.equal(statSync(img.path).mode & 0o777, 0o644);
  assert.equal(dumpSuper(img.path).inodes, img.inodes);
  await fsck(img.path);
  const check = (root: string) => {
    for (const [name, data] of files) assert.ok(readFileSync(join(root, name)).equals(data), name);
    assert.ok(readFileSync(join(root, "data/hard")).equals(files.get("data/f4097")!));
    assert.equal(readlinkSync(join(root, "data/link")), "f100003");
    assert.equal(readdirSync(join(root, "many")).length, 400);
    assert.equal(readFileSync(join(root, "many/entry-with-a-longish-name-399"), "utf8"), "399\n");
  };
  const x = await extract(img.path);
  t.after(() => rmSync(x, { recursive: true, force: true }));
  check(x);
  const mnt = tryMount(img.path);
  if (mnt === undefined) return;
  try {
    check(mnt.dir);
    assert.equal(statSync(join(mnt.dir, "data/hard")).nlink, 2);
    assert.equal(xattrsOf(join(mnt.dir, "data/x"))?.get("user.note")?.toString(), "hello");
  } finally {
    mnt.unmount();
  }
});

test("a spool mostly dead (files replaced by a later layer) is copied into a compact image", async (t) => {
  const dir = scratch(t);
  const big = randomBytes(1 << 20);
  const img = await buildRootfsImage({
    source: {
      kind: "layers",
      layers: [Readable.from([tar([{ name: "big", data: big }, { name: "keep", data: "k" }])]), Readable.from([tar([{ name: "big", data: "small now" }])])],
      spoolPath: join(dir, "spool"),
    },
    out: join(dir, "rootfs.img"),
  });
  assert.equal(img.inPlace, false);
  assert.ok(img.sizeBytes < 64 * 1024, `${img.sizeBytes} bytes`);
  assert.deepEqual(readdirSync(dir), ["rootfs.img"], "spool removed");
  await fsck(img.path);
  const x = await extract(img.path);
  t.after(() => rmSync(x, { recursive: true, force: true }));
  assert.equal(readFileSync(join(x, "big"), "utf8"), "small now");
  assert.equal(readFileSync(join(x, "keep"), "utf8"), "k");
});

test("directory → image with ownerRoot, mountable when the host allows", async (t) => {
  const dir = scratch(t);
  const src = join(dir, "src");
  mkdirSync(join(src, "bin"), { recursive: true });
  writeFileSync(join(src, "bin", "tool"), "#!/bin/sh\n");
  if (process.getuid?.() === 0) execFileSync("chown", ["-R", "1000:1000", src]);
  const img = await buildRootfsImage({ source: { kind: "directory", path: src, ownerRoot: true }, out: join(dir, "img") });
  assert.equal(img.inodes, 3);
  await fsck(img.path);
  const mnt = tryMount(img.path);
  if (mnt === undefined) return;
  try {
    const d = describeDir(mnt.dir).desc;
    assert.deepEqual([d.get("bin/tool")?.uid, d.get("bin/tool")?.gid], [0, 0]);
    assert.equal(readFileSync(join(mnt.dir, "bin", "tool"), "utf8"), "#!/bin/sh\n");
  } finally {
    mnt.unmount();
  }
});

test("a real Debian-tar layer pair (GNU tar output, whiteout added by hand) builds", async (t) => {
  const dir = scratch(t);
  const src = join(dir, "src");
  mkdirSync(join(src, "usr", "share", "doc"), { recursive: true });
  for (let i = 0; i < 200; i++) writeFileSync(join(src, "usr", "share", "doc", `doc-${i}`), `doc ${i}\n`.repeat(i));
  execFileSync("tar", ["-C", src, "--format=posix", "-cf", join(dir, "l0.tar"), "."]);
  const l1 = tar([{ name: "usr/share/doc/.wh.doc-7" }, { name: "usr/share/doc/new", data: "new" }]);
  const img = await buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([readFileSync(join(dir, "l0.tar"))]), Readable.from([l1])], spoolPath: join(dir, "spool") }, out: join(dir, "img") });
  await fsck(img.path);
  const x = await extract(img.path);
  t.after(() => rmSync(x, { recursive: true, force: true }));
  const names = readdirSync(join(x, "usr", "share", "doc"));
  assert.equal(names.length, 200);
  assert.ok(!names.includes("doc-7") && names.includes("new"));
  assert.equal(readFileSync(join(x, "usr/share/doc/doc-150"), "utf8"), "doc 150\n".repeat(150));
});

test("an image whose last inode fills its block still has room after it (fsck.erofs reads an xattr header after every inode)", async (t) => {
  // Found by hand: with the in-place layout (metadata last), these trees put
  // the last inode's end exactly at the end of a block, so the image ended
  // there and fsck.erofs 1.5 read past it.
  for (const [n, mtimes] of [[170, false], [102, true], [205, true]] as const) {
    const dir = scratch(t);
    const specs = Array.from({ length: n }, (_, i) => ({ name: `f${i}`, data: "x", ...(mtimes ? { mtime: 1_600_000_000 + i } : {}) }));
    const img = await buildRootfsImage({ source: { kind: "layers", layers: [Readable.from([tar(specs)])], spoolPath: join(dir, "spool") }, out: join(dir, "img") });
    assert.equal(img.inPlace, true, `${n} files: the in-place layout`);
    await fsck(img.path);
    const x = await extract(img.path);
    t.after(() => rmSync(x, { recursive: true, force: true }));
    assert.equal(readdirSync(x).length, n);
  }
});

test("invalid options are TypeErrors naming the option", async () => {
  await assert.rejects(buildRootfsImage({ source: { kind: "directory", path: "/" }, out: "" }), (e) => e instanceof TypeError && /out/.test(e.message));
  await assert.rejects(buildRootfsImage({ source: { kind: "nope" } as never, out: "/tmp/x" }), (e) => e instanceof TypeError && /source.kind/.test(e.message));
  await assert.rejects(buildRootfsImage({ source: { kind: "layers", layers: [], spoolPath: "" }, out: "/tmp/x" }), (e) => e instanceof TypeError && /spoolPath/.test(e.message));
  await assert.rejects(buildRootfsImage({ source: { kind: "directory", path: "/" }, out: "/tmp/x", uuid: Buffer.alloc(3) }), (e) => e instanceof TypeError && /uuid/.test(e.message));
});
