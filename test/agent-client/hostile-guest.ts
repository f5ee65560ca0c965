/**
 * A hostile guest agent, run as a child process of limits.test.ts so that
 * its own allocations do not count in the host's heap measurements. It
 * listens on a unix socket (as QEMU's chardev does), answers HELLO and then
 * plays one scenario. It reports on stdout, one line per event.
 *
 *   node hostile-guest.js SOCKET SCENARIO [ARGS...]
 */

import { createServer, type Socket } from "node:net";
import { FrameReader, RecordBuilder, encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { MAGIC, MAX_PAYLOAD, MsgType, Tag } from "../../src/protocol/constants.js";

const [path, scenario, ...args] = process.argv.slice(2) as [string, string, ...string[]];

function report(line: string): void {
  process.stdout.write(`${line}\n`);
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
}

/** Writes `buf` honouring the socket's backpressure. */
function write(sock: Socket, buf: Buffer): Promise<void> {
  return new Promise((r) => {
    if (sock.write(buf)) r();
    else sock.once("drain", () => r());
  });
}

const exit0 = () => new RecordBuilder().i32(Tag.EXIT.exit_code, 0).build();

/** `n` one-byte DATA frames on (stream, channel), in one buffer. */
function tinyFrames(stream: number, ch: number, n: number): Buffer {
  const one = encodeFrame(MsgType.DATA, ch, stream, Buffer.from("x"));
  const out = Buffer.allocUnsafe(one.length * n);
  for (let i = 0; i < n; i++) one.copy(out, i * one.length);
  return out;
}

async function run(sock: Socket, next: () => Promise<Frame>, paused: { pause(): void; resume(): void }): Promise<void> {
  switch (scenario) {
    case "tiny": {
      // For each EXEC: `n` 1-byte DATA frames on stdout (exactly what the
      // initial window allows, without any WINDOW), then EOFs and EXIT.
      const n = Number(args[0]);
      for (;;) {
        const f = await next();
        if (f.type !== MsgType.EXEC) continue;
        const all = tinyFrames(f.stream, 1, n);
        for (let off = 0; off < all.length; off += 1 << 20) await write(sock, all.subarray(off, off + (1 << 20)));
        await write(sock, Buffer.concat([encodeFrame(MsgType.EOF, 1, f.stream), encodeFrame(MsgType.EOF, 2, f.stream), encodeFrame(MsgType.EXIT, 0, f.stream, exit0())]));
        report(`sent ${f.stream}`);
      }
    }
    case "noread": {
      // Reads `streams` EXEC requests, then never reads its port again and
      // floods 1-byte DATA frames round robin over every stream and both
      // output channels (within the initial windows: legal traffic).
      const streams = Number(args[0]);
      const frames = Number(args[1]);
      const ids: number[] = [];
      while (ids.length < streams) {
        const f = await next();
        if (f.type === MsgType.EXEC) ids.push(f.stream);
      }
      paused.pause();
      report("paused");
      const round = Buffer.concat(ids.flatMap((id) => [encodeFrame(MsgType.DATA, 1, id, Buffer.from("o")), encodeFrame(MsgType.DATA, 2, id, Buffer.from("e"))]));
      const batch = Buffer.concat(Array.from({ length: Math.max(1, Math.floor((256 << 10) / round.length)) }, () => round));
      const perBatch = (batch.length / round.length) * ids.length * 2;
      for (let sent = 0; sent < frames; sent += perBatch) await write(sock, batch);
      report("flooded");
      return;
    }
    case "grant": {
      // Grants itself a 2 GiB stdin window, does not read for a while,
      // then counts what the host sends without granting more.
      let f: Frame;
      do f = await next();
      while (f.type !== MsgType.EXEC);
      const id = f.stream;
      await write(sock, encodeFrame(MsgType.WINDOW, 0, id, u32(0x80000000)));
      paused.pause();
      report("paused");
      await new Promise((r) => setTimeout(r, Number(args[0] ?? 500)));
      paused.resume();
      let received = 0;
      let quiet: NodeJS.Timeout | undefined;
      const done = new Promise<void>((r) => {
        const arm = () => {
          if (quiet) clearTimeout(quiet);
          quiet = setTimeout(r, 500);
        };
        arm();
        void (async () => {
          for (;;) {
            const g = await next();
            if (g.type === MsgType.DATA && g.flags === 0) {
              received += g.payload.length;
              arm();
            }
          }
        })();
      });
      await done;
      report(`received ${received}`);
      // Two more huge grants: cumulative credit over 4 GiB.
      await write(sock, Buffer.concat([encodeFrame(MsgType.WINDOW, 0, id, u32(0xffffffff)), encodeFrame(MsgType.WINDOW, 0, id, u32(0xffffffff))]));
      report("overflowed");
      return;
    }
    case "streams": {
      // Answers every request at once with OK, then a late DATA frame for
      // the stream it just finished (the host must drop it, at no cost).
      let answered = 0;
      for (;;) {
        const f = await next();
        if (f.stream === 0 || f.type === MsgType.CANCEL || f.type === MsgType.WINDOW) continue;
        sock.write(Buffer.concat([encodeFrame(MsgType.OK, 0, f.stream), encodeFrame(MsgType.DATA, 1, f.stream, Buffer.from("late"))]));
        if (++answered % 1000 === 0) report(`answered ${answered}`);
      }
    }
    default:
      throw new Error(`unknown scenario ${scenario}`);
  }
}

const server = createServer((sock) => {
  server.close();
  const rd = new FrameReader();
  const queue: Frame[] = [];
  let wake: (() => void) | undefined;
  sock.on("data", (b) => {
    // Copy: frames are views into the socket's chunk.
    for (const f of rd.push(b)) queue.push({ ...f, payload: Buffer.from(f.payload) });
    wake?.();
  });
  sock.on("error", () => undefined);
  sock.on("close", () => process.exit(0));
  const next = async (): Promise<Frame> => {
    while (!queue.length) await new Promise<void>((r) => (wake = r));
    return queue.shift()!;
  };
  void (async () => {
    const hello = await next();
    if (hello.type !== MsgType.HELLO) throw new Error("expected HELLO");
    const ack = new RecordBuilder().bytes(Tag.HELLO_ACK.magic, MAGIC).u32(Tag.HELLO_ACK.version, 1).bytes(Tag.HELLO_ACK.agent_version, "hostile").u32(Tag.HELLO_ACK.max_payload, MAX_PAYLOAD);
    sock.write(encodeFrame(MsgType.HELLO_ACK, 0, 0, ack.build()));
    await run(sock, next, { pause: () => sock.pause(), resume: () => sock.resume() });
  })().catch((e: unknown) => {
    report(`error ${String(e)}`);
    sock.destroy();
  });
});
// A paused socket alone does not keep a process alive.
setInterval(() => undefined, 1 << 30);
server.listen(path, () => report("listening"));
