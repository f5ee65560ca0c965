/**
 * `supermachine run [OPTIONS] IMAGE [COMMAND [ARG...]]`: Docker's shape on
 * the library's fast path. The image's snapshot is baked on first use
 * (Image.build with runWorkload: false) and restored afterwards; the bake's
 * own VM runs the first command (warm handoff), so no run boots twice.
 */

import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../guest/default-image.js";
import { Image, type BuildOptions } from "../image/image.js";
import { compilePolicy, type NetworkOption } from "../net/policy.js";
import type { PullPolicy } from "../oci/pull.js";
import { defaultCacheDir } from "../paths.js";
import type { AcceleratorOption } from "../vmm/accel.js";
import type { ExecChild } from "../vm/exec-child.js";
import { Vm, type VmBootOptions } from "../vm/vm.js";
import { parseCommand, parseCount, parseDurationMs, parseMib, UsageError } from "./args.js";
import { RUN } from "./commands.js";
import { ProgressView } from "./progress.js";

/** Whether BuildOptions.mounts (host directories with guestPath/readOnly) is implemented: `-v` passes its mounts through. */
export const MOUNTS_SUPPORTED = true;

/** A `-v HOST:GUEST[:ro]` mount, as BuildOptions.mounts takes it. */
export interface CliMount {
  readonly hostPath: string;
  readonly guestTag: string;
  readonly guestPath: string;
  readonly readOnly: boolean;
}

export function parseVolume(v: string, i: number): CliMount {
  const parts = v.split(":");
  let ro = false;
  if (parts.length === 3 && (parts[2] === "ro" || parts[2] === "rw")) {
    ro = parts[2] === "ro";
    parts.pop();
  }
  if (parts.length !== 2 || parts[0] === "" || !parts[1]!.startsWith("/")) throw new UsageError(`-v expects HOST:GUEST[:ro] with an absolute GUEST path, got ${JSON.stringify(v)}`);
  return { hostPath: resolve(parts[0]!), guestTag: `v${i}`, guestPath: parts[1]!, readOnly: ro };
}

export function parseDisk(v: string): { name: string; sizeMib: number; mountPoint: string } {
  const m = /^([A-Za-z0-9][A-Za-z0-9._-]{0,63}):([^:]+):(\/.*)$/.exec(v);
  if (!m) throw new UsageError(`--disk expects NAME:SIZE:/PATH (e.g. data:512:/data), got ${JSON.stringify(v)}`);
  return { name: m[1]!, sizeMib: parseMib(m[2]!, "--disk SIZE"), mountPoint: m[3]! };
}

export function parsePublish(v: string): { hostPort: number; guestPort: number } {
  const m = /^(?:(?:127\.0\.0\.1:)?(\d+):)?(\d+)(?:\/tcp)?$/.exec(v);
  if (!m) throw new UsageError(`-p expects [HOST:]GUEST (TCP ports; the host side listens on 127.0.0.1), got ${JSON.stringify(v)}`);
  return { hostPort: m[1] === undefined ? 0 : parseCount(m[1], "-p HOST", 0, 65535), guestPort: parseCount(m[2]!, "-p GUEST", 1, 65535) };
}

export function parseNetwork(v: string | undefined): NetworkOption | undefined {
  if (v === undefined) return undefined;
  if (v === "default" || v === "bridge" || v === "host") return true;
  if (v === "none") return false;
  let policy: unknown;
  try {
    const text = readFileSync(v, "utf8");
    if (text.length > 1 << 20) throw new Error("over 1 MiB");
    policy = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`--network expects default, none or a JSON policy file; ${JSON.stringify(v)}: ${(e as Error).message}`);
  }
  try {
    compilePolicy(policy, `--network ${v}`);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  return policy as NetworkOption;
}

/** `-e` and `--env-file` into one record (later wins); `KEY` alone takes the host's value. */
export function parseEnv(flags: readonly string[], files: readonly string[]): Record<string, string> {
  const env: Record<string, string> = {};
  const add = (e: string, where: string) => {
    const i = e.indexOf("=");
    const k = i < 0 ? e : e.slice(0, i);
    if (!/^[^=\0\s]+$/.test(k)) throw new UsageError(`${where}: expects KEY=VALUE, got ${JSON.stringify(e)}`);
    if (i < 0) {
      const hv = process.env[k];
      if (hv !== undefined) env[k] = hv;
    } else env[k] = e.slice(i + 1);
  };
  for (const f of files) {
    let text: string;
    try {
      text = readFileSync(f, "utf8");
    } catch (e) {
      throw new UsageError(`--env-file ${f}: ${(e as Error).message}`);
    }
    text.split(/\r?\n/).forEach((line, n) => {
      const t = line.trim();
      if (t === "" || t.startsWith("#")) return;
      add(t, `--env-file ${f}:${n + 1}`);
    });
  }
  for (const e of flags) add(e, "-e");
  return env;
}

function debug(s: string): void {
  if (process.env.SUPERMACHINE_DEBUG === "1") process.stderr.write(`supermachine: debug: ${s}\n`);
}

export async function runCommand(args: string[]): Promise<number> {
  const p = parseCommand(RUN, args);
  if (p.help) return -1;
  const v = p.values;
  const str = (k: string) => v[k] as string | undefined;
  const list = (k: string) => (v[k] as string[] | undefined) ?? [];
  let image: string | undefined;
  let command: string[];
  if (str("rootfs") !== undefined) command = p.positionals;
  else if (p.dashDashFirst) {
    image = "default";
    command = p.positionals;
  } else {
    image = p.positionals[0];
    command = p.positionals.slice(1);
    if (image === undefined) throw new UsageError("supermachine run: give an IMAGE (or `default`), e.g. `supermachine run alpine echo hi`; see `supermachine run --help`");
  }
  const memoryMib = str("memory") !== undefined ? parseMib(str("memory")!, "--memory") : undefined;
  const vcpus = str("cpus") !== undefined ? parseCount(str("cpus")!, "--cpus", 1, 64) : undefined;
  const timeoutMs = str("timeout") !== undefined ? parseDurationMs(str("timeout")!, "--timeout") : 0;
  const pull = str("pull");
  if (pull !== undefined && !["always", "missing", "never"].includes(pull)) throw new UsageError(`--pull expects always, missing or never, got ${JSON.stringify(pull)}`);
  const env = parseEnv(list("env"), list("env-file"));
  const mounts = list("volume").map((m, i) => parseVolume(m, i));
  const disks = list("disk").map(parseDisk);
  const ports = list("publish").map(parsePublish);
  const network = parseNetwork(str("network"));
  const entrypoint = str("entrypoint");
  const tty = v.tty === true;
  const interactive = v.interactive === true;
  const view = new ProgressView(process.stderr, v.quiet !== true);
  if (mounts.length > 0 && !MOUNTS_SUPPORTED) {
    throw new UsageError(`-v (host directory mounts) is not supported yet by this build of supermachine for Linux; drop -v ${list("volume")[0]}, or copy files in with a COMMAND`);
  }
  if (str("rootfs") !== undefined && (disks.length > 0 || str("platform") !== undefined || pull !== undefined)) {
    throw new UsageError("--rootfs boots a directory: --disk, --platform and --pull apply to an IMAGE only");
  }

  const cacheDir = defaultCacheDir();
  const controller = new AbortController();
  let vm: Vm | undefined;
  let img: Image | undefined;
  let child: ExecChild | undefined;
  let interrupts = 0;
  let interruptedBy = 0;
  // Before the command runs, Ctrl-C cancels; while it runs (without a
  // terminal in raw mode), the signal goes to the command, and a second one
  // destroys the VM.
  const onSignal = (sig: NodeJS.Signals) => {
    const num = sig === "SIGINT" ? 2 : sig === "SIGHUP" ? 1 : 15;
    interrupts++;
    if (child && interrupts === 1) {
      void child.signal(num).catch(() => undefined);
      return;
    }
    interruptedBy = 128 + num;
    controller.abort(new Error(`interrupted by ${sig}`));
    void vm?.destroy();
  };
  const sigs: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const s of sigs) process.on(s, onSignal);
  let rawSet = false;
  let stopStdin: (() => void) | undefined;
  const stdinTty = process.stdin.isTTY === true;
  try {
    let argv: string[];
    if (image === undefined) {
      const boot: VmBootOptions = {
        cacheDir,
        rootfs: str("rootfs")!,
        config: DEFAULT_IMAGE_CONFIG,
        signal: controller.signal,
        ...(memoryMib ? { memoryMib } : {}),
        ...(vcpus ? { vcpus } : {}),
        ...(network !== undefined ? { network } : {}),
        ...(mounts.length ? { mounts } : {}),
        ...(str("accel") ? { accel: str("accel") as AcceleratorOption } : {}),
      };
      const t0 = Date.now();
      vm = await Vm.boot(boot);
      debug(`vm ${vm.id} booted from directory ${str("rootfs")} in ${Date.now() - t0} ms`);
      argv = [...(entrypoint ? [entrypoint] : []), ...command];
    } else {
      const ref = image === "default" ? `dir:${await ensureDefaultImage(cacheDir)}` : image;
      const build: BuildOptions = {
        ref,
        cacheDir,
        runWorkload: false,
        onProgress: view.onProgress,
        signal: controller.signal,
        ...(memoryMib ? { memoryMib } : {}),
        ...(vcpus ? { vcpus } : {}),
        ...(pull ? { pullPolicy: pull as PullPolicy } : {}),
        ...(str("platform") ? { platform: str("platform")! } : {}),
        ...(network !== undefined ? { network } : {}),
        ...(disks.length ? { volumes: disks } : {}),
        ...(str("accel") ? { accel: str("accel") as AcceleratorOption } : {}),
        // Host paths are not part of the snapshot key: a moved checkout reuses the snapshot.
        ...(mounts.length ? { mounts } : {}),
      };
      const t0 = Date.now();
      img = await Image.build(build);
      view.done();
      const handoff = await img.takeHandoff();
      vm = handoff ?? (await img.restore({ signal: controller.signal }));
      debug(`vm ${vm.id} ${handoff ? `booted (baked snapshot ${img.manifest.name})` : `restored from snapshot ${img.manifest.name}`} in ${Date.now() - t0} ms${(await vm._pretranslated) ? ", pretranslating" : ""}`);
      const ic = img.imageCmd ?? { entrypoint: [], cmd: [] };
      const ep = entrypoint !== undefined ? (entrypoint === "" ? [] : [entrypoint]) : [...ic.entrypoint];
      argv = [...ep, ...(command.length > 0 ? command : entrypoint !== undefined ? [] : [...ic.cmd])];
    }
    if (argv.length === 0) throw new UsageError(`supermachine run: ${image ?? str("rootfs")} has no ENTRYPOINT or CMD; give a COMMAND`);
    for (const port of ports) {
      const f = await vm.exposeTcp(port.hostPort, port.guestPort);
      // The address goes to stdout's neighbour stderr, always: scripts read it.
      process.stderr.write(`supermachine: guest port ${port.guestPort} is at ${f.localAddr}\n`);
    }
    const winsize = () => {
      const s = process.stdout.isTTY ? process.stdout : process.stdin.isTTY ? (process.stdin as unknown as NodeJS.WriteStream) : undefined;
      const [cols, rows] = s && typeof s.getWindowSize === "function" ? s.getWindowSize() : [process.stdout.columns || 80, process.stdout.rows || 24];
      return { cols: cols || 80, rows: rows || 24 };
    };
    child = await vm.spawn({
      argv,
      env,
      timeoutMs,
      ...(str("workdir") ? { cwd: str("workdir")! } : {}),
      ...(str("user") ? { user: str("user")! } : {}),
      ...(tty ? { tty: true, winsize: winsize() } : {}),
      signal: controller.signal,
    });
    const c = child;
    const pumps = [pump(c, "out"), ...(tty ? [] : [pump(c, "err")])];
    let onWinch: (() => void) | undefined;
    if (tty) {
      onWinch = () => {
        const w = winsize();
        void c.resize(w.cols, w.rows).catch(() => undefined);
      };
      process.on("SIGWINCH", onWinch);
    }
    if (interactive) {
      if (tty && stdinTty) {
        // Raw mode: Ctrl-C, Ctrl-D and Ctrl-Z are bytes for the guest's terminal.
        process.stdin.setRawMode(true);
        rawSet = true;
      }
      stopStdin = feedStdin(c);
    } else {
      await c.closeStdin();
    }
    const [res] = await Promise.all([c.wait(), ...pumps]);
    if (onWinch) process.removeListener("SIGWINCH", onWinch);
    // Under TCG, the first run of a snapshot leaves the keys of what its
    // QEMU translated, so that the next run's QEMU translates them ahead of
    // the guest (docs/pretranslate.md); a no-op once they exist.
    if (!interruptedBy) await vm._recordTbHints().catch(() => 0);
    if (interruptedBy && res.signal === null && res.exitCode === -1) return interruptedBy;
    if (res.timedOut) return 124;
    if (res.signal !== null) return 128 + res.signal;
    if (res.exitCode < 0) return 137;
    return res.exitCode;
  } catch (e) {
    if (interruptedBy) return interruptedBy;
    throw e;
  } finally {
    view.done();
    stopStdin?.();
    if (rawSet) process.stdin.setRawMode(false);
    if (interactive) {
      // A terminal or pipe on stdin must not keep the process alive.
      process.stdin.pause();
      (process.stdin as { unref?: () => void }).unref?.();
    }
    for (const s of sigs) process.removeListener(s, onSignal);
    await vm?.close();
    await img?.close();
  }
}

/** Forwards our stdin to the command (with backpressure); returns what stops it. */
function feedStdin(c: ExecChild): () => void {
  const stdin = process.stdin;
  const onData = (chunk: Buffer) => {
    stdin.pause();
    c.writeStdin(chunk).then(
      () => stdin.resume(),
      () => undefined, // the command ended first
    );
  };
  const onEnd = () => void c.closeStdin().catch(() => undefined);
  stdin.on("data", onData);
  stdin.once("end", onEnd);
  stdin.resume();
  return () => {
    stdin.removeListener("data", onData);
    stdin.removeListener("end", onEnd);
    stdin.pause();
  };
}

async function pump(child: ExecChild, which: "out" | "err"): Promise<void> {
  const dest = which === "out" ? process.stdout : process.stderr;
  for (;;) {
    const b = which === "out" ? await child.readStdout(256 * 1024) : await child.readStderr(256 * 1024);
    if (b.length === 0) return;
    if (!dest.write(b)) await new Promise((r) => dest.once("drain", r));
  }
}
