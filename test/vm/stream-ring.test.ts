/**
 * The stream ring on real VMs (docs/protocol.md, "Stream ring"): large
 * host → guest payloads (stdin, writeFile) go through the VM's read-only
 * ring disk and arrive byte-exact (spliced into a stdin pipe when it has
 * room and nothing is queued, else read and queued), small ones as frames, every region is
 * acknowledged; a restored VM has its own ring; with the ring switched off
 * the same bytes go as frames.
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image } from "../../src/image/image.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault, defaultRootfs, waitFor } from "../helpers.js";

/** Small sizes, sizes around the ring's threshold and chunk (256 KiB), then large. */
const SIZES = [1, 4095, 16_385, 262_143, 262_144, 262_145, 300_001, 524_289, 1 << 20, 3 << 20];

/** Pipes `parts` into sha256sum in the guest; returns the guest's digest and the host's. */
async function hashThroughStdin(vm: Vm, parts: Buffer[], argv: string[] = ["sha256sum"]): Promise<{ guest: string; host: string }> {
  const c = await vm.spawn({ argv });
  const h = createHash("sha256");
  for (const p of parts) {
    h.update(p);
    await c.writeStdin(p);
  }
  await c.closeStdin();
  let out = "";
  for (;;) {
    const b = await c.readStdout();
    if (b.length === 0) break;
    out += b.toString();
  }
  const r = await c.wait();
  assert.equal(r.exitCode, 0);
  return { guest: out.split(/\s/)[0]!, host: h.digest("hex") };
}

describe("stream ring", { timeout: VM_TEST_TIMEOUT }, () => {
  let vm: Vm;
  before(async () => {
    vm = await bootDefault();
  });
  after(async () => {
    await vm?.destroy();
  });

  it("stdin of every size arrives byte-exact; large writes went through the ring and every region was acknowledged", async () => {
    assert.ok(vm.conn.info?.features.includes("ring"), `agent features: ${vm.conn.info?.features.join(",")}`);
    const before = vm.conn._ringStats!.bytes;
    const parts = SIZES.map((n) => randomBytes(n));
    const { guest, host } = await hashThroughStdin(vm, parts);
    assert.equal(guest, host);
    const s = vm.conn._ringStats!;
    // Most of the 3 MiB part went as regions (up to 1 MiB each; pieces under
    // 256 KiB, and any the full ring did not take, go as frames).
    assert.ok(s.bytes - before >= 2 << 20, `bytes through the ring: ${s.bytes - before}`);
    await waitFor(() => vm.conn._ringStats!.pending === 0, 10_000, "every ring region acknowledged");
  });

  it("stdin to a reader that lags and reads odd sizes: regions spliced into the pipe, split by a full pipe, and queued behind it arrive in order", async () => {
    // The reader starts after two seconds. The first part fills the 1 MiB
    // stdin pipe but for two pages, so the next region finds room for only
    // those (the rest of it is read at an offset and queued), and what
    // follows queues behind it; then `dd bs=1000` drains the pipe unevenly.
    const before = vm.conn._ringStats!.bytes;
    const parts = [randomBytes((1 << 20) - 8192), randomBytes(262_144 + 5), randomBytes(3 << 20), randomBytes(4095), randomBytes(1 << 20)];
    const { guest, host } = await hashThroughStdin(vm, parts, ["sh", "-c", "sleep 2; dd bs=1000 2>/dev/null | sha256sum"]);
    assert.equal(guest, host);
    assert.ok(vm.conn._ringStats!.bytes - before >= 3 << 20, `bytes through the ring: ${vm.conn._ringStats!.bytes - before}`);
    await waitFor(() => vm.conn._ringStats!.pending === 0, 10_000, "every ring region acknowledged");
  });

  it("writeFile of 3 MiB through the ring reads back the same", async () => {
    const data = randomBytes(3 << 20);
    const before = vm.conn._ringStats!.sent;
    await vm.writeFile("/tmp/ring.bin", data);
    assert.ok(vm.conn._ringStats!.sent > before, "the upload used the ring");
    const r = await vm.exec({ argv: ["sha256sum", "/tmp/ring.bin"] });
    assert.equal(r.stdout.toString().split(/\s/)[0], createHash("sha256").update(data).digest("hex"));
  });

  it("many concurrent streams share one ring without mixing bytes", async () => {
    const runs = await Promise.all([0, 1, 2, 3].map(() => hashThroughStdin(vm, [randomBytes(700_000), randomBytes(900_001)])));
    for (const r of runs) assert.equal(r.guest, r.host);
    await waitFor(() => vm.conn._ringStats!.pending === 0, 10_000, "every ring region acknowledged");
  });
});

describe("stream ring: restores and the frames-only switch", { timeout: VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  const saved = process.env.SUPERMACHINE_STREAM_RING;
  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-ring-snap-"));
  });
  after(async () => {
    if (saved === undefined) delete process.env.SUPERMACHINE_STREAM_RING;
    else process.env.SUPERMACHINE_STREAM_RING = saved;
    await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("a restored VM reads its own ring; with SUPERMACHINE_STREAM_RING=0 the same bytes go as frames", async () => {
    const image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag: `ring-${randomBytes(3).toString("hex")}` });
    try {
      assert.equal(image.manifest.streamRing, true);
      const parts = [randomBytes(2 << 20), randomBytes(12_345)];
      const vm = await image.restore();
      try {
        assert.ok(vm.conn._ringStats, "the restored VM has a ring");
        const { guest, host } = await hashThroughStdin(vm, parts);
        assert.equal(guest, host);
        assert.ok(vm.conn._ringStats!.bytes >= 1 << 20, `bytes through the ring: ${vm.conn._ringStats!.bytes}`);
      } finally {
        await vm.destroy();
      }
      process.env.SUPERMACHINE_STREAM_RING = "0";
      const plain = await image.restore();
      try {
        assert.equal(plain.conn._ringStats, undefined, "switched off");
        const { guest, host } = await hashThroughStdin(plain, parts);
        assert.equal(guest, host);
      } finally {
        await plain.destroy();
      }
    } finally {
      await image.close();
    }
  });
});
