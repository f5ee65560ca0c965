import assert from "node:assert/strict";
import { test } from "node:test";
import { ImageError } from "../../src/errors.js";
import { compareNames, countLinks, FsTree, makeDir, makeFile, makeSymlink, nameFromBytes, nameToBytes, showName, treeStats, type DirNode } from "../../src/rootfs/tree.js";

test("names are latin1 byte strings that round-trip any bytes", () => {
  const bytes = Buffer.from([0x61, 0xff, 0x80, 0xc3, 0xa9]);
  const name = nameFromBytes(bytes);
  assert.equal(name.length, 5);
  assert.ok(nameToBytes(name).equals(bytes));
  assert.equal(showName(nameFromBytes(Buffer.from("é", "utf8"))), '"é"');
  assert.equal(showName(name), '"a\\xff\\x80\\xc3\\xa9"');
});

test("compareNames is bytewise (what erofs and strcmp use)", () => {
  const names = ["b", ".", "-x", "..", "a", nameFromBytes(Buffer.from([0xc3, 0xa9])), "Z"];
  names.sort(compareNames);
  assert.deepEqual(names, ["-x", ".", "..", "Z", "a", "b", nameFromBytes(Buffer.from([0xc3, 0xa9]))]);
});

test("node metadata: mode keeps only permission bits incl. setuid/setgid/sticky", () => {
  assert.equal(makeFile(0, null, { mode: 0o104755 }).mode, 0o4755);
  assert.equal(makeDir({ mode: 0o41777 }).mode, 0o1777);
  assert.equal(makeSymlink("x").mode, 0o777);
});

test("countLinks: files count entries, directories 2 + subdirs; entries() is parent-first, sorted", () => {
  const tree = new FsTree();
  const f = makeFile(0, null);
  const a = makeDir();
  const b = makeDir();
  tree.root.children.set("b", b);
  tree.root.children.set("a", a);
  a.children.set("f", f);
  b.children.set("g", f);
  tree.root.children.set("h", f);
  a.children.set("sub", makeDir());
  const links = countLinks(tree);
  assert.equal(links.get(f), 3);
  assert.equal(links.get(tree.root), 4);
  assert.equal(links.get(a), 3);
  assert.equal(links.get(b), 2);
  assert.deepEqual([...tree.entries()].map((e) => e.path.join("/")), ["a", "b", "h", "a/f", "a/sub", "b/g"]);
  assert.deepEqual(treeStats(tree), { inodes: 5, fileBytes: 0 });
});

test("a directory linked twice (or a cycle) is an ImageError, not a hang", () => {
  const tree = new FsTree();
  const d = makeDir();
  tree.root.children.set("d", d);
  d.children.set("loop", tree.root as DirNode);
  assert.throws(() => countLinks(tree), ImageError);
  const t2 = new FsTree();
  const e = makeDir();
  t2.root.children.set("x", e);
  t2.root.children.set("y", e);
  assert.throws(() => [...t2.entries()], ImageError);
});
