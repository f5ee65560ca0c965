import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { MountError, SupermachineError } from "../../src/errors.js";
import { FuseServer, MAX_WRITE_BYTES, type FuseServerOptions, type MountSpec } from "../../src/mounts/server.js";
import { Errno, Fattr, NotifyCode, Op, S_IFDIR, S_IFMT, S_IFREG, cstr, encodeRequest, parseReply, struct } from "../../src/mounts/wire.js";
import { serve, errnoOf } from "./helpers.js";
import { FuseCallError, FuseClient, O_CREAT, O_EXCL, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, ROOT, openFdCount } from "../../src/mounts/client.js";

function tmp(t: TestContext, prefix = "sm-mount-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("open validates the mount: missing or non-directory hostPath is a MountError naming hostPath; bad options are TypeErrors", async (t) => {
  const dir = tmp(t);
  writeFileSync(join(dir, "file"), "x");
  const before = await openFdCount();
  for (const hostPath of [join(dir, "missing"), join(dir, "file")]) {
    const err = await FuseServer.open({ hostPath, guestTag: "w" }).then(
      () => assert.fail("opened"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof MountError && err instanceof SupermachineError);
    assert.equal(err.code, "ERR_SM_MOUNT");
    assert.equal(err.option, "hostPath");
    assert.match(err.message, /mounts\[\]\.hostPath/);
  }
  await assert.rejects(FuseServer.open({ hostPath: dir, guestTag: "w", symlinks: "sometimes" as "deny" }), (e: unknown) => e instanceof TypeError && /mounts\[\]\.symlinks/.test(e.message));
  await assert.rejects(FuseServer.open({ hostPath: dir, guestTag: "no/slash" }), (e: unknown) => e instanceof TypeError && /guestTag/.test(e.message));
  await assert.rejects(FuseServer.open({ hostPath: dir, guestTag: "w", guestPath: "relative" }), (e: unknown) => e instanceof TypeError && /guestPath/.test(e.message));
  await assert.rejects(FuseServer.open({ hostPath: dir, guestTag: "w" }, { maxNodes: 0 }), (e: unknown) => e instanceof TypeError && /maxNodes/.test(e.message));
  assert.equal(await openFdCount(), before, "a refused mount leaves no descriptor open");
});

test("INIT negotiates 7.37 or lower, max_write 128 KiB; other requests before INIT fail", async (t) => {
  const dir = tmp(t);
  const server = await FuseServer.open({ hostPath: dir, guestTag: "w" });
  t.after(() => server.close());
  const c = new FuseClient(server);
  assert.equal(await c.errno(Op.GETATTR, ROOT, struct([4, 0], [4, 0], [8, 0])), Errno.EIO);
  assert.equal(await c.errno(Op.INIT, 0n, struct([4, 7], [4, 20], [4, 0], [4, 0])), Errno.EPROTO, "a kernel older than 7.31 is refused");
  const out = await c.init(38);
  assert.equal(out.readUInt32LE(0), 7);
  assert.equal(out.readUInt32LE(4), 37);
  assert.equal(out.readUInt32LE(20), MAX_WRITE_BYTES);
  assert.equal(out.readUInt16LE(28), 32);
  const flags = out.readUInt32LE(12);
  assert.equal(flags & (1 << 16), 0, "no writeback cache: guest writes reach the host at once");
  const attr = await c.getattr(ROOT);
  assert.equal(attr.mode & S_IFMT, S_IFDIR);
});

test("lookup, create, write, read, readdir, rename, link, unlink, rmdir round trips land on the host", async (t) => {
  const dir = tmp(t);
  mkdirSync(join(dir, "src"));
  writeFileSync(join(dir, "src", "hello.txt"), "hello from the host\n");
  const c = await serve(t, { hostPath: dir });

  const src = await c.lookup(ROOT, "src");
  assert.equal(src.attr.mode & S_IFMT, S_IFDIR);
  assert.equal(src.attr.uid, 0, "the Node user's files show as uid 0 by default");
  const hello = await c.lookup(src.nodeid, "hello.txt");
  assert.equal(hello.attr.size, 20n);
  assert.equal((await c.readFile(hello.nodeid)).toString(), "hello from the host\n");
  assert.equal((await c.lookup(src.nodeid, "hello.txt")).nodeid, hello.nodeid, "one nodeid per inode");

  // Guest writes land on the host.
  const made = await c.create(src.nodeid, "out.bin", 0o100664);
  const payload = Buffer.alloc(300_000);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
  for (let off = 0; off < payload.length; off += MAX_WRITE_BYTES) {
    const part = payload.subarray(off, off + MAX_WRITE_BYTES);
    assert.equal(await c.write(made.nodeid, made.fh, off, part), part.length);
  }
  await c.release(made.nodeid, made.fh);
  assert.deepEqual(readFileSync(join(dir, "src", "out.bin")), payload);
  assert.equal(statSync(join(dir, "src", "out.bin")).mode & 0o777, 0o664, "the guest's mode, not the host umask");
  assert.deepEqual(await c.readFile(made.nodeid), payload);

  // Host edits are read by the next open.
  writeFileSync(join(dir, "src", "hello.txt"), "edited on the host\n");
  assert.equal((await c.readFile(hello.nodeid)).toString(), "edited on the host\n");
  assert.equal((await c.getattr(hello.nodeid)).size, 19n);

  // Directory listings, plain and plus.
  const names = (await c.readdir(src.nodeid)).map((e) => e.name.toString()).sort();
  assert.deepEqual(names, [".", "..", "hello.txt", "out.bin"]);
  const plus = await c.readdir(src.nodeid, true);
  const helloPlus = plus.find((e) => e.name.toString() === "hello.txt");
  assert.equal(helloPlus?.nodeid, hello.nodeid);
  assert.equal(plus.find((e) => e.name.toString() === ".")?.nodeid, 0n, '"." is never looked up');

  // Many entries over several READDIR calls with a small buffer.
  mkdirSync(join(dir, "many"));
  for (let i = 0; i < 300; i++) writeFileSync(join(dir, "many", `f${i}`), "");
  const many = await c.lookup(ROOT, "many");
  const listed = await c.readdir(many.nodeid, false, 512);
  assert.equal(listed.length, 302);
  assert.equal(new Set(listed.map((e) => e.name.toString())).size, 302);

  // mkdir, rename (plain and NOREPLACE), hard link, unlink, rmdir.
  const sub = await c.mkdir(ROOT, "sub", 0o750);
  assert.equal(sub.attr.mode & 0o777, 0o750);
  assert.ok(statSync(join(dir, "sub")).isDirectory());
  await c.rename(src.nodeid, "out.bin", sub.nodeid, "moved.bin");
  assert.ok(existsSync(join(dir, "sub", "moved.bin")) && !existsSync(join(dir, "src", "out.bin")));
  assert.equal(await errnoOf(c.rename(sub.nodeid, "moved.bin", src.nodeid, "hello.txt", 1)), Errno.EEXIST);
  assert.equal(await errnoOf(c.rename(sub.nodeid, "moved.bin", src.nodeid, "x", 2)), Errno.EINVAL, "RENAME_EXCHANGE is refused");
  await c.rename(sub.nodeid, "moved.bin", sub.nodeid, "renamed.bin", 1);
  const linked = await c.link(made.nodeid, ROOT, "hardlink.bin");
  assert.equal(linked.nodeid, made.nodeid);
  assert.equal(statSync(join(dir, "hardlink.bin")).ino, statSync(join(dir, "sub", "renamed.bin")).ino);
  assert.equal(await errnoOf(c.link(sub.nodeid, ROOT, "dirlink")), Errno.EPERM, "no hard links to directories");
  assert.equal(await errnoOf(c.rmdir(ROOT, "sub")), Errno.ENOTEMPTY);
  await c.unlink(sub.nodeid, "renamed.bin");
  await c.rmdir(ROOT, "sub");
  assert.ok(!existsSync(join(dir, "sub")));
  assert.equal(await errnoOf(c.lookup(ROOT, "sub")), Errno.ENOENT);

  // MKNOD makes regular files only.
  const plain = await c.mknod(ROOT, "plain", S_IFREG | 0o600);
  assert.equal(plain.attr.mode & S_IFMT, S_IFREG);
  assert.equal(await errnoOf(c.mknod(ROOT, "fifo", 0o010644)), Errno.EPERM);
  assert.equal(await errnoOf(c.mknod(ROOT, "dev", 0o020644)), Errno.EPERM);
  assert.ok(!existsSync(join(dir, "fifo")) && !existsSync(join(dir, "dev")));

  // STATFS answers for the host filesystem.
  const st = await c.ok("STATFS", Op.STATFS, ROOT);
  assert.equal(st.length, 80);
  assert.ok(st.readBigUInt64LE(0) > 0n);
});

test("SETATTR: truncate, mode without set-id bits, times; uid/gid changes are ignored", async (t) => {
  const dir = tmp(t);
  writeFileSync(join(dir, "f"), "0123456789");
  const c = await serve(t, { hostPath: dir });
  const f = await c.lookup(ROOT, "f");
  let attr = await c.setattr(f.nodeid, { valid: Fattr.SIZE, size: 4 });
  assert.equal(attr.size, 4n);
  assert.equal(readFileSync(join(dir, "f"), "utf8"), "0123");
  attr = await c.setattr(f.nodeid, { valid: Fattr.MODE, mode: S_IFREG | 0o6755 });
  assert.equal(attr.mode & 0o7777, 0o755, "setuid/setgid are never set on host files");
  assert.equal(statSync(join(dir, "f")).mode & 0o7777, 0o755);
  attr = await c.setattr(f.nodeid, { valid: Fattr.MTIME | Fattr.ATIME, mtime: 1_000_000, atime: 2_000_000 });
  assert.equal(statSync(join(dir, "f")).mtimeMs, 1_000_000_000);
  assert.equal(attr.mtimeNs, 1_000_000n * 1_000_000_000n);
  const owner = statSync(join(dir, "f")).uid;
  await c.setattr(f.nodeid, { valid: Fattr.UID | Fattr.GID, uid: 4242, gid: 4242 });
  assert.equal(statSync(join(dir, "f")).uid, owner);
  const d = await c.mkdir(ROOT, "d", 0o2775);
  assert.equal(statSync(join(dir, "d")).mode & 0o7777, 0o775);
  assert.equal(await errnoOf(c.setattr(d.nodeid, { valid: Fattr.SIZE, size: 0 })), Errno.EISDIR);
});

test("guest names are single components: '', '.', '..', '/' and over-long names are refused and nothing climbs out", async (t) => {
  const root = tmp(t);
  const dir = join(root, "mnt");
  mkdirSync(dir);
  writeFileSync(join(root, "outside"), "OUTSIDE-MARKER");
  const c = await serve(t, { hostPath: dir });
  const cases: Array<[string | Buffer, number]> = [
    ["", Errno.ENOENT],
    [".", Errno.EINVAL],
    ["..", Errno.EINVAL],
    ["../outside", Errno.EINVAL],
    ["a/b", Errno.EINVAL],
    ["/etc", Errno.EINVAL],
    ["x".repeat(256), Errno.ENAMETOOLONG],
  ];
  for (const [name, errno] of cases) {
    assert.equal(await errnoOf(c.lookup(ROOT, name)), errno, `LOOKUP ${JSON.stringify(name.toString())}`);
    assert.equal(await errnoOf(c.create(ROOT, name)), errno, `CREATE ${JSON.stringify(name.toString())}`);
    assert.equal(await errnoOf(c.mkdir(ROOT, name)), errno, `MKDIR ${JSON.stringify(name.toString())}`);
  }
  // A name without its NUL terminator, and a body too short for its struct.
  assert.equal(await c.errno(Op.LOOKUP, ROOT, Buffer.from("abc")), Errno.EINVAL);
  assert.equal(await c.errno(Op.CREATE, ROOT, Buffer.alloc(4)), Errno.EINVAL);
  assert.equal(await c.errno(Op.LOOKUP, 999n, cstr("x")), Errno.ESTALE, "unknown nodeids are stale");
  assert.equal(readdirSync(root).sort().join(","), "mnt,outside");
  assert.deepEqual(readdirSync(dir), []);
  // A 255-byte name is fine; arbitrary (non-UTF-8) bytes are kept as they are.
  await c.create(ROOT, "y".repeat(255));
  const latin1 = Buffer.from([0x63, 0x61, 0x66, 0xe9]);
  await c.create(ROOT, latin1);
  assert.ok(readdirSync(dir, { encoding: "buffer" }).some((n) => n.equals(latin1)));
});

test("malformed frames get error replies (or none when no header), never a throw", async (t) => {
  const dir = tmp(t);
  const c = await serve(t, { hostPath: dir });
  assert.equal(await c.server.handle(Buffer.alloc(8)), null);
  const lying = encodeRequest({ opcode: Op.GETATTR, unique: 77n, nodeid: ROOT }, Buffer.alloc(16));
  lying.writeUInt32LE(9999, 0);
  const r = parseReply((await c.server.handle(lying))!);
  assert.equal(r.unique, 77n);
  assert.equal(r.error, -Errno.EINVAL);
  assert.equal(await c.errno(4000, ROOT), Errno.ENOSYS, "unknown opcodes: ENOSYS");
  assert.equal(await c.errno(Op.GETXATTR, ROOT, struct([4, 64], [4, 0]), cstr("user.x")), Errno.ENOSYS);
  const f = await c.create(ROOT, "f");
  assert.equal(await c.errno(Op.READ, f.nodeid, c.readBody(f.fh, 0, 2 * 1024 * 1024)), Errno.EINVAL, "a read whose reply exceeds a frame is refused");
  const big = Buffer.alloc(MAX_WRITE_BYTES + 1);
  assert.equal(
    await c.errno(Op.WRITE, f.nodeid, struct([8, f.fh], [8, 0], [4, big.length], [4, 0], [8, 0], [4, 0], [4, 0]), big),
    Errno.EINVAL,
    "a write over max_write is refused",
  );
  assert.equal(await c.errno(Op.WRITE, f.nodeid, struct([8, f.fh], [8, 0], [4, 100], [4, 0], [8, 0], [4, 0], [4, 0]), Buffer.alloc(10)), Errno.EINVAL, "a write shorter than it says");
  assert.equal(await c.errno(Op.READ, f.nodeid, c.readBody(12345n, 0, 10)), Errno.EBADF);
});

test("readOnly refuses every change with EROFS and still reads", async (t) => {
  const dir = tmp(t);
  writeFileSync(join(dir, "f"), "read me");
  mkdirSync(join(dir, "d"));
  const c = await serve(t, { hostPath: dir, readOnly: true });
  const f = await c.lookup(ROOT, "f");
  assert.equal((await c.readFile(f.nodeid)).toString(), "read me");
  assert.equal(await errnoOf(c.open(f.nodeid, O_WRONLY)), Errno.EROFS);
  assert.equal(await errnoOf(c.open(f.nodeid, O_RDWR)), Errno.EROFS);
  assert.equal(await errnoOf(c.create(ROOT, "new")), Errno.EROFS);
  assert.equal(await errnoOf(c.mkdir(ROOT, "nd")), Errno.EROFS);
  assert.equal(await errnoOf(c.mknod(ROOT, "nn", S_IFREG | 0o644)), Errno.EROFS);
  assert.equal(await errnoOf(c.symlink(ROOT, "l", "f")), Errno.EROFS);
  assert.equal(await errnoOf(c.unlink(ROOT, "f")), Errno.EROFS);
  assert.equal(await errnoOf(c.rmdir(ROOT, "d")), Errno.EROFS);
  assert.equal(await errnoOf(c.rename(ROOT, "f", ROOT, "g")), Errno.EROFS);
  assert.equal(await errnoOf(c.link(f.nodeid, ROOT, "h")), Errno.EROFS);
  assert.equal(await errnoOf(c.setattr(f.nodeid, { valid: Fattr.SIZE, size: 0 })), Errno.EROFS);
  assert.equal(await errnoOf(c.setattr(f.nodeid, { valid: Fattr.MODE, mode: 0o777 })), Errno.EROFS);
  const fh = await c.open(f.nodeid);
  assert.equal(await c.errno(Op.WRITE, f.nodeid, struct([8, fh], [8, 0], [4, 1], [4, 0], [8, 0], [4, 0], [4, 0]), Buffer.from("x")), Errno.EROFS);
  assert.equal(await c.errno(Op.ACCESS, f.nodeid, struct([4, 2], [4, 0])), Errno.EROFS);
  assert.equal(await c.errno(Op.ACCESS, f.nodeid, struct([4, 4], [4, 0])), 0);
  await c.release(f.nodeid, fh);
  assert.deepEqual(readdirSync(dir).sort(), ["d", "f"]);
  assert.equal(readFileSync(join(dir, "f"), "utf8"), "read me");
});

test("bounded tables: ENFILE past maxNodes (with eviction notifications), EMFILE past maxHandles; FORGET and RELEASE free them", async (t) => {
  const dir = tmp(t);
  for (let i = 0; i < 10; i++) writeFileSync(join(dir, `f${i}`), `file ${i}`);
  const server = await FuseServer.open({ hostPath: dir, guestTag: "w" }, { maxNodes: 5, maxHandles: 2 });
  t.after(() => server.close());
  const notes: Buffer[] = [];
  server.onNotify = (m) => notes.push(m);
  const c = new FuseClient(server);
  await c.init();
  const ids: bigint[] = [];
  for (let i = 0; i < 4; i++) ids.push((await c.lookup(ROOT, `f${i}`)).nodeid);
  assert.equal(server.nodeCount, 5);
  assert.equal(await errnoOf(c.lookup(ROOT, "f4")), Errno.ENFILE);
  assert.equal((await c.lookup(ROOT, "f0")).nodeid, ids[0], "a node already known needs no new slot");
  // The server asked the guest kernel to drop old entries.
  assert.ok(notes.length > 0);
  const n = parseReply(notes[0]!);
  assert.equal(n.unique, 0n);
  assert.equal(n.error, NotifyCode.INVAL_ENTRY);
  assert.equal(n.body.readBigUInt64LE(0), ROOT);
  assert.match(n.body.subarray(16, 16 + n.body.readUInt32LE(8)).toString(), /^f\d$/);
  // BATCH_FORGET of two nodes frees two slots.
  const batch = encodeRequest({ opcode: Op.BATCH_FORGET, unique: 500n, nodeid: 0n }, struct([4, 2], [4, 0]), struct([8, ids[1]!], [8, 1], [8, ids[2]!], [8, 1]));
  assert.equal(await server.handle(batch), null);
  assert.equal(server.nodeCount, 3);
  await c.lookup(ROOT, "f4");
  // Handles.
  const h1 = await c.open(ids[0]!);
  const h2 = await c.open(ids[3]!);
  assert.equal(await errnoOf(c.open(ids[0]!)), Errno.EMFILE);
  assert.equal(await errnoOf(c.readdir(ROOT)), Errno.EMFILE);
  await c.release(ids[0]!, h1);
  assert.equal(server.handleCount, 1);
  assert.equal((await c.read(ids[3]!, h2, 0, 100)).toString(), "file 3");
  await c.release(ids[3]!, h2);
  // A forgotten node is stale.
  await c.forget(ids[3]!, 1n);
  assert.equal(await c.errno(Op.GETATTR, ids[3]!, struct([4, 0], [4, 0], [8, 0])), Errno.ESTALE);
});

test("many requests in flight at once, and close() leaves no descriptor open", async (t) => {
  const dir = tmp(t);
  for (let i = 0; i < 50; i++) writeFileSync(join(dir, `f${i}`), `content ${i}`.repeat(100));
  chmodSync(dir, 0o755);
  const before = await openFdCount();
  const server = await FuseServer.open({ hostPath: dir, guestTag: "w" });
  const c = new FuseClient(server);
  await c.init();
  const results = await Promise.all(
    Array.from({ length: 200 }, async (_, k) => {
      const i = k % 50;
      const e = await c.lookup(ROOT, `f${i}`);
      return [i, (await c.readFile(e.nodeid)).toString()] as const;
    }),
  );
  for (const [i, text] of results) assert.equal(text, `content ${i}`.repeat(100));
  const f = await c.lookup(ROOT, "f1");
  const fh = await c.open(f.nodeid);
  assert.ok((await openFdCount()) > before);
  // A request racing a RELEASE of its handle reads the right file or fails; never another file.
  const racing = c.read(f.nodeid, fh, 0, 20).then(
    (b) => b.toString(),
    (e: unknown) => (e instanceof FuseCallError ? `errno ${e.errno}` : Promise.reject(e)),
  );
  await c.release(f.nodeid, fh);
  assert.ok(["content 1content 1co", `errno ${Errno.EBADF}`].includes(await racing));
  await server.close();
  await server.close();
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(await openFdCount(), before);
  assert.equal(await c.errno(Op.GETATTR, ROOT, struct([4, 0], [4, 0], [8, 0])), Errno.ENOTCONN);
});

test("CREATE of an existing name opens a regular file (O_TRUNC honoured) but never a host FIFO, directory or symlink", async (t) => {
  const dir = tmp(t);
  writeFileSync(join(dir, "kept"), "old contents");
  writeFileSync(join(dir, "trunc"), "old contents");
  execFileSync("mkfifo", [join(dir, "fifo")]);
  mkdirSync(join(dir, "dir"));
  symlinkSync("/etc/hostname", join(dir, "link"));
  const c = await serve(t, { hostPath: dir });
  const kept = await c.create(ROOT, "kept", 0o100600, O_RDWR | O_CREAT);
  assert.equal((await c.read(kept.nodeid, kept.fh, 0, 100)).toString(), "old contents");
  await c.release(kept.nodeid, kept.fh);
  const tr = await c.create(ROOT, "trunc", 0o100600, O_RDWR | O_CREAT | O_TRUNC);
  await c.release(tr.nodeid, tr.fh);
  assert.equal(readFileSync(join(dir, "trunc"), "utf8"), "");
  assert.equal(await errnoOf(c.create(ROOT, "kept", 0o100600, O_RDWR | O_CREAT | O_EXCL)), Errno.EEXIST);
  // Would block a thread-pool thread forever if opened.
  assert.equal(await errnoOf(c.create(ROOT, "fifo", 0o100600, O_RDONLY | O_CREAT)), Errno.EACCES);
  assert.equal(await errnoOf(c.open((await c.lookup(ROOT, "fifo")).nodeid)), Errno.EACCES);
  assert.equal(await errnoOf(c.create(ROOT, "dir", 0o100600, O_RDWR | O_CREAT)), Errno.EISDIR);
  assert.equal(await errnoOf(c.create(ROOT, "link", 0o100600, O_RDWR | O_CREAT)), Errno.ELOOP);
  assert.equal(c.server.handleCount, 0, "failed opens hold no handle");
});

test("cache timeouts: entries and attributes are cached by the guest for cacheTimeoutMs, so host edits show within it", async (t) => {
  const dir = tmp(t);
  writeFileSync(join(dir, "f"), "x");
  for (const [ms, sec, nsec] of [
    [undefined, 0n, 500_000_000],
    [1500, 1n, 500_000_000],
    [0, 0n, 0],
  ] as const) {
    const c = await serve(t, { hostPath: dir }, ms === undefined ? {} : { cacheTimeoutMs: ms });
    const body = await c.ok("LOOKUP", Op.LOOKUP, ROOT, cstr("f"));
    assert.equal(body.readBigUInt64LE(16), sec, "entry_valid");
    assert.equal(body.readBigUInt64LE(24), sec, "attr_valid");
    assert.equal(body.readUInt32LE(32), nsec, "entry_valid_nsec");
    assert.equal(body.readUInt32LE(36), nsec, "attr_valid_nsec");
    const attr = await c.ok("GETATTR", Op.GETATTR, body.readBigUInt64LE(0), struct([4, 0], [4, 0], [8, 0]));
    assert.equal(attr.readBigUInt64LE(0), sec);
    assert.equal(attr.readUInt32LE(8), nsec);
  }
});

test("maxInFlight: requests beyond it wait their turn and all complete", async (t) => {
  const dir = tmp(t);
  for (let i = 0; i < 20; i++) writeFileSync(join(dir, `f${i}`), `n${i}`);
  const c = await serve(t, { hostPath: dir }, { maxInFlight: 1 });
  const got = await Promise.all(Array.from({ length: 100 }, async (_, k) => (await c.readFile((await c.lookup(ROOT, `f${k % 20}`)).nodeid)).toString()));
  assert.deepEqual(got, Array.from({ length: 100 }, (_, k) => `n${k % 20}`));
});

test("directory listings are bounded: EOVERFLOW past maxDirEntries, ENOMEM past the total budget, freed by RELEASEDIR", async (t) => {
  const dir = tmp(t);
  mkdirSync(join(dir, "small"));
  mkdirSync(join(dir, "huge"));
  for (let i = 0; i < 5; i++) writeFileSync(join(dir, "small", `f${i}`), "");
  for (let i = 0; i < 11; i++) writeFileSync(join(dir, "huge", `f${i}`), "");
  const c = await serve(t, { hostPath: dir }, { maxDirEntries: 10 });
  const huge = await c.lookup(ROOT, "huge");
  assert.equal(await errnoOf(c.readdir(huge.nodeid)), Errno.EOVERFLOW);
  const small = await c.lookup(ROOT, "small");
  assert.equal((await c.readdir(small.nodeid)).length, 7);
  // Hold listings open: 7 entries each, budget 4 × 10 = 40.
  const held: bigint[] = [];
  const readdirBody = (fh: bigint): Buffer => struct([8, fh], [8, 0], [4, 4096], [4, 0], [8, 0], [4, 0], [4, 0]);
  for (let i = 0; i < 7; i++) {
    const fh = (await c.ok("OPENDIR", Op.OPENDIR, small.nodeid, struct([4, 0], [4, 0]))).readBigUInt64LE(0);
    held.push(fh);
    const errno = await c.errno(Op.READDIR, small.nodeid, readdirBody(fh));
    assert.equal(errno, i < 6 ? 0 : Errno.ENOMEM, `listing ${i}`);
  }
  for (const fh of held) await c.release(small.nodeid, fh, true);
  assert.equal((await c.readdir(small.nodeid)).length, 7, "released listings give their budget back");
});
