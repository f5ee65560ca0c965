/**
 * `supermachine run` end to end with Docker's shape: the default image, the
 * snapshot fast path (the second run restores), exit statuses (the
 * command's, 128+N, 124), -p, --network, --entrypoint, and no VM left
 * behind.
 */

import assert from "node:assert/strict";
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { VM_TEST_TIMEOUT, waitFor } from "../helpers.js";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { findQemu } from "../../src/vmm/qemu.js";
import { cliEnv, type CliEnv } from "./cli-env.js";

describe("supermachine run", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let c: CliEnv;
  before(() => {
    c = cliEnv("run");
  });
  after(() => {
    try {
      assert.deepEqual(c.qemus(), [], "no VM left behind");
    } finally {
      c.remove();
    }
  });

  it("runs a command in the default image (`run -- CMD`), exits with its status, leaves nothing behind", () => {
    const r = c.run(["run", "-q", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert.equal(r.status, 7, r.stderr);
    assert.equal(r.stdout, "out\n");
    assert.match(r.stderr, /err\n/);
    // The first run of an image boots once and bakes its snapshot.
    assert.match(r.stderr, /debug: vm [0-9a-f]+ booted \(baked snapshot sm-[0-9a-f]+\)/);
    assert.deepEqual(c.qemus(), [], "no VM left behind");
    assert.deepEqual(c.runtimeLeft(), [], "no runtime dir left behind");
  });

  it("the first run of an image bakes its snapshot; a second `run IMAGE echo hi` restores it", () => {
    const first = c.run(["run", "default", "echo", "hi"]);
    assert.equal(first.status, 0, first.stderr);
    assert.equal(first.stdout, "hi\n");
    const second = c.run(["run", "default", "echo", "hi"]);
    assert.equal(second.status, 0, second.stderr);
    assert.equal(second.stdout, "hi\n");
    assert.match(second.stderr, /debug: vm [0-9a-f]+ restored from snapshot sm-[0-9a-f]+/);
    assert.doesNotMatch(second.stderr, /booted|bake sm-/);
    assert.match(second.stderr, /snapshot sm-[0-9a-f]+ \(cached\)/);
    // One snapshot for the image, whatever the number of runs.
    const snaps = readdirSync(c.snapshotsDir).filter((n) => n.startsWith("sm-"));
    assert.equal(snaps.length, 1);
    if (chooseAccelerator().accel === "tcg" && /\/qemu\/bin\/qemu-system-x86_64$/.test(findQemu())) {
      // Under TCG the first restore leaves its block keys; the next run's QEMU pretranslates them.
      assert.ok(existsSync(join(c.snapshotsDir, snaps[0]!, "tb-hints")), "the restored run recorded its block keys");
      const third = c.run(["run", "default", "echo", "hi"]);
      assert.equal(third.status, 0, third.stderr);
      assert.equal(third.stdout, "hi\n");
      assert.match(third.stderr, /debug: vm [0-9a-f]+ restored from snapshot sm-[0-9a-f]+ in \d+ ms, pretranslating/);
    }
  });

  it("-v HOST:GUEST mounts a host directory: `run -v DIR:/work -w /work IMAGE sh -c 'ls; echo hi > out'` leaves out on the host", () => {
    const dir = mkdtempSync(join(tmpdir(), "sm-cli-v-"));
    try {
      writeFileSync(join(dir, "from-host.txt"), "host file\n");
      const r = c.run(["run", "-q", "-v", `${dir}:/work`, "-w", "/work", "default", "sh", "-c", "ls; echo hi > out"]);
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /from-host\.txt/);
      assert.equal(readFileSync(join(dir, "out"), "utf8"), "hi\n");
      const ro = c.run(["run", "-q", "-v", `${dir}:/work:ro`, "default", "sh", "-c", "echo x > /work/nope"]);
      assert.notEqual(ro.status, 0, "a :ro mount refuses writes");
      assert.equal(existsSync(join(dir, "nope")), false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("a command killed by signal N exits 128+N: `sh -c 'kill -TERM $$'` exits 143, SIGKILL 137", () => {
    const term = c.run(["run", "-q", "default", "sh", "-c", "kill -TERM $$"]);
    assert.equal(term.status, 143, term.stderr);
    const kill = c.run(["run", "-q", "default", "sh", "-c", "kill -KILL $$"]);
    assert.equal(kill.status, 137, kill.stderr);
  });

  it("`--timeout 1 IMAGE sleep 9` exits 124", () => {
    const r = c.run(["run", "-q", "--timeout", "1", "default", "sleep", "9"]);
    assert.equal(r.status, 124, r.stderr);
  });

  it("-e, --env-file, -w, -u and --entrypoint", () => {
    const f = join(c.work, "envfile");
    writeFileSync(f, "# settings\nFROM_FILE=file value\nBOTH=file\n");
    const r = c.run(["run", "-q", "--env-file", f, "-e", "BOTH=flag", "-w", "/tmp", "-u", "65534", "--entrypoint", "/bin/sh", "default", "-c", 'echo "$FROM_FILE|$BOTH|$(pwd)|$(id -u)"']);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "file value|flag|/tmp|65534\n");
  });

  it("-i forwards standard input", () => {
    const r = c.run(["run", "-q", "-i", "default", "sh", "-c", "tr a-z A-Z"], { input: "from stdin\n" });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "FROM STDIN\n");
  });

  it("-p serves a guest HTTP server (busybox httpd) on the printed host address; SIGTERM reaches the command", async () => {
    const child = c.spawn(["run", "-p", "80", "default", "sh", "-c", "mkdir -p /www && echo hello from the guest > /www/index.html && exec httpd -f -p 80 -h /www"]);
    let stderr = "";
    child.stderr!.on("data", (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
    try {
      await waitFor(() => /guest port 80 is at 127\.0\.0\.1:\d+/.test(stderr), 240_000, `the published address (stderr: ${stderr})`);
      const addr = /guest port 80 is at (127\.0\.0\.1:\d+)/.exec(stderr)![1]!;
      let body = "";
      await waitFor(
        async () => {
          body = await fetch(`http://${addr}/`).then(
            (res) => (res.ok ? res.text() : ""),
            () => "",
          );
          return body !== "";
        },
        120_000,
        "the guest's httpd to answer",
      );
      assert.equal(body, "hello from the guest\n");
      child.kill("SIGTERM");
      assert.equal(await exited, 143, stderr);
    } finally {
      child.kill("SIGKILL");
      await exited;
    }
    assert.deepEqual(c.qemus(), []);
  });

  describe("--network", () => {
    let server: Server;
    let port = 0;
    before(async () => {
      server = createServer((_req, res) => res.end("host service\n"));
      await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
      port = (server.address() as { port: number }).port;
    });
    after(() => new Promise<void>((r) => server.close(() => r())));

    it("a POLICY-FILE opens a host service to the guest; `none` has no network", async () => {
      const policy = join(c.work, "policy.json");
      writeFileSync(policy, JSON.stringify({ allow: ["hostsvc"], hosts: { hostsvc: "127.0.0.1" } }));
      // busybox nc (this busybox's static wget crashes in the guest's resolver).
      const fetchCmd = `printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 hostsvc ${port} | tail -1`;
      const open = await c.runAsync(["run", "-q", "--network", policy, "default", "sh", "-c", fetchCmd]);
      assert.equal(open.status, 0, open.stderr);
      assert.equal(open.stdout, "host service\n");
      const none = await c.runAsync(["run", "-q", "--network", "none", "default", "sh", "-c", `${fetchCmd}; nslookup hostsvc >/dev/null 2>&1; echo "nslookup=$?"`]);
      assert.equal(none.status, 0, none.stderr);
      assert.match(none.stdout, /nslookup=[1-9]/);
      assert.doesNotMatch(none.stdout, /host service/);
    });
  });

  it("boots a host directory with --rootfs and passes env and workdir", () => {
    const dir = mkdtempSync(join(tmpdir(), "sm-cli-rootfs-"));
    try {
      for (const d of ["bin", "etc", "work"]) mkdirSync(join(dir, d));
      copyFileSync("/bin/busybox", join(dir, "bin", "busybox"));
      chmodSync(join(dir, "bin", "busybox"), 0o755);
      symlinkSync("busybox", join(dir, "bin", "sh"));
      symlinkSync("busybox", join(dir, "bin", "cat"));
      writeFileSync(join(dir, "work", "hello.txt"), "from the host directory\n");
      const r = c.run(["run", "-q", "--rootfs", dir, "-e", "GREETING=hi there", "-w", "/work", "sh", "-c", 'echo "$GREETING"; cat hello.txt']);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, "hi there\nfrom the host directory\n");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("failures exit 125 with one line: a missing rootfs, an image that is not there", () => {
    const r = c.run(["run", "-q", "--rootfs", "/nonexistent-dir", "true"]);
    assert.equal(r.status, 125);
    assert.match(r.stderr, /does not exist/);
    const n = c.run(["run", "-q", "--pull", "never", "nothere/at-all:1", "true"], { env: { SUPERMACHINE_DEBUG: "" } });
    assert.equal(n.status, 125, n.stderr);
    // One line (besides the TCG notice of a host without KVM).
    assert.equal(n.stderr.trimEnd().split("\n").filter((l) => !/under QEMU TCG emulation/.test(l)).length, 1, n.stderr);
  });
});
