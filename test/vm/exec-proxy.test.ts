/**
 * vm.execPath / vm.vsockPath: a bring-your-own client speaking
 * docs/protocol.md over the socket gets its own session and runs commands
 * while the Vm object runs others. Real VM; the client is written here from
 * the spec with the shared codec.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { connect, type Socket } from "node:net";
import { after, before, describe, it } from "node:test";
import { ClosedError } from "../../src/errors.js";
import { FrameReader, RecordBuilder, RecordReader, encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { MAGIC, MsgType, PROTOCOL_VERSION, Tag } from "../../src/protocol/constants.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault } from "../helpers.js";

/** A minimal protocol client: frames in, frames out, per-stream queues. */
class ByoClient {
  private reader = new FrameReader();
  private queue: Frame[] = [];
  private waiters: (() => void)[] = [];
  closed = false;

  private constructor(private sock: Socket) {
    sock.on("data", (c: Buffer) => {
      for (const f of this.reader.push(c)) this.queue.push({ ...f, payload: Buffer.from(f.payload) });
      this.wake();
    });
    sock.on("close", () => {
      this.closed = true;
      this.wake();
    });
    sock.on("error", () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static async connect(path: string): Promise<ByoClient> {
    const sock = connect(path);
    await new Promise<void>((resolve, reject) => {
      sock.once("connect", resolve);
      sock.once("error", reject);
    });
    return new ByoClient(sock);
  }

  send(type: number, flags: number, stream: number, payload?: Uint8Array): void {
    this.sock.write(encodeFrame(type, flags, stream, payload));
  }

  /** The next frame matching `pred` (others stay queued). */
  async next(pred: (f: Frame) => boolean, timeoutMs = 60_000): Promise<Frame> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.queue.findIndex(pred);
      if (i >= 0) return this.queue.splice(i, 1)[0]!;
      if (this.closed) throw new Error("the proxy closed the session");
      if (Date.now() > deadline) throw new Error("no such frame in time");
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 200);
      });
    }
  }

  async hello(): Promise<RecordReader> {
    this.send(
      MsgType.HELLO,
      0,
      0,
      new RecordBuilder().bytes(Tag.HELLO.magic, MAGIC).u32(Tag.HELLO.min_version, PROTOCOL_VERSION).u32(Tag.HELLO.max_version, PROTOCOL_VERSION).bytes(Tag.HELLO.host_version, "byo-test").build(),
    );
    const ack = await this.next((f) => f.type === MsgType.HELLO_ACK && f.stream === 0);
    return new RecordReader(ack.payload);
  }

  /** Runs argv on `stream` to its EXIT; returns stdout and the exit code. */
  async run(stream: number, argv: string[]): Promise<{ stdout: string; exitCode: number }> {
    const r = new RecordBuilder();
    for (const a of argv) r.bytes(Tag.EXEC.argv, a);
    this.send(MsgType.EXEC, 0, stream, r.build());
    let stdout = "";
    for (;;) {
      const f = await this.next((x) => x.stream === stream);
      if (f.type === MsgType.DATA && f.flags === 1) {
        stdout += f.payload.toString();
        const w = Buffer.alloc(4);
        w.writeUInt32LE(f.payload.length);
        this.send(MsgType.WINDOW, 1, stream, w);
      } else if (f.type === MsgType.EXIT) {
        return { stdout, exitCode: new RecordReader(f.payload).i32(Tag.EXIT.exit_code)! };
      } else if (f.type === MsgType.ERROR) {
        throw new Error(`ERROR on stream ${stream}: ${new RecordReader(f.payload).str(Tag.ERROR.message, 4096)}`);
      }
    }
  }

  close(): void {
    this.sock.destroy();
  }
}

describe("execPath: bring-your-own client sessions", { timeout: VM_TEST_TIMEOUT }, () => {
  let vm: Vm;

  before(async () => {
    vm = await bootDefault();
  });

  after(async () => {
    await vm?.destroy();
  });

  it("a client on execPath runs a command while the Vm object runs another", async () => {
    assert.equal(vm.vsockPath, vm.execPath, "one socket carries everything here");
    const c = await ByoClient.connect(vm.execPath);
    try {
      const ack = await c.hello();
      assert.ok(ack.bytes(Tag.HELLO_ACK.magic)?.equals(MAGIC));
      assert.equal(ack.u32(Tag.HELLO_ACK.version), PROTOCOL_VERSION);
      assert.equal(ack.str(Tag.HELLO_ACK.agent_version, 64), vm.agentVersion);
      // The client's command outlives the Vm object's: both run at once.
      const byo = c.run(1, ["sh", "-c", "sleep 2; echo from the byo client; exit 5"]);
      const mine = await vm.exec({ argv: ["sh", "-c", "echo from the vm object"] });
      assert.equal(mine.stdout.toString(), "from the vm object\n");
      assert.equal(c.closed, false);
      assert.deepEqual(await byo, { stdout: "from the byo client\n", exitCode: 5 });
      // Stream ids are the client's own, independent of the Vm's.
      assert.deepEqual(await c.run(2, ["echo", "two"]), { stdout: "two\n", exitCode: 0 });
      // PING is a real round trip with the client's payload.
      const payload = randomBytes(8);
      c.send(MsgType.PING, 0, 0, payload);
      const pong = await c.next((f) => f.type === MsgType.PONG);
      assert.ok(pong.payload.equals(payload));
    } finally {
      c.close();
    }
    assert.equal((await vm.exec({ argv: ["echo", "still fine"] })).stdout.toString(), "still fine\n");
  });

  it("two clients at once; requests that reconfigure the VM are refused on the client's stream", async () => {
    const [a, b] = await Promise.all([ByoClient.connect(vm.execPath), ByoClient.connect(vm.execPath)]);
    try {
      await Promise.all([a.hello(), b.hello()]);
      const [ra, rb] = await Promise.all([a.run(1, ["echo", "a"]), b.run(1, ["echo", "b"])]);
      assert.deepEqual([ra.stdout, rb.stdout], ["a\n", "b\n"]);
      a.send(MsgType.CONFIGURE, 0, 7, new RecordBuilder().bytes(Tag.CONFIGURE.hostname, "evil").build());
      const refused = await a.next((f) => f.stream === 7);
      assert.equal(refused.type, MsgType.ERROR);
      assert.match(new RecordReader(refused.payload).str(Tag.ERROR.message, 4096) ?? "", /not allowed through execPath/);
      assert.notEqual((await vm.exec({ argv: ["hostname"] })).stdout.toString(), "evil\n");
      // The log stream is the Vm object's (vm.logs()).
      a.send(MsgType.LOGS, 0, 8);
      const noLogs = await a.next((f) => f.stream === 8);
      assert.equal(noLogs.type, MsgType.ERROR);
      assert.match(new RecordReader(noLogs.payload).str(Tag.ERROR.message, 4096) ?? "", /LOGS \(use vm\.logs\(\)\)/);
    } finally {
      a.close();
      b.close();
    }
  });

  it("a client that breaks the protocol loses its session only; a client's process ends when it disconnects", async () => {
    const bad = await ByoClient.connect(vm.execPath);
    await bad.hello();
    bad.send(MsgType.DATA, 0, 42, Buffer.from("no such stream"));
    await bad.next(() => false, 30_000).catch(() => undefined);
    assert.equal(bad.closed, true, "the proxy ended the bad session");

    const future = await ByoClient.connect(vm.execPath);
    future.send(MsgType.HELLO, 0, 0, new RecordBuilder().bytes(Tag.HELLO.magic, MAGIC).u32(Tag.HELLO.min_version, 99).u32(Tag.HELLO.max_version, 100).build());
    const no = await future.next((f) => f.stream === 0);
    assert.equal(no.type, MsgType.ERROR, "an unsupported version range is answered with ERROR");
    await future.next(() => false, 30_000).catch(() => undefined);
    assert.equal(future.closed, true);

    const gone = await ByoClient.connect(vm.execPath);
    await gone.hello();
    const r = new RecordBuilder().bytes(Tag.EXEC.argv, "sleep").bytes(Tag.EXEC.argv, "4343");
    gone.send(MsgType.EXEC, 0, 1, r.build());
    await new Promise((res) => setTimeout(res, 1000));
    assert.match((await vm.exec({ argv: ["ps"] })).stdout.toString(), /sleep 4343/);
    gone.close();
    const deadline = Date.now() + 30_000;
    while (/sleep 4343/.test((await vm.exec({ argv: ["ps"] })).stdout.toString())) {
      assert.ok(Date.now() < deadline, "the disconnected client's process was not cancelled");
      await new Promise((res) => setTimeout(res, 200));
    }
    assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
  });

  it("sessions end when the VM goes; execPath of a closed VM throws", async () => {
    const own = await bootDefault();
    let c: ByoClient | undefined;
    try {
      c = await ByoClient.connect(own.execPath);
      await c.hello();
      const running = c.run(1, ["sleep", "1000"]).then(
        () => "exited",
        (e: unknown) => String(e),
      );
      await new Promise((res) => setTimeout(res, 500));
      await own.destroy();
      assert.match(await running, /closed the session/);
      assert.throws(() => own.execPath, ClosedError);
    } finally {
      c?.close();
      await own.destroy();
    }
  });
});
