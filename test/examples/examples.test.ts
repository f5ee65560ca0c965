/**
 * Runs every examples/*.mjs as a user would (`node examples/NAME.mjs`, from
 * another working directory) in a child Node: it must exit by itself with
 * status 0, print the lines the table below expects of it, and leave no
 * QEMU, runtime directory or temporary file behind. An example that reads
 * SUPERMACHINE_EXAMPLE_PYTHON_IMAGE runs twice: with a Debian+Python image
 * (an OCI layout built from the mmdebstrap fixture) and without it (its
 * busybox fallback). Real QEMU, real kernel, real snapshots.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { debianPythonLayout } from "../fixtures/oci/images.js";
import { REPO_ROOT, VM_TEST_TIMEOUT, pidsMatching, processAlive } from "../helpers.js";

/** What the test knows of one example. */
interface ExampleSpec {
  /** Every pattern must match a line of the example's stdout. */
  readonly expect: readonly RegExp[];
  /**
   * Fixtures the example needs (e.g. a registry on loopback): started before
   * the run, in `dir` (a scratch directory of this run), with the
   * environment to pass; `close` runs after it, whatever happened.
   */
  readonly setup?: (dir: string) => Promise<{ env: Readonly<Record<string, string>>; close?: () => Promise<void> }>;
}

/** One entry per example. A new example needs an entry here (the test says so). */
const EXPECTED: Readonly<Record<string, ExampleSpec | readonly RegExp[]>> = {
  "00-quick-start.mjs": [/^hello from the VM$/, /^exit code 0, accelerator (tcg|kvm), image /],
  "01-one-shot-exec.mjs": [/^candidate 0: ok  stdout="42"$/, /^candidate 1: ok  stdout="45"$/, /^candidate 2: FAILED  stdout=""  stderr=".*wrong answer"$/, /^3 candidates run with (python3|sh): 2 ok, 1 failed$/],
  "02-agent-runtime.mjs": [/^warmed at bake time$/, /^task 1: files left by other tasks: none$/, /^task 2: files left by other tasks: none$/, /^task 3: files left by other tasks: none$/],
  "03-persistent-service.mjs": [
    /^VM 1, inside the VM: {2}hello from the service baked into the snapshot$/,
    /^VM 1, from the host: {2}HTTP 200: hello from the service baked into the snapshot {2}\(via 127\.0\.0\.1:\d+\)$/,
    /^VM 2, from the host: {2}HTTP 200: hello from the service baked into the snapshot /,
  ],
  "06-mount-workspace.mjs": [/^host reads: built in the VM$/, /^fresh from the host$/],
  "07-npm-workspace-fast.mjs": [
    /^warmup: npm install done at bake time \(\d+ registry requests\)$/,
    /^VM 1: HELLO FROM THE SOURCE ON THE MOUNT! /,
    /^VM 1: \/work\/node_modules has demo-greet, demo-shout$/,
    /^VM 1 after a host edit: HELLO EDITED ON THE HOST!$/,
    /^VM 2: HELLO EDITED ON THE HOST! /,
    /^node_modules on the host: empty \(the install lives in the volume\)$/,
    /^registry requests by restored VMs: 0$/,
  ],
  "04-resource-files.mjs": [/^ {2}guest> name = "example"$/, /^ {2}guest> -----BEGIN CERTIFICATE-----$/, /^same files again: {2}same snapshot: true, booted: false$/, /^edited app\.toml: {3}new snapshot: true, guest reads name = "edited"$/],
};

/** How long one example may run (TCG; bakes; two test files at once on two cores). */
const RUN_DEADLINE_MS = VM_TEST_TIMEOUT;

const EXAMPLES_DIR = join(REPO_ROOT, "examples");
const examples = readdirSync(EXAMPLES_DIR)
  .filter((f) => f.endsWith(".mjs"))
  .sort();

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

function runExample(file: string, cwd: string, env: NodeJS.ProcessEnv): Promise<Run> {
  const child = spawn(process.execPath, [join(EXAMPLES_DIR, file)], { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  let timedOut = false;
  child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
  child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
  const killer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, RUN_DEADLINE_MS);
  return new Promise((resolve, reject) => {
    child.once("error", (e) => {
      clearTimeout(killer);
      reject(e);
    });
    child.once("close", (code, signal) => {
      clearTimeout(killer);
      resolve({ code, signal, stdout, stderr, timedOut });
    });
  });
}

/** The child's QEMU processes (their sockets live under its runtime dir). */
function qemusUnder(runtimeDir: string): number[] {
  return pidsMatching(new RegExp(`qemu-system.*${runtimeDir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`)).filter(processAlive);
}

describe("examples/*.mjs run as written and exit by themselves", { timeout: 4 * examples.length * RUN_DEADLINE_MS }, () => {
  let work: string;
  let pythonRef: string;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), "sm-examples-"));
    // The seed's python:slim, offline: Debian bookworm + python3-minimal as an OCI layout.
    pythonRef = await debianPythonLayout(join(work, "layout"));
  });

  after(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  it("finds the examples", () => {
    for (const f of ["00-quick-start.mjs", "01-one-shot-exec.mjs", "02-agent-runtime.mjs", "03-persistent-service.mjs", "04-resource-files.mjs", "06-mount-workspace.mjs", "07-npm-workspace-fast.mjs"]) {
      assert.ok(examples.includes(f), `examples/${f} is missing`);
    }
  });

  for (const file of examples) {
    const source = readFileSync(join(EXAMPLES_DIR, file), "utf8");
    const variants: { label: string; python: boolean }[] = source.includes("SUPERMACHINE_EXAMPLE_PYTHON_IMAGE")
      ? [
          { label: "with the Debian python image", python: true },
          { label: "without a python image (busybox fallback)", python: false },
        ]
      : [{ label: "", python: false }];
    for (const variant of variants) {
      it(`${file}${variant.label ? ` ${variant.label}` : ""}`, async () => {
        const entry = EXPECTED[file];
        assert.ok(entry, `examples/${file} has no entry in EXPECTED in test/examples/examples.test.ts: add the lines its output must contain`);
        const spec: ExampleSpec = Array.isArray(entry) ? { expect: entry as readonly RegExp[] } : (entry as ExampleSpec);
        const tag = `${file.replace(/\.mjs$/, "")}${variant.python ? "-py" : ""}`;
        const runtimeDir = join(work, `rt-${tag}`);
        const tmp = join(work, `tmp-${tag}`);
        const cwd = join(work, `cwd-${tag}`);
        await Promise.all([mkdir(tmp), mkdir(cwd)]);
        const env: NodeJS.ProcessEnv = {
          ...process.env,
          SUPERMACHINE_RUNTIME_DIR: runtimeDir,
          SUPERMACHINE_SNAPSHOTS_DIR: join(work, "snapshots"),
          TMPDIR: tmp,
        };
        delete env.SUPERMACHINE_EXAMPLE_PYTHON_IMAGE;
        delete env.SUPERMACHINE_EXAMPLE_IMAGE;
        delete env.SUPERMACHINE_EXAMPLE_NGINX_IMAGE;
        if (variant.python) env.SUPERMACHINE_EXAMPLE_PYTHON_IMAGE = pythonRef;
        let r: Run;
        const fixtureDir = join(work, `fixture-${tag}`);
        await mkdir(fixtureDir);
        const fixture = spec.setup ? await spec.setup(fixtureDir) : undefined;
        try {
          Object.assign(env, fixture?.env);
          r = await runExample(file, cwd, env);
        } finally {
          await fixture?.close?.();
        }
        const diag = `\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;
        assert.ok(!r.timedOut, `examples/${file} did not exit within ${RUN_DEADLINE_MS} ms${diag}`);
        assert.equal(r.code, 0, `examples/${file} exit status (signal ${r.signal})${diag}`);
        const lines = r.stdout.split("\n");
        for (const re of spec.expect) assert.ok(lines.some((l) => re.test(l)), `examples/${file}: no line of its output matches ${re}${diag}`);
        // Its exit hooks kill what it started; SIGKILL reaches a confined QEMU through its wrapper: give it 2 s.
        const until = Date.now() + 2000;
        while (qemusUnder(runtimeDir).length && Date.now() < until) await new Promise((res) => setTimeout(res, 50));
        assert.deepEqual(qemusUnder(runtimeDir), [], `examples/${file}: QEMU processes left behind${diag}`);
        const parent = join(runtimeDir, `supermachine-${process.getuid!()}`);
        assert.deepEqual(existsSync(parent) ? readdirSync(parent) : [], [], `examples/${file}: runtime directories left behind`);
        assert.deepEqual(readdirSync(tmp), [], `examples/${file}: files left behind in its TMPDIR`);
      });
    }
  }
});
