/**
 * The snapshot format checks, one negative test per rule, plus the sparse
 * copy and the restore stub kernel. No VM needed: files are made by hand.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { spawnSync } from "node:child_process";
import { chmodSync, chownSync, copyFileSync, mkdtempSync, renameSync, rmSync, symlinkSync } from "node:fs";
import { open, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { SnapshotError } from "../../src/errors.js";
import { dataExtents, parseExtents, sealSnapshotDir, sha256File, sha256FileHere, sparseCopy, sparseSha256File, sparseSha256Here, stubKernel } from "../../src/snapshot/files.js";
import { _hashThreadJobs } from "../../src/snapshot/hash-thread.js";
import { SNAPSHOT_FORMAT, SNAPSHOT_VERSION, readManifest, type SnapshotManifest } from "../../src/snapshot/manifest.js";

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

let root: string;
before(() => {
  root = mkdtempSync(join(tmpdir(), "sm-snapfmt-"));
});
after(() => rmSync(root, { recursive: true, force: true }));

let n = 0;
async function makeSnapshot(edit?: (m: SnapshotManifest) => void): Promise<string> {
  const dir = join(root, `s${n++}`);
  await import("node:fs/promises").then((f) => f.mkdir(dir));
  // 3 MiB: one chunk with data, two all zeros (the RAM digest skips those).
  const ram = Buffer.alloc(3 << 20);
  ram.write("guest memory", 4096);
  const state = Buffer.from("QEVM device state");
  const rootfs = Buffer.from("erofs image bytes");
  await writeFile(join(dir, "ram"), ram);
  await writeFile(join(dir, "state"), state);
  await writeFile(join(dir, "rootfs.erofs"), rootfs);
  const m: SnapshotManifest = {
    format: SNAPSHOT_FORMAT,
    version: SNAPSHOT_VERSION,
    key: "a".repeat(64),
    name: "t",
    createdAt: new Date().toISOString(),
    accel: "tcg",
    arch: process.arch,
    qemuVersion: "QEMU emulator version 7.2",
    memoryMib: 3,
    vcpus: 1,
    image: { ref: "x", digest: "sha256:00" },
    config: { env: ["A=b"] },
    workload: null,
    guestPort: 80,
    listenerRequired: false,
    inputs: {},
    files: { ram: { size: ram.length, sparseSha256: await sparseSha256File(join(dir, "ram")) }, state: { size: state.length, sha256: sha(state) }, rootfs: { size: rootfs.length, sha256: sha(rootfs) } },
  };
  edit?.(m);
  await writeFile(join(dir, "manifest.json"), JSON.stringify(m));
  return dir;
}

async function flipByte(path: string, at: number): Promise<void> {
  const f = await open(path, "r+");
  const b = Buffer.alloc(1);
  await f.read(b, 0, 1, at);
  b[0] = b[0]! ^ 0xff;
  await f.write(b, 0, 1, at);
  await f.close();
}

describe("snapshot format", () => {
  it("a well-formed snapshot passes quick and full checks", async () => {
    const dir = await makeSnapshot();
    assert.equal((await readManifest(dir, "quick")).memoryMib, 3);
    assert.equal((await readManifest(dir, "full")).vcpus, 1);
  });

  const rejects = async (dir: string, verify: "quick" | "full", re: RegExp) => {
    await assert.rejects(readManifest(dir, verify), (e: unknown) => {
      assert.ok(e instanceof SnapshotError, String(e));
      assert.match(e.message, re);
      return true;
    });
  };

  it("a missing directory", async () => rejects(join(root, "nope"), "quick", /does not exist/));
  it("a missing manifest (an interrupted build)", async () => {
    const dir = await makeSnapshot();
    rmSync(join(dir, "manifest.json"));
    await rejects(dir, "quick", /manifest.json is missing/);
  });
  it("a manifest that is not JSON", async () => {
    const dir = await makeSnapshot();
    await writeFile(join(dir, "manifest.json"), "{ nope");
    await rejects(dir, "quick", /not valid JSON/);
  });
  it("an oversized manifest", async () => {
    const dir = await makeSnapshot();
    await writeFile(join(dir, "manifest.json"), " ".repeat((1 << 20) + 1));
    await rejects(dir, "quick", /over the/);
  });
  it("a foreign format", async () => rejects(await makeSnapshot((m) => ((m as { format: string }).format = "other")), "quick", /format "other"/));
  it("a newer version", async () => rejects(await makeSnapshot((m) => (m.version = SNAPSHOT_VERSION + 1)), "quick", /version/));
  it("a bad shape", async () => rejects(await makeSnapshot((m) => ((m as { memoryMib: unknown }).memoryMib = "lots")), "quick", /memoryMib/));
  it("a streamRing that is not a boolean", async () => rejects(await makeSnapshot((m) => ((m as { streamRing: unknown }).streamRing = "yes")), "quick", /streamRing/));
  it("a bad cpuModel (it goes on QEMU's command line)", async () => {
    await rejects(await makeSnapshot((m) => ((m as { cpuModel: unknown }).cpuModel = "max,+avx -monitor stdio")), "quick", /cpuModel/);
    await rejects(await makeSnapshot((m) => ((m as { cpuModel: unknown }).cpuModel = "max,,kvm=on")), "quick", /cpuModel/);
    await rejects(await makeSnapshot((m) => ((m as { cpuModel: unknown }).cpuModel = 7)), "quick", /cpuModel/);
  });
  it("a missing file", async () => {
    const dir = await makeSnapshot();
    rmSync(join(dir, "state"));
    await rejects(dir, "quick", /state file is missing/);
  });
  it("a truncated RAM file", async () => {
    const dir = await makeSnapshot();
    const f = await open(join(dir, "ram"), "r+");
    await f.truncate(1000);
    await f.close();
    await rejects(dir, "quick", /ram is 1000 bytes/);
  });
  it("a corrupted state file is caught even by the quick check", async () => {
    const dir = await makeSnapshot();
    await flipByte(join(dir, "state"), 3);
    await rejects(dir, "quick", /state does not match its checksum/);
  });
  it("a corrupted RAM file is caught by the full check", async () => {
    const dir = await makeSnapshot();
    await flipByte(join(dir, "ram"), 4100);
    await readManifest(dir, "quick");
    await rejects(dir, "full", /ram does not match its checksum/);
  });
  it("a byte written into an all-zero part of the RAM file is caught by the full check", async () => {
    const dir = await makeSnapshot();
    await flipByte(join(dir, "ram"), (2 << 20) + 17);
    await readManifest(dir, "quick");
    await rejects(dir, "full", /ram does not match its checksum/);
  });
  it("a RAM record with a plain sha256 (format 3) is refused as a bad files record", async () =>
    rejects(
      await makeSnapshot((m) => {
        (m.files as { ram: unknown }).ram = { size: m.files.ram.size, sha256: "a".repeat(64) };
      }),
      "quick",
      /bad files record/,
    ));
  it("a symlinked file (even to a file of the right content) is refused by the quick check", async () => {
    const dir = await makeSnapshot();
    renameSync(join(dir, "ram"), join(root, `ram-elsewhere-${n}`));
    symlinkSync(join(root, `ram-elsewhere-${n}`), join(dir, "ram"));
    await rejects(dir, "quick", /ram is a symlink/);
  });
  it("a symlinked manifest is refused", async () => {
    const dir = await makeSnapshot();
    renameSync(join(dir, "manifest.json"), join(root, `manifest-elsewhere-${n}`));
    symlinkSync(join(root, `manifest-elsewhere-${n}`), join(dir, "manifest.json"));
    await rejects(dir, "quick", /manifest.json is a symlink/);
  });
  it("a file that is not a regular file (a directory, a fifo) is refused", async () => {
    const dir = await makeSnapshot();
    rmSync(join(dir, "state"));
    await import("node:fs/promises").then((f) => f.mkdir(join(dir, "state")));
    await rejects(dir, "quick", /state is not a regular file/);
  });
  it("a swapped state file (another snapshot's) is refused by the quick check", async () => {
    const a = await makeSnapshot();
    const b = await makeSnapshot();
    await writeFile(join(b, "state"), Buffer.from("QEVM other statexx").subarray(0, 17));
    copyFileSync(join(b, "state"), join(a, "state"));
    await rejects(a, "quick", /state does not match its checksum/);
  });
  it("a swapped RAM file of the same size is refused by the full check", async () => {
    const a = await makeSnapshot();
    await writeFile(join(a, "ram"), Buffer.alloc(3 << 20, 1));
    await rejects(a, "full", /ram does not match its checksum/);
  });
  it("an altered manifest: a RAM size that is not memoryMib MiB", async () =>
    rejects(await makeSnapshot((m) => (m.files.ram.size = 1000)), "quick", /ram size 1000 is not memoryMib/));
  it("an altered manifest: sizes edited to match a truncated RAM file are still refused", async () => {
    const dir = await makeSnapshot((m) => {
      m.memoryMib = 4;
      m.files.ram.size = 4 << 20;
    });
    await rejects(dir, "quick", /ram is 3145728 bytes, the manifest says 4194304/);
  });
  it("an altered manifest: a checksum that does not match", async () =>
    rejects(await makeSnapshot((m) => (m.files.state.sha256 = "b".repeat(64))), "quick", /state does not match its checksum/));
  it("an altered manifest: counts out of range", async () => rejects(await makeSnapshot((m) => (m.vcpus = 100_000)), "quick", /out of range/));
  it("a directory writable by others is refused", async () => {
    const dir = await makeSnapshot();
    chmodSync(dir, 0o777);
    await rejects(dir, "quick", /the directory is writable by others \(mode 777\)/);
  });
  it("a file writable by its group is refused", async () => {
    const dir = await makeSnapshot();
    chmodSync(join(dir, "state"), 0o660);
    await rejects(dir, "quick", /state is writable by its group/);
  });
  it("a file owned by another user is refused", { skip: process.getuid?.() !== 0 ? "needs root to chown" : false }, async () => {
    const dir = await makeSnapshot();
    chownSync(join(dir, "ram"), 65534, 65534);
    await rejects(dir, "quick", /ram is owned by uid 65534/);
  });
  it("a corrupted root filesystem is caught by the full check", async () => {
    const dir = await makeSnapshot();
    await flipByte(join(dir, "rootfs.erofs"), 0);
    await rejects(dir, "full", /rootfs does not match/);
  });
});

describe("snapshot files", () => {
  it("sha256File is the sha256 of the whole file, at and around its read size", async () => {
    const dir = mkdtempSync(join(tmpdir(), "sm-sha-"));
    try {
      const chunk = 4 << 20;
      for (const size of [0, 1, 4095, chunk - 1, chunk, chunk + 1, 2 * chunk + 12345]) {
        const data = Buffer.alloc(size);
        for (let i = 0; i < size; i += 4093) data[i] = (i * 7 + size) & 255;
        if (size) data[size - 1] = 0xa5;
        const f = join(dir, `f${size}`);
        await writeFile(f, data);
        assert.equal(await sha256File(f), createHash("sha256").update(data).digest("hex"), `size ${size}`);
      }
      await assert.rejects(sha256File(join(dir, "missing")), /ENOENT/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  // The RAM digest as docs/snapshots.md defines it, written out here apart from files.ts.
  const spec = (b: Buffer): string => {
    const h = createHash("sha256").update("supermachine-sparse-sha256-v1\0");
    const u64 = (x: number) => {
      const o = Buffer.alloc(8);
      o.writeBigUInt64LE(BigInt(x));
      return o;
    };
    h.update(u64(b.length));
    for (let i = 0; i * (1 << 20) < b.length; i++) {
      const c = b.subarray(i << 20, (i + 1) << 20);
      if (c.some((x) => x !== 0)) h.update(u64(i)).update(createHash("sha256").update(c).digest());
    }
    return h.digest("hex");
  };
  it("the RAM digest: its definition, holes and written zeros alike, every byte and the size counted", async () => {
    const dir = mkdtempSync(join(root, "digest-"));
    const b = Buffer.alloc((9 << 20) + 5000);
    b.write("first", 10);
    b.write("last", b.length - 10);
    b.write("middle", (5 << 20) + 3);
    const written = join(dir, "written");
    await writeFile(written, b);
    const d = await sparseSha256File(written);
    assert.equal(d, spec(b));
    assert.notEqual(d, sha(b), "not a plain sha256");
    // The same bytes as a sparse file (holes where the zeros were).
    const holes = join(dir, "holes");
    await sparseCopy(written, holes);
    assert.equal(await sparseSha256File(holes), d);
    // A byte in a zero chunk, a byte in a data chunk, trailing zeros: each changes it.
    const seen = new Set([d]);
    for (const edit of [(x: Buffer) => (x[(3 << 20) + 1] = 1), (x: Buffer) => (x[(5 << 20) + 4] = 0x41), (x: Buffer) => (x[11] = 0)]) {
      const c = Buffer.from(b);
      edit(c);
      await writeFile(written, c);
      const e = await sparseSha256File(written);
      assert.equal(e, spec(c));
      assert.ok(!seen.has(e), "an edit changed the digest");
      seen.add(e);
    }
    await writeFile(written, Buffer.concat([b, Buffer.alloc(4096)]));
    assert.ok(!seen.has(await sparseSha256File(written)), "trailing zeros changed the digest");
    // Empty file: the tag and the size only.
    await writeFile(written, Buffer.alloc(0));
    assert.equal(await sparseSha256File(written), spec(Buffer.alloc(0)));
  });

  it("the digests are taken on the hash thread, the same as on this thread; a failed read rejects; an idle thread does not keep a script alive", async () => {
    const dir = mkdtempSync(join(root, "thread-"));
    const b = Buffer.alloc((3 << 20) + 77);
    b.write("thread", (2 << 20) + 9);
    const file = join(dir, "f");
    await writeFile(file, b);
    const before = _hashThreadJobs();
    assert.equal(await sparseSha256File(file), spec(b));
    assert.equal(await sha256File(file), sha(b));
    assert.equal(_hashThreadJobs(), before + 2, "both answered by the hash thread");
    assert.equal(await sparseSha256Here(file, b.length, undefined), spec(b));
    assert.equal(await sha256FileHere(file), sha(b));
    await assert.rejects(sha256File(join(dir, "missing")), /ENOENT/);
    // A script that hashed and has nothing else to do exits by itself.
    const script = `import { sha256File } from ${JSON.stringify(new URL("../../src/snapshot/files.js", import.meta.url).href)};\nconsole.log(await sha256File(${JSON.stringify(file)}));\n`;
    const r = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8", timeout: 60_000 });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), sha(b));
  });

  it("the RAM digest reads only the data extents lseek reports, and is the same without them", async () => {
    const dir = mkdtempSync(join(root, "extents-"));
    const file = join(dir, "ram");
    const size = 64 << 20;
    const f = await open(file, "w");
    await f.truncate(size);
    const at = [0, (3 << 20) + 17, 40 << 20, size - 3];
    for (const o of at) await f.write(Buffer.from("abc"), 0, Math.min(3, size - o), o);
    await f.close();
    const ext = await dataExtents(file, size);
    assert.ok(ext, "the agent binary reports extents");
    let covered = 0;
    for (const [d, h] of ext) covered += h - d;
    assert.ok(covered < size / 4, `${covered} of ${size} bytes reported as data: the holes are skipped`);
    for (const o of at) assert.ok(ext.some(([d, h]) => d <= o && o < h), `written byte at ${o} inside an extent`);
    assert.equal(await dataExtents(file, size + 1), undefined, "another size than the caller's: no answer");
    const want = spec(await readFile(file));
    assert.equal(await sparseSha256File(file), want);
    // Without the helper the whole file is read: the same digest.
    const saved = process.env.SUPERMACHINE_AGENT;
    process.env.SUPERMACHINE_AGENT = join(dir, "no-agent-here");
    try {
      assert.equal(await dataExtents(file, size), undefined);
      assert.equal(await sparseSha256File(file), want);
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_AGENT;
      else process.env.SUPERMACHINE_AGENT = saved;
    }
    // A byte written into a hole becomes data: seen, and the digest changes.
    const g = await open(file, "r+");
    await g.write(Buffer.from("z"), 0, 1, 20 << 20);
    await g.close();
    assert.ok((await dataExtents(file, size))!.some(([d, h]) => d <= 20 << 20 && 20 << 20 < h));
    const changed = await sparseSha256File(file);
    assert.notEqual(changed, want);
    assert.equal(changed, spec(await readFile(file)));
  });

  it("data extents: only an answer that adds up is used", () => {
    assert.deepEqual(parseExtents("100\n0 10\n20 100\n", 100), [[0, 10], [20, 100]]);
    assert.deepEqual(parseExtents("100\n", 100), []);
    for (const bad of ["99\n0 10\n", "100\n0 10", "100\n10 5\n", "100\n0 10\n5 20\n", "100\n0 101\n", "100\n0 10 \n", "100\n-1 10\n", "100\nx y\n", "", "100\n0 10\n\n"]) {
      assert.equal(parseExtents(bad, 100), undefined, JSON.stringify(bad));
    }
  });

  it("sealing makes a snapshot directory 0700 and its files 0600, and a sealed snapshot passes", async () => {
    const dir = await makeSnapshot();
    chmodSync(dir, 0o755);
    for (const f of ["ram", "state", "rootfs.erofs", "manifest.json"]) chmodSync(join(dir, f), 0o644);
    await sealSnapshotDir(dir);
    assert.equal((await stat(dir)).mode & 0o777, 0o700);
    for (const f of ["ram", "state", "rootfs.erofs", "manifest.json"]) assert.equal((await stat(join(dir, f))).mode & 0o777, 0o600, f);
    await readManifest(dir, "full");
  });

  for (const [how, cp] of [["with coreutils' cp", undefined], ["by reading, without cp", null], ["by reading, when cp fails", "/bin/false"]] as const) {
    it(`sparse copy keeps content and its holes (${how})`, async () => {
      const src = join(root, "sparse-src");
      const size = 16 << 20;
      const f = await open(src, "w");
      await f.truncate(size);
      const data = Buffer.alloc(8192, 7);
      await f.write(data, 0, data.length, 5 << 20);
      await f.write(Buffer.from("tail"), 0, 4, size - 4);
      // A block of zeros written as data: a hole in the copy.
      await f.write(Buffer.alloc(4096), 0, 4096, 9 << 20);
      await f.close();
      const dst = join(root, "sparse-dst");
      await rm(dst, { force: true });
      await sparseCopy(src, dst, { cp });
      const a = await readFile(src);
      const b = await readFile(dst);
      assert.ok(a.equals(b));
      assert.equal(b.length, size);
      const st = await stat(dst);
      assert.ok(st.blocks * 512 <= 64 * 1024, `copy uses ${st.blocks * 512} bytes on disk`);
    });
  }

  it("the restore stub is an ELF with a PVH entry note, padded past the bzImage header", () => {
    const k = stubKernel();
    assert.equal(k.readUInt32BE(0), 0x7f454c46);
    assert.ok(k.length >= 8192);
    assert.ok(k.includes(Buffer.from("Xen\0", "latin1")));
  });
});
