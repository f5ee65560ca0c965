/**
 * `require("@supermachine/core")` (CommonJS) works as well as `import`: a
 * child Node resolves the package by name through its `exports` map from a
 * project that links it in node_modules, boots a real VM through the
 * CommonJS build, and gets errors the ESM build recognizes.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { REPO_ROOT, VM_TEST_TIMEOUT, defaultRootfs } from "../helpers.js";

const execFileP = promisify(execFile);

describe("CommonJS", { timeout: VM_TEST_TIMEOUT }, () => {
  let project: string;

  before(async () => {
    project = await mkdtemp(join(tmpdir(), "sm-cjs-"));
    await mkdir(join(project, "node_modules", "@supermachine"), { recursive: true });
    await symlink(REPO_ROOT, join(project, "node_modules", "@supermachine", "core"), "dir");
    await writeFile(join(project, "package.json"), JSON.stringify({ name: "user-project", private: true }));
  });

  after(async () => {
    await rm(project, { recursive: true, force: true });
  });

  async function node(file: string, body: string): Promise<string> {
    await writeFile(join(project, file), body);
    const { stdout } = await execFileP(process.execPath, [join(project, file)], { cwd: project, timeout: 5 * 60_000 });
    return stdout;
  }

  it("require() loads the CommonJS build with the seed's classes; import() loads the ESM build", async () => {
    const out = await node(
      "load.cjs",
      `const sm = require("@supermachine/core");
const path = require.resolve("@supermachine/core");
console.log(JSON.stringify({ path, kinds: ["Image", "Pool", "Vm", "ExecChild", "TcpForwarder", "ClosedError"].map((k) => typeof sm[k]) }));
import("@supermachine/core").then((esm) => {
  console.log(JSON.stringify({ esmDifferent: esm.Vm !== sm.Vm, crossInstanceof: new sm.ClosedError("x") instanceof esm.ClosedError, code: new sm.PoolError("y").code }));
});`,
    );
    const [a, b] = out.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.match(String(a!.path), /dist\/cjs\/index\.js$/);
    assert.deepEqual(a!.kinds, ["function", "function", "function", "function", "function", "function"]);
    assert.deepEqual(b, { esmDifferent: true, crossInstanceof: true, code: "ERR_SM_POOL" });
  });

  it("the CommonJS build boots a VM and runs a command", async () => {
    const rootfs = await defaultRootfs();
    const out = await node(
      "boot.cjs",
      `const { Vm } = require("@supermachine/core");
(async () => {
  const vm = await Vm.boot({ rootfs: ${JSON.stringify(rootfs)} });
  try {
    const r = await vm.exec({ argv: ["echo", "hello from cjs"] });
    console.log(JSON.stringify({ stdout: r.stdout.toString(), exitCode: r.exitCode }));
  } finally {
    await vm.release();
  }
})().catch((e) => { console.error(e); process.exitCode = 1; });`,
    );
    assert.deepEqual(JSON.parse(out.trim()), { stdout: "hello from cjs\n", exitCode: 0 });
  });
});
