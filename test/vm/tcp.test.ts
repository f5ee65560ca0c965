/**
 * vm.exposeTcp / TcpForwarder on a real VM: HTTP servers in the guest
 * (busybox httpd, and test/fixtures/guest/burst-httpd.c for a burst of 200
 * parallel requests) behind forwarders, a 32 MiB echo round trip with
 * half-close, stop() during a slow download, a port with no listener, and
 * forwarders ending with their VM.
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { get, type IncomingMessage } from "node:http";
import { connect, type Socket } from "node:net";
import { after, before, describe, it } from "node:test";
import { RING_MAX_REGION_BYTES } from "../../src/agent-client/ring.js";
import type { TcpForwarder } from "../../src/vm/tcp-forwarder.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault, compileGuestProgram, waitFor } from "../helpers.js";

const BIG = 8 << 20;

function hostPort(f: TcpForwarder): number {
  return Number(f.localAddr.split(":")[1]);
}

function httpGet(port: number, path: string): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = get({ host: "127.0.0.1", port, path, agent: false, timeout: 120_000 }, (res: IncomingMessage) => {
      const parts: Buffer[] = [];
      res.on("data", (b: Buffer) => parts.push(b));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(parts) }));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error("request timed out")));
    req.on("error", reject);
  });
}

/** Opens a connection; resolves with how it ended: "refused", "reset", or the bytes received before a clean EOF. */
function exchange(port: number, send: Buffer | undefined): Promise<{ how: "eof" | "reset" | "refused"; data: Buffer }> {
  return new Promise((resolve) => {
    const parts: Buffer[] = [];
    const s: Socket = connect({ host: "127.0.0.1", port, allowHalfOpen: true });
    s.on("connect", () => {
      if (send) s.end(send);
    });
    s.on("data", (b: Buffer) => parts.push(b));
    s.on("end", () => {
      s.end();
      resolve({ how: "eof", data: Buffer.concat(parts) });
    });
    s.on("error", (e: NodeJS.ErrnoException) => {
      resolve({ how: e.code === "ECONNREFUSED" ? "refused" : "reset", data: Buffer.concat(parts) });
    });
    s.setTimeout(120_000, () => s.destroy(new Error("no answer")));
  });
}

async function untilServing(port: number, path: string): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      const r = await httpGet(port, path);
      if (r.status === 200) return;
    } catch {
      /* not listening yet: the forwarder resets the connection */
    }
    if (Date.now() > deadline) throw new Error(`nothing served ${path} through port ${port} within 60 s`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe("vm.exposeTcp on a real VM", { timeout: VM_TEST_TIMEOUT }, () => {
  let vm: Vm;
  let web: TcpForwarder;
  let big: Buffer;
  before(async () => {
    vm = await bootDefault();
    big = randomBytes(BIG);
    await vm.exec({ argv: ["mkdir", "-p", "/tmp/www"] });
    await vm.exec({ argv: ["sh", "-c", "echo hello from the guest > /tmp/www/index.html"] });
    // The 8 MiB file goes in 4 MiB pieces (the file API's cap).
    await vm.writeFile("/tmp/part0", big.subarray(0, BIG / 2));
    await vm.writeFile("/tmp/part1", big.subarray(BIG / 2));
    assert.equal((await vm.exec({ argv: ["sh", "-c", "cat /tmp/part0 /tmp/part1 > /tmp/www/big.bin && rm /tmp/part0 /tmp/part1"] })).exitCode, 0);
    await vm.spawn({ argv: ["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/tmp/www"] });
    // A persistent echo server: each connection gets its own cat.
    await vm.spawn({ argv: ["nc", "-ll", "-p", "9000", "-e", "cat"] });
    web = await vm.exposeTcp(0, 8080);
    await untilServing(hostPort(web), "/index.html");
  });
  after(async () => {
    await vm?.destroy();
  });

  // busybox httpd listens with a backlog of 9: a burst of 200 connects meets
  // the guest kernel's overload paths (SYN drops, syncookies whose ACKs are
  // dropped while the accept queue is full, retransmits backing off for
  // minutes, resets), which vary from run to run. A guest server whose
  // backlog holds the whole burst puts all 200 through the forwarder at once.
  it("serves 200 parallel HTTP requests through one forwarder", async () => {
    await vm.writeFile("/tmp/burst-httpd", await compileGuestProgram("burst-httpd"));
    assert.equal((await vm.exec({ argv: ["chmod", "755", "/tmp/burst-httpd"] })).exitCode, 0);
    await vm.spawn({ argv: ["/tmp/burst-httpd", "8200", "hello from the guest\n"] });
    await vm.conn.waitListen(8200, 60_000);
    const burst = await vm.exposeTcp(0, 8200);
    try {
      const port = hostPort(burst);
      let most = 0;
      const sample = setInterval(() => (most = Math.max(most, burst.activeConnections)), 1);
      const rs = await Promise.all(Array.from({ length: 200 }, () => httpGet(port, "/index.html"))).finally(() => clearInterval(sample));
      for (const r of rs) {
        assert.equal(r.status, 200);
        assert.equal(r.body.toString(), "hello from the guest\n");
      }
      // They were open through the forwarder at the same time.
      assert.ok(most >= 100, `at most ${most} connections open at once`);
      // Every connection was closed again.
      await waitFor(() => burst.activeConnections === 0, 10_000, "every connection closed");
    } finally {
      await burst.stop();
    }
  });

  it("a 32 MiB body round-trips intact through a guest echo server (half-close ends it); the upload, coalesced, used the stream ring", async () => {
    const fwd = await vm.exposeTcp(0, 9000);
    try {
      const body = randomBytes(32 << 20);
      const ringBefore = vm.conn._ringStats!.bytes;
      let r = await exchange(hostPort(fwd), body);
      // nc may not listen yet on the first try: that connection is reset.
      for (let i = 0; r.how !== "eof" && i < 50; i++) {
        await new Promise((res) => setTimeout(res, 200));
        r = await exchange(hostPort(fwd), body);
      }
      assert.equal(r.how, "eof");
      assert.equal(r.data.length, body.length);
      assert.equal(createHash("sha256").update(r.data).digest("hex"), createHash("sha256").update(body).digest("hex"));
      // The socket's 64 KiB chunks, coalesced while a write is in flight,
      // went as ring regions of 256 KiB to 1 MiB (without coalescing: none).
      const ringBytes = vm.conn._ringStats!.bytes - ringBefore;
      assert.ok(ringBytes >= 8 << 20, `bytes through the ring during the upload: ${ringBytes}`);
    } finally {
      await fwd.stop();
    }
  });

  it("the agent grants a connection a window of two ring regions (one in flight while the next fills), to at most 8 connections at once", async () => {
    const open = async (n: number) => {
      const conns = Array.from({ length: n }, () => vm.conn.tcpConnect(8080));
      await Promise.all(conns.map((c) => c.connected));
      return conns;
    };
    const windows = (conns: { sender: { credit: number } }[]) => conns.map((c) => c.sender.credit / RING_MAX_REGION_BYTES).sort();
    const ten = await open(10);
    try {
      // The extra credit comes right after STARTED.
      await waitFor(() => windows(ten).filter((w) => w === 2).length === 8, 30_000, "8 connections with the extra grant");
      assert.deepEqual(windows(ten), [1, 1, 2, 2, 2, 2, 2, 2, 2, 2]);
    } finally {
      for (const c of ten) c.reset();
    }
    // Closed connections give their extra back.
    await waitFor(
      async () => {
        const [one] = await open(1);
        try {
          await new Promise((r) => setTimeout(r, 200));
          return one!.sender.credit === 2 * RING_MAX_REGION_BYTES;
        } finally {
          one!.reset();
        }
      },
      30_000,
      "a new connection's extra grant after the others closed",
    );
  });

  it("stop() during a slow download lets it finish and refuses new connections; stop() is idempotent", async () => {
    const fwd = await vm.exposeTcp(0, 8080);
    const port = hostPort(fwd);
    const hash = createHash("sha256");
    let got = 0;
    let stopped = false;
    const done = new Promise<void>((resolve, reject) => {
      get({ host: "127.0.0.1", port, path: "/big.bin", agent: false }, (res) => {
        assert.equal(res.statusCode, 200);
        res.on("data", (b: Buffer) => {
          hash.update(b);
          got += b.length;
          // A slow reader: a short pause after every piece.
          res.pause();
          setTimeout(() => res.resume(), 2);
          if (!stopped && got > 256 * 1024) {
            stopped = true;
            void fwd.stop();
          }
        });
        res.on("end", resolve);
        res.on("error", reject);
      }).on("error", reject);
    });
    await done;
    assert.ok(stopped, "the forwarder was stopped mid-download");
    assert.equal(got, BIG);
    assert.equal(hash.digest("hex"), createHash("sha256").update(big).digest("hex"));
    assert.equal((await exchange(port, undefined)).how, "refused");
    await fwd.stop();
    // The VM's other forwarder is untouched.
    assert.equal((await httpGet(hostPort(web), "/index.html")).status, 200);
  });

  it("uploads to a guest that does not read hold a bounded amount of host memory, and let go of it when the guest side closes", async () => {
    // Each connection's `sleep` never reads its socket: the guest's buffers
    // and the window fill, and the rest waits on the host.
    await vm.spawn({ argv: ["nc", "-ll", "-p", "9100", "-e", "sleep", "600"] });
    // Connections made before nc listens are reset.
    await vm.conn.waitListen(9100, 60_000);
    const fwd = await vm.exposeTcp(0, 9100);
    const socks: Socket[] = [];
    try {
      const chunk = randomBytes(256 << 10);
      for (let i = 0; i < 24; i++) {
        const s = connect({ host: "127.0.0.1", port: hostPort(fwd) });
        s.on("error", () => undefined);
        s.on("connect", () => {
          // 8 MiB each, far more than the guest takes.
          for (let k = 0; k < 32; k++) s.write(chunk);
        });
        socks.push(s);
      }
      // nc takes one connection at a time from a short backlog, which it
      // closes and opens again after each: the others wait for SYN
      // retransmits, or are reset. Until every connection still open has its
      // guest reader (one `sleep` each); one accepted after the kill below
      // would start a reader that never goes away.
      await waitFor(
        async () => {
          const n = Number((await vm.exec({ argv: ["sh", "-c", "pidof sleep | wc -w"] })).stdout.toString());
          return n > 0 && n === fwd.activeConnections;
        },
        150_000,
        "a guest reader for every open connection",
      );
      // Until the forwarder holds what it will hold (it grows, then stays).
      let most = 0;
      let last = -1;
      const deadline = Date.now() + 60_000;
      while (Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 1000));
        most = Math.max(most, fwd._uploadHeld);
        if (fwd._uploadHeld === last && last > 0) break;
        last = fwd._uploadHeld;
      }
      assert.ok(most > 0, "the uploads reached the forwarder");
      // The budget (8 MiB) plus, per connection, one socket chunk queued and
      // one write in flight (at most 64 KiB each) over it.
      assert.ok(most <= (8 << 20) + 24 * 2 * (64 << 10), `held ${most} bytes`);
      // The guest's readers go away: every connection ends, and what the
      // host held for them is let go.
      assert.equal((await vm.exec({ argv: ["sh", "-c", "kill $(pidof sleep)"] })).exitCode, 0);
      await waitFor(() => fwd._uploadHeld === 0 && fwd.activeConnections === 0, 60_000, "the ended connections hold nothing");
    } finally {
      for (const s of socks) s.destroy();
      await fwd.stop();
    }
  });

  it("a guest port with no listener resets that one connection, nothing else", async () => {
    const none = await vm.exposeTcp(0, 9999);
    try {
      const slow = httpGet(hostPort(web), "/big.bin");
      const r = await exchange(hostPort(none), Buffer.from("anyone there?\n"));
      assert.equal(r.how, "reset");
      assert.equal(r.data.length, 0);
      const ok = await slow;
      assert.equal(ok.body.length, BIG);
      // The forwarder keeps listening: the next connection is reset as well, not refused.
      assert.equal((await exchange(hostPort(none), undefined)).how, "reset");
      assert.equal((await vm.exec({ argv: ["echo", "still here"] })).stdout.toString(), "still here\n");
    } finally {
      await none.stop();
    }
  });

  it("several forwarders per VM; all stop when the VM goes away", async () => {
    const other = await bootDefault();
    let closed = false;
    try {
      await other.exec({ argv: ["sh", "-c", "mkdir -p /tmp/w && echo other > /tmp/w/index.html"] });
      await other.spawn({ argv: ["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/tmp/w"] });
      const a = await other.exposeTcp(0, 8080);
      const b = await other.exposeTcp(0, 8080);
      await untilServing(hostPort(a), "/index.html");
      assert.equal((await httpGet(hostPort(b), "/index.html")).body.toString(), "other\n");
      await other.release();
      closed = true;
      assert.equal((await exchange(hostPort(a), undefined)).how, "refused");
      assert.equal((await exchange(hostPort(b), undefined)).how, "refused");
      await assert.rejects(other.exposeTcp(0, 8080), { code: "ERR_SM_CLOSED" });
    } finally {
      if (!closed) await other.destroy();
    }
  });
});
