/**
 * VM lifecycle on real VMs: graceful close vs destroy, idempotence, typed
 * errors after close or death, cleanup of QEMU and sockets, the agent
 * surviving a host reconnect, and QEMU not outliving a killed Node process.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { connect } from "node:net";
import { join } from "node:path";
import { describe, it } from "node:test";
import { AgentConnection } from "../../src/agent-client/connection.js";
import { ClosedError, GuestDiedError, MissingAssetError } from "../../src/errors.js";
import { bootAssets, kernelCmdline } from "../../src/guest/assets.js";
import { directoryImage } from "../../src/rootfs/cache.js";
import { defaultCacheDir } from "../../src/paths.js";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { QemuProcess } from "../../src/vmm/qemu.js";
import { createRuntimeDir, removeRuntimeDir } from "../../src/vm/runtime-dir.js";
import { Vm } from "../../src/vm/vm.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, bootDefault, defaultRootfs, killQemuUnderExec, processAlive, waitFor } from "../helpers.js";

describe("VM lifecycle", { timeout: VM_TEST_TIMEOUT }, () => {
  it("shows the accelerator it chose, and close() waits for work in flight", async () => {
    const vm = await bootDefault();
    try {
      assert.equal(vm.accelerator, chooseAccelerator().accel);
      assert.ok(vm.acceleratorReason.length > 0);
      const pid = vm.pid!;
      const dir = vm.runtimeDir;
      assert.ok(processAlive(pid));
      const work = vm.exec({ argv: ["sh", "-c", "sleep 1; echo done"] });
      await new Promise((r) => setTimeout(r, 100));
      const closing = vm.close();
      await assert.rejects(vm.exec({ argv: ["true"] }), ClosedError, "new work is refused while closing");
      const r = await work;
      assert.equal(r.stdout.toString(), "done\n", "the exec in flight completed");
      await closing;
      await vm.close();
      await vm.destroy();
      assert.equal(vm.status, "closed");
      assert.equal(processAlive(pid), false, "QEMU is gone");
      assert.equal(existsSync(dir), false, "sockets and runtime dir are gone");
      await assert.rejects(vm.exec({ argv: ["true"] }), ClosedError);
      await assert.rejects(vm.readFile("/etc/hostname"), ClosedError);
    } finally {
      await vm.destroy();
    }
  });

  it("destroy() fails work in flight at once and is idempotent", async () => {
    const vm = await bootDefault();
    const pid = vm.pid!;
    const work = vm.exec({ argv: ["sleep", "100"] }).then(
      () => undefined,
      (e: unknown) => e,
    );
    await new Promise((r) => setTimeout(r, 200));
    await Promise.all([vm.destroy(), vm.destroy()]);
    assert.ok((await work) instanceof ClosedError);
    assert.equal(processAlive(pid), false);
    await vm.release();
  });

  it("a guest that dies turns pending and later calls into GuestDiedError", async () => {
    const vm = await bootDefault();
    try {
      await killQemuUnderExec(vm);
      assert.equal(vm.status, "dead");
    } finally {
      await vm.destroy();
    }
  });

  it("a guest kernel panic (sysrq crash) ends QEMU instead of hanging", async () => {
    const vm = await bootDefault();
    try {
      const pending = await vm.exec({ argv: ["sh", "-c", "echo c > /proc/sysrq-trigger"] }).then(
        () => undefined,
        (e: unknown) => e,
      );
      assert.ok(pending instanceof GuestDiedError, String(pending));
      await waitFor(() => !processAlive(vm.qemu.pid!), 120_000, "QEMU to exit after the panic");
    } finally {
      await vm.destroy();
    }
  });

  it("a broken root filesystem image fails the boot clearly and leaves nothing behind", async () => {
    const dir = mkdtempSync(join(tmpdir(), "sm-bad-"));
    try {
      const bad = join(dir, "bad.erofs");
      writeFileSync(bad, Buffer.alloc(64 * 1024, 0x5a));
      await assert.rejects(Vm.boot({ rootfsImage: bad }), (e: unknown) => {
        assert.ok(e instanceof GuestDiedError, String(e));
        assert.match(e.message, /root filesystem/);
        return true;
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("a missing kernel is a MissingAssetError naming the fix, before anything starts", async () => {
    await assert.rejects(Vm.boot({ rootfs: await defaultRootfs(), kernel: "/nonexistent/vmlinux" }), (e: unknown) => {
      assert.ok(e instanceof MissingAssetError);
      assert.match(e.message, /does not exist/);
      return true;
    });
  });

  it("the agent survives the host disconnecting and reconnecting", async () => {
    const cacheDir = defaultCacheDir();
    const assets = await bootAssets({ cacheDir });
    const rootfs = await directoryImage(await defaultRootfs(), cacheDir);
    const accel = chooseAccelerator().accel;
    const dir = createRuntimeDir();
    const qemu = await QemuProcess.start({
      accel,
      memoryMib: 256,
      vcpus: 1,
      kernel: assets.kernel,
      initrd: assets.initrd,
      cmdline: kernelCmdline({ accel, hasRootfs: true }),
      rootfs,
      dir,
      name: "sm-reconnect",
    });
    try {
      for (let round = 0; round < 3; round++) {
        if (round === 2) {
          // A host that dies in the middle of a frame: the next host's HELLO
          // must still be found.
          const raw = connect(qemu.agentSocket);
          await new Promise((r) => raw.once("connect", r));
          raw.write(Buffer.from([200, 0, 0, 0, 0x10, 0, 0, 0, 9, 0, 0, 0, 1, 4, 0, 0]));
          await new Promise((r) => setTimeout(r, 300));
          raw.destroy();
          await new Promise((r) => setTimeout(r, 200));
        }
        const conn = await AgentConnection.connect(qemu.agentSocket, { timeoutMs: 120_000, gone: qemu.exitSignal });
        const s = conn.exec({ argv: [Buffer.from("echo"), Buffer.from(`round ${round}`)] });
        let out = "";
        s.onData = (ch, chunk) => {
          out += chunk.toString();
          s.ack(ch, chunk.length);
        };
        assert.equal((await s.exit).exitCode, 0);
        assert.equal(out, `round ${round}\n`);
        // Leave a process running across the disconnect.
        conn.exec({ argv: [Buffer.from("sleep"), Buffer.from("30")] });
        conn.destroy(new Error("host goes away"));
        await new Promise((r) => setTimeout(r, 200));
      }
    } finally {
      await qemu.stop();
      await removeRuntimeDir(dir);
    }
  });

  it("QEMU does not outlive a Node process that is SIGKILLed", async () => {
    const script = join(mkdtempSync(join(tmpdir(), "sm-orphan-")), "boot.mjs");
    writeFileSync(
      script,
      `import { Vm } from ${JSON.stringify(join(REPO_ROOT, "dist", "src", "index.js"))};
       const vm = await Vm.boot({ rootfs: ${JSON.stringify(await defaultRootfs())} });
       console.log("QEMU " + vm.pid);
       setInterval(() => {}, 1000);`,
    );
    const child = spawn(process.execPath, [script], { stdio: ["ignore", "pipe", "inherit"] });
    const pid = await new Promise<number>((resolve, reject) => {
      let buf = "";
      child.stdout.on("data", (b: Buffer) => {
        buf += b.toString();
        const m = /QEMU (\d+)/.exec(buf);
        if (m) resolve(Number(m[1]));
      });
      child.once("exit", () => reject(new Error(`the child exited before booting: ${buf}`)));
    });
    assert.ok(processAlive(pid));
    child.kill("SIGKILL");
    await waitFor(() => !processAlive(pid), 30_000, `QEMU ${pid} to die with its parent`);
    rmSync(join(script, ".."), { recursive: true, force: true });
  });
});

// Regression: under host load, a TCG guest's TSC calibration against the
// emulated PIT failed and the boot hung with an empty console (every boot of
// 12, with two CPU burners on two cores). The host now passes the TSC
// frequency (tsc_early_khz).
describe("boot under host load", { timeout: VM_TEST_TIMEOUT }, () => {
  it("boots three VMs at once while both cores are busy", async () => {
    const burners = [0, 1].map(() => spawn(process.execPath, ["-e", "for(;;){}"], { stdio: "ignore" }));
    try {
      const vms = await Promise.all([0, 1, 2].map(() => bootDefault({ bootTimeoutMs: 180_000 })));
      try {
        for (const vm of vms) assert.equal((await vm.exec({ argv: ["echo", "up"] })).stdout.toString(), "up\n");
      } finally {
        await Promise.all(vms.map((v) => v.destroy()));
      }
    } finally {
      for (const b of burners) b.kill("SIGKILL");
    }
  });
});
