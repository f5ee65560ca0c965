import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { AbortError, LayerError } from "../../src/errors.js";
import { applyLayer, normalizePath, type LayerProgress } from "../../src/rootfs/layers.js";
import { Spool, SPOOL_ALIGN } from "../../src/rootfs/spool.js";
import { countLinks, FsTree, type Node } from "../../src/rootfs/tree.js";
import { chunks, tar, type TarSpec } from "../fixtures/rootfs/tar-writer.js";

interface Ctx {
  tree: FsTree;
  spool: Spool;
  dir: string;
  /** Applies layers in order (index = position). */
  apply: (...layers: TarSpec[][]) => Promise<void>;
  get: (path: string) => Node | undefined;
  content: (path: string) => string;
}

async function setup(t: TestContext): Promise<Ctx> {
  const dir = mkdtempSync(join(tmpdir(), "sm-layers-"));
  const spool = await Spool.create(join(dir, "spool"));
  t.after(async () => {
    await spool.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const tree = new FsTree();
  let index = 0;
  const ctx: Ctx = {
    tree,
    spool,
    dir,
    apply: async (...layers) => {
      for (const l of layers) await applyLayer(tree, chunks(tar(l), 1000), spool, { layer: index++ });
    },
    get: (p) => tree.lookup(normalizePath(p)),
    content: (p) => {
      const n = tree.lookup(normalizePath(p));
      assert.ok(n?.kind === "file", `${p} is a file`);
      if (n.content === null) return "";
      return readFileSync(n.content.path).subarray(n.content.offset, n.content.offset + n.size).toString();
    },
  };
  return ctx;
}

/** The only host file any layer may produce is the spool itself. */
function assertNothingOnHost(c: Ctx): void {
  assert.deepEqual(readdirSync(c.dir), ["spool"]);
}

function rejectsLayer(p: Promise<unknown>, layer: number, re: RegExp): Promise<void> {
  return assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof LayerError, `LayerError expected, got ${String(e)}`);
    assert.equal(e.layer, layer);
    assert.match(e.message, re);
    assert.match(e.message, new RegExp(`^Layer ${layer}`));
    return true;
  });
}

test("normalizePath: lexical rules", () => {
  assert.deepEqual(normalizePath("./a//b/./c/"), ["a", "b", "c"]);
  assert.deepEqual(normalizePath("/etc/passwd"), ["etc", "passwd"]);
  assert.deepEqual(normalizePath("a/../b"), ["b"]);
  assert.deepEqual(normalizePath("./"), []);
  assert.throws(() => normalizePath("../x"), LayerError);
  assert.throws(() => normalizePath("a/../../x"), LayerError);
  assert.throws(() => normalizePath("/.."), LayerError);
  assert.throws(() => normalizePath(`${"x".repeat(256)}`), LayerError);
  assert.throws(() => normalizePath("a/".repeat(2049)), LayerError);
});

test("files go to the spool, 4 KiB aligned; parents are created 0755 root", async (t) => {
  const c = await setup(t);
  await c.apply([
    { name: "a/b/one", data: "1", uid: 5, mode: 0o600 },
    { name: "a/b/two", data: "two!" },
    { name: "empty", data: "" },
  ]);
  assert.equal(c.content("a/b/one"), "1");
  assert.equal(c.content("a/b/two"), "two!");
  for (const p of ["a/b/one", "a/b/two"]) {
    const n = c.get(p);
    assert.ok(n?.kind === "file" && n.content !== null && n.content.offset % SPOOL_ALIGN === 0);
  }
  const e = c.get("empty");
  assert.ok(e?.kind === "file" && e.content === null && e.size === 0);
  const a = c.get("a");
  assert.ok(a?.kind === "dir");
  assert.deepEqual([a.mode, a.uid, a.gid], [0o755, 0, 0]);
  const one = c.get("a/b/one")!;
  assert.deepEqual([one.mode, one.uid], [0o600, 5]);
});

test("a later entry replaces an earlier one; dir over dir merges metadata only", async (t) => {
  const c = await setup(t);
  await c.apply(
    [
      { name: "d/", mode: 0o700 },
      { name: "d/keep", data: "k" },
      { name: "f", data: "old" },
      { name: "gone/", mode: 0o755 },
      { name: "gone/child", data: "x" },
    ],
    [
      { name: "d/", mode: 0o751, uid: 7 },
      { name: "f", data: "new" },
      { name: "gone", type: "2", linkname: "elsewhere" },
    ],
  );
  const d = c.get("d");
  assert.ok(d?.kind === "dir");
  assert.deepEqual([d.mode, d.uid, [...d.children.keys()]], [0o751, 7, ["keep"]]);
  assert.equal(c.content("f"), "new");
  assert.equal(c.get("gone")?.kind, "symlink");
});

test("whiteouts delete lower-layer files and whole directories", async (t) => {
  const c = await setup(t);
  await c.apply(
    [{ name: "a/b", data: "b" }, { name: "a/c", data: "c" }, { name: "dir/x/y", data: "y" }],
    [{ name: "a/.wh.b" }, { name: ".wh.dir" }, { name: ".wh.missing" }, { name: "nowhere/.wh.x" }],
  );
  assert.equal(c.get("a/b"), undefined);
  assert.equal(c.content("a/c"), "c");
  assert.equal(c.get("dir"), undefined);
  assert.equal(c.get("nowhere"), undefined, "a whiteout creates no parent");
  assert.equal(c.get("a/.wh.b"), undefined, "whiteout files are not content");
});

test("whiteouts never hide entries of their own layer, in either order", async (t) => {
  const c = await setup(t);
  await c.apply([{ name: "x", data: "lower" }], [{ name: "x", data: "same layer" }, { name: ".wh.x" }, { name: ".wh.y" }, { name: "y", data: "new y" }]);
  assert.equal(c.content("x"), "same layer");
  assert.equal(c.content("y"), "new y");
});

test("opaque directories hide all lower children, keep this layer's (any order)", async (t) => {
  const c = await setup(t);
  await c.apply(
    [
      { name: "d/old", data: "o" },
      { name: "d/sub/lower", data: "l" },
      { name: "e/old", data: "o" },
    ],
    [
      { name: "d/new", data: "n" },
      { name: "d/.wh..wh..opq" },
      { name: "d/sub/mine", data: "m" },
      { name: "e/.wh..wh..opq" },
      { name: "e/later", data: "l" },
    ],
  );
  const d = c.get("d");
  assert.ok(d?.kind === "dir");
  assert.deepEqual([...d.children.keys()].sort(), ["new", "sub"]);
  const sub = c.get("d/sub");
  assert.ok(sub?.kind === "dir");
  assert.deepEqual([...sub.children.keys()], ["mine"]);
  const e = c.get("e");
  assert.ok(e?.kind === "dir");
  assert.deepEqual([...e.children.keys()], ["later"]);
});

test("opaque marker inside a directory that this layer re-declares hides lower children below it too", async (t) => {
  const c = await setup(t);
  await c.apply([{ name: "d/sub/lower", data: "l" }], [{ name: "d/" }, { name: "d/sub/" }, { name: "d/.wh..wh..opq" }]);
  const sub = c.get("d/sub");
  assert.ok(sub?.kind === "dir");
  assert.equal(sub.children.size, 0);
});

test("hard links share the node of an earlier entry (same or lower layer)", async (t) => {
  const c = await setup(t);
  await c.apply([{ name: "bin/busybox", data: "BB", mode: 0o755 }], [{ name: "bin/sh", type: "1", linkname: "bin/busybox" }, { name: "bin/ls", type: "1", linkname: "/bin/busybox" }]);
  const bb = c.get("bin/busybox");
  assert.equal(c.get("bin/sh"), bb);
  assert.equal(c.get("bin/ls"), bb);
  assert.equal(countLinks(c.tree).get(bb!), 3);
});

test("a hard link keeps the old node when its target path is replaced later", async (t) => {
  const c = await setup(t);
  await c.apply([{ name: "a", data: "v1" }, { name: "b", type: "1", linkname: "a" }], [{ name: "a", data: "v2" }]);
  assert.equal(c.content("a"), "v2");
  assert.equal(c.content("b"), "v1");
});

test("hostile: hard link to a missing file or to a directory is a LayerError", async (t) => {
  const c = await setup(t);
  await rejectsLayer(c.apply([{ name: "l", type: "1", linkname: "nope" }]), 0, /does not exist/);
  const c2 = await setup(t);
  await rejectsLayer(c2.apply([{ name: "d/" }, { name: "l", type: "1", linkname: "d" }]), 0, /is a directory/);
  const c3 = await setup(t);
  await rejectsLayer(c3.apply([{ name: "l", type: "1", linkname: "../../etc/passwd" }]), 0, /above the root/);
  for (const x of [c, c2, c3]) assertNothingOnHost(x);
});

test("hostile: hard link target reached through a symlink is refused", async (t) => {
  const c = await setup(t);
  await rejectsLayer(c.apply([{ name: "real/f", data: "x" }, { name: "s", type: "2", linkname: "real" }, { name: "l", type: "1", linkname: "s/f" }]), 0, /symlink/);
});

test("hostile: '..' climbing above the root is rejected, inner '..' is resolved lexically", async (t) => {
  const c = await setup(t);
  await rejectsLayer(c.apply([{ name: "../../../tmp/evil", data: "x" }]), 0, /above the root/);
  const c2 = await setup(t);
  await rejectsLayer(c2.apply([{ name: "ok", data: "1" }], [{ name: "a/../../evil", data: "x" }]), 1, /above the root/);
  const c3 = await setup(t);
  await c3.apply([{ name: "a/../b", data: "b" }]);
  assert.equal(c3.content("b"), "b");
  assert.equal(c3.get("a"), undefined, "a/.. does not create a");
  for (const x of [c, c2, c3]) assertNothingOnHost(x);
});

test("hostile: absolute names are relative to the image root", async (t) => {
  const c = await setup(t);
  await c.apply([{ name: "/etc/passwd", data: "root:x:0:0::/root:/bin/sh" }, { name: "//abs//dir/" }]);
  assert.equal(c.content("etc/passwd"), "root:x:0:0::/root:/bin/sh");
  assert.equal(c.get("abs/dir")?.kind, "dir");
  assertNothingOnHost(c);
});

test("hostile: writing through a symlinked parent (etc -> /) is rejected, never followed", async (t) => {
  const c = await setup(t);
  await rejectsLayer(c.apply([{ name: "etc", type: "2", linkname: "/" }, { name: "etc/passwd", data: "pwned" }]), 0, /parent "etc" is a symlink/);
  assert.equal(c.get("etc")?.kind, "symlink");
  assert.equal(c.get("passwd"), undefined);
  assertNothingOnHost(c);
});

test("hostile: symlink planted in one layer, written through in the next (x -> ../../..)", async (t) => {
  const c = await setup(t);
  await rejectsLayer(c.apply([{ name: "x", type: "2", linkname: "../../.." }], [{ name: "x/passwd", data: "pwned" }]), 1, /symlink/);
  const c2 = await setup(t);
  await rejectsLayer(c2.apply([{ name: "a/x", type: "2", linkname: "/" }], [{ name: "a/x/etc/.wh.passwd" }]), 1, /symlink/);
  const c3 = await setup(t);
  await rejectsLayer(c3.apply([{ name: "x", type: "2", linkname: "/" }], [{ name: "x/sub/" }]), 1, /symlink/);
  for (const x of [c, c2, c3]) assertNothingOnHost(x);
});

test("replacing a symlink by a directory entry of its own name is allowed", async (t) => {
  const c = await setup(t);
  await c.apply([{ name: "usr/lib/", mode: 0o755 }, { name: "lib", type: "2", linkname: "usr/lib" }], [{ name: "lib/" }, { name: "lib/foo.so", data: "so" }]);
  assert.equal(c.get("lib")?.kind, "dir");
  assert.equal(c.content("lib/foo.so"), "so");
  const usrlib = c.get("usr/lib");
  assert.ok(usrlib?.kind === "dir" && usrlib.children.size === 0);
});

test("hostile: a parent that is a regular file is rejected", async (t) => {
  const c = await setup(t);
  await rejectsLayer(c.apply([{ name: "f", data: "x" }, { name: "f/g", data: "y" }]), 0, /not a directory/);
});

test("hostile: malformed whiteouts and names", async (t) => {
  for (const [spec, re] of [
    [{ name: "a/.wh.." }, /names no file/],
    [{ name: "a/.wh." }, /names no file/],
    [{ name: "n", data: "x", pax: { path: `${"n".repeat(256)}` } }, /longer than 255/],
    [{ name: `${"d/".repeat(2100)}f`, data: "x", pax: { path: `${"d/".repeat(2100)}f` } }, /4096/],
    [{ name: "s", type: "2", linkname: "" }, /symlink target/],
    [{ name: "./", type: "0", data: "x" }, /root directory/],
  ] as Array<[TarSpec, RegExp]>) {
    const c = await setup(t);
    await rejectsLayer(c.apply([{ name: "a/" }, spec]), 0, re);
    assertNothingOnHost(c);
  }
});

test("device nodes, fifos and setuid bits stay tree data; nothing is created on the host", async (t) => {
  const c = await setup(t);
  await c.apply([
    { name: "dev/null", type: "3", devmajor: 1, devminor: 3, mode: 0o666 },
    { name: "dev/sda", type: "4", devmajor: 8, devminor: 0 },
    { name: "run/fifo", type: "6" },
    { name: "bin/su", data: "su", mode: 0o4755 },
  ]);
  const n = c.get("dev/null");
  assert.ok(n?.kind === "chardev");
  assert.deepEqual([n.major, n.minor, n.mode], [1, 3, 0o666]);
  assert.equal(c.get("dev/sda")?.kind, "blockdev");
  assert.equal(c.get("run/fifo")?.kind, "fifo");
  assert.equal(c.get("bin/su")?.mode, 0o4755);
  assertNothingOnHost(c);
});

test("the root entry './' sets the root's metadata", async (t) => {
  const c = await setup(t);
  await c.apply([{ name: "./", mode: 0o700, uid: 3, mtime: 99 }]);
  assert.deepEqual([c.tree.root.mode, c.tree.root.uid, c.tree.root.mtimeSec], [0o700, 3, 99]);
});

test("xattrs erofs cannot store are dropped, others kept", async (t) => {
  const c = await setup(t);
  await c.apply([
    {
      name: "f",
      data: "x",
      pax: {
        "SCHILY.xattr.security.capability": Buffer.from([1, 0, 0, 2]),
        "SCHILY.xattr.user.keep": "v",
        "SCHILY.xattr.system.weird": "w",
        "SCHILY.xattr.user.": "empty name",
        [`SCHILY.xattr.user.${"k".repeat(256)}`]: "too long",
      },
    },
  ]);
  assert.deepEqual([...c.get("f")!.xattrs.keys()].sort(), ["security.capability", "user.keep"]);
});

test("progress: per-layer bytes, final report equals the tar size", async (t) => {
  const c = await setup(t);
  const data = tar([{ name: "big", data: Buffer.alloc(3 << 20, 1) }]);
  const seen: LayerProgress[] = [];
  const stats = await applyLayer(c.tree, chunks(data, 65536), c.spool, { layer: 4, onProgress: (p) => seen.push(p) });
  assert.ok(seen.length >= 3);
  assert.ok(seen.every((p) => p.layer === 4));
  assert.equal(seen.at(-1)!.bytes, data.length);
  assert.equal(stats.bytes, data.length);
  assert.equal(stats.contentBytes, 3 << 20);
});

test("errors from the input stream pass through unchanged", async (t) => {
  const c = await setup(t);
  async function* broken(): AsyncGenerator<Buffer> {
    yield tar([{ name: "a", data: "x" }], { end: false });
    throw new Error("digest mismatch upstream");
  }
  await assert.rejects(applyLayer(c.tree, broken(), c.spool), /digest mismatch upstream/);
});

test("abort: AbortError from applyLayer, between entries and inside a body", async (t) => {
  const c = await setup(t);
  const ac = new AbortController();
  ac.abort(new Error("stop"));
  await assert.rejects(applyLayer(c.tree, chunks(tar([{ name: "a", data: "x" }])), c.spool, { signal: ac.signal }), AbortError);
  const ac2 = new AbortController();
  async function* slow(): AsyncGenerator<Buffer> {
    const data = tar([{ name: "big", data: Buffer.alloc(1 << 20) }]);
    yield data.subarray(0, 4096);
    ac2.abort();
    yield data.subarray(4096);
  }
  await assert.rejects(applyLayer(c.tree, slow(), c.spool, { signal: ac2.signal }), AbortError);
});
