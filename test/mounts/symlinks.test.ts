import assert from "node:assert/strict";
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { FuseServer, type SymlinkPolicy } from "../../src/mounts/server.js";
import { Errno, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG } from "../../src/mounts/wire.js";
import { FuseCallError, FuseClient, ROOT } from "../../src/mounts/client.js";
import { errnoOf, serve } from "./helpers.js";

const MARKER = "OUTSIDE-SECRET-7f3a";

/**
 * root/outside/secret   (MARKER: must never be served except under "follow")
 * root/mnt/             (the mount)
 *   abs-file -> root/outside/secret
 *   abs-dir  -> root/outside
 *   rel-up   -> ../outside/secret
 *   inner    -> real.txt      (inside the mount)
 *   real.txt
 */
function fixture(t: TestContext): { root: string; mnt: string; outside: string } {
  const root = mkdtempSync(join(tmpdir(), "sm-links-"));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const outside = join(root, "outside");
  const mnt = join(root, "mnt");
  mkdirSync(outside);
  mkdirSync(mnt);
  writeFileSync(join(outside, "secret"), MARKER);
  writeFileSync(join(mnt, "real.txt"), "inside");
  symlinkSync(join(outside, "secret"), join(mnt, "abs-file"));
  symlinkSync(outside, join(mnt, "abs-dir"));
  symlinkSync("../outside/secret", join(mnt, "rel-up"));
  symlinkSync("real.txt", join(mnt, "inner"));
  return { root, mnt, outside };
}

/** Tries every way a guest could read a file through the host symlink `name`; returns everything that came back. */
async function tryToRead(c: FuseClient, name: string): Promise<string> {
  let seen = "";
  try {
    const e = await c.lookup(ROOT, name);
    try {
      seen += (await c.readFile(e.nodeid)).toString();
    } catch {
      // refused
    }
    try {
      const child = await c.lookup(e.nodeid, "secret");
      seen += (await c.readFile(child.nodeid)).toString();
    } catch {
      // refused
    }
  } catch {
    // refused at LOOKUP
  }
  for (const plus of [false, true]) {
    for (const ent of await c.readdir(ROOT, plus)) {
      if (ent.nodeid !== undefined && ent.nodeid !== 0n && ent.name.toString() === name) {
        try {
          seen += (await c.readFile(ent.nodeid)).toString();
        } catch {
          // refused
        }
      }
    }
  }
  return seen;
}

test('"deny": the guest cannot create symlinks (EPERM) and host symlinks are not traversable (EACCES at LOOKUP)', async (t) => {
  const { mnt } = fixture(t);
  const c = await serve(t, { hostPath: mnt, symlinks: "deny" });
  assert.equal(await errnoOf(c.symlink(ROOT, "escape", "/etc/passwd")), Errno.EPERM);
  assert.ok(!existsSync(join(mnt, "escape")));
  for (const name of ["abs-file", "abs-dir", "rel-up", "inner"]) {
    assert.equal(await errnoOf(c.lookup(ROOT, name)), Errno.EACCES, name);
    assert.ok(!(await tryToRead(c, name)).includes(MARKER), name);
  }
  // READDIRPLUS lists the name but gives it no node.
  const plus = await c.readdir(ROOT, true);
  assert.equal(plus.find((e) => e.name.toString() === "abs-file")?.nodeid, 0n);
  assert.equal((await c.readFile((await c.lookup(ROOT, "real.txt")).nodeid)).toString(), "inside");
});

test('"opaque" (default): guest symlink targets are stored verbatim and never resolved; host symlinks are leaves, not traversed', async (t) => {
  const { mnt, outside } = fixture(t);
  const c = await serve(t, { hostPath: mnt });
  assert.equal(c.server.spec.symlinks, "opaque");

  // A hostile target, stored byte for byte.
  const made = await c.symlink(ROOT, "escape", "/etc/passwd");
  assert.equal(made.attr.mode & S_IFMT, S_IFLNK);
  assert.equal(readlinkSync(join(mnt, "escape")), "/etc/passwd");
  assert.equal((await c.readlink(made.nodeid)).toString(), "/etc/passwd");
  const odd = Buffer.from([0x2e, 0x2e, 0x2f, 0x2e, 0x2e, 0x2f, 0xff, 0x01]);
  const oddNode = await c.symlink(ROOT, "odd", odd);
  assert.deepEqual(readlinkSync(join(mnt, "odd"), { encoding: "buffer" }), odd);
  assert.deepEqual(await c.readlink(oddNode.nodeid), odd);
  // npm-workspace style relative links work (the guest kernel resolves them inside the mount).
  mkdirSync(join(mnt, "packages", "a"), { recursive: true });
  const nm = await c.mkdir(ROOT, "node_modules");
  await c.symlink(nm.nodeid, "a", "../packages/a");
  assert.equal(readlinkSync(join(mnt, "node_modules", "a")), "../packages/a");

  // The host never follows a symlink: not a guest-made one, not a host one.
  const esc = await c.lookup(ROOT, "escape");
  assert.equal(esc.attr.mode & S_IFMT, S_IFLNK);
  assert.equal(await errnoOf(c.open(esc.nodeid)), Errno.ELOOP);
  for (const name of ["abs-file", "abs-dir", "rel-up"]) {
    const e = await c.lookup(ROOT, name);
    assert.equal(e.attr.mode & S_IFMT, S_IFLNK, `${name} is a symlink node`);
    assert.equal(await errnoOf(c.open(e.nodeid)), Errno.ELOOP, `${name}: OPEN of a symlink node`);
    assert.equal(await errnoOf(c.lookup(e.nodeid, "secret")), Errno.ENOTDIR, `${name}: LOOKUP under a symlink node`);
    assert.equal(await errnoOf(c.create(e.nodeid, "planted")), Errno.ENOTDIR, `${name}: CREATE under a symlink node`);
    assert.ok(!(await tryToRead(c, name)).includes(MARKER), name);
  }
  assert.equal((await c.readlink((await c.lookup(ROOT, "abs-file")).nodeid)).toString(), join(outside, "secret"));
  assert.equal((await c.readlink((await c.lookup(ROOT, "rel-up")).nodeid)).toString(), "../outside/secret");
  assert.ok(!existsSync(join(outside, "planted")));
  // A guest can remove and rename symlinks like any entry.
  await c.rename(ROOT, "escape", ROOT, "escape2");
  assert.equal(readlinkSync(join(mnt, "escape2")), "/etc/passwd");
  assert.equal((await c.readlink(esc.nodeid)).toString(), "/etc/passwd", "READLINK follows the node across a rename");
  await c.unlink(ROOT, "escape2");
  assert.ok(!existsSync(join(mnt, "escape2")));
  assert.equal(lstatSync(join(outside, "secret")).size, MARKER.length);
});

test('"follow": host symlinks are followed (trusted trees), including to files outside the mount', async (t) => {
  const { mnt } = fixture(t);
  const c = await serve(t, { hostPath: mnt, symlinks: "follow" });
  const f = await c.lookup(ROOT, "abs-file");
  assert.equal(f.attr.mode & S_IFMT, S_IFREG);
  assert.equal((await c.readFile(f.nodeid)).toString(), MARKER);
  const d = await c.lookup(ROOT, "abs-dir");
  assert.equal(d.attr.mode & S_IFMT, S_IFDIR);
  assert.equal((await c.readFile((await c.lookup(d.nodeid, "secret")).nodeid)).toString(), MARKER);
  assert.equal((await c.readFile((await c.lookup(ROOT, "rel-up")).nodeid)).toString(), MARKER);
  assert.equal((await c.readFile((await c.lookup(ROOT, "inner")).nodeid)).toString(), "inside");
  // The guest can still create symlinks; a new one is answered as a symlink.
  const made = await c.symlink(ROOT, "mine", "real.txt");
  assert.equal(made.attr.mode & S_IFMT, S_IFLNK);
  assert.equal(readlinkSync(join(mnt, "mine")), "real.txt");
  // Dangling links stay visible as symlinks.
  symlinkSync("/nonexistent/nowhere", join(mnt, "dangling"));
  const dl = await c.lookup(ROOT, "dangling");
  assert.equal(dl.attr.mode & S_IFMT, S_IFLNK);
  assert.equal((await c.readlink(dl.nodeid)).toString(), "/nonexistent/nowhere");
});
