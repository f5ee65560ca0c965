/**
 * Vm.exec and files on a real VM (real QEMU, real kernel, the default
 * busybox image, under TCG here). One VM serves the whole file.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { after, before, describe, it } from "node:test";
import { AbortError, FileTooLargeError, OutputLimitError } from "../../src/errors.js";
import type { Vm } from "../../src/vm/vm.js";
import { VM_TEST_TIMEOUT, bootDefault } from "../helpers.js";

describe("Vm.exec on a real VM", { timeout: VM_TEST_TIMEOUT }, () => {
  let vm: Vm;
  before(async () => {
    vm = await bootDefault();
  });
  after(async () => {
    await vm?.destroy();
  });

  it("echo returns hello and exit 0", async () => {
    const r = await vm.exec({ argv: ["echo", "hello"] });
    assert.equal(r.stdout.toString(), "hello\n");
    assert.equal(r.stderr.length, 0);
    assert.equal(r.exitCode, 0);
    assert.equal(r.timedOut, false);
  });

  it("an exit status comes back", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", "exit 3"] });
    assert.equal(r.exitCode, 3);
  });

  it("stderr is kept apart from stdout", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", "echo out; echo err >&2; echo out2"] });
    assert.equal(r.stdout.toString(), "out\nout2\n");
    assert.equal(r.stderr.toString(), "err\n");
  });

  it("env is merged over the image env and cwd is honoured", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", 'echo "$FOO|$PATH|$(pwd)"'], env: { FOO: "bar baz" }, cwd: "/tmp" });
    assert.equal(r.stdout.toString(), "bar baz|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/tmp\n");
    const over = await vm.exec({ argv: ["sh", "-c", "echo $PATH"], env: { PATH: "/bin" } });
    assert.equal(over.stdout.toString(), "/bin\n");
  });

  it("argv with spaces, quotes and non-UTF-8 bytes passes through unchanged", async () => {
    const raw = Buffer.from([0xff, 0xfe, 0x80, 0x41, 0xc3]);
    const args = ["a b", `"q'uote"`, "$HOME", "*", "", "tab\there"];
    const r = await vm.exec({ argv: ["printf", "%s|", ...args, raw] });
    assert.deepEqual(r.stdout, Buffer.concat([Buffer.from(args.map((a) => `${a}|`).join("")), raw, Buffer.from("|")]));
  });

  it("a missing program exits 127 with a message, like a shell", async () => {
    const r = await vm.exec({ argv: ["no-such-program-here"] });
    assert.equal(r.exitCode, 127);
    assert.match(r.stderr.toString(), /no-such-program-here: command not found/);
  });

  it("a missing cwd is a clear error", async () => {
    await assert.rejects(vm.exec({ argv: ["true"], cwd: "/does/not/exist" }), /working directory \/does\/not\/exist does not exist/);
  });

  it("timeoutMs kills sleep and its children; exitCode -1 soon after the deadline", async () => {
    const t0 = Date.now();
    const r = await vm.exec({ argv: ["sh", "-c", "sleep 1000 & sleep 1000; wait"], timeoutMs: 1500 });
    const took = Date.now() - t0;
    assert.equal(r.exitCode, -1);
    assert.equal(r.timedOut, true);
    assert.ok(took >= 1400, `returned after ${took} ms, before the deadline`);
    // Nothing of the tree is left: no sleep process in the guest.
    const ps = await vm.exec({ argv: ["sh", "-c", "ps -o comm | grep -c '^sleep' || true"] });
    assert.equal(ps.stdout.toString().trim(), "0");
  });

  it("isolateTree: a timeout also kills a daemon that left the session", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", "setsid sleep 999 & sleep 999"], timeoutMs: 1500, isolateTree: true });
    assert.equal(r.timedOut, true);
    const ps = await vm.exec({ argv: ["sh", "-c", "ps -o comm | grep -c '^sleep' || true"] });
    assert.equal(ps.stdout.toString().trim(), "0");
  });

  it("peakRssKib reports a ~50 MiB allocation, with and without a cgroup", async () => {
    for (const isolateTree of [false, true]) {
      const r = await vm.exec({ argv: ["dd", "if=/dev/zero", "of=/dev/null", "bs=50M", "count=1"], isolateTree });
      assert.equal(r.exitCode, 0, r.stderr.toString());
      assert.ok(r.peakRssKib !== null && r.peakRssKib >= 50 * 1024, `isolateTree=${isolateTree}: peak ${r.peakRssKib} KiB`);
    }
  });

  it("stageFiles and stageFilesMode: a staged 0o755 script runs", async () => {
    const r = await vm.exec({
      argv: ["/opt/run.sh"],
      stageFiles: { "/tmp/data.txt": Buffer.from("staged data\n") },
      stageFilesMode: [{ path: "/opt/run.sh", data: Buffer.from("#!/bin/sh\ncat /tmp/data.txt\nstat -c %a /opt/run.sh /tmp/data.txt\n"), mode: 0o755 }],
    });
    assert.equal(r.exitCode, 0, r.stderr.toString());
    assert.equal(r.stdout.toString(), "staged data\n755\n644\n");
  });

  it("chain runs the second command only when the first exits 0", async () => {
    const ok = await vm.exec({ argv: ["echo", "first"], chain: ["echo", "second"] });
    assert.equal(ok.stdout.toString(), "first\nsecond\n");
    assert.equal(ok.exitCode, 0);
    const bad = await vm.exec({ argv: ["sh", "-c", "echo first; exit 4"], chain: ["echo", "second"] });
    assert.equal(bad.stdout.toString(), "first\n");
    assert.equal(bad.exitCode, 4);
  });

  it("a process starts as a session leader with an empty signal mask, nothing ignored, SCHED_OTHER and only fds 0-2, however it is started", async () => {
    // The agent itself runs as SCHED_BATCH (its wakeups do not preempt).
    const agent = await vm.exec({ argv: ["cut", "-d", " ", "-f", "41", "/proc/1/stat"] });
    assert.equal(agent.stdout.toString(), "3\n");
    const ways = [{}, { cwd: "/tmp" }, { user: "65534" }, { isolateTree: true }, { user: "65534", isolateTree: true }, { tty: true }];
    const lines = async (argv: string[], way: object) => {
      const r = await vm.exec({ argv, ...way });
      assert.equal(r.exitCode, 0, `${argv.join(" ")} ${JSON.stringify(way)}: ${r.stderr.toString()}`);
      return r.stdout.toString().replace(/\r/g, "").trim().split("\n");
    };
    for (const way of ways) {
      const what = JSON.stringify(way);
      // Each program is the process the agent started (no shell in between).
      const [pid, sid, policy] = (await lines(["cut", "-d", " ", "-f", "1,6,41", "/proc/self/stat"], way))[0]!.split(" ");
      assert.equal(sid, pid, `session leader ${what}`);
      assert.equal(policy, "0", `SCHED_OTHER ${what}`);
      assert.deepEqual(await lines(["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"], way), ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"], what);
      // ls's own fds: 0-2 and the directory it reads.
      assert.deepEqual(await lines(["ls", "-1", "/proc/self/fd"], way), ["0", "1", "2", "3"], what);
    }
  });

  it("outputs around the agent's first-read size arrive whole and in order", async () => {
    for (const n of [16383, 16384, 16385, 40000]) {
      const r = await vm.exec({ argv: ["sh", "-c", `head -c ${n} /dev/zero | tr '\\0' x; echo end`] });
      assert.equal(r.stdout.toString(), "x".repeat(n) + "end\n", `${n} bytes`);
    }
    // Exactly the first read's size, then more after a pause.
    const r = await vm.exec({ argv: ["sh", "-c", "head -c 16384 /dev/zero | tr '\\0' y; sleep 0.3; echo later; echo err >&2"] });
    assert.equal(r.stdout.toString(), "y".repeat(16384) + "later\n");
    assert.equal(r.stderr.toString(), "err\n");
  });

  it("16 MiB of stdout arrives intact", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", "head -c 16777216 /dev/urandom > /tmp/big && sha256sum /tmp/big >&2 && cat /tmp/big && rm /tmp/big"], timeoutMs: 300_000 });
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout.length, 16 * 1024 * 1024);
    const guestSum = r.stderr.toString().split(/\s+/)[0];
    assert.equal(createHash("sha256").update(r.stdout).digest("hex"), guestSum);
  });

  it("20 concurrent execs each get their own output", async () => {
    const rs = await Promise.all(
      Array.from({ length: 20 }, (_, i) => vm.exec({ argv: ["sh", "-c", `for j in 1 2 3; do echo ${i}-$j; done; echo e${i} >&2; exit ${i % 7}`] })),
    );
    rs.forEach((r, i) => {
      assert.equal(r.stdout.toString(), `${i}-1\n${i}-2\n${i}-3\n`);
      assert.equal(r.stderr.toString(), `e${i}\n`);
      assert.equal(r.exitCode, i % 7);
    });
  });

  it("maxOutputBytes stops a runaway writer with a typed error holding the output", async () => {
    await assert.rejects(vm.exec({ argv: ["yes"], maxOutputBytes: 1 << 20 }), (e: unknown) => {
      assert.ok(e instanceof OutputLimitError);
      assert.ok(e.stdout.length <= 1 << 20 && e.stdout.length > 0);
      return true;
    });
    // The VM is still fine.
    assert.equal((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString(), "ok\n");
  });

  it("an AbortSignal kills the exec", async () => {
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 300);
    await assert.rejects(vm.exec({ argv: ["sleep", "100"], signal: ac.signal }), AbortError);
  });

  it("writeFile/readFile round-trip binary data", async () => {
    const data = Buffer.alloc(3 * 1024 * 1024 + 17);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7919) & 0xff;
    await vm.writeFile("/tmp/rt/blob.bin", data);
    const back = await vm.readFile("/tmp/rt/blob.bin");
    assert.ok(back.equals(data));
    const sum = await vm.exec({ argv: ["sha256sum", "/tmp/rt/blob.bin"] });
    assert.equal(sum.stdout.toString().split(" ")[0], createHash("sha256").update(data).digest("hex"));
  });

  it("4 MiB is accepted and 4 MiB + 1 byte is refused, both directions", async () => {
    await vm.writeFile("/tmp/four", Buffer.alloc(4 * 1024 * 1024, 1));
    assert.equal((await vm.readFile("/tmp/four")).length, 4 * 1024 * 1024);
    await assert.rejects(vm.writeFile("/tmp/toobig", Buffer.alloc(4 * 1024 * 1024 + 1)), FileTooLargeError);
    await assert.rejects(vm.exec({ argv: ["true"], stageFiles: { "/tmp/x": Buffer.alloc(4 * 1024 * 1024 + 1) } }), FileTooLargeError);
    await vm.exec({ argv: ["sh", "-c", "head -c 4194305 /dev/zero > /tmp/big5"] });
    await assert.rejects(vm.readFile("/tmp/big5"), (e: unknown) => e instanceof FileTooLargeError && e.size === 4194305);
    // Nothing half-written: the refused upload left no file behind.
    const ls = await vm.exec({ argv: ["ls", "-a", "/tmp"] });
    assert.doesNotMatch(ls.stdout.toString(), /toobig/);
  });

  it("bad input is refused with a TypeError naming the option", async () => {
    await assert.rejects(vm.exec({ argv: [] }), /Invalid option argv/);
    await assert.rejects(vm.exec({ argv: ["echo"], timeoutMs: -1 }), /Invalid option timeoutMs/);
    await assert.rejects(vm.exec({ argv: ["echo"], cwd: "relative" }), /Invalid option cwd/);
    await assert.rejects(vm.exec({ argv: ["echo"], env: { "A=B": "x" } }), /Invalid option env key/);
    await assert.rejects(vm.exec({ argv: ["a\0b"] }), /Invalid option argv\[0\]/);
    await assert.rejects(vm.writeFile("relative/path", Buffer.from("x")), TypeError);
  });

  it("writes land in the overlay: the root filesystem image on the host is unchanged", async () => {
    const args = vm.qemu.child.spawnargs;
    const drive = args.find((a) => a.startsWith("id=root,file="))!;
    const image = /file=([^,]+)/.exec(drive)![1]!;
    const before = createHash("sha256").update(readFileSync(image)).digest("hex");
    const r = await vm.exec({ argv: ["sh", "-c", "echo changed > /etc/os-release && rm /bin/true && mkdir /newdir && cat /etc/os-release && grep ' / ' /proc/mounts"] });
    assert.equal(r.exitCode, 0, r.stderr.toString());
    assert.match(r.stdout.toString(), /changed\noverlay \/ overlay/);
    const after = createHash("sha256").update(readFileSync(image)).digest("hex");
    assert.equal(after, before);
  });
});
