/**
 * Which hosts run VMs (and the error the others get), and the platform
 * package lookup: ours is used, anything else of that name is refused with
 * the reason (the name also exists on npm, published by the macOS
 * original's author, with another layout).
 */

import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { SupermachineError, UnsupportedPlatformError } from "../../src/errors.js";
import { formatDoctorReport, type DoctorReport } from "../../src/doctor/index.js";
import { SUPPORTED_HOSTS, assertSupportedHost, unsupportedHostReason } from "../../src/platform/host.js";
import { PLATFORM_ASSETS_FORMAT, mainPackageVersion, platformPackageName, platformPackageStatus } from "../../src/platform/package.js";
import { GUEST_MODULES } from "../../src/guest/modules.js";

describe("supported hosts", () => {
  it("linux-x64 is the one supported host", () => {
    assert.deepEqual(SUPPORTED_HOSTS, ["linux-x64"]);
    assert.equal(unsupportedHostReason("linux", "x64"), undefined);
    assert.doesNotThrow(() => assertSupportedHost("linux", "x64"));
  });

  for (const [platform, arch, re] of [
    ["darwin", "arm64", /does not run on macOS \(darwin-arm64\).*@supermachine\/core \(the macOS original, with its @supermachine\/core-darwin-arm64/],
    ["darwin", "x64", /does not run on macOS \(darwin-x64\)/],
    ["win32", "x64", /does not run on Windows \(win32-x64\).*WSL 2/],
    ["linux", "arm64", /x86-64 only, not on linux-arm64.*microvm/],
    ["freebsd", "x64", /does not run on freebsd-x64/],
  ] as const) {
    it(`${platform}-${arch} gets UnsupportedPlatformError saying what to use`, () => {
      assert.throws(
        () => assertSupportedHost(platform, arch),
        (e: unknown) => {
          assert.ok(e instanceof UnsupportedPlatformError);
          assert.ok(e instanceof SupermachineError);
          assert.equal(e.code, "ERR_SM_UNSUPPORTED_PLATFORM");
          assert.equal(e.platform, `${platform}-${arch}`);
          assert.deepEqual(e.supported, ["linux-x64"]);
          assert.match(e.message, re);
          return true;
        },
      );
    });
  }

  it("the platform package is named in the seed's style, for linux-x64 only", () => {
    assert.equal(platformPackageName("linux", "x64"), "@supermachine/core-linux-x64-gnu");
    assert.equal(platformPackageName("linux", "arm64"), undefined);
    assert.equal(platformPackageName("darwin", "arm64"), undefined);
  });
});

describe("platform package lookup", () => {
  let dir: string;
  const name = "@supermachine/core-linux-x64-gnu";
  let n = 0;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-platform-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  /** A project whose node_modules holds a platform package with this package.json (and its files). */
  async function project(pkg: Record<string, unknown> | undefined, files: readonly string[] = ["agent/supermachine-agent", "kernel/vmlinux", "kernel/modules/order"]): Promise<string> {
    const p = join(dir, `p${n++}`);
    await mkdir(p, { recursive: true });
    await writeFile(join(p, "package.json"), "{}");
    if (pkg) {
      const pd = join(p, "node_modules", "@supermachine", "core-linux-x64-gnu");
      for (const f of files) {
        await mkdir(join(pd, f, ".."), { recursive: true });
        await writeFile(join(pd, f), "x");
      }
      await writeFile(join(pd, "package.json"), JSON.stringify(pkg));
    }
    return p;
  }

  const ours = (over: Record<string, unknown> = {}, kernelOver: Record<string, unknown> = {}): Record<string, unknown> => ({
    name,
    version: mainPackageVersion(),
    supermachine: {
      assetsFormat: PLATFORM_ASSETS_FORMAT,
      agent: "agent/supermachine-agent",
      kernel: { image: "kernel/vmlinux", modules: "kernel/modules", guestModules: GUEST_MODULES.join(","), release: "6.1.0-57-amd64", id: "debian:6.1.192-3+mX", package: "linux-image-6.1.0-57-amd64", version: "6.1.192-3", source: "linux", ...kernelOver },
    },
    ...over,
  });

  it("finds ours, with absolute paths inside the package", async () => {
    const p = await project(ours());
    const s = platformPackageStatus(p);
    assert.equal(s.found, true);
    if (!s.found) return;
    const pd = join(p, "node_modules", "@supermachine", "core-linux-x64-gnu");
    assert.equal(s.assets.agent, join(pd, "agent", "supermachine-agent"));
    assert.equal(s.assets.kernel, join(pd, "kernel", "vmlinux"));
    assert.equal(s.assets.modulesDir, join(pd, "kernel", "modules"));
    assert.equal(s.assets.kernelId, "debian:6.1.192-3+mX");
    assert.equal(s.assets.busybox, undefined);
    assert.match(s.assets.kernelPackage, /linux-image-6\.1\.0-57-amd64 6\.1\.192-3 \(source: linux\)/);
  });

  for (const [what, pkg, files, re] of [
    ["not installed", undefined, [], /is not installed/],
    ["another version", ours({ version: "0.7.103" }), undefined, /version "0\.7\.103", not .*install the same version of both/],
    ["no supermachine section (the name's other publisher)", { name, version: mainPackageVersion(), main: "index.js" }, undefined, /no `supermachine` section/],
    ["another assets format", ours({ supermachine: { assetsFormat: 99 } }), undefined, /assets format is 99/],
    ["a path leaving the package", ours({}, { image: "../../../etc/passwd" }), undefined, /kernel image leaves the package/],
    ["an absolute path", ours({}, { image: "/etc/passwd" }), undefined, /kernel image is not a relative path/],
    ["a missing file", ours(), ["agent/supermachine-agent", "kernel/modules/order"], /kernel image \(kernel\/vmlinux\) is missing/],
    ["another name in its package.json", ours({ name: "evil" }), undefined, /names "evil"/],
    ["kernel modules for another guest", ours({}, { guestModules: "virtio_mmio" }), undefined, /modules are made for "virtio_mmio", this version's guest loads/],
  ] as const) {
    it(`refuses a platform package with ${what}, saying why`, async () => {
      const p = await project(pkg as Record<string, unknown> | undefined, files as readonly string[] | undefined);
      const s = platformPackageStatus(p);
      assert.equal(s.found, false);
      if (s.found) return;
      assert.match(s.reason, re);
    });
  }
});

describe("doctor report text", () => {
  it("prints a fix under each problem and a verdict naming what is missing", () => {
    const r: DoctorReport = {
      ok: false,
      platform: "linux-x64",
      accelerator: { accel: "tcg", reason: "auto: the CPU shows no hardware virtualization (no vmx/svm flag)" },
      checks: [
        { id: "qemu", title: "QEMU", status: "fail", required: true, detail: "qemu-system-x86_64 is not on PATH", fix: "apt-get install -y qemu-system-x86" },
        { id: "accelerator", title: "accelerator", status: "warn", required: false, detail: "TCG emulation (auto: …)", fix: "nothing" },
        { id: "disk", title: "disk space", status: "ok", required: false, detail: "plenty" },
      ],
    };
    const text = formatDoctorReport(r);
    assert.equal(
      text,
      [
        "FAIL  QEMU: qemu-system-x86_64 is not on PATH",
        "      fix: apt-get install -y qemu-system-x86",
        "warn  accelerator: TCG emulation (auto: …)",
        "      fix: nothing",
        "ok    disk space: plenty",
        "doctor: cannot run VMs: QEMU (see the fix lines above)",
      ].join("\n"),
    );
    assert.match(formatDoctorReport({ ...r, ok: true, checks: r.checks.slice(1) }), /\ndoctor: ready \(accelerator: tcg\); 1 warning$/);
  });
});
