/**
 * Serves a FuseServer to the *host's* kernel FUSE client: opens /dev/fuse,
 * mounts it with mount(8) (the descriptor passed as fd 3), and moves raw
 * messages between /dev/fuse and FuseServer.handle exactly as the agent does
 * in the guest. No VM: a real kernel speaks to the server, so the wire format
 * and the cache/invalidation behaviour are checked against real FUSE code.
 *
 * Everything that touches the mount must run in a child process: a
 * synchronous file call on the mount from this process would block the event
 * loop the server needs to answer it.
 */

import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import type { FuseServer } from "../../src/mounts/server.js";

export interface HostMount {
  readonly mnt: string;
  /** Runs a shell script (cwd = the mount); resolves with exit code and output, never hangs (aborts the mount on timeout). */
  sh(script: string, timeoutMs?: number): Promise<{ code: number | null; out: string }>;
  /** Unmounts, ends the read loop, closes /dev/fuse. Idempotent. */
  unmount(): Promise<void>;
}

/** Why host-kernel tests cannot run here, or undefined when they can. */
export function hostKernelUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return "mounting FUSE needs root";
  if (!fs.existsSync("/dev/fuse")) return "no /dev/fuse";
  if (!fs.readFileSync("/proc/filesystems", "utf8").includes("\tfuse\n")) return "the host kernel has no fuse filesystem";
  // fusectl lets a stuck test abort its connection instead of hanging.
  if (!fs.readFileSync("/proc/self/mounts", "utf8").includes(" /sys/fs/fuse/connections fusectl ")) {
    const r = spawnSync("mount", ["-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"], { stdio: "ignore", timeout: 10_000 });
    if (r.status !== 0) return "cannot mount fusectl (needed to abort a stuck mount)";
  }
  return undefined;
}

/** Runs a command without blocking the event loop (the server must keep answering). */
function run(argv: readonly string[], stdio: Array<"ignore" | "pipe" | number> = ["ignore", "pipe", "pipe"]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio });
    let out = "";
    child.stdout?.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr?.on("data", (b: Buffer) => (out += b.toString()));
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    child.on("error", (err) => (out += String(err)));
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

/** The fusectl connection id of the mount at `mnt` (the minor of its device), read from mountinfo without touching the mount. */
function connectionOf(mnt: string): string | undefined {
  for (const line of fs.readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
    const f = line.split(" ");
    if (f[4] === mnt) return f[2]?.split(":")[1];
  }
  return undefined;
}

export async function mountOnHostKernel(server: FuseServer, mnt: string, options: { readOnly?: boolean } = {}): Promise<HostMount> {
  const fd = fs.openSync("/dev/fuse", fs.constants.O_RDWR);
  const data = "fd=3,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions";
  const r = await run(["mount", "-t", "fuse", "-o", `${options.readOnly ? "ro," : ""}nosuid,nodev,${data}`, `sm-${server.spec.guestTag}`, mnt], ["ignore", "pipe", "pipe", fd]);
  if (r.code !== 0) {
    fs.closeSync(fd);
    throw new Error(`mount failed: ${r.out}`);
  }
  const connection = connectionOf(mnt);
  let unmounted = false;

  // Notifications are written one at a time: an INVAL_ENTRY may wait for a
  // directory lock held by a LOOKUP whose reply needs a free thread.
  const notes: Buffer[] = [];
  let writingNote = false;
  const pumpNotes = (): void => {
    if (writingNote || unmounted) return;
    const next = notes.shift();
    if (next === undefined) return;
    writingNote = true;
    fs.write(fd, next, 0, next.length, null, () => {
      writingNote = false;
      pumpNotes();
    });
  };
  server.onNotify = (m) => {
    notes.push(m);
    pumpNotes();
  };

  const loop = (async () => {
    const buf = Buffer.alloc(132 * 1024);
    for (;;) {
      let n: number;
      try {
        n = await new Promise<number>((resolve, reject) => fs.read(fd, buf, 0, buf.length, null, (err, got) => (err ? reject(err) : resolve(got))));
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOENT" || code === "EINTR" || code === "EAGAIN") continue;
        return; // ENODEV: unmounted
      }
      const request = Buffer.from(buf.subarray(0, n));
      void server.handle(request).then((reply) => {
        if (reply !== null && !unmounted) fs.write(fd, reply, 0, reply.length, null, () => undefined);
      });
    }
  })();

  const abort = (): void => {
    if (connection === undefined) return;
    try {
      fs.writeFileSync(`/sys/fs/fuse/connections/${connection}/abort`, "1");
    } catch {
      // already gone
    }
  };

  const mount: HostMount = {
    mnt,
    sh(script, timeoutMs = 60_000) {
      return new Promise((resolve) => {
        // cwd stays "/": libuv's spawn waits on the main thread until the child has exec'd, and a
        // chdir into the mount before exec would need this very event loop to answer.
        const child = spawn("sh", ["-c", `cd "$SM_MNT" || exit 99\n${script}`], { cwd: "/", env: { ...process.env, SM_MNT: mnt }, stdio: ["ignore", "pipe", "pipe"] });
        let out = "";
        child.stdout.on("data", (b: Buffer) => (out += b.toString()));
        child.stderr.on("data", (b: Buffer) => (out += b.toString()));
        const timer = setTimeout(() => {
          out += `\n[timed out after ${timeoutMs} ms: mount aborted]`;
          abort();
          child.kill("SIGKILL");
        }, timeoutMs);
        child.on("close", (code) => {
          clearTimeout(timer);
          resolve({ code, out });
        });
      });
    },
    async unmount() {
      if (unmounted) return;
      await run(["umount", "-l", mnt]);
      const ended = await Promise.race([loop.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3000))]);
      if (!ended) {
        abort();
        await Promise.race([loop, new Promise((r) => setTimeout(r, 3000))]);
      }
      unmounted = true;
      server.onNotify = undefined;
      fs.closeSync(fd);
    },
  };
  return mount;
}
