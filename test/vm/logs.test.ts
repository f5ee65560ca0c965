/**
 * vm.logs(): output of guest processes no exec or spawn reads any more, on
 * real VMs (the default busybox image). A server a warmup spawned and left
 * running is baked with the image; in a clone its ExecChild is gone and its
 * output comes out of the clone's log stream, labelled with its pid. A flood
 * of detached output stays within the host's ring (and the accounting of
 * what was dropped adds up); readers end with the VM.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawn } from "node:child_process";
import { after, before, describe, it } from "node:test";
import { ClosedError } from "../../src/errors.js";
import { Image } from "../../src/image/image.js";
import { LOG_BUFFER_BYTES, type LogEntry, type LogReader, type LogRing } from "../../src/vm/logs.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, bootDefault, defaultRootfs, pidsMatching, processAlive, waitFor } from "../helpers.js";

/** Reads entries until `done(entries)` holds, or fails after `timeoutMs`. */
async function readUntil(reader: LogReader, done: (all: LogEntry[]) => boolean, timeoutMs: number, what: string): Promise<LogEntry[]> {
  const all: LogEntry[] = [];
  const timer = setTimeout(() => reader.destroy(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; got ${JSON.stringify(all.slice(-5).map((e) => [e.pid, e.stream, e.data.toString().slice(0, 80)]))}`)), timeoutMs);
  try {
    for await (const e of reader.iterator({ destroyOnReturn: false })) {
      all.push(e as LogEntry);
      if (done(all)) return all;
    }
    throw new Error(`the log stream ended before ${what}`);
  } finally {
    clearTimeout(timer);
  }
}

const text = (entries: readonly LogEntry[], stream: LogEntry["stream"]): string =>
  entries.filter((e) => e.stream === stream).map((e) => e.data.toString()).join("");

describe("vm.logs() of a VM restored from a snapshot", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;
  let serverPid = 0;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-logs-"));
    image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir,
      warmupTag: `logs-${randomBytes(3).toString("hex")}`,
      warmup: async (vm) => {
        // A "server" left running in the snapshot (bounded: 10 minutes).
        const child = await vm.spawn({
          argv: ["sh", "-c", "echo started >&2; i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 1; done"],
        });
        serverPid = child.pid;
        assert.equal((await child.readStderr()).toString(), "started\n");
      },
    });
  });

  after(async () => {
    await image?.close();
    if (snapshotsDir) await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("the warmup's process keeps printing in the VM handed out after the bake and in a restored clone, labelled with its pid; readers end when the VMs are released", async () => {
    assert.equal(image.baked, true, "this test bakes its own snapshot (a fresh warmupTag)");
    assert.ok(serverPid > 0);
    const pool = await image.pool({ min: 1, max: 2 });
    try {
      // The first is the bake's own VM (warm handoff), the second a restore.
      const vms = [await pool.acquire(), await pool.acquire()];
      const readers: LogReader[] = [];
      try {
        for (const vm of vms) {
          const reader = vm.logs();
          readers.push(reader);
          const seen = await readUntil(reader, (all) => (text(all, "stdout").match(/^tick \d+$/gm) ?? []).length >= 3, 120_000, `three ticks in VM ${vm.id}`);
          for (const e of seen) {
            assert.equal(e.pid, serverPid, "labelled with the pid of the warmup's spawn");
            assert.equal(e.stream, "stdout");
          }
          const ticks = (text(seen, "stdout").match(/^tick (\d+)$/gm) ?? []).map((l) => Number(l.split(" ")[1]));
          for (let i = 1; i < ticks.length; i++) assert.equal(ticks[i], ticks[i - 1]! + 1, `consecutive ticks: ${ticks.join(",")}`);
          // A second reader gets what the ring still holds.
          const second = vm.logs();
          const again = await readUntil(second, (all) => all.length >= 1, 30_000, "the second reader's first entry");
          assert.equal(again[0]!.pid, serverPid);
          second.destroy();
        }
      } finally {
        for (const vm of vms) await vm.release();
      }
      // Each reader ends with its VM (after what it had not read).
      for (const reader of readers) {
        for await (const e of reader) assert.equal((e as LogEntry).pid, serverPid);
        assert.ok(reader.readableEnded, "the reader ended when the VM went back to the pool");
      }
    } finally {
      await pool.shutdown();
    }
  });
});

describe("vm.logs() of an image's workload", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let snapshotsDir: string;
  let image: Image;

  before(async () => {
    snapshotsDir = await mkdtemp(join(tmpdir(), "sm-logs-wl-"));
    image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir,
      warmupTag: `logs-workload-${randomBytes(3).toString("hex")}`,
      // A server that says hello, warns on stderr and beats (bounded: 10 minutes).
      cmd: ["sh", "-c", "echo serving; echo warn >&2; (i=0; while [ $i -lt 600 ]; do echo beat; i=$((i+1)); sleep 1; done) & exec httpd -f -p 80 -h /etc"],
      guestPort: 80,
      listenerRequired: true,
    });
  });

  after(async () => {
    await image?.close();
    if (snapshotsDir) await rm(snapshotsDir, { recursive: true, force: true });
  });

  it("a restored VM's logs start with the workload's lines from before the snapshot, then what it prints after", async () => {
    assert.equal(image.baked, true);
    const pool = await image.pool({ min: 1, max: 2 });
    try {
      const vms = [await pool.acquire(), await pool.acquire()];
      try {
        const vm = vms[1]!; // restored from the snapshot
        const seen = await readUntil(vm.logs(), (all) => (text(all, "stdout").match(/^beat$/gm) ?? []).length >= 2 && text(all, "stderr").includes("warn\n"), 120_000, "the workload's lines");
        assert.ok(text(seen, "stdout").startsWith("serving\n"), `stdout starts with the start-up line: ${JSON.stringify(text(seen, "stdout").slice(0, 40))}`);
        assert.equal(text(seen, "stderr"), "warn\n");
        const pids = new Set(seen.map((e) => e.pid));
        assert.equal(pids.size, 1, "one workload, one pid label");
        assert.ok([...pids][0]! > 1);
        // The server works, and its exec path is untouched.
        const r = await vm.exec({ argv: ["wget", "-qO-", "http://127.0.0.1:80/passwd"] });
        assert.match(r.stdout.toString(), /^root:/);
      } finally {
        for (const vm of vms) await vm.release();
      }
    } finally {
      await pool.shutdown();
    }
  });
});

describe("vm.logs() under a flood", { timeout: VM_TEST_TIMEOUT }, () => {
  it("background output of a finished exec comes out, the host keeps at most LOG_BUFFER_BYTES, and data plus droppedBytes add up", async () => {
    const vm = await bootDefault();
    try {
      const reader = vm.logs();
      const total = 6 * 1024 * 1024;
      // The exec ends at once; its background child keeps the pipes and floods them.
      const r = await vm.exec({ argv: ["sh", "-c", `(sleep 1; yes 0123456789abcdef | head -c ${total}; echo done >&2) & exit 0`] });
      assert.equal(r.exitCode, 0);
      // Nobody reads for a while: the ring must hold it within its budget.
      const ring = (vm as unknown as { logRing: LogRing }).logRing;
      let maxHeld = 0;
      const deadline = Date.now() + 180_000;
      let accounted = 0;
      let stderr = "";
      let dropped = 0;
      const sample = setInterval(() => (maxHeld = Math.max(maxHeld, ring.heldBytes)), 20);
      try {
        await new Promise((res) => setTimeout(res, 15_000));
        for await (const item of reader) {
          const e = item as LogEntry;
          maxHeld = Math.max(maxHeld, ring.heldBytes);
          if (e.stream === "stdout") {
            accounted += e.data.length + e.droppedBytes;
            assert.match(e.data.toString("latin1"), /^[0-9a-f\n]*$/, "only the flood's bytes on stdout");
          } else {
            stderr += e.data.toString();
            accounted += e.droppedBytes;
          }
          dropped += e.droppedBytes;
          if (stderr.includes("done\n") && accounted >= total) break;
          if (Date.now() > deadline) throw new Error(`flood not accounted for within 180 s: ${accounted} of ${total} bytes`);
        }
      } finally {
        clearInterval(sample);
      }
      assert.equal(accounted, total, "every byte is either delivered or counted as dropped");
      assert.ok(dropped > 0, "a reader that did not read lost the oldest output, and was told");
      assert.ok(maxHeld <= LOG_BUFFER_BYTES, `the host held ${maxHeld} bytes, over ${LOG_BUFFER_BYTES}`);
      // The normal exec path is untouched.
      const ok = await vm.exec({ argv: ["echo", "still fine"] });
      assert.equal(ok.stdout.toString(), "still fine\n");
      reader.destroy();
    } finally {
      await vm.destroy();
    }
  });

  it("with console: true, the guest console is in the stream too (stream \"console\", pid 0); other readers do not see it", async () => {
    const vm = await bootDefault();
    try {
      const plain = vm.logs();
      const withConsole = vm.logs({ console: true });
      assert.throws(() => vm.logs({ console: "yes" } as never), TypeError);
      await vm.exec({ argv: ["sh", "-c", "echo to-the-console > /dev/console; (sleep 1; echo from-a-child) & exit 0"] });
      const got = await readUntil(withConsole, (all) => text(all, "stdout").includes("from-a-child\n") && text(all, "console").includes("to-the-console"), 60_000, "the console line and the child's line");
      for (const e of got.filter((x) => x.stream === "console")) assert.equal(e.pid, 0);
      const plainGot = await readUntil(plain, (all) => text(all, "stdout").includes("from-a-child\n"), 30_000, "the child's line (plain reader)");
      assert.ok(plainGot.every((e) => e.stream !== "console"), "a reader without console: true gets no console entries");
    } finally {
      await vm.destroy();
    }
  });

  it("is refused after the VM ended, and a reader ends with the VM", async () => {
    const vm = await bootDefault();
    let reader: LogReader;
    try {
      reader = vm.logs();
      await vm.exec({ argv: ["sh", "-c", "(sleep 1; echo late) & exit 0"] });
      const got = await readUntil(reader, (all) => text(all, "stdout").includes("late\n"), 60_000, "the background child's line");
      assert.ok(got[0]!.pid > 0);
    } finally {
      await vm.destroy();
    }
    const rest: unknown[] = [];
    for await (const e of reader) rest.push(e);
    assert.ok(reader.readableEnded);
    assert.throws(() => vm.logs(), ClosedError);
  });
});

describe("vm.logs() and the event loop", { timeout: VM_TEST_TIMEOUT }, () => {
  it("a script awaiting a VM's logs waits for them, then (the reader unread, the VM left open) exits by itself, leaving no QEMU", async () => {
    const work = await mkdtemp(join(tmpdir(), "sm-logs-exit-"));
    try {
      const runtimeDir = join(work, "rt");
      const dist = join(REPO_ROOT, "dist", "src");
      const script =
        `import { Vm } from ${JSON.stringify(join(dist, "index.js"))};\n` +
        `import { DEFAULT_IMAGE_CONFIG } from ${JSON.stringify(join(dist, "guest", "default-image.js"))};\n` +
        `const vm = await Vm.boot({ rootfs: ${JSON.stringify(await defaultRootfs())}, config: DEFAULT_IMAGE_CONFIG });\n` +
        `const reader = vm.logs();\n` +
        `await vm.exec({ argv: ["sh", "-c", "(while :; do echo bg; sleep 1; done) & exit 0"] });\n` +
        `for await (const e of reader.iterator({ destroyOnReturn: false })) { console.log("GOT " + e.data.toString().trim()); break; }\n` +
        `console.log("LAST LINE");\n`;
      const file = join(work, "script.mjs");
      await (await import("node:fs/promises")).writeFile(file, script);
      const child = spawn(process.execPath, [file], { env: { ...process.env, SUPERMACHINE_RUNTIME_DIR: runtimeDir }, stdio: ["ignore", "pipe", "pipe"] });
      let stdout = "";
      let stderr = "";
      let killer: NodeJS.Timeout | undefined;
      child.stdout.on("data", (b: Buffer) => {
        stdout += b.toString();
        if (!killer && stdout.includes("LAST LINE")) killer = setTimeout(() => child.kill("SIGKILL"), 30_000);
      });
      child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
      const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((r) => child.once("exit", (c, sg) => r([c, sg])));
      if (killer) clearTimeout(killer);
      assert.match(stdout, /^GOT bg$/m, `stdout: ${stdout}\nstderr: ${stderr}`);
      assert.equal(signal, null, `the script did not exit within 30 s of its last line (killed)\nstderr: ${stderr}`);
      assert.equal(code, 0, stderr);
      // QEMU goes with its parent (the confinement chain's parent-death
      // signal), a moment after the script's exit event on a loaded host.
      const left = () => pidsMatching(new RegExp(`qemu-system.*${runtimeDir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`)).filter(processAlive);
      await waitFor(() => left().length === 0, 10_000, "the script's QEMU to exit").catch(() => undefined);
      assert.deepEqual(left(), [], "no QEMU left behind");
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  });
});
