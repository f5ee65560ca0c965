/**
 * Moving a VM's device state in and out of QEMU through its migration
 * channel. QEMU runs under a seccomp sandbox that forbids spawning (so no
 * `exec:` URIs), and 7.2 has no `file:` URI: both directions go through a unix
 * socket that this process serves or connects to.
 *
 * With the `x-ignore-shared` capability, RAM that is a shared file mapping is
 * left out of the stream (the file *is* the memory), so a saved state is only
 * the devices' (~60 KB).
 */

import { createReadStream, createWriteStream } from "node:fs";
import { unlink } from "node:fs/promises";
import { connect, createServer, type Socket } from "node:net";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { QemuError, TimeoutError } from "../errors.js";
import { allowQemuConnect } from "../vmm/confine.js";
import { MIGRATION_IN_SOCKET, RELOAD_COMMAND } from "../vmm/qemu.js";
import type { QmpClient } from "../vmm/qmp.js";

interface MigrateStatus {
  status?: string;
  "error-desc"?: string;
}

async function waitMigration(qmp: QmpClient, what: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 1; ; delay = Math.min(delay * 2, 20)) {
    const st = await qmp.execute<MigrateStatus>("query-migrate");
    if (st.status === "completed") return;
    if (st.status === "failed" || st.status === "cancelled") throw new QemuError(`${what} failed: ${st["error-desc"] ?? st.status}`);
    if (Date.now() > deadline) throw new TimeoutError(`${what} did not finish within ${timeoutMs} ms`, timeoutMs);
    await new Promise((r) => setTimeout(r, delay));
  }
}

export async function setIgnoreShared(qmp: QmpClient, on: boolean): Promise<void> {
  await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: on }] });
}

/**
 * Listens on `sock` for QEMU's one connection (handed to `onConnection`)
 * while `run` asks QEMU to connect; the socket is gone afterwards.
 */
export async function servingQemu<T>(sock: string, onConnection: (s: Socket) => void, run: () => Promise<T>): Promise<T> {
  await unlink(sock).catch(() => undefined);
  const server = createServer((s) => {
    server.close();
    onConnection(s);
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(sock, () => resolve());
  });
  try {
    // QEMU connects as its own (unprivileged) user.
    await allowQemuConnect(sock);
    return await run();
  } finally {
    server.close();
    await unlink(sock).catch(() => undefined);
  }
}

/**
 * Saves the (stopped) VM's migration stream into `file`. With `ignoreShared`
 * the shared-file RAM is left out.
 */
export async function saveState(qmp: QmpClient, dir: string, file: string, o: { ignoreShared: boolean; timeoutMs: number }): Promise<void> {
  await setIgnoreShared(qmp, o.ignoreShared);
  const sock = join(dir, `mig-out-${process.pid}.sock`);
  let received: Promise<void> | undefined;
  await servingQemu(
    sock,
    (s) => (received = pipeline(s, createWriteStream(file))),
    async () => {
      await qmp.execute("migrate", { uri: `unix:${sock}` });
      await waitMigration(qmp, "saving the VM state", o.timeoutMs);
      // QEMU has closed its end; the file is complete once the pipe drains.
      for (let i = 0; !received && i < 100; i++) await new Promise((r) => setTimeout(r, 5));
      if (!received) throw new QemuError("QEMU reported the state saved but never connected");
      await received;
    },
  );
}

/**
 * Feeds `file` to a QEMU started with `incoming` (it listens on
 * `dir`/mig-in.sock from its start) and waits until the state is loaded (the
 * VM then runs).
 */
export async function loadState(qmp: QmpClient, dir: string, file: string, o: { ignoreShared: boolean; timeoutMs: number }): Promise<void> {
  await setIgnoreShared(qmp, o.ignoreShared);
  // No self-announce after the load. QEMU's default (5 rounds over ~0.5 s)
  // has the guest's virtio-net send gratuitous ARP and IPv6 notices so that
  // switches learn where the MAC went; here the link is a host stack of the
  // VM's own that knows the guest's fixed MAC. Under TCG the ~12 frames and
  // the guest's paths that send them cost ~40 ms of CPU per restore
  // (docs/performance.md). @internal SUPERMACHINE_RESTORE_ANNOUNCE=1 keeps
  // QEMU's default (bench/refill.ts compares).
  if (process.env.SUPERMACHINE_RESTORE_ANNOUNCE !== "1") await qmp.execute("migrate-set-parameters", { "announce-rounds": 0 });
  const sock = join(dir, MIGRATION_IN_SOCKET);
  // QEMU closes its end once it has read the stream, possibly before our
  // side has seen every write acknowledged: success is what query-migrate
  // says, not how the socket ends.
  await new Promise<void>((resolve, reject) => {
    const s = connect(sock);
    let connected = false;
    let rs: ReturnType<typeof createReadStream> | undefined;
    s.on("error", (e) => {
      if (!connected) reject(e);
    });
    s.once("connect", () => {
      connected = true;
      rs = createReadStream(file, { highWaterMark: 256 * 1024 });
      rs.on("error", (e) => {
        s.destroy();
        reject(e);
      });
      rs.pipe(s);
    });
    s.once("close", () => {
      // When QEMU closes first, pipe() only unpipes: the file stream would
      // stay open (a descriptor and a buffer per restore; found by the soak).
      rs?.destroy();
      resolve();
    });
  });
  await waitMigration(qmp, "loading the VM state", o.timeoutMs);
  await unlink(sock).catch(() => undefined);
}

/**
 * Loads `file` (a state saved with `x-ignore-shared`) into the stopped,
 * running QEMU of a VM that a previous holder used: QEMU's patched command
 * (qemu/README.md) puts the snapshot's RAM file back under the guest, loads
 * the device state from a socket this serves, and keeps the translations the
 * reload leaves valid. The VM stays stopped; `cont` runs it.
 */
export async function reloadState(qmp: QmpClient, dir: string, file: string, o: { timeoutMs: number }): Promise<void> {
  // The stream was saved with x-ignore-shared, which changes its format: a
  // Vm.snapshot of the previous VM (a full stream) turned it off.
  await setIgnoreShared(qmp, true);
  const sock = join(dir, `reload-${process.pid}.sock`);
  let served: Promise<void> | undefined;
  const serve = (s: Socket) => {
    // QEMU may close its end with bytes unread (a load it gave up): after
    // the pipeline has ended, that reset still needs a listener.
    s.on("error", () => undefined);
    // QEMU closes its end once it has read what it needs.
    served = pipeline(createReadStream(file, { highWaterMark: 256 * 1024 }), s).catch(() => undefined);
  };
  await servingQemu(sock, serve, async () => {
    // QEMU answers once the state is loaded; a QEMU that never does is ended by the caller.
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new TimeoutError(`reloading the VM state did not finish within ${o.timeoutMs} ms`, o.timeoutMs)), o.timeoutMs);
    });
    try {
      await Promise.race([qmp.execute(RELOAD_COMMAND, { path: sock }), late]);
    } finally {
      clearTimeout(timer);
    }
    await served;
  });
}
