/**
 * vm.spawn / ExecChild on a real VM: interactive use, flow control with
 * bounded host memory both ways, signals, timeouts, peak RSS, ttys, Node
 * streams, AbortSignal.
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { after, before, describe, it } from "node:test";
import { Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ExecChild } from "../../src/vm/exec-child.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault } from "../helpers.js";

/** Reads stdout until `want` appears (or EOF); returns everything read. */
async function readUntil(c: ExecChild, want: string | RegExp, which: "out" | "err" = "out"): Promise<string> {
  let text = "";
  for (;;) {
    const b = which === "out" ? await c.readStdout() : await c.readStderr();
    if (b.length === 0) return text;
    text += b.toString();
    if (typeof want === "string" ? text.includes(want) : want.test(text)) return text;
  }
}

describe("vm.spawn on a real VM", { timeout: VM_TEST_TIMEOUT }, () => {
  let vm: Vm;
  before(async () => {
    vm = await bootDefault();
  });
  after(async () => {
    await vm?.destroy();
  });

  it("drives an interactive sh line by line", async () => {
    const sh = await vm.spawn({ argv: ["sh"] });
    assert.ok(sh.pid > 1);
    await sh.writeStdin(Buffer.from("echo hello\n"));
    assert.equal(await readUntil(sh, "\n"), "hello\n");
    await sh.writeStdin(Buffer.from("x=5; echo $((x * 2))\n"));
    assert.equal(await readUntil(sh, "\n"), "10\n");
    await sh.writeStdin(Buffer.from("echo oops >&2\n"));
    assert.equal(await readUntil(sh, "\n", "err"), "oops\n");
    await sh.writeStdin(Buffer.from("exit 4\n"));
    await sh.closeStdin();
    assert.equal((await sh.readStdout()).length, 0, "EOF after exit");
    const r = await sh.wait();
    assert.deepEqual({ exitCode: r.exitCode, timedOut: r.timedOut }, { exitCode: 4, timedOut: false });
  });

  it("cat echoes 64 MiB of stdin back byte-exact while host memory stays bounded", async () => {
    const cat = await vm.spawn({ argv: ["cat"] });
    const total = 64 << 20;
    const chunk = randomBytes(1 << 20);
    const sent = createHash("sha256");
    const got = createHash("sha256");
    let received = 0;
    const rss0 = process.memoryUsage().rss;
    let rssMax = rss0;
    const sample = setInterval(() => (rssMax = Math.max(rssMax, process.memoryUsage().rss)), 20);
    try {
      const writer = (async () => {
        for (let off = 0; off < total; off += chunk.length) {
          // Vary the chunk so a reordering would show in the hash.
          chunk.writeUInt32LE(off, 0);
          sent.update(chunk);
          await cat.writeStdin(chunk);
        }
        await cat.closeStdin();
      })();
      for (;;) {
        const b = await cat.readStdout(1 << 20);
        if (b.length === 0) break;
        got.update(b);
        received += b.length;
      }
      await writer;
      assert.equal((await cat.wait()).exitCode, 0);
    } finally {
      clearInterval(sample);
    }
    assert.equal(received, total);
    assert.equal(got.digest("hex"), sent.digest("hex"));
    const growth = (rssMax - rss0) / (1 << 20);
    assert.ok(growth < 200, `host RSS grew by ${growth.toFixed(0)} MiB`);
  });

  it("a guest writing endlessly to a slow reader: host memory stays bounded, signal(9) ends it", async () => {
    const yes = await vm.spawn({ argv: ["yes", "y".repeat(1000)] });
    const rss0 = process.memoryUsage().rss;
    let read = 0;
    for (let i = 0; i < 20; i++) {
      read += (await yes.readStdout(64 * 1024)).length;
      await new Promise((r) => setTimeout(r, 50));
    }
    // However long we wait, the host holds at most a window (1 MiB) per channel.
    await new Promise((r) => setTimeout(r, 1000));
    const growth = (process.memoryUsage().rss - rss0) / (1 << 20);
    assert.ok(read > 0);
    assert.ok(growth < 64, `host RSS grew by ${growth.toFixed(0)} MiB while the guest wrote endlessly`);
    await yes.signal(9);
    // Drain what is left so the exit can be delivered.
    while ((await yes.readStdout(1 << 20)).length > 0);
    const r = await yes.wait();
    assert.equal(r.exitCode, -1);
  });

  it("signal(15) to sleep 1000: wait() resolves promptly with -1; a signal after exit is harmless", async () => {
    const s = await vm.spawn({ argv: ["sleep", "1000"] });
    const t0 = Date.now();
    await s.signal(15);
    const r = await s.wait();
    assert.equal(r.exitCode, -1);
    assert.equal(r.timedOut, false);
    assert.ok(Date.now() - t0 < 30_000);
    await s.signal(15);
    await s.signal(9);
  });

  it("timeoutMs applies to spawn: timedOut is true", async () => {
    const s = await vm.spawn({ argv: ["sleep", "1000"], timeoutMs: 1000 });
    const r = await s.wait();
    assert.deepEqual({ exitCode: r.exitCode, timedOut: r.timedOut }, { exitCode: -1, timedOut: true });
  });

  it("peakRssKib of a process that allocates ~50 MiB is at least 50 MiB", async () => {
    const s = await vm.spawn({ argv: ["dd", "if=/dev/zero", "of=/dev/null", "bs=50M", "count=1"] });
    const r = await s.wait();
    assert.equal(r.exitCode, 0);
    assert.ok(r.peakRssKib !== null && r.peakRssKib >= 50 * 1024, `peak ${r.peakRssKib} KiB`);
  });

  it("tty: stty size shows the winsize, tty reports a terminal; without tty, tty fails", async () => {
    const t = await vm.spawn({ argv: ["sh", "-c", "stty size; tty; echo to-stderr >&2"], tty: true, winsize: { cols: 100, rows: 30 } });
    const out = await readUntil(t, "to-stderr");
    assert.match(out, /^30 100\r\n\/dev\/pts\/\d+\r\nto-stderr/, "stdout and stderr merge on the pty");
    assert.equal((await t.wait()).exitCode, 0);
    const plain = await vm.exec({ argv: ["tty"] });
    assert.equal(plain.exitCode, 1);
    assert.match(plain.stdout.toString(), /not a tty/);
    const collect = await vm.exec({ argv: ["tty"], tty: true });
    assert.equal(collect.exitCode, 0);
    assert.match(collect.stdout.toString(), /^\/dev\/pts\/\d+\r\n$/);
  });

  it("tty: resize delivers SIGWINCH and the new size", async () => {
    const t = await vm.spawn({
      argv: ["sh", "-c", "trap 'stty size' WINCH; echo ready; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"],
      tty: true,
      winsize: { cols: 80, rows: 24 },
    });
    await readUntil(t, "ready");
    await t.resize(132, 43);
    assert.match(await readUntil(t, "43 132"), /43 132/);
    await t.signal(9);
    while ((await t.readStdout()).length > 0);
    await t.wait();
  });

  it("Node streams: stdout as a Readable, stdin as a Writable, async iteration", async () => {
    const c = await vm.spawn({ argv: ["sh", "-c", "tr a-z A-Z"] });
    const chunks: Buffer[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _e, cb) {
        chunks.push(chunk);
        cb();
      },
    });
    const reading = pipeline(c.stdout, sink);
    c.stdin.write("hello ");
    c.stdin.end("streams\n");
    await reading;
    assert.equal(Buffer.concat(chunks).toString(), "HELLO STREAMS\n");
    assert.equal((await c.wait()).exitCode, 0);
    const it = await vm.spawn({ argv: ["sh", "-c", "for i in 1 2 3; do echo line$i; done"] });
    let all = "";
    for await (const b of it) all += b.toString();
    assert.equal(all, "line1\nline2\nline3\n");
  });

  it("an AbortSignal kills the process", async () => {
    const ac = new AbortController();
    const s = await vm.spawn({ argv: ["sleep", "1000"], signal: ac.signal });
    setTimeout(() => ac.abort(), 200);
    const r = await s.wait();
    assert.equal(r.exitCode, -1);
  });

  it("exit is reported only after all output is delivered: a channel being read stays flow-controlled and lossless", async () => {
    const s = await vm.spawn({ argv: ["sh", "-c", "head -c 3000000 /dev/zero; echo done >&2"] });
    // Start reading stdout (the channel is then the caller's), then stop for
    // a while: the process blocks on its pipe, and wait() must not resolve
    // before its output is out. (A channel nobody reads would be drained by
    // wait(): see exec-child-settle.test.ts.)
    let n = (await s.readStdout(1000)).length;
    let waited = false;
    void s.wait().then(() => (waited = true));
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(waited, false);
    for (;;) {
      const b = await s.readStdout(1 << 20);
      if (!b.length) break;
      n += b.length;
    }
    assert.equal(n, 3_000_000);
    assert.deepEqual(s.discardedBytes, { stdout: 0, stderr: 0 });
    assert.equal((await s.readStderr()).toString(), "done\n");
    assert.equal((await s.wait()).exitCode, 0);
  });
});
