/**
 * The host side of the stream ring (src/agent-client/ring.ts): regions are
 * written where the file says, never over an unacknowledged one, wrap to
 * the front, and a full or closed ring declines (the caller sends frames).
 * A guest's RING_ACK that acknowledges more than is outstanding is refused.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { RING_BYTES, StreamRing, createRingFile } from "../../src/agent-client/ring.js";

describe("StreamRing", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-ring-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("creates a sparse file of RING_BYTES, and refuses to reuse an existing path", async () => {
    const f = join(dir, "a");
    createRingFile(f);
    const st = await stat(f);
    assert.equal(st.size, RING_BYTES);
    assert.ok(st.blocks * 512 < RING_BYTES, "sparse");
    assert.throws(() => createRingFile(f), /EEXIST/);
  });

  it("places regions at 4 KiB boundaries with the bytes in the file, wraps, and waits for acks when full", async () => {
    const f = join(dir, "b");
    createRingFile(f);
    const size = 64 * 1024;
    const r = StreamRing.open(f, size);
    const a = randomBytes(20_000); // 5 pages
    const b = randomBytes(30_000); // 8 pages
    assert.equal(r.place(a), 0);
    assert.equal(r.place(b), 20_480);
    const file = await readFile(f);
    assert.deepEqual(file.subarray(0, a.length), a);
    assert.deepEqual(file.subarray(20_480, 20_480 + b.length), b);
    assert.equal(r.pending, 2);
    // 13 of 16 pages used: 4 more pages do not fit, even after a wrap.
    assert.equal(r.place(randomBytes(16_384)), undefined, "full: declined");
    assert.equal(r.ack(1), undefined);
    // Pages 5..12 still held: 3 pages at the end are skipped, the region goes to 0.
    const c = randomBytes(16_384);
    assert.equal(r.place(c), 0, "wraps to the front");
    assert.deepEqual((await readFile(f)).subarray(0, c.length), c);
    // One page is free between the new region and the held one.
    assert.equal(r.place(randomBytes(8192)), undefined, "the held region is never overwritten");
    assert.equal(r.place(randomBytes(4096)), 16_384);
    assert.equal(r.ack(3), undefined);
    assert.equal(r.pending, 0);
    assert.equal(r.place(randomBytes(4096)), 0, "empty: back to the front");
    r.close();
    assert.equal(r.place(randomBytes(4096)), undefined, "closed: declined");
  });

  it("refuses acknowledgements of regions never placed", () => {
    const f = join(dir, "c");
    createRingFile(f);
    const r = StreamRing.open(f);
    assert.match(r.ack(1) ?? "", /RING_ACK of 1 regions, 0 outstanding/);
    assert.notEqual(r.place(randomBytes(RING_BYTES / 4)), undefined);
    for (const bad of [0, -1, 2, 1.5, 2 ** 32 - 1]) assert.match(r.ack(bad) ?? "", /RING_ACK/, String(bad));
    assert.equal(r.ack(1), undefined);
    r.close();
  });

  it("declines payloads larger than the ring", () => {
    const f = join(dir, "d");
    createRingFile(f);
    const r = StreamRing.open(f, 8192);
    assert.equal(r.place(randomBytes(8193)), undefined);
    assert.equal(r.place(Buffer.alloc(0)), undefined);
    assert.equal(r.place(randomBytes(8192)), 0);
    r.close();
  });
});
