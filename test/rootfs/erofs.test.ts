import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { AbortError, DiskFullError, ImageError } from "../../src/errors.js";
import { writeErofs } from "../../src/rootfs/erofs.js";
import { FsTree, makeDevice, makeDir, makeFile, makeSpecial, makeSymlink, nameFromBytes, treeStats, type ContentRef, type DirNode, type Node, type NodeMeta } from "../../src/rootfs/tree.js";
import { describeDir, describeTree, dumpInode, dumpLs, dumpSuper, extract, fsck, nidOf, tryMount, xattrsOf, type Desc } from "../fixtures/rootfs/erofs-check.js";

const COMMON_MTIME = { mtimeSec: 1_700_000_000, mtimeNsec: 0 };

/** A scratch dir plus a content file that file nodes point into (at odd offsets). */
function scratch(t: TestContext): { dir: string; put: (data: Buffer) => ContentRef } {
  const dir = mkdtempSync(join(tmpdir(), "sm-erofs-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const content = join(dir, "content");
  writeFileSync(content, Buffer.from("garbage-first"));
  let size = 13;
  return {
    dir,
    put: (data) => {
      appendFileSync(content, data);
      const ref = { path: content, offset: size, size: data.length };
      size += data.length + 7;
      appendFileSync(content, Buffer.from("padding"));
      return ref;
    },
  };
}

function add(dir: DirNode, name: string | Buffer, node: Node): Node {
  dir.children.set(typeof name === "string" ? nameFromBytes(Buffer.from(name, "utf8")) : nameFromBytes(name), node);
  return node;
}

function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  let x = seed * 2654435761;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** A tree with every node kind and the awkward cases. */
function bigTree(put: (d: Buffer) => ContentRef): { tree: FsTree; hardlinked: Node } {
  const m = (extra: Partial<NodeMeta> = {}): Partial<NodeMeta> => ({ ...COMMON_MTIME, ...extra });
  const tree = new FsTree(makeDir(m({ mode: 0o755 })));
  const r = tree.root;
  const files = add(r, "files", makeDir(m())) as DirNode;
  for (const size of [0, 1, 4095, 4096, 4097, 8191, 8192, 12_000, (1 << 20) + 3]) {
    const data = pattern(size, size);
    add(files, `f${size}`, makeFile(size, size === 0 ? null : put(data), m({ mode: 0o640, mtimeNsec: size % 1000 })));
  }
  add(files, "setuid", makeFile(2, put(Buffer.from("su")), m({ mode: 0o4755 })));
  add(files, "setgid", makeFile(2, put(Buffer.from("sg")), m({ mode: 0o2711 })));
  add(r, "sticky", makeDir(m({ mode: 0o1777 })));
  add(r, "sgid-dir", makeDir(m({ mode: 0o2775, gid: 50 })));
  add(files, "bigids", makeFile(3, put(Buffer.from("ids")), m({ uid: 100_000, gid: 70_000 })));
  add(files, "old", makeFile(1, put(Buffer.from("o")), { mtimeSec: 1_000_000_000, mtimeNsec: 123_456_789 }));
  add(files, "future", makeFile(1, put(Buffer.from("f")), { mtimeSec: 4_200_000_000, mtimeNsec: 999_999_999 }));

  const names = add(r, "names", makeDir(m())) as DirNode;
  add(names, Buffer.from([0x66, 0xff, 0xfe, 0x80]), makeFile(1, put(Buffer.from("1")), m()));
  add(names, "n".repeat(255), makeFile(1, put(Buffer.from("2")), m()));
  add(names, "-dash-sorts-before-dot", makeFile(0, null, m()));
  add(names, "with space", makeFile(0, null, m()));
  add(names, "ünïcödé", makeFile(0, null, m()));
  add(names, Buffer.from([0x2e, 0x2e, 0x2e]), makeFile(0, null, m())); // "..."

  const many = add(r, "many", makeDir(m())) as DirNode;
  for (let i = 0; i < 3000; i++) add(many, `entry-${String(i).padStart(5, "0")}-${"x".repeat(i % 40)}`, i % 10 === 0 ? makeDir(m()) : makeFile(0, null, m()));
  const longNames = add(r, "longnames", makeDir(m())) as DirNode;
  for (let i = 0; i < 60; i++) add(longNames, `${String(i).padStart(3, "0")}${"L".repeat(252)}`, makeFile(0, null, m()));

  const shared = makeFile(5, put(Buffer.from("hlink")), m({ mode: 0o755 }));
  add(files, "hl-a", shared);
  add(r, "hl-b", shared);
  add(many, "hl-c", shared);

  const links = add(r, "links", makeDir(m())) as DirNode;
  add(links, "rel", makeSymlink("../files/f1", m()));
  add(links, "abs", makeSymlink("/etc/passwd", m()));
  add(links, "dangling", makeSymlink("nowhere/at/all", m()));
  add(links, "binary", makeSymlink(nameFromBytes(Buffer.from([0x61, 0xff, 0x62])), m()));
  add(links, "long", makeSymlink("t/".repeat(2047) + "x", m()));
  add(links, "dated", makeSymlink("x", { mtimeSec: 1_234_567_890, mtimeNsec: 5 }));

  const dev = add(r, "dev", makeDir(m())) as DirNode;
  add(dev, "null", makeDevice("chardev", 1, 3, m({ mode: 0o666 })));
  add(dev, "sda", makeDevice("blockdev", 8, 0, m({ mode: 0o660, gid: 6 })));
  add(dev, "bignum", makeDevice("chardev", 300, 70_000, m()));
  add(dev, "fifo", makeSpecial("fifo", m({ mode: 0o620 })));
  add(dev, "sock", makeSpecial("socket", m({ mode: 0o777 })));

  const x = add(r, "xattrs", makeDir(m({ xattrs: new Map([["user.dir", Buffer.from("on a dir")]]) }))) as DirNode;
  const acl = Buffer.from([2, 0, 0, 0, 1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, 4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff, 0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff]);
  add(
    x,
    "file",
    makeFile(
      6,
      put(Buffer.from("xattrs")),
      m({
        mode: 0o644,
        xattrs: new Map([
          ["user.a", Buffer.from("1")],
          ["user.binary", Buffer.from([0, 1, 2, 255])],
          ["user.empty", Buffer.alloc(0)],
          ["security.capability", Buffer.from([0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])],
          ["trusted.t", Buffer.from("trusted")],
          ["system.posix_acl_access", acl],
        ]),
      }),
    ),
  );
  add(x, "bigvalue", makeFile(4097, put(pattern(4097, 9)), m({ xattrs: new Map([["user.big", pattern(3000, 3)]]) })));
  add(x, "symlink", makeSymlink("target", m({ xattrs: new Map([["trusted.on-link", Buffer.from("l")]]) })));
  add(r, "empty-dir", makeDir(m({ mode: 0o700 })));
  let deep = r;
  for (let i = 0; i < 40; i++) deep = add(deep, `d${i}`, makeDir(m())) as DirNode;
  add(deep, "bottom", makeFile(6, put(Buffer.from("bottom")), m()));
  return { tree, hardlinked: shared };
}

function compare(got: Map<string, Desc>, want: Map<string, Desc>, opts: { modeMask: number; skip?: (path: string, d: Desc) => (keyof Desc)[] }): void {
  assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), "same set of paths");
  for (const [path, w] of want) {
    const g = got.get(path)!;
    const skip = new Set(opts.skip?.(path, w) ?? []);
    for (const k of Object.keys(w) as (keyof Desc)[]) {
      if (skip.has(k)) continue;
      const a = k === "mode" ? (g.mode & opts.modeMask) : g[k];
      const b = k === "mode" ? (w.mode & opts.modeMask) : w[k];
      assert.equal(a, b, `${k} of ${JSON.stringify(path)}`);
    }
  }
}

test("erofs image of every node kind passes fsck.erofs and extracts to the same tree", async (t) => {
  const s = scratch(t);
  const { tree } = bigTree(s.put);
  const out = join(s.dir, "rootfs.erofs");
  const img = await writeErofs(tree, out);
  assert.equal(img.inodes, treeStats(tree).inodes);
  assert.equal(statSync(out).size, img.sizeBytes);
  assert.equal(img.sizeBytes % 4096, 0);
  await fsck(out);
  const sb = dumpSuper(out);
  assert.equal(sb.magic.toLowerCase(), "0xe0f5e1e2");
  assert.equal(sb.rootNid, 36);
  assert.equal(sb.inodes, img.inodes);
  assert.equal(sb.blocks * 4096, img.sizeBytes);

  const x = await extract(out);
  t.after(() => rmSync(x, { recursive: true, force: true }));
  const want = describeTree(tree);
  const got = describeDir(x).desc;
  // fsck.erofs 1.5 drops setuid/setgid/sticky on extraction (chown after chmod)
  // and does not set symlink times; the kernel mount below checks those.
  compare(got, want, { modeMask: 0o777, skip: (_p, d) => (d.type === "symlink" ? ["mtime"] : d.type === "dir" ? ["mtime"] : []) });
  // Directory mtimes are checked where extraction order cannot disturb them.
  assert.equal(got.get("empty-dir")!.mtime, want.get("empty-dir")!.mtime);
});

test("hard links are one inode with the right link count; directories count subdirs", async (t) => {
  const s = scratch(t);
  const { tree } = bigTree(s.put);
  const out = join(s.dir, "img");
  await writeErofs(tree, out);
  const a = nidOf(out, "files/hl-a");
  assert.equal(nidOf(out, "hl-b"), a);
  assert.equal(nidOf(out, "many/hl-c"), a);
  assert.equal(dumpInode(out, a).links, 3);
  assert.equal(dumpInode(out, nidOf(out, "many")).links, 2 + 300);
  assert.equal(dumpInode(out, nidOf(out, "empty-dir")).links, 2);
  const ids = dumpInode(out, nidOf(out, "files/bigids"));
  assert.deepEqual([ids.uid, ids.gid, ids.inodeSize], [100_000, 70_000, 64]);
  assert.equal(dumpInode(out, nidOf(out, "names/with space")).inodeSize, 32, "common mtime + small ids use the compact inode");
});

test("directories: '.' and '..' included, names sorted bytewise, multi-block dirs", async (t) => {
  const s = scratch(t);
  const { tree } = bigTree(s.put);
  const out = join(s.dir, "img");
  await writeErofs(tree, out);
  const root = 36;
  for (const dir of ["many", "longnames", "names", ""]) {
    const nid = dir === "" ? root : nidOf(out, dir);
    const ls = dumpLs(out, nid);
    const names = ls.map((e) => e.name);
    const sorted = [...names].sort((p, q) => Buffer.compare(Buffer.from(p, "latin1"), Buffer.from(q, "latin1")));
    assert.deepEqual(names, sorted, `${dir} sorted`);
    assert.equal(ls.find((e) => e.name === ".")?.nid, nid);
    const node = dir === "" ? tree.root : tree.lookup(dir.split("/"));
    assert.ok(node?.kind === "dir");
    assert.equal(ls.length, node.children.size + 2);
    if (dir === "names") assert.ok(names.indexOf("-dash-sorts-before-dot") < names.indexOf("."));
  }
  assert.equal(dumpLs(out, nidOf(out, "many")).find((e) => e.name === "..")?.nid, root);
  assert.ok(dumpInode(out, nidOf(out, "many")).size > 3 * 4096, "many spans several blocks");
  assert.ok(dumpInode(out, nidOf(out, "longnames")).size > 3 * 4096, "longnames spans several blocks");
  const types = new Map(dumpLs(out, nidOf(out, "dev")).map((e) => [e.name, e.type]));
  assert.deepEqual(Object.fromEntries(types), { ".": 2, "..": 2, null: 3, sda: 4, bignum: 3, fifo: 5, sock: 6 });
  assert.equal(dumpLs(out, nidOf(out, "links")).find((e) => e.name === "rel")?.type, 7);
});

test("inline tails never cross a block boundary (many tail sizes and xattr sizes)", async (t) => {
  const s = scratch(t);
  const tree = new FsTree(makeDir(COMMON_MTIME));
  const n = 150;
  for (let i = 0; i < n; i++) {
    const size = (i * 997) % 9000;
    const xattrs = i % 3 === 0 ? new Map([["user.k", pattern((i * 37) % 600, i)]]) : new Map<string, Buffer>();
    add(tree.root, `f${i}`, makeFile(size, size === 0 ? null : s.put(pattern(size, i)), { ...COMMON_MTIME, mtimeSec: COMMON_MTIME.mtimeSec + (i % 2), xattrs }));
  }
  const out = join(s.dir, "img");
  await writeErofs(tree, out);
  await fsck(out);
  let inlined = 0;
  for (const e of dumpLs(out, 36)) {
    if (e.name === "." || e.name === "..") continue;
    const ino = dumpInode(out, e.nid);
    if (ino.layout !== 2) continue;
    inlined++;
    const start = (e.nid * 32) % 4096;
    assert.ok(start + ino.inodeSize + ino.xattrSize + (ino.size % 4096) <= 4096, `${e.name} inline data crosses a block`);
  }
  assert.ok(inlined > n / 3, `tail packing used (${inlined})`);
  const x = await extract(out);
  t.after(() => rmSync(x, { recursive: true, force: true }));
  compare(describeDir(x).desc, describeTree(tree), { modeMask: 0o777, skip: (p) => (p === "" ? ["mtime"] : []) });
});

test("the real kernel mounts the image and sees the same tree (skipped without root/loop/erofs)", async (t) => {
  const s = scratch(t);
  const { tree } = bigTree(s.put);
  const out = join(s.dir, "img");
  await writeErofs(tree, out);
  const mnt = tryMount(out);
  if (mnt === undefined) {
    t.skip("cannot mount erofs here (needs root, a loop device and the erofs module)");
    return;
  }
  try {
    const { desc, ino, nlink } = describeDir(mnt.dir);
    compare(desc, describeTree(tree), { modeMask: 0o7777 });
    assert.equal(ino.get("files/hl-a"), ino.get("hl-b"));
    assert.equal(ino.get("files/hl-a"), ino.get("many/hl-c"));
    assert.equal(nlink.get("hl-b"), 3);
    assert.equal(nlink.get(""), 2 + [...tree.root.children.values()].filter((c) => c.kind === "dir").length);
    const xa = xattrsOf(join(mnt.dir, "xattrs/file"));
    if (xa !== undefined) {
      const want = (tree.lookup(["xattrs", "file"]) as Node).xattrs;
      for (const [k, v] of want) assert.deepEqual(xa.get(k), v, `xattr ${k}`);
      assert.deepEqual(xattrsOf(join(mnt.dir, "xattrs/bigvalue"))?.get("user.big"), pattern(3000, 3));
      assert.deepEqual(xattrsOf(join(mnt.dir, "xattrs"))?.get("user.dir"), Buffer.from("on a dir"));
    }
  } finally {
    mnt.unmount();
  }
});

test("same tree, same bytes (reproducible images)", async (t) => {
  const s = scratch(t);
  const { tree } = bigTree(s.put);
  await writeErofs(tree, join(s.dir, "a"));
  await writeErofs(tree, join(s.dir, "b"));
  assert.ok(readFileSync(join(s.dir, "a")).equals(readFileSync(join(s.dir, "b"))));
});

test("a failed build leaves no temp file and keeps the previous image", async (t) => {
  const s = scratch(t);
  const out = join(s.dir, "img");
  writeFileSync(out, "previous");
  const tree = new FsTree();
  add(tree.root, "ok", makeFile(5, s.put(Buffer.from("fine!")), {}));
  add(tree.root, "missing", makeFile(10, { path: join(s.dir, "does-not-exist"), offset: 0, size: 10 }, {}));
  await assert.rejects(writeErofs(tree, out), (e) => e instanceof ImageError && /does-not-exist/.test(e.message));
  assert.equal(readFileSync(out, "utf8"), "previous");
  assert.deepEqual(readdirSync(s.dir).sort(), ["content", "img"]);

  const shrunk = new FsTree();
  add(shrunk.root, "short", makeFile(100, { path: join(s.dir, "content"), offset: 1 << 30, size: 100 }, {}));
  await assert.rejects(writeErofs(shrunk, out), (e) => e instanceof ImageError && /shorter/.test(e.message));
  assert.deepEqual(readdirSync(s.dir).sort(), ["content", "img"]);
});

test("abort: AbortError and no temp file", async (t) => {
  const s = scratch(t);
  const { tree } = bigTree(s.put);
  const ac = new AbortController();
  ac.abort(new Error("stop"));
  await assert.rejects(writeErofs(tree, join(s.dir, "img"), { signal: ac.signal }), AbortError);
  assert.deepEqual(readdirSync(s.dir), ["content"]);
});

test("ENOSPC becomes DiskFullError and the temp file is removed (skipped without root)", async (t) => {
  const s = scratch(t);
  const small = join(s.dir, "small");
  mkdirSync(small);
  if (process.getuid?.() !== 0 || spawnSync("mount", ["-t", "tmpfs", "-o", "size=256k", "tmpfs", small]).status !== 0) {
    t.skip("needs root to mount a small tmpfs");
    return;
  }
  try {
    const tree = new FsTree();
    add(tree.root, "big", makeFile(1 << 20, s.put(pattern(1 << 20, 1)), {}));
    await assert.rejects(writeErofs(tree, join(small, "img")), (e) => e instanceof DiskFullError && e.path === join(small, "img"));
    assert.deepEqual(readdirSync(small), []);
  } finally {
    spawnSync("umount", [small]);
  }
});

test("trees erofs cannot hold are ImageErrors", async (t) => {
  const s = scratch(t);
  const bad: Array<[string, (r: DirNode) => void]> = [
    ["slash in a name", (r) => r.children.set("a/b", makeFile(0, null))],
    ["name over 255 bytes", (r) => r.children.set("x".repeat(256), makeFile(0, null))],
    ["non-latin1 string name", (r) => r.children.set("\u4e2d", makeFile(0, null))],
    ["unknown xattr namespace", (r) => r.children.set("x", makeFile(0, null, { xattrs: new Map([["system.other", Buffer.from("v")]]) }))],
    ["empty symlink", (r) => r.children.set("l", makeSymlink(""))],
    ["negative uid", (r) => r.children.set("u", makeFile(0, null, { uid: -1 }))],
    ["device major over 12 bits", (r) => r.children.set("d", makeDevice("chardev", 5000, 1))],
    ["nanoseconds out of range", (r) => r.children.set("t", makeFile(0, null, { mtimeNsec: 1e9 }))],
    ["size without content", (r) => r.children.set("s", makeFile(10, null))],
    [
      "directory linked twice",
      (r) => {
        const d = makeDir();
        r.children.set("d1", d);
        r.children.set("d2", d);
      },
    ],
  ];
  for (const [what, build] of bad) {
    const tree = new FsTree();
    build(tree.root);
    await assert.rejects(writeErofs(tree, join(s.dir, "img")), ImageError, what);
    assert.equal(existsSync(join(s.dir, "img")), false);
  }
});
