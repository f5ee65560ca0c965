/** A fake guest agent on a real unix socket: answers HELLO, then runs a script over the frames it reads. */

import assert from "node:assert/strict";
import { createServer, type Server, type Socket } from "node:net";
import { FrameReader, RecordBuilder, encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { MAGIC, MAX_PAYLOAD, MsgType, Tag } from "../../src/protocol/constants.js";

export async function listenFakeAgent(path: string, script: (sock: Socket, next: () => Promise<Frame>) => Promise<void>): Promise<Server> {
  const server = createServer((sock) => {
    const rd = new FrameReader();
    const queue: Frame[] = [];
    let wake: (() => void) | undefined;
    sock.on("data", (b) => {
      queue.push(...rd.push(b));
      wake?.();
    });
    sock.on("error", () => undefined);
    const next = async (): Promise<Frame> => {
      while (!queue.length) await new Promise<void>((r) => (wake = r));
      return queue.shift()!;
    };
    void (async () => {
      assert.equal((await next()).type, MsgType.HELLO);
      const ack = new RecordBuilder().bytes(Tag.HELLO_ACK.magic, MAGIC).u32(Tag.HELLO_ACK.version, 1).bytes(Tag.HELLO_ACK.agent_version, "fake").u32(Tag.HELLO_ACK.max_payload, MAX_PAYLOAD);
      sock.write(encodeFrame(MsgType.HELLO_ACK, 0, 0, ack.build()));
      await script(sock, next);
    })().catch(() => sock.destroy());
  });
  await new Promise<void>((r) => server.listen(path, r));
  return server;
}
