/**
 * The host half of the mount transport (src/mounts/attach.ts and the MOUNT
 * stream of the agent connection) against a fake agent on a unix socket: a
 * unit test may fake the socket; test/mounts/vm-mounts.test.ts uses real VMs.
 */

import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { AgentConnection } from "../../src/agent-client/connection.js";
import { MountError, ProtocolError } from "../../src/errors.js";
import { MountAttachment, validateMounts } from "../../src/mounts/attach.js";
import { Op, cstr, encodeRequest, parseReply, struct } from "../../src/mounts/wire.js";
import { FrameReader, RecordBuilder, RecordReader, encodeFrame, type Frame } from "../../src/protocol/codec.js";
import { listenFakeAgent } from "../agent-client/fake-agent.js";
import { MAGIC, MAX_PAYLOAD, MsgType, Tag, WireError } from "../../src/protocol/constants.js";

let dir: string;
let share: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "sm-attach-"));
  share = join(dir, "share");
  mkdirSync(share);
  writeFileSync(join(share, "hello.txt"), "hi");
});
after(() => rmSync(dir, { recursive: true, force: true }));

type Agent = { sock: Socket; next: () => Promise<Frame> };
let n = 0;
async function fakeAgent(script: (a: Agent) => Promise<void>): Promise<{ conn: AgentConnection; server: Server; fatal: Promise<Error> }> {
  const path = join(dir, `a${n++}.sock`);
  const server = await listenFakeAgent(path, (sock, next) => script({ sock, next }));
  const conn = await AgentConnection.connect(path, { timeoutMs: 5000 });
  const fatal = new Promise<Error>((r) => (conn.onFatal = r));
  return { conn, server, fatal };
}

const mounted = (p: string): Buffer => new RecordBuilder().bytes(Tag.MOUNTED.guest_path, p).build();

describe("MountAttachment over a fake agent", () => {
  it("registers the tag, serves FUSE requests with a fresh server per mount, detaches on CANCEL", async () => {
    const seen: { tag?: string; path?: string; ro?: boolean; replies: Buffer[]; cancel: boolean } = { replies: [], cancel: false };
    const { conn, server } = await fakeAgent(async ({ sock, next }) => {
      const m = await next();
      assert.equal(m.type, MsgType.MOUNT);
      const r = new RecordReader(m.payload);
      seen.tag = r.str(Tag.MOUNT.tag);
      seen.path = r.bytes(Tag.MOUNT.guest_path)?.toString();
      seen.ro = r.bool(Tag.MOUNT.read_only);
      sock.write(encodeFrame(MsgType.MOUNTED, 0, m.stream, mounted("/work")));
      // The guest kernel's first requests on the new connection.
      sock.write(encodeFrame(MsgType.FUSE, 0, m.stream, encodeRequest({ opcode: Op.INIT, unique: 2n, nodeid: 0n }, struct([4, 7], [4, 37], [4, 128 * 1024], [4, 0xffff_ffff], [4, 0]), Buffer.alloc(44))));
      sock.write(encodeFrame(MsgType.FUSE, 0, m.stream, encodeRequest({ opcode: Op.LOOKUP, unique: 4n, nodeid: 1n }, cstr("hello.txt"))));
      for (let i = 0; i < 2; i++) {
        const f = await next();
        assert.equal(f.type, MsgType.FUSE);
        seen.replies.push(f.payload);
      }
      const c = await next();
      seen.cancel = c.type === MsgType.CANCEL && c.stream === m.stream;
      sock.write(encodeFrame(MsgType.OK, 0, m.stream));
    });
    try {
      const [spec] = validateMounts([{ hostPath: share, guestTag: "ws", guestPath: "/work", readOnly: true }]);
      const a = await MountAttachment.attach(conn, spec!, spec!.guestPath);
      assert.equal(a.guestPath, "/work");
      assert.deepEqual([seen.tag, seen.path, seen.ro], ["ws", "/work", true]);
      assert.equal(conn.openStreams, 1);
      while (seen.replies.length < 2) await new Promise((r) => setTimeout(r, 10));
      const byUnique = new Map(seen.replies.map((b) => [parseReply(b).unique, parseReply(b)]));
      assert.equal(byUnique.get(2n)?.error, 0, "INIT answered");
      assert.equal(byUnique.get(4n)?.error, 0, "LOOKUP of hello.txt answered");
      assert.equal(await a.detach(), "/work");
      assert.ok(seen.cancel, "detach sends CANCEL on the mount stream");
      assert.equal(conn.openStreams, 0);
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  it("an agent ERROR on MOUNT is a MountError", async () => {
    const { conn, server } = await fakeAgent(async ({ sock, next }) => {
      const m = await next();
      sock.write(encodeFrame(MsgType.ERROR, 0, m.stream, new RecordBuilder().u32(Tag.ERROR.code, WireError.IO).bytes(Tag.ERROR.message, "mount ws on /x: No such device").build()));
    });
    try {
      const [spec] = validateMounts([{ hostPath: share, guestTag: "ws" }]);
      await assert.rejects(MountAttachment.attach(conn, spec!, "/x"), (e: unknown) => e instanceof MountError && /No such device/.test(e.message));
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });

  for (const [what, payload] of [
    ["a relative guest path", mounted("work")],
    ["a guest path with a NUL", mounted("/w\0x")],
    ["no guest_path field", Buffer.alloc(0)],
  ] as const) {
    it(`MOUNTED with ${what} is a protocol error`, async () => {
      const { conn, server, fatal } = await fakeAgent(async ({ sock, next }) => {
        const m = await next();
        sock.write(encodeFrame(MsgType.MOUNTED, 0, m.stream, payload));
      });
      try {
        const [spec] = validateMounts([{ hostPath: share, guestTag: "ws" }]);
        await assert.rejects(MountAttachment.attach(conn, spec!, undefined));
        assert.ok((await fatal) instanceof ProtocolError);
      } finally {
        conn.destroy(new Error("done"));
        server.close();
      }
    });
  }

  it("a FUSE frame shorter than a request header is a protocol error", async () => {
    const { conn, server, fatal } = await fakeAgent(async ({ sock, next }) => {
      const m = await next();
      sock.write(encodeFrame(MsgType.MOUNTED, 0, m.stream, mounted("/w")));
      sock.write(encodeFrame(MsgType.FUSE, 0, m.stream, Buffer.alloc(20)));
    });
    try {
      const [spec] = validateMounts([{ hostPath: share, guestTag: "ws" }]);
      await MountAttachment.attach(conn, spec!, "/w");
      const e = await fatal;
      assert.ok(e instanceof ProtocolError && /shorter than its header/.test(e.message), String(e));
    } finally {
      conn.destroy(new Error("done"));
      server.close();
    }
  });
});
