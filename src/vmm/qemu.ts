/**
 * The QEMU process of one VM: command line, start, console capture, stop.
 *
 * QEMU runs the `microvm` machine with `-nodefaults`, the seccomp sandbox,
 * and only: an ISA serial console, a virtio-serial port for the agent, a
 * read-only virtio-blk root disk, and QMP on a unix socket. It is started
 * through `setpriv --pdeathsig KILL`, so it dies with the Node process even
 * when that one is SIGKILLed; a process 'exit' hook covers the rest.
 *
 * A running QEMU does not hold Node's event loop (the child and its output
 * pipes are unref'd): a script whose work is done exits, and the 'exit' hook
 * kills what is left. What waits on the guest holds the loop instead (the
 * agent connection while a request is in flight, `stop()` until QEMU is gone).
 */

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { delimiter, join } from "node:path";
import { MissingAssetError, QemuError } from "../errors.js";
import { guestText } from "../guest-text.js";
import type { Accelerator } from "./accel.js";

export interface QemuLaunch {
  /** Path of qemu-system-*; default from SUPERMACHINE_QEMU or PATH. */
  qemuBinary?: string;
  accel: Accelerator;
  memoryMib: number;
  vcpus: number;
  kernel: string;
  /** Omitted for snapshot restores (the guest's RAM comes from the snapshot). */
  initrd?: string;
  cmdline: string;
  /** Read-only root filesystem image (virtio-blk). */
  rootfs?: string;
  /** Directory for the sockets (short path: unix sockets are ≤ 107 bytes). */
  dir: string;
  /** Guest RAM in a file (for snapshots): shared or private (copy-on-write). */
  memoryFile?: { path: string; share: boolean };
  /** Start paused, waiting for `migrate-incoming` (snapshot restore). */
  incoming?: boolean;
  /** Stay paused after start (or after an incoming migration): -S. */
  paused?: boolean;
  /** Process name shown by ps (≤ 15 chars). */
  name: string;
  /**
   * Unix socket of the host's network stack: the VM gets a virtio-net NIC
   * whose frames QEMU carries there (`-netdev stream`, QEMU the client: a
   * 4-byte big-endian length, then the Ethernet frame). Someone must listen
   * on it before QEMU starts. Absent: the VM has no NIC.
   */
  netSocket?: string;
}

/** The MAC address of every VM's NIC: each VM has a host stack of its own. */
export const GUEST_MAC = "52:54:00:53:4d:02";

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

const CONSOLE_TAIL = 64 * 1024;

const live = new Set<ChildProcess>();
let hooked = false;
let started = 0;

/** How many QEMU processes this Node process has started (for tests and stats). */
export function qemuStartCount(): number {
  return started;
}

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on("exit", () => {
    for (const c of live) {
      try {
        c.kill("SIGKILL");
      } catch {
        /* already gone */
      }
    }
  });
}

/** PIDs of QEMU processes this Node process started and that still run. */
export function liveQemuPids(): number[] {
  return [...live].map((c) => c.pid).filter((p): p is number => typeof p === "number");
}

function which(cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? "/usr/bin:/bin").split(delimiter)) {
    const p = join(dir, cmd);
    if (existsSync(p)) return p;
  }
  return undefined;
}

export function qemuBinaryName(arch: string = process.arch): string {
  return arch === "arm64" ? "qemu-system-aarch64" : "qemu-system-x86_64";
}

/** Finds the QEMU binary or throws MissingAssetError naming the fix. */
export function findQemu(explicit?: string): string {
  const p = explicit ?? process.env.SUPERMACHINE_QEMU;
  if (p) {
    if (!existsSync(p)) throw new MissingAssetError("qemu", `QEMU binary ${p} (from ${explicit ? "the qemuBinary option" : "SUPERMACHINE_QEMU"}) does not exist.`);
    return p;
  }
  const name = qemuBinaryName();
  const found = which(name);
  if (!found) {
    throw new MissingAssetError(
      "qemu",
      `${name} is not installed. Run \`npm run setup\` (Debian/Ubuntu: apt-get install qemu-system-x86), or point SUPERMACHINE_QEMU at a QEMU binary.`,
    );
  }
  return found;
}

/** Builds QEMU's argument vector. Pure, for tests. */
export function qemuArgs(l: QemuLaunch): string[] {
  const a: string[] = [];
  a.push("-name", `${l.name},process=${l.name.slice(0, 15)}`);
  a.push("-M", "microvm,x-option-roms=off,isa-serial=on,acpi=on");
  if (l.accel === "kvm") a.push("-accel", "kvm", "-cpu", "host");
  // tb-size bounds TCG's translation cache (and so QEMU's RSS).
  else a.push("-accel", "tcg,tb-size=64", "-cpu", "max");
  if (l.memoryFile) {
    a.push("-m", `${l.memoryMib}M`);
    a.push(
      "-object",
      `memory-backend-file,id=ram,size=${l.memoryMib}M,mem-path=${l.memoryFile.path},share=${l.memoryFile.share ? "on" : "off"}`,
    );
    a.push("-machine", "memory-backend=ram");
  } else {
    // Named like the file-backed RAM ("ram", not "microvm.ram"): a snapshot
    // of this VM is loaded into a helper QEMU whose RAM is a file, and
    // migration matches RAM blocks by name.
    a.push("-m", `${l.memoryMib}M`);
    a.push("-object", `memory-backend-ram,id=ram,size=${l.memoryMib}M`);
    a.push("-machine", "memory-backend=ram");
  }
  a.push("-smp", String(l.vcpus));
  a.push("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot");
  a.push("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
  a.push("-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con");
  a.push("-kernel", l.kernel);
  if (l.initrd) a.push("-initrd", l.initrd);
  a.push("-append", l.cmdline);
  a.push("-device", "virtio-serial-device,max_ports=2");
  a.push("-chardev", `socket,id=agent,path=${join(l.dir, "agent.sock")},server=on,wait=off`);
  a.push("-device", "virtserialport,chardev=agent,name=sm.agent");
  if (l.rootfs) {
    a.push("-drive", `id=root,file=${l.rootfs},format=raw,if=none,readonly=on`);
    a.push("-device", "virtio-blk-device,drive=root");
  }
  if (l.netSocket !== undefined) {
    // QEMU's option syntax would split the path at a comma.
    if (l.netSocket.includes(",") || !l.netSocket.startsWith("/") || Buffer.byteLength(l.netSocket) > 107) {
      throw new TypeError(`netSocket must be an absolute path of at most 107 bytes without commas, received ${JSON.stringify(l.netSocket)}`);
    }
    a.push("-netdev", `stream,id=net0,server=off,addr.type=unix,addr.path=${l.netSocket}`);
    a.push("-device", `virtio-net-device,netdev=net0,mac=${GUEST_MAC}`);
  }
  a.push("-qmp", `unix:${join(l.dir, "qmp.sock")},server=on,wait=off`);
  if (l.incoming) a.push("-incoming", "defer");
  if (l.paused) a.push("-S");
  return a;
}

export class QemuProcess {
  readonly child: ChildProcess;
  readonly agentSocket: string;
  readonly qmpSocket: string;
  /** Resolves when QEMU has exited (never rejects). */
  readonly exited: Promise<QemuExit>;
  private tail: Buffer[] = [];
  private tailBytes = 0;
  private exitInfo: QemuExit | undefined;
  private errLine = "";
  /**
   * Called when QEMU reports on stderr that the guest broke a virtio device
   * ("virtio: zero sized buffers are not allowed", ...): QEMU stops serving
   * that device, so the VM can no longer be reached and should be ended.
   */
  onDeviceError: ((message: string) => void) | undefined;

  private constructor(child: ChildProcess, l: QemuLaunch) {
    this.child = child;
    this.agentSocket = join(l.dir, "agent.sock");
    this.qmpSocket = join(l.dir, "qmp.sock");
    const onData = (b: Buffer) => this.keep(b);
    child.stdout?.on("data", onData);
    child.stderr?.on("data", (b: Buffer) => {
      this.keep(b);
      this.scanStderr(b);
    });
    // Idle VMs must not keep the process alive (see the file comment).
    child.unref();
    for (const pipe of [child.stdout, child.stderr]) (pipe as unknown as { unref?: () => void } | null)?.unref?.();
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        live.delete(child);
        this.exitInfo = { code, signal };
        resolve(this.exitInfo);
      });
    });
  }

  /** Starts QEMU. Spawn failures (binary missing) throw. */
  static async start(l: QemuLaunch): Promise<QemuProcess> {
    const qemu = findQemu(l.qemuBinary);
    const args = qemuArgs(l);
    const setpriv = which("setpriv");
    const [cmd, argv] = setpriv ? [setpriv, ["--pdeathsig", "KILL", "--", qemu, ...args]] : [qemu, args];
    hookExit();
    const child = spawn(cmd, argv, { stdio: ["ignore", "pipe", "pipe"] });
    started++;
    live.add(child);
    const proc = new QemuProcess(child, l);
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve);
      child.once("error", (e: NodeJS.ErrnoException) => {
        live.delete(child);
        reject(
          e.code === "ENOENT"
            ? new MissingAssetError("qemu", `cannot run ${cmd}: not found. Run \`npm run setup\` or set SUPERMACHINE_QEMU.`, { cause: e })
            : new QemuError(`cannot start QEMU: ${e.message}`, { cause: e }),
        );
      });
    });
    return proc;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get exitStatus(): QemuExit | undefined {
    return this.exitInfo;
  }

  private keep(b: Buffer): void {
    this.tail.push(b);
    this.tailBytes += b.length;
    while (this.tailBytes - this.tail[0]!.length >= CONSOLE_TAIL) {
      this.tailBytes -= this.tail.shift()!.length;
    }
  }

  private scanStderr(b: Buffer): void {
    // Bounded: only the current line is kept, cut at 1 KiB.
    const lines = (this.errLine + b.toString("utf8")).split("\n");
    this.errLine = lines.pop()!.slice(-1024);
    for (const line of lines) {
      const m = /^[^:\s]*qemu[^:]*: (virtio[^:]*: .*)$/.exec(line.trim());
      if (m) this.onDeviceError?.(m[1]!.slice(0, 512));
    }
  }

  /** The last ~64 KiB the guest console and QEMU printed. */
  consoleTail(maxBytes = 4096): string {
    const all = Buffer.concat(this.tail);
    return guestText(all.subarray(Math.max(0, all.length - maxBytes)).toString("utf8"), { maxChars: maxBytes, keep: "tail" });
  }

  /** Sends a signal; harmless after exit. */
  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    if (this.exitInfo) return;
    try {
      this.child.kill(signal);
    } catch {
      /* already gone */
    }
  }

  /** Kills QEMU and waits for it to be gone (holding the event loop until then). */
  async stop(): Promise<QemuExit> {
    if (!this.exitInfo) this.child.ref();
    this.kill("SIGKILL");
    return this.exited;
  }
}
