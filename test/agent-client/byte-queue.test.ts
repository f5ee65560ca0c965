/**
 * ByteQueue: the contiguous FIFO that holds guest output. ChunkQueue: the
 * FIFO of a host socket's reads, kept by reference. Both checked against a
 * plain reference (concatenated Buffers) under random pushes and takes.
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ByteQueue, ChunkQueue } from "../../src/agent-client/byte-queue.js";

/**
 * 20,000 random pushes (mostly under 40 bytes, one in five up to `largest`)
 * and takes (up to `maxTake`, or everything), each checked against a plain
 * concatenation; returns what the reference still holds.
 */
function againstReference(seed: number, largest: number, maxTake: number, push: (b: Buffer) => void, take: (max: number) => Buffer, length: () => number): Buffer {
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  let ref = Buffer.alloc(0);
  let counter = 0;
  for (let i = 0; i < 20_000; i++) {
    if (rnd(3) > 0) {
      const n = rnd(5) === 0 ? rnd(largest) : rnd(40);
      const b = Buffer.alloc(n);
      for (let j = 0; j < n; j++) b[j] = counter++ & 0xff;
      push(b);
      ref = Buffer.concat([ref, b]);
    } else {
      const max = rnd(4) === 0 ? Infinity : rnd(maxTake);
      const got = take(max);
      const n = Math.min(max, ref.length);
      assert.ok(got.equals(ref.subarray(0, n)), `take ${i}`);
      ref = ref.subarray(n);
    }
    assert.equal(length(), ref.length);
  }
  return ref;
}

describe("ByteQueue", () => {
  it("returns exactly the bytes pushed, in order, under random pushes and shifts", () => {
    const q = new ByteQueue();
    const ref = againstReference(7, 70_000, 100_000, (b) => q.push(b), (max) => q.shift(max), () => q.length);
    assert.ok(q.takeAll().equals(ref));
    assert.equal(q.length, 0);
    assert.equal(q.capacity, 0);
  });

  it("a million 1-byte pushes cost about a megabyte, and the copy out is independent of the queue", () => {
    const q = new ByteQueue();
    const one = Buffer.from("x");
    for (let i = 0; i < 1_000_000; i++) q.push(one);
    assert.equal(q.length, 1_000_000);
    assert.ok(q.capacity <= 2 * 1_000_000, `capacity ${q.capacity}`);
    const a = q.shift(10);
    q.push(Buffer.from("yyyyyyyyyy"));
    assert.equal(a.toString(), "xxxxxxxxxx");
  });

  it("a drained queue does not pin a large buffer", () => {
    const q = new ByteQueue();
    q.push(Buffer.alloc(1 << 20));
    q.shift();
    assert.ok(q.capacity <= 64 * 1024, `capacity ${q.capacity} after draining`);
  });
});

describe("ChunkQueue", () => {
  it("returns exactly the bytes pushed, in order, under random pushes and takes", () => {
    const q = new ChunkQueue();
    const ref = againstReference(11, 200_000, 300_000, (b) => q.push(b), (max) => q.take(max), () => q.length);
    assert.ok(q.take().equals(ref));
    assert.equal(q.length, 0);
  });

  it("a take that one large chunk covers is that chunk's memory, not a copy; small chunks are copied in", () => {
    const q = new ChunkQueue();
    const big = Buffer.alloc(100_000, 1);
    q.push(big);
    const a = q.take(60_000);
    assert.equal(a.buffer, big.buffer);
    const b = q.take(60_000);
    assert.equal(b.buffer, big.buffer);
    assert.equal(b.length, 40_000);
    const small = Buffer.from("abc");
    q.push(small);
    small.write("xyz");
    assert.equal(q.take().toString(), "abc");
  });

  it("bytes taken stay as they were while small chunks keep coming", () => {
    const q = new ChunkQueue();
    q.push(Buffer.from("hello"));
    const a = q.take(3);
    q.push(Buffer.from("world"));
    assert.equal(a.toString(), "hel");
    assert.equal(q.take().toString(), "loworld");
  });

  it("a million 1-byte pushes cost about a megabyte of buffers, not an object each", () => {
    const q = new ChunkQueue();
    const one = Buffer.from("x");
    const before = process.memoryUsage().arrayBuffers;
    for (let i = 0; i < 1_000_000; i++) q.push(one);
    assert.equal(q.length, 1_000_000);
    assert.ok(process.memoryUsage().arrayBuffers - before < 4 << 20, "arrayBuffers grew by under 4 MiB");
    assert.equal(q.take().length, 1_000_000);
  });
});
