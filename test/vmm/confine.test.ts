/**
 * QEMU's confinement (vmm/confine.ts, docs/confinement.md) on real VMs: an
 * unprivileged user when Node is root, an empty environment, private
 * namespaces holding only the VM's files, its own cgroup with limits, a
 * raised oom_score_adj, read-only snapshot files that stay 0600, and no QEMU
 * left once Node is SIGKILLed.
 */

import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync, readlinkSync, statSync } from "node:fs";
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { before, describe, it } from "node:test";
import { ConfinementError } from "../../src/errors.js";
import { Image } from "../../src/image/image.js";
import { QEMU_MEMORY_OVERHEAD_MIB, QEMU_OOM_SCORE_ADJ, QEMU_PIDS_BASE, VmCgroup, confinement, decodeExit, qemuUser, type ConfinementReport } from "../../src/vmm/confine.js";
import { findQemu, qemuArgs, type QemuLaunch } from "../../src/vmm/qemu.js";
import { namespaceFilter } from "../../src/vmm/seccomp.js";
import type { Vm } from "../../src/vm/vm.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, bootDefault, defaultRootfs, pidsMatching, processAlive, waitFor } from "../helpers.js";

const isRoot = process.getuid?.() === 0;

const base: QemuLaunch = {
  accel: "tcg",
  memoryMib: 256,
  vcpus: 1,
  kernel: "/k/vmlinux",
  cmdline: "console=ttyS0",
  dir: "/run/x",
  name: "sm-test",
};

function statusField(pid: number, field: string): string[] {
  const line = readFileSync(`/proc/${pid}/status`, "utf8")
    .split("\n")
    .find((l) => l.startsWith(`${field}:`));
  assert.ok(line, `/proc/${pid}/status has ${field}`);
  return line.slice(field.length + 1).trim().split(/\s+/);
}

/** The cgroup directories of `pid` for the hierarchies that carry memory, pids and cpu limits. */
function cgroupDirs(pid: number, report: ConfinementReport): Record<"memory" | "pids" | "cpu", string> {
  const lines = readFileSync(`/proc/${pid}/cgroup`, "utf8").trim().split("\n");
  const mounts = readFileSync("/proc/self/mountinfo", "utf8").trim().split("\n");
  const mountOf = (ctrl: string): string => {
    for (const m of mounts) {
      const [l, r] = m.split(" - ");
      const f = r!.split(" ");
      if (report.cgroup.version === 2 ? f[0] === "cgroup2" : f[0] === "cgroup" && f[2]!.split(",").includes(ctrl)) return l!.split(" ")[4]!;
    }
    throw new Error(`no mount for ${ctrl}`);
  };
  const pathOf = (ctrl: string): string => {
    for (const l of lines) {
      const [, ctrls, path] = /^\d+:([^:]*):(.*)$/.exec(l)!;
      if (report.cgroup.version === 2 ? ctrls === "" : ctrls!.split(",").includes(ctrl)) return path!;
    }
    throw new Error(`QEMU is in no ${ctrl} cgroup: ${lines.join(" | ")}`);
  };
  const dir = (c: string) => join(mountOf(c), pathOf(c));
  return { memory: dir("memory"), pids: dir("pids"), cpu: dir("cpu") };
}

/** Checks everything the confinement promises about a running VM's QEMU. */
function checkConfined(vm: Vm, report: ConfinementReport, what: string): Record<"memory" | "pids" | "cpu", string> | undefined {
  const pid = vm.pid;
  assert.ok(pid && processAlive(pid), `${what}: QEMU runs`);
  assert.match(readlinkSync(`/proc/${pid}/exe`), /qemu-system/, `${what}: vm.pid is QEMU itself, not its wrapper`);
  // The user.
  const uid = statusField(pid, "Uid");
  if (isRoot) {
    assert.ok(report.user.active, `${what}: Node is root, so QEMU must drop to another user (${report.user.detail})`);
    assert.deepEqual(uid, [String(report.user.uid), String(report.user.uid), String(report.user.uid), String(report.user.uid)], `${what}: real/effective/saved/fs uid`);
    assert.notEqual(uid[1], "0", `${what}: effective uid is not 0`);
    assert.notEqual(statusField(pid, "Gid")[1], "0", `${what}: effective gid is not 0`);
    assert.equal(statusField(pid, "CapEff")[0], "0000000000000000", `${what}: no effective capabilities`);
    assert.equal(statusField(pid, "CapPrm")[0], "0000000000000000", `${what}: no permitted capabilities`);
  } else {
    assert.equal(uid[1], String(process.getuid!()), `${what}: QEMU runs as Node's user`);
  }
  // The runtime directory: QEMU may enter it, never add, remove or swap an entry.
  const rt = statSync(vm.runtimeDir);
  assert.equal(rt.uid, process.getuid!(), `${what}: the runtime dir stays Node's`);
  if (isRoot) {
    assert.equal(rt.mode & 0o777, 0o750, `${what}: runtime dir mode`);
    assert.equal(rt.gid, report.user.gid, `${what}: runtime dir group is QEMU's`);
  } else assert.equal(rt.mode & 0o777, 0o700, `${what}: runtime dir mode`);
  // The environment: nothing of Node's (bubblewrap sets PWD=/ at most).
  const env = readFileSync(`/proc/${pid}/environ`, "latin1").split("\0").filter(Boolean);
  assert.ok(env.every((kv) => kv === "PWD=/"), `${what}: QEMU's environment is ${JSON.stringify(env)}`);
  // oom_score_adj.
  assert.equal(readFileSync(`/proc/${pid}/oom_score_adj`, "utf8").trim(), String(QEMU_OOM_SCORE_ADJ), `${what}: oom_score_adj`);
  assert.equal(readFileSync(`/proc/self/oom_score_adj`, "utf8").trim(), "0", `${what}: Node's own oom_score_adj is untouched`);
  // Namespaces: QEMU's root holds only the system part and this VM's files.
  if (report.namespaces.active) {
    for (const ns of ["mnt", "pid", "net", "ipc", "uts"]) {
      assert.notEqual(readlinkSync(`/proc/${pid}/ns/${ns}`), readlinkSync(`/proc/self/ns/${ns}`), `${what}: own ${ns} namespace`);
    }
    assert.ok(Number(statusField(pid, "Seccomp_filters")[0]) >= 2, `${what}: QEMU's own seccomp filter and the no-namespaces one`);
    if (isRoot) {
      const top = readdirSync(`/proc/${pid}/root`).sort();
      for (const name of top) assert.ok(["bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "sbin", "tmp", "usr", "run", "var", "home"].includes(name), `${what}: unexpected /${name} in QEMU's root`);
      assert.ok(!existsSync(`/proc/${pid}/root/etc/passwd`), `${what}: no /etc/passwd in QEMU's root`);
      assert.ok(!existsSync(`/proc/${pid}/root/etc/shadow`), `${what}: no /etc/shadow in QEMU's root`);
      assert.ok(existsSync(`/proc/${pid}/root${vm.runtimeDir}/agent.sock`), `${what}: its runtime dir is there, at its host path`);
      const others = readdirSync(join(vm.runtimeDir, "..")).filter((n) => join(vm.runtimeDir, "..", n) !== vm.runtimeDir);
      for (const o of others) assert.ok(!existsSync(`/proc/${pid}/root${join(vm.runtimeDir, "..", o)}`), `${what}: another VM's runtime dir ${o} is not visible`);
      assert.ok(!existsSync(`/proc/${pid}/root/dev/kvm`) || vm.accelerator === "kvm", `${what}: /dev/kvm only for KVM VMs`);
    }
  } else {
    assert.ok(report.namespaces.detail.length > 0);
  }
  // cgroup limits.
  if (!report.cgroup.active) {
    assert.match(report.cgroup.detail, /off/, `${what}: cgroups are off and the report says why`);
    return undefined;
  }
  const dirs = cgroupDirs(pid, report);
  const memBytes = (vm.memoryMib + QEMU_MEMORY_OVERHEAD_MIB) * 1024 * 1024;
  const pidsMax = QEMU_PIDS_BASE + vm.vcpus;
  for (const d of Object.values(dirs)) assert.match(d, /\/sm-\d+-/, `${what}: QEMU is in its own VM cgroup (${d})`);
  if (report.cgroup.version === 2) {
    assert.equal(readFileSync(join(dirs.memory, "memory.max"), "utf8").trim(), String(memBytes));
    assert.equal(readFileSync(join(dirs.pids, "pids.max"), "utf8").trim(), String(pidsMax));
    assert.equal(readFileSync(join(dirs.cpu, "cpu.weight"), "utf8").trim(), "100");
  } else {
    assert.equal(readFileSync(join(dirs.memory, "memory.soft_limit_in_bytes"), "utf8").trim(), String(memBytes));
    assert.equal(readFileSync(join(dirs.pids, "pids.max"), "utf8").trim(), String(pidsMax));
    assert.equal(readFileSync(join(dirs.cpu, "cpu.shares"), "utf8").trim(), "1024");
  }
  // The limits hold QEMU's whole process tree (its threads, bubblewrap's init).
  const procs = readFileSync(join(dirs.memory, "cgroup.procs"), "utf8").trim().split("\n").map(Number);
  assert.ok(procs.includes(pid), `${what}: QEMU is in its memory cgroup's procs`);
  return dirs;
}

describe("QEMU command line under confinement", () => {
  it("-runas drops to the QEMU user, seccomp allows exactly that; otherwise set*uid stays denied", () => {
    const a = qemuArgs({ ...base, runAs: { uid: 1234, gid: 5678 } });
    assert.equal(a[a.indexOf("-runas") + 1], "1234:5678");
    assert.match(a[a.indexOf("-sandbox") + 1]!, /elevateprivileges=allow/);
    const w = qemuArgs({ ...base, runAs: { uid: 1234, gid: 5678, runWith: true } });
    assert.equal(w[w.indexOf("-run-with") + 1], "user=1234:5678", "QEMU ≥ 9.1 spelling");
    assert.ok(!w.includes("-runas"));
    const b = qemuArgs(base);
    assert.ok(!b.includes("-runas") && !b.includes("-run-with"));
    assert.match(b[b.indexOf("-sandbox") + 1]!, /elevateprivileges=deny/);
  });

  it("a snapshot's RAM opens read-only where QEMU can (rom=off keeps the private mapping writable)", () => {
    const a = qemuArgs({ ...base, memoryFile: { path: "/s/ram", share: false, readOnly: true } });
    assert.ok(a.includes("memory-backend-file,id=ram,size=256M,mem-path=/s/ram,share=off,readonly=on,rom=off"));
    const shared = qemuArgs({ ...base, memoryFile: { path: "/s/ram", share: true, readOnly: true } });
    assert.ok(shared.includes("memory-backend-file,id=ram,size=256M,mem-path=/s/ram,share=on"), "a shared (bake) RAM file is never read-only");
  });

  it("bubblewrap's 128+N exit code of a QEMU killed by signal N reads as that signal", () => {
    assert.deepEqual(decodeExit(137, null, true), { code: null, signal: "SIGKILL" });
    assert.deepEqual(decodeExit(1, null, true), { code: 1, signal: null });
    assert.deepEqual(decodeExit(137, null, false), { code: 137, signal: null });
    assert.deepEqual(decodeExit(null, "SIGTERM", true), { code: null, signal: "SIGTERM" });
  });

  it("SUPERMACHINE_QEMU_USER: UID:GID or a passwd name; root and unknown users are refused with a typed error", () => {
    assert.deepEqual(qemuUser({ SUPERMACHINE_QEMU_USER: "4000:4001" }), { uid: 4000, gid: 4001, name: "4000:4001" });
    assert.equal(qemuUser({ SUPERMACHINE_QEMU_USER: "nobody" }).uid, 65534);
    assert.throws(() => qemuUser({ SUPERMACHINE_QEMU_USER: "0:0" }), (e: unknown) => e instanceof ConfinementError && /unprivileged/.test(e.message));
    assert.throws(() => qemuUser({ SUPERMACHINE_QEMU_USER: "root" }), ConfinementError);
    assert.throws(() => qemuUser({ SUPERMACHINE_QEMU_USER: "no-such-user-here" }), (e: unknown) => e instanceof ConfinementError && /SUPERMACHINE_QEMU_USER/.test(e.message));
    const d = qemuUser({});
    assert.ok(d.uid !== 0 && d.gid !== 0);
  });
});

describe("the no-namespaces seccomp filter", () => {
  it("under bubblewrap with the filter, unshare of a user or network namespace fails and plain work runs", () => {
    assert.ok(existsSync("/usr/bin/bwrap"), "bubblewrap is installed (npm run setup)");
    const filter = namespaceFilter();
    assert.ok(filter, `a filter exists for ${process.arch}`);
    const run = (argv: string[], withFilter: boolean) =>
      spawnSync("/usr/bin/bwrap", ["--unshare-pid", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "--dev", "/dev", "--proc", "/proc", ...(withFilter ? ["--seccomp", "0"] : []), "--", ...argv], {
        stdio: [withFilter ? "pipe" : "ignore", "pipe", "pipe"],
        ...(withFilter ? { input: filter } : {}),
        encoding: "utf8",
      });
    const plain = run(["/usr/bin/sh", "-c", "echo ok; grep Seccomp_filters /proc/self/status"], true);
    assert.equal(plain.status, 0, plain.stderr);
    assert.match(plain.stdout, /^ok\nSeccomp_filters:\s+1$/m);
    const control = run(["/usr/bin/unshare", "--user", "/usr/bin/true"], false);
    assert.equal(control.status, 0, `without the filter this host lets unshare --user run: ${control.stderr}`);
    for (const ns of ["--user", "--net", "--mount"]) {
      const r = run(["/usr/bin/unshare", ns, "/usr/bin/true"], true);
      assert.notEqual(r.status, 0, `unshare ${ns} must fail`);
      assert.match(r.stderr, /Operation not permitted/, `unshare ${ns}: ${r.stderr}`);
    }
  });
});

describe("VM cgroups", () => {
  // A plain directory stands in for cgroupfs: this checks what is written
  // where; the real VM tests below check it on the host's cgroups.
  it("cgroup v2: memory.max = guest RAM + overhead, pids.max, cpu.weight, in a leaf named after this process", async () => {
    const root = await mkdtemp(join(tmpdir(), "sm-cgv2-"));
    try {
      const cg = await VmCgroup.create({ version: 2, bases: [{ controller: "all", dir: root }] }, "sm-abc", 512, 2);
      assert.equal(cg.dirs.length, 1);
      const d = cg.dirs[0]!;
      assert.match(d, new RegExp(`/sm-${process.pid}-sm-abc-[0-9a-f]{6}$`));
      assert.equal(await readFile(join(d, "memory.max"), "utf8"), String((512 + QEMU_MEMORY_OVERHEAD_MIB) * 1024 * 1024));
      assert.equal(await readFile(join(d, "pids.max"), "utf8"), String(QEMU_PIDS_BASE + 2));
      assert.equal(await readFile(join(d, "cpu.weight"), "utf8"), "100");
      assert.deepEqual(cg.procsFiles, [join(d, "cgroup.procs")]);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it("cgroup v1: one leaf per hierarchy with its own limit file", async () => {
    const root = await mkdtemp(join(tmpdir(), "sm-cgv1-"));
    try {
      const bases = (["memory", "pids", "cpu"] as const).map((c) => ({ controller: c, dir: join(root, c) }));
      for (const b of bases) await mkdir(b.dir);
      const cg = await VmCgroup.create({ version: 1, bases }, "sm-abc", 256, 1);
      const [m, p, c] = cg.dirs;
      assert.equal(await readFile(join(m!, "memory.soft_limit_in_bytes"), "utf8"), String((256 + QEMU_MEMORY_OVERHEAD_MIB) * 1024 * 1024));
      assert.equal(await readFile(join(p!, "pids.max"), "utf8"), String(QEMU_PIDS_BASE + 1));
      assert.equal(await readFile(join(c!, "cpu.shares"), "utf8"), "1024");
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it("a cgroup that cannot be made is a ConfinementError naming SUPERMACHINE_CGROUP", async () => {
    const root = await mkdtemp(join(tmpdir(), "sm-cgbad-"));
    try {
      const bases = [
        { controller: "memory" as const, dir: join(root, "memory") },
        { controller: "pids" as const, dir: join(root, "missing", "pids") },
      ];
      await mkdir(bases[0]!.dir);
      await assert.rejects(VmCgroup.create({ version: 1, bases }, "sm-x", 256, 1), (e: unknown) => e instanceof ConfinementError && /SUPERMACHINE_CGROUP/.test(e.message));
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});

describe("supermachine info", () => {
  it("--json has a confinement section that matches confinement()", async () => {
    const out = JSON.parse(execFileSync(process.execPath, [join(REPO_ROOT, "bin", "supermachine.js"), "info", "--json"], { encoding: "utf8" })) as { confinement: ConfinementReport };
    const report = await confinement(findQemu());
    assert.deepEqual(out.confinement, JSON.parse(JSON.stringify(report)));
    const text = execFileSync(process.execPath, [join(REPO_ROOT, "bin", "supermachine.js"), "info"], { encoding: "utf8" });
    assert.match(text, /^confinement:$/m);
    assert.match(text, new RegExp(`^  unprivileged user +${report.user.active ? "on " : "off"}`, "m"));
    assert.match(text, new RegExp(`^  cgroup limits +${report.cgroup.active ? "on " : "off"}`, "m"));
  });
});

describe("QEMU confinement on real VMs", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let report: ConfinementReport;

  before(async () => {
    report = await confinement(findQemu());
  });

  it("a booted VM's QEMU: unprivileged user, empty environment, private namespaces, own cgroup with limits, oom_score_adj; the cgroup goes with it", async () => {
    if (isRoot) assert.ok(report.namespaces.active, `bubblewrap must be usable here (npm run setup installs it): ${report.namespaces.detail}`);
    const marker = "SM_CONFINE_TEST_MARKER";
    process.env[marker] = "must-not-reach-qemu";
    let vm: Vm | undefined;
    let dirs: ReturnType<typeof checkConfined>;
    try {
      vm = await bootDefault();
      dirs = checkConfined(vm, report, "boot");
      assert.equal((await vm.exec({ argv: ["echo", "confined"] })).stdout.toString(), "confined\n");
    } finally {
      delete process.env[marker];
      await vm?.destroy();
    }
    for (const d of Object.values(dirs ?? {})) assert.ok(!existsSync(d), `the VM's cgroup ${d} is removed with it`);
  });

  it("restores from a 0700/0600 snapshot directory: its files stay as they are, the restored QEMU is confined too", async () => {
    const snapshotsDir = await mkdtemp(join(tmpdir(), "sm-confine-"));
    let image: Image | undefined;
    let vm: Vm | undefined;
    try {
      image = await Image.build({ ref: `dir:${await defaultRootfs()}`, snapshotsDir, warmupTag: `confine-${process.pid}` });
      await image.close();
      const snap = image.snapshotPath;
      await chmod(snap, 0o700);
      const before: Record<string, { mode: number; uid: number; mtimeMs: number; size: number }> = {};
      for (const name of await readdir(snap)) {
        if (!(await stat(join(snap, name))).isFile()) continue;
        await chmod(join(snap, name), 0o600);
        const st = await stat(join(snap, name));
        before[name] = { mode: st.mode, uid: st.uid, mtimeMs: st.mtimeMs, size: st.size };
      }
      vm = await image.restore();
      checkConfined(vm, report, "restore");
      await vm.exec({ argv: ["sh", "-c", "echo scribble > /tmp/x; dd if=/dev/zero of=/tmp/big bs=1M count=8 2>/dev/null; sync"] });
      await vm.destroy();
      vm = undefined;
      for (const [name, b] of Object.entries(before)) {
        const st = await stat(join(snap, name));
        assert.deepEqual({ mode: st.mode, uid: st.uid, mtimeMs: st.mtimeMs, size: st.size }, b, `${name} is unchanged by a restore`);
      }
      assert.equal((await stat(snap)).mode & 0o777, 0o700);
    } finally {
      await vm?.destroy();
      await image?.close();
      await rm(snapshotsDir, { recursive: true, force: true });
    }
  });

  it("a bad SUPERMACHINE_QEMU_USER fails the boot with ConfinementError and leaves no runtime dir or QEMU", async () => {
    const runtime = await mkdtemp(join(tmpdir(), "sm-baduser-"));
    try {
      const helpers = pathToFileURL(join(REPO_ROOT, "dist", "test", "helpers.js")).href;
      const code = `import { bootDefault } from ${JSON.stringify(helpers)};
try { const vm = await bootDefault(); await vm.destroy(); console.log("booted"); }
catch (e) { console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message })); }`;
      const out = execFileSync(process.execPath, ["--input-type=module", "-e", code], {
        env: { ...process.env, SUPERMACHINE_QEMU_USER: "0:0", SUPERMACHINE_RUNTIME_DIR: runtime },
        encoding: "utf8",
      }).trim();
      if (!isRoot) {
        assert.equal(out, "booted", "a Node that is not root runs QEMU as itself and ignores SUPERMACHINE_QEMU_USER");
        return;
      }
      const r = JSON.parse(out.split("\n").pop()!) as { name: string; code: string; message: string };
      assert.equal(r.code, "ERR_SM_CONFINEMENT", out);
      assert.match(r.message, /SUPERMACHINE_QEMU_USER/);
      const rtParent = join(runtime, `supermachine-${process.getuid!()}`);
      assert.deepEqual(existsSync(rtParent) ? readdirSync(rtParent) : [], [], "no VM runtime dir is left");
      assert.deepEqual(pidsMatching(new RegExp(runtime.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"))), [], "no QEMU was started");
    } finally {
      await rm(runtime, { recursive: true, force: true });
    }
  });

  it("Node killed with SIGKILL while 4 VMs run: no QEMU process remains 2 s later", async () => {
    const runtime = await mkdtemp(join(tmpdir(), "sm-kill9-"));
    const script = join(runtime, "boot4.mjs");
    const helpers = pathToFileURL(join(REPO_ROOT, "dist", "test", "helpers.js")).href;
    await writeFile(
      script,
      `import { bootDefault } from ${JSON.stringify(helpers)};
const vms = await Promise.all([0, 1, 2, 3].map(() => bootDefault()));
await Promise.all(vms.map((vm) => vm.exec({ argv: ["true"] })));
process.stdout.write(JSON.stringify(vms.map((vm) => vm.pid)) + "\\n");
setInterval(() => {}, 1000);
`,
    );
    const child = spawn(process.execPath, [script], { env: { ...process.env, SUPERMACHINE_RUNTIME_DIR: runtime }, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr.on("data", (b: Buffer) => (err = (err + b.toString()).slice(-4000)));
    const exited = new Promise((r) => child.once("exit", r));
    try {
      await waitFor(() => out.includes("\n") || child.exitCode !== null, VM_TEST_TIMEOUT, "the child to boot 4 VMs");
      const pids = JSON.parse(out.trim()) as number[];
      assert.equal(pids.length, 4, `child output ${out} / ${err}`);
      const mine = () => pidsMatching(new RegExp(runtime.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")));
      assert.ok(pids.every((p) => processAlive(p)), "the 4 QEMUs run");
      assert.ok(mine().length >= 4, "the QEMUs (and their wrappers) name the child's runtime dir");
      child.kill("SIGKILL");
      await exited;
      await new Promise((r) => setTimeout(r, 2000));
      assert.deepEqual(pids.filter((p) => processAlive(p)), [], "no QEMU of the killed Node runs 2 s later");
      assert.deepEqual(mine(), [], "no process of the killed Node's VMs (QEMU, bubblewrap) runs 2 s later");
      // The killed Node could not remove its VMs' cgroups; the next process does.
      if (report.cgroup.active) {
        const base = report.cgroup.base!;
        const left = () => readdirSync(base).filter((n) => n.startsWith(`sm-${child.pid}-`));
        // 4 are left, unless another test process running at the same time
        // already swept them (the sweep removes cgroups of dead processes).
        assert.ok(left().length <= 4, `more cgroups than VMs in ${base}: ${left().join(" ")}`);
        const confineJs = pathToFileURL(join(REPO_ROOT, "dist", "src", "vmm", "confine.js")).href;
        execFileSync(process.execPath, ["--input-type=module", "-e", `await (await import(${JSON.stringify(confineJs)})).confinement()`]);
        assert.deepEqual(left(), [], "the next process's first confinement() removed them");
      }
    } finally {
      child.kill("SIGKILL");
      for (const p of pidsMatching(new RegExp(runtime.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")))) {
        try {
          process.kill(p, "SIGKILL");
        } catch {
          /* gone */
        }
      }
      await rm(runtime, { recursive: true, force: true });
    }
  });
});
