import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, mkdirSync, symlinkSync, linkSync, readFileSync, utimesSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { test } from "node:test";
import { LayerError } from "../../src/errors.js";
import { readTar, type TarEntry } from "../../src/rootfs/tar.js";
import { chunks, entry, header, tar } from "../fixtures/rootfs/tar-writer.js";

interface Read {
  e: TarEntry;
  data: Buffer;
}

async function readAll(input: AsyncIterable<Uint8Array> | Readable, opts: Parameters<typeof readTar>[1] = {}): Promise<Read[]> {
  const out: Read[] = [];
  for await (const e of readTar(input, opts)) {
    const parts: Buffer[] = [];
    for await (const c of e.body()) parts.push(Buffer.from(c));
    out.push({ e, data: Buffer.concat(parts) });
  }
  return out;
}

test("ustar: files, dirs, links, devices, fifos and their metadata", async () => {
  const data = tar([
    { name: "dir/", mode: 0o4755, uid: 1000, gid: 100, mtime: 123 },
    { name: "dir/file", data: "hello", mode: 0o644 },
    { name: "dir/hard", type: "1", linkname: "dir/file" },
    { name: "dir/sym", type: "2", linkname: "../x" },
    { name: "dev/null", type: "3", devmajor: 1, devminor: 3 },
    { name: "dev/sda", type: "4", devmajor: 8, devminor: 0 },
    { name: "pipe", type: "6" },
    { name: "contig", type: "7", data: "c" },
  ]);
  const r = await readAll(chunks(data));
  assert.deepEqual(
    r.map((x) => [x.e.type, x.e.path, x.e.linkpath, x.data.toString()]),
    [
      ["dir", "dir/", "", ""],
      ["file", "dir/file", "", "hello"],
      ["hardlink", "dir/hard", "dir/file", ""],
      ["symlink", "dir/sym", "../x", ""],
      ["chardev", "dev/null", "", ""],
      ["blockdev", "dev/sda", "", ""],
      ["fifo", "pipe", "", ""],
      ["file", "contig", "", "c"],
    ],
  );
  assert.equal(r[0]!.e.mode, 0o4755);
  assert.equal(r[0]!.e.uid, 1000);
  assert.equal(r[0]!.e.gid, 100);
  assert.equal(r[0]!.e.mtimeSec, 123);
  assert.deepEqual([r[4]!.e.devmajor, r[4]!.e.devminor], [1, 3]);
});

test("works with 1-byte chunks and with unread bodies (skipped)", async () => {
  const big = Buffer.alloc(70_000, 7);
  const data = tar([{ name: "a", data: big }, { name: "b", data: "tail" }]);
  const names: string[] = [];
  for await (const e of readTar(chunks(data, 1))) names.push(e.path); // bodies never read
  assert.deepEqual(names, ["a", "b"]);
  const r = await readAll(chunks(data, 333));
  assert.ok(r[0]!.data.equals(big));
  assert.equal(r[1]!.data.toString(), "tail");
});

test("ustar prefix field, V7 headers, GNU long names and long link names", async () => {
  const long = `${"d".repeat(120)}/${"f".repeat(150)}`;
  const data = tar([
    { name: "name", prefix: "some/prefix", data: "p" },
    { name: "v7dir/", format: "v7", type: "\0" },
    { name: "v7file", format: "v7", type: "\0", data: "v" },
    { name: long, gnuLong: true, format: "gnu", data: "L" },
    { name: "ln", type: "2", linkname: "t".repeat(300), gnuLong: true, format: "gnu" },
  ]);
  const r = await readAll(chunks(data));
  assert.equal(r[0]!.e.path, "some/prefix/name");
  assert.equal(r[1]!.e.type, "dir");
  assert.equal(r[2]!.e.type, "file");
  assert.equal(r[3]!.e.path, long);
  assert.equal(r[3]!.data.toString(), "L");
  assert.equal(r[4]!.e.linkpath, "t".repeat(300));
});

test("PAX: path, linkpath, size, uid, gid, mtime with fraction, xattrs; globals", async () => {
  const name = Buffer.from([0x66, 0xff, 0xfe, 0x2f, 0x80]); // not UTF-8
  const data = tar(
    [
      {
        name: "short",
        data: "xyz",
        pax: {
          path: name,
          uid: "3000000",
          gid: "70000",
          mtime: "1700000000.5",
          "SCHILY.xattr.user.test": Buffer.from([0, 1, 2, 0x0a, 0x3d]),
          "LIBARCHIVE.xattr.user.%41b": Buffer.from("hello").toString("base64"),
          atime: "1.0",
        },
      },
      { name: "l", type: "2", linkname: "short", pax: { linkpath: "/very/long/target" } },
      { name: "g" },
    ],
    { global: { uid: "42", comment: "hi" } },
  );
  const r = await readAll(chunks(data));
  assert.equal(r[0]!.e.path, name.toString("latin1"));
  assert.equal(r[0]!.e.uid, 3000000);
  assert.equal(r[0]!.e.gid, 70000);
  assert.equal(r[0]!.e.mtimeSec, 1700000000);
  assert.equal(r[0]!.e.mtimeNsec, 500000000);
  assert.deepEqual([...r[0]!.e.xattrs.keys()], ["user.test", "user.Ab"]);
  assert.deepEqual(r[0]!.e.xattrs.get("user.test"), Buffer.from([0, 1, 2, 0x0a, 0x3d]));
  assert.equal(r[0]!.e.xattrs.get("user.Ab")!.toString(), "hello");
  assert.equal(r[1]!.e.linkpath, "/very/long/target");
  assert.equal(r[1]!.e.uid, 42, "global uid applies");
  assert.equal(r[2]!.e.uid, 42);
});

test("PAX size overrides the header size", async () => {
  const body = Buffer.alloc(1000, 1);
  const data = Buffer.concat([entry({ name: "f", data: body, size: 0, pax: { size: "1000" } }), Buffer.alloc(1024)]);
  // The header said 0 but PAX says 1000: the writer put 1000 bytes.
  const r = await readAll(chunks(data));
  assert.equal(r[0]!.e.size, 1000);
  assert.ok(r[0]!.data.equals(body));
});

test("GNU base-256 numeric fields", async () => {
  const data = tar([{ name: "f", data: "abc", uid: 5_000_000, mtime: 1_700_000_001, base256: ["size", "uid", "mtime"] }]);
  const r = await readAll(chunks(data));
  assert.equal(r[0]!.e.uid, 5_000_000);
  assert.equal(r[0]!.e.mtimeSec, 1_700_000_001);
  assert.equal(r[0]!.data.toString(), "abc");
});

test("negative mtimes clamp to 0", async () => {
  const r = await readAll(chunks(tar([{ name: "f", mtime: -5, base256: ["mtime"] }, { name: "g", pax: { mtime: "-3.25" } }])));
  assert.equal(r[0]!.e.mtimeSec, 0);
  assert.equal(r[1]!.e.mtimeSec, 0);
});

test("hostile: checksum mismatch is a LayerError", async () => {
  const data = tar([{ name: "ok", data: "1" }, { name: "bad", badChecksum: true }]);
  await assert.rejects(readAll(chunks(data)), (e) => e instanceof LayerError && /checksum/.test(e.message));
});

test("hostile: random bytes are not a tar archive", async () => {
  await assert.rejects(readAll(chunks(Buffer.alloc(2048, 0x41))), LayerError);
});

test("hostile: truncated body and truncated header", async () => {
  const data = tar([{ name: "f", data: Buffer.alloc(5000, 1) }], { end: false });
  await assert.rejects(readAll(chunks(data.subarray(0, 512 + 1000))), (e) => e instanceof LayerError && /truncated/.test(e.message));
  await assert.rejects(readAll(chunks(data.subarray(0, 300))), (e) => e instanceof LayerError && /truncated|checksum/.test(e.message));
  // Skipping an unread body hits the truncation too.
  await assert.rejects(
    (async () => {
      for await (const _ of readTar(chunks(data.subarray(0, 2000))));
    })(),
    LayerError,
  );
});

test("hostile: empty stream and meta header without entry", async () => {
  await assert.rejects(readAll(chunks(Buffer.alloc(0))), (e) => e instanceof LayerError && /empty/.test(e.message));
  const onlyPax = entry({ name: "f", pax: { path: "x" } }).subarray(0, 1024);
  await assert.rejects(readAll(chunks(onlyPax)), LayerError);
});

test("hostile: oversized PAX header and GNU long name are refused before buffering", async () => {
  // Only the header is sent: the size alone must be refused.
  const paxHead = header({ name: "PaxHeader" }, { type: "x", size: 2 << 20 });
  await assert.rejects(readAll(chunks(paxHead)), (e) => e instanceof LayerError && /limit/.test(e.message));
  const longHead = header({ name: "././@LongLink", format: "gnu" }, { type: "L", size: 1 << 20 });
  await assert.rejects(readAll(chunks(longHead)), (e) => e instanceof LayerError && /limit/.test(e.message));
  // Many small PAX headers in a row add up too.
  const many = Buffer.concat(Array.from({ length: 40 }, (_, i) => entry({ name: "x", pax: { [`SCHILY.xattr.user.k${i}`]: Buffer.alloc(40_000) } }).subarray(0, -512)));
  await assert.rejects(readAll(chunks(many)), (e) => e instanceof LayerError && /limit/.test(e.message));
});

test("hostile: malformed PAX records", async () => {
  for (const body of ["99 path=x\n", "abc path=x\n", "10 pathx\n\n", "6 =ab\n"]) {
    const b = Buffer.from(body);
    const data = Buffer.concat([header({ name: "P" }, { type: "x", size: b.length }), b, Buffer.alloc(512 - b.length), header({ name: "f" }), Buffer.alloc(1024)]);
    await assert.rejects(readAll(chunks(data)), LayerError, body);
  }
});

test("hostile: unsupported entry types and GNU sparse PAX", async () => {
  await assert.rejects(readAll(chunks(tar([{ name: "s", type: "S" }]))), (e) => e instanceof LayerError && /sparse/.test(e.message));
  await assert.rejects(readAll(chunks(tar([{ name: "q", type: "Q" }]))), (e) => e instanceof LayerError && /unknown type/.test(e.message));
  await assert.rejects(readAll(chunks(tar([{ name: "s", pax: { "GNU.sparse.major": "1" } }]))), (e) => e instanceof LayerError && /sparse/.test(e.message));
});

test("hostile: non-octal numeric field and NUL in a PAX path", async () => {
  const h = header({ name: "f" });
  h.write("12x", 124, "latin1"); // corrupt size; fix the checksum so only the field is wrong
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(sum.toString(8).padStart(6, "0") + "\0 ", 148, "latin1");
  await assert.rejects(readAll(chunks(Buffer.concat([h, Buffer.alloc(1024)]))), (e) => e instanceof LayerError && /octal/.test(e.message));
  await assert.rejects(readAll(chunks(tar([{ name: "f", pax: { path: "a\0b" } }]))), (e) => e instanceof LayerError && /NUL/.test(e.message));
});

test("reads what GNU tar writes (gnu and posix formats, long names, hard links)", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sm-tar-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const src = join(dir, "src");
  const deep = join(src, "a".repeat(90), "b".repeat(90));
  mkdirSync(deep, { recursive: true });
  writeFileSync(join(deep, "c".repeat(120)), "deep");
  writeFileSync(join(src, "f"), Buffer.alloc(10_000, 3));
  linkSync(join(src, "f"), join(src, "f2"));
  symlinkSync("f", join(src, "s"));
  utimesSync(join(src, "f"), 1_600_000_000.25, 1_600_000_000.25);
  for (const format of ["gnu", "posix"]) {
    const file = join(dir, `${format}.tar`);
    execFileSync("tar", ["-C", src, `--format=${format}`, "--sort=name", "-cf", file, "."]);
    const r = await readAll(Readable.from(chunks(readFileSync(file), 4096)));
    const byName = new Map(r.map((x) => [x.e.path, x]));
    assert.equal(byName.get(`./${"a".repeat(90)}/${"b".repeat(90)}/${"c".repeat(120)}`)?.data.toString(), "deep", format);
    assert.equal(byName.get("./f")?.data.length, 10_000);
    assert.equal(byName.get("./f")?.e.mtimeSec, 1_600_000_000);
    assert.equal(byName.get("./f2")?.e.type, "hardlink");
    assert.equal(byName.get("./f2")?.e.linkpath, "./f");
    assert.equal(byName.get("./s")?.e.linkpath, "f");
    if (format === "posix") assert.equal(byName.get("./f")?.e.mtimeNsec, 250_000_000);
  }
});

test("progress callback sees the bytes read", async () => {
  const data = tar([{ name: "f", data: Buffer.alloc(100_000) }]);
  let last = 0;
  await readAll(chunks(data, 8192), { onBytes: (n) => (last = n) });
  assert.equal(last, data.length);
});
