/**
 * The `mounts` option: every mistake is refused at the call, with the
 * option named, before anything boots (no VM here: a refused call must not
 * start QEMU at all).
 */

import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { MountError } from "../../src/errors.js";
import { Image } from "../../src/image/image.js";
import { checkHostPaths, validateMounts } from "../../src/mounts/attach.js";
import { Vm } from "../../src/vm/vm.js";
import { qemuStartCount } from "../../src/vmm/qemu.js";

describe("mounts option validation", () => {
  let dir: string;
  let file: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "sm-mountopts-"));
    file = join(dir, "a-file");
    await writeFile(file, "x");
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("fills defaults: opaque, not read-only, resolved host path, normalised guest path", () => {
    const [m] = validateMounts([{ hostPath: dir, guestTag: "ws", guestPath: "/work//space/" }]);
    assert.deepEqual(m, { hostPath: dir, guestTag: "ws", symlinks: "opaque", readOnly: false, guestPath: "/work/space" });
    assert.deepEqual(validateMounts(undefined), []);
  });

  it("malformed entries are TypeErrors naming mounts[i].<field>", () => {
    const cases: [unknown, RegExp][] = [
      ["not an array", /mounts/],
      [[null], /mounts\[0\]/],
      [[{ guestTag: "a" }], /mounts\[0\]\.hostPath/],
      [[{ hostPath: dir, guestTag: "bad tag" }], /mounts\[0\]\.guestTag/],
      [[{ hostPath: dir, guestTag: "" }], /mounts\[0\]\.guestTag/],
      [[{ hostPath: dir, guestTag: "a" }, { hostPath: dir, guestTag: "b", symlinks: "sometimes" }], /mounts\[1\]\.symlinks/],
      [[{ hostPath: dir, guestTag: "a", readOnly: "yes" }], /mounts\[0\]\.readOnly/],
      [[{ hostPath: dir, guestTag: "a", guestPath: "relative" }], /mounts\[0\]\.guestPath/],
      [[{ hostPath: dir, guestTag: "a", guestPath: "/x/../etc" }], /mounts\[0\]\.guestPath/],
      [[{ hostPath: dir, guestTag: "a", guestPath: "/" }], /mounts\[0\]\.guestPath/],
    ];
    for (const [v, re] of cases) assert.throws(() => validateMounts(v), (e: unknown) => e instanceof TypeError && re.test(e.message), JSON.stringify(v));
  });

  it("a duplicate guestTag or guestPath is a MountError naming both entries", () => {
    assert.throws(
      () => validateMounts([{ hostPath: dir, guestTag: "a" }, { hostPath: dir, guestTag: "a" }]),
      (e: unknown) => e instanceof MountError && e.code === "ERR_SM_MOUNT" && e.option === "guestTag" && /mounts\[1\]\.guestTag.*mounts\[0\]/.test(e.message),
    );
    assert.throws(
      () => validateMounts([{ hostPath: dir, guestTag: "a", guestPath: "/w" }, { hostPath: dir, guestTag: "b", guestPath: "/w/" }]),
      (e: unknown) => e instanceof MountError && e.option === "guestPath" && /mounts\[1\]\.guestPath/.test(e.message),
    );
  });

  it("a missing or non-directory hostPath is a MountError naming mounts[i].hostPath", async () => {
    await assert.rejects(
      checkHostPaths(validateMounts([{ hostPath: dir, guestTag: "ok" }, { hostPath: join(dir, "missing"), guestTag: "b" }])),
      (e: unknown) => e instanceof MountError && e.option === "hostPath" && /mounts\[1\]\.hostPath .*does not exist/.test(e.message),
    );
    await assert.rejects(
      checkHostPaths(validateMounts([{ hostPath: file, guestTag: "f" }])),
      (e: unknown) => e instanceof MountError && /mounts\[0\]\.hostPath .*is not a directory/.test(e.message),
    );
  });

  it("Image.build and Vm.boot refuse bad mounts before starting anything", async () => {
    const starts = qemuStartCount();
    await assert.rejects(
      Image.build({ ref: "dir:/nonexistent-rootfs", snapshotsDir: dir, mounts: [{ hostPath: join(dir, "missing"), guestTag: "ws" }] }),
      (e: unknown) => e instanceof MountError && /mounts\[0\]\.hostPath/.test(e.message),
    );
    await assert.rejects(Image.build({ ref: "dir:/nonexistent-rootfs", snapshotsDir: dir, mounts: [{ hostPath: dir, guestTag: "ws", symlinks: "yes" as never }] }), TypeError);
    await assert.rejects(Vm.boot({ rootfs: "/nonexistent-rootfs", mounts: [{ hostPath: file, guestTag: "ws" }] }), MountError);
    assert.equal(qemuStartCount(), starts, "no QEMU was started");
  });
});
