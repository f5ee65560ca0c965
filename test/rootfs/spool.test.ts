/**
 * The spool (src/rootfs/spool.ts) starts writing its bytes back to disk as
 * they arrive (an fdatasync per 16 MiB written, not awaited), so that the
 * image's fsync at the end finds little left; an error of such a writeback
 * is not lost (the image's fsync, on another descriptor opened later, would
 * not see it): close() throws it.
 */

import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ImageError } from "../../src/errors.js";
import { Spool } from "../../src/rootfs/spool.js";

/** FileHandle's prototype, whose datasync the tests count or break. */
async function fileHandleProto(dir: string): Promise<{ datasync: () => Promise<void> }> {
  const fh = await open(join(dir, "probe"), "w");
  const proto = Object.getPrototypeOf(fh) as { datasync: () => Promise<void> };
  await fh.close();
  return proto;
}

async function* chunks(total: number, fill: number): AsyncGenerator<Buffer> {
  for (let done = 0; done < total; done += 1 << 20) yield Buffer.alloc(Math.min(1 << 20, total - done), fill);
}

test("a spool writes its bytes back while it fills (one datasync per 16 MiB, none for a small one) and keeps them", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sm-spool-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const proto = await fileHandleProto(dir);
  const real = proto.datasync;
  let calls = 0;
  proto.datasync = function (this: unknown) {
    calls++;
    return real.call(this);
  };
  try {
    const small = await Spool.create(join(dir, "small"));
    await small.append(chunks(3 << 20, 1), 3 << 20);
    await small.close();
    assert.equal(calls, 0, "under 16 MiB: no writeback");
    const big = await Spool.create(join(dir, "big"), { reserve: 4096 });
    const refs = [];
    for (let i = 0; i < 5; i++) refs.push(await big.append(chunks(10 << 20, 10 + i), 10 << 20));
    await big.close();
    assert.ok(calls >= 2 && calls <= 3, `${calls} writebacks for 50 MiB`);
    const bytes = readFileSync(join(dir, "big"));
    refs.forEach((r, i) => {
      assert.equal(r!.offset, 4096 + i * (10 << 20));
      assert.ok(bytes.subarray(r!.offset, r!.offset + r!.size).every((b) => b === 10 + i));
    });
  } finally {
    proto.datasync = real;
  }
});

test("an early writeback's error is thrown by close(), as an ImageError naming the spool", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sm-spool-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const proto = await fileHandleProto(dir);
  const real = proto.datasync;
  proto.datasync = () => Promise.reject(Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO" }));
  try {
    const s = await Spool.create(join(dir, "spool"));
    await s.append(chunks(20 << 20, 7), 20 << 20);
    await assert.rejects(s.close(), (e: unknown) => e instanceof ImageError && /spool/.test((e as Error).message) && /EIO/.test((e as Error).message));
  } finally {
    proto.datasync = real;
  }
});
