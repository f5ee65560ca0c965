/**
 * doctor() on this host (the library function the CLI prints), and as an
 * unprivileged user: /dev/kvm it cannot open and cgroups it cannot make are
 * warnings with a fix, not failures.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { promisify } from "node:util";
import { doctor, type DoctorReport } from "../../src/doctor/index.js";
import { chooseAccelerator } from "../../src/vmm/accel.js";
import { buildPatchedQemu, qemuPatchFiles } from "../../src/vmm/qemu-build.js";
import { builtQemuDir } from "../../src/vmm/qemu.js";
import { REPO_ROOT } from "../helpers.js";

const execFileP = promisify(execFile);
const isRoot = process.getuid?.() === 0;

describe("doctor", () => {
  it("checks every item, in order, and agrees with the accelerator choice", async () => {
    const r = await doctor();
    assert.deepEqual(
      r.checks.map((c) => c.id),
      ["platform", "qemu", "assets", "kvm", "cpu-virtualization", "accelerator", "qemu-reuse", "cgroup", "bubblewrap", "setpriv", "disk", "busybox", "volumes"],
    );
    // Setup built QEMU with the reload command (docs/qemu-reuse.md).
    const reuse = r.checks.find((c) => c.id === "qemu-reuse")!;
    if (r.accelerator?.accel === "tcg") assert.match(reuse.detail, /has x-supermachine-reload/);
    assert.equal(reuse.status, "ok");
    assert.equal(r.ok, true, `this checkout ran setup: ${JSON.stringify(r.checks.filter((c) => c.status === "fail"))}`);
    assert.deepEqual(r.accelerator, chooseAccelerator());
    for (const c of r.checks) {
      assert.ok(c.detail.length > 0, `${c.id} says what it found`);
      if (c.status !== "ok") assert.ok(c.fix && c.fix.length > 0, `${c.id} (${c.status}) says what to do`);
    }
    assert.deepEqual(
      r.checks.filter((c) => c.required).map((c) => c.id),
      ["platform", "qemu", "assets"],
    );
  });

  it("QEMU process reuse: off with SUPERMACHINE_REUSE_QEMU=0; a QEMU without the command is a warning with a fix", async () => {
    process.env.SUPERMACHINE_REUSE_QEMU = "0";
    try {
      const r = await doctor();
      const reuse = r.checks.find((c) => c.id === "qemu-reuse")!;
      if (r.accelerator?.accel === "tcg") assert.match(reuse.detail, /^off/);
    } finally {
      delete process.env.SUPERMACHINE_REUSE_QEMU;
    }
    const saved = process.env.SUPERMACHINE_QEMU;
    process.env.SUPERMACHINE_QEMU = "/usr/bin/qemu-system-x86_64";
    try {
      const r = await doctor();
      const reuse = r.checks.find((c) => c.id === "qemu-reuse")!;
      if (r.accelerator?.accel === "tcg") {
        assert.equal(reuse.status, "warn");
        assert.match(reuse.fix!, /npm run setup/);
      }
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_QEMU;
      else process.env.SUPERMACHINE_QEMU = saved;
    }
  });

  it("a QEMU built before the rep-string patch (reload command, no rep helper) is a warning that says to build again", async () => {
    const dir = await mkdtemp(join(tmpdir(), "sm-doctor-qemu-"));
    const saved = process.env.SUPERMACHINE_QEMU;
    try {
      // A stand-in for an older setup build: runs Debian's QEMU and carries
      // the reload command's name, as such a build's binary does.
      const fake = join(dir, "qemu-system-x86_64");
      await writeFile(fake, "#!/bin/sh\n# x-supermachine-reload\nexec /usr/bin/qemu-system-x86_64 \"$@\"\n", { mode: 0o755 });
      process.env.SUPERMACHINE_QEMU = fake;
      const r = await doctor();
      assert.equal(r.checks.find((c) => c.id === "qemu")!.status, "ok");
      const reuse = r.checks.find((c) => c.id === "qemu-reuse")!;
      if (r.accelerator?.accel === "tcg") {
        assert.equal(reuse.status, "warn");
        assert.match(reuse.detail, /built before qemu\/supermachine-rep-string\.patch/);
        assert.match(reuse.fix!, /setup --qemu/);
      }
      // One with the rep-string helper but not the pretranslation commands.
      await writeFile(fake, "#!/bin/sh\n# x-supermachine-reload rep_movs64\nexec /usr/bin/qemu-system-x86_64 \"$@\"\n", { mode: 0o755 });
      const r2 = await doctor();
      const reuse2 = r2.checks.find((c) => c.id === "qemu-reuse")!;
      if (r2.accelerator?.accel === "tcg") {
        assert.equal(reuse2.status, "warn");
        assert.match(reuse2.detail, /built before qemu\/supermachine-pretranslate\.patch/);
        assert.doesNotMatch(reuse2.detail, /rep-string/);
      }
      // The setup build has them all.
      if (saved === undefined) delete process.env.SUPERMACHINE_QEMU;
      else process.env.SUPERMACHINE_QEMU = saved;
      const ok = (await doctor()).checks.find((c) => c.id === "qemu-reuse")!;
      assert.equal(ok.status, "ok");
      if (r.accelerator?.accel === "tcg") assert.match(ok.detail, /pretranslates a snapshot's known blocks; rep movs\/stos run a page at a time/);
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_QEMU;
      else process.env.SUPERMACHINE_QEMU = saved;
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("a low disk threshold warns and names the variables that move the caches", async () => {
    const r = await doctor({ minFreeMib: Number.MAX_SAFE_INTEGER });
    const disk = r.checks.find((c) => c.id === "disk")!;
    assert.equal(disk.status, "warn");
    assert.match(disk.fix!, /SUPERMACHINE_CACHE_DIR/);
    assert.equal(r.ok, true, "disk space is advisory");
  });

  it("as an unprivileged user: /dev/kvm and cgroups are warnings with a fix", async () => {
    const home = await mkdtemp(join(tmpdir(), "sm-doctor-"));
    try {
      const prefix = isRoot ? ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] : [];
      const argv = [...prefix, process.execPath, join(REPO_ROOT, "bin", "supermachine.js"), "doctor", "--json"];
      const { stdout } = await execFileP(argv[0]!, argv.slice(1), { env: { PATH: process.env.PATH, HOME: home }, timeout: 120_000 }).catch((e: { stdout: string }) => e);
      const r = JSON.parse(stdout) as DoctorReport;
      const kvm = r.checks.find((c) => c.id === "kvm")!;
      if (!existsSync("/dev/kvm")) {
        assert.equal(kvm.status, "warn");
        assert.match(kvm.detail, /does not exist/);
      } else if ((statSync("/dev/kvm").mode & 0o006) !== 0o006) {
        assert.equal(kvm.status, "warn");
        assert.match(kvm.detail, /cannot open it read-write/);
        assert.match(kvm.fix!, /usermod -aG \S+ nobody|usermod -aG \S+ \S+/);
        assert.doesNotMatch(kvm.fix!, /join the root group/);
      }
      const cg = r.checks.find((c) => c.id === "cgroup")!;
      assert.equal(cg.status, "warn");
      assert.equal(cg.required, false);
      assert.match(cg.fix!, /SUPERMACHINE_CGROUP/);
    } finally {
      await rm(home, { recursive: true, force: true });
    }
  });

  it("setup --qemu: the build setup made is found as present (same patch and version); --dry-run says what it would build and where", async () => {
    for (const f of qemuPatchFiles()) assert.ok(existsSync(f), `${f} ships at the package root`);
    const logs: string[] = [];
    const r = await buildPatchedQemu({ dest: builtQemuDir(), log: (s) => logs.push(s) });
    assert.equal(r.status, "present");
    assert.equal(r.status === "present" && r.binary, join(builtQemuDir(), "bin", "qemu-system-x86_64"));
    // A directory with no build: the CLI only says what it would do.
    const home = await mkdtemp(join(tmpdir(), "sm-setup-qemu-"));
    try {
      const argv = [join(REPO_ROOT, "bin", "supermachine.js"), "setup", "--qemu", "--dry-run", "--json"];
      const { stderr } = await execFileP(process.execPath, argv, { env: { ...process.env, HOME: home, SUPERMACHINE_CACHE_DIR: join(home, "cache") }, timeout: 120_000 }).catch((e: { stderr: string }) => e);
      assert.match(stderr, /would build QEMU \S+ with qemu\/supermachine-reload\.patch and qemu\/supermachine-rep-string\.patch and qemu\/supermachine-pretranslate\.patch into (\/usr\/local\/lib\/supermachine\/qemu|\S+\/cache\/qemu)/);
    } finally {
      await rm(home, { recursive: true, force: true });
    }
  });
});
