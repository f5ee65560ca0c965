import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { FuseServer, type SymlinkPolicy } from "../../src/mounts/server.js";
import { S_IFDIR, S_IFLNK, S_IFMT } from "../../src/mounts/wire.js";
import { FuseClient, ROOT } from "../../src/mounts/client.js";

const MARKER = "MARKER-OUTSIDE-c0ffee-";
const SWAPS = 5000;

/**
 * The swapper: another process renames the directory `d` away, puts a
 * symlink (to the outside directory, or to "/") in its place, and puts the
 * directory back, SWAPS times, as fast as it can.
 */
const SWAPPER = `
const fs = require("fs");
const [mnt, outside, swaps] = process.argv.slice(1);
const d = mnt + "/d", real = mnt + "/d.real";
for (let i = 0; i < Number(swaps); i++) {
  fs.renameSync(d, real);
  fs.symlinkSync(i % 2 ? "/" : outside, d);
  fs.renameSync(real, mnt + "/d.back");
  fs.unlinkSync(d);
  fs.renameSync(mnt + "/d.back", d);
}
`;

/**
 * The race's tree: `mnt` (served) holds d/f = "inside-f"; `outside` (never
 * served) holds f = MARKER. Returns a server on `mnt` that counts its
 * replies and those carrying the marker, a client that has done INIT, and
 * `checkNothingEscaped`, the assertions every race ends with.
 */
async function raceTree(t: TestContext, label: string, symlinks?: SymlinkPolicy) {
  const root = mkdtempSync(join(tmpdir(), "sm-race-"));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const outside = join(root, "outside");
  const mnt = join(root, "mnt");
  mkdirSync(outside);
  mkdirSync(join(mnt, "d"), { recursive: true });
  writeFileSync(join(outside, "f"), MARKER + "file");
  writeFileSync(join(mnt, "d", "f"), "inside-f");
  const rootBefore = new Set(readdirSync("/"));
  const server = await FuseServer.open({ hostPath: mnt, guestTag: "w", ...(symlinks ? { symlinks } : {}) });
  t.after(() => server.close());
  const marker = Buffer.from(MARKER);
  const counts = { replies: 0, leaked: 0 };
  const handle = server.handle.bind(server);
  server.handle = async (req: Buffer) => {
    const r = await handle(req);
    counts.replies++;
    if (r !== null && r.includes(marker)) counts.leaked++;
    return r;
  };
  const c = new FuseClient(server);
  await c.init();
  const checkNothingEscaped = (): void => {
    assert.equal(counts.leaked, 0, "a reply carried bytes of the file outside the mount");
    assert.deepEqual(readdirSync(outside), ["f"], "nothing was created outside the mount");
    assert.deepEqual(
      readdirSync("/").filter((n) => !rootBefore.has(n)),
      [],
      "nothing was created in /",
    );
  };
  return { outside, mnt, tag: `sm-race-${process.pid}-${label}-`, counts, c, checkNothingEscaped };
}

for (const policy of ["opaque", "deny"] as const satisfies readonly SymlinkPolicy[]) {
  test(`race (${policy}): a directory swapped for a symlink to outside or / thousands of times; no byte outside hostPath is read or written`, { timeout: 300_000 }, async (t) => {
    const { outside, mnt, tag, counts, c, checkNothingEscaped } = await raceTree(t, policy, policy);

    const child = spawn(process.execPath, ["-e", SWAPPER, mnt, outside, String(SWAPS)], { stdio: ["ignore", "ignore", "pipe"] });
    let childErr = "";
    child.stderr.on("data", (b: Buffer) => (childErr += b.toString()));
    let running = true;
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    void exited.then(() => (running = false));
    t.after(() => {
      if (running) child.kill("SIGKILL");
    });

    const seen = { dir: 0, symlink: 0, enoent: 0, other: 0, reads: 0, creates: 0, naiveEscapes: 0 };
    let serial = 0;
    const worker = async (): Promise<void> => {
      while (running) {
        // Requests arrive as I/O events in a VM: yield to them (and to the child's exit) each round.
        await new Promise((r) => setImmediate(r));
        // What a path-based server would do: this one does reach outside (the race is real).
        try {
          if (readFileSync(join(mnt, "d", "f"), "utf8").startsWith(MARKER)) seen.naiveEscapes++;
        } catch {
          // ENOENT/ENOTDIR in between swaps
        }
        let d;
        try {
          d = await c.lookup(ROOT, "d");
        } catch {
          seen.enoent++;
          continue;
        }
        const type = d.attr.mode & S_IFMT;
        if (type === S_IFDIR) seen.dir++;
        else if (type === S_IFLNK) seen.symlink++;
        else seen.other++;
        try {
          const f = await c.lookup(d.nodeid, "f");
          const bytes = await c.readFile(f.nodeid);
          assert.equal(bytes.toString(), "inside-f");
          seen.reads++;
          await c.forget(f.nodeid);
        } catch (err) {
          if (err instanceof assert.AssertionError) throw err;
        }
        try {
          const made = await c.create(d.nodeid, `${tag}${serial++}`);
          await c.release(made.nodeid, made.fh);
          seen.creates++;
          await c.forget(made.nodeid);
        } catch {
          // ENOTDIR under a symlink node
        }
        await c.forget(d.nodeid);
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    assert.equal(await exited, 0, childErr);

    t.diagnostic(`replies ${counts.replies}, ${JSON.stringify(seen)}`);
    checkNothingEscaped();
    assert.ok(seen.reads > 0 && seen.creates > 0, "the server did work during the race");
    // Every created file is inside the mount.
    const inside = [...readdirSync(join(mnt, "d")), ...readdirSync(mnt)].filter((n) => n.startsWith(tag));
    assert.equal(inside.length, seen.creates);
    if (policy === "opaque") assert.ok(seen.dir > 0, "the directory was seen");
    // The test is only meaningful if the race window was actually hit.
    assert.ok(seen.symlink + seen.enoent + seen.naiveEscapes > 0, "the swap was observed");
  });
}

test("race (guest-driven): the guest itself swaps a directory for a symlink to / through the server while reading and creating under it", { timeout: 300_000 }, async (t) => {
  const { outside, tag, c, checkNothingEscaped } = await raceTree(t, "guest");
  let running = true;
  let swaps = 0;
  const swapper = async (): Promise<void> => {
    try {
      for (let i = 0; i < 2000; i++) {
        await c.rename(ROOT, "d", ROOT, "d.real");
        const l = await c.symlink(ROOT, "d", i % 2 ? "/" : outside);
        await c.forget(l.nodeid);
        await c.unlink(ROOT, "d");
        await c.rename(ROOT, "d.real", ROOT, "d");
        swaps++;
      }
    } finally {
      running = false;
    }
  };
  let serial = 0;
  let reads = 0;
  const worker = async (): Promise<void> => {
    while (running) {
      // As in a VM, requests arrive as I/O events: let the swapper's file system calls complete.
      await new Promise((r) => setImmediate(r));
      let d;
      try {
        d = await c.lookup(ROOT, "d");
      } catch {
        continue;
      }
      try {
        const f = await c.lookup(d.nodeid, "f");
        assert.equal((await c.readFile(f.nodeid)).toString(), "inside-f");
        reads++;
        await c.forget(f.nodeid);
      } catch (err) {
        if (err instanceof assert.AssertionError) throw err;
      }
      try {
        const made = await c.create(d.nodeid, `${tag}${serial++}`);
        await c.release(made.nodeid, made.fh);
        await c.forget(made.nodeid);
      } catch {
        // under a symlink node
      }
      await c.forget(d.nodeid);
    }
  };
  await Promise.all([swapper(), worker(), worker(), worker()]);
  t.diagnostic(`swaps ${swaps}, reads ${reads}`);
  assert.equal(swaps, 2000);
  checkNothingEscaped();
  assert.ok(reads > 0);
});
