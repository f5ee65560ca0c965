// Pattern 1: one-shot exec (CI / verifier). Generated code runs in
// isolation; the result comes back; the VM is thrown away
// (restoreOnRelease: every candidate starts from the clean snapshot).
//
// The seed uses "python:slim". Offline, point SUPERMACHINE_EXAMPLE_PYTHON_IMAGE
// at a Python image (e.g. "oci:/path/to/layout:python"); without it the same
// candidates, written for busybox's sh, run in the default image.
//
//   node examples/01-one-shot-exec.mjs

import { Image, defaultImageRef } from "@supermachine/core";

const pythonRef = process.env.SUPERMACHINE_EXAMPLE_PYTHON_IMAGE;
const [interpreter, file] = pythonRef ? ["python3", "/tmp/code.py"] : ["sh", "/tmp/code.sh"];

// Three submissions: two right, one wrong.
const candidates = pythonRef
  ? ["print(6 * 7)", "print(sum(range(10)))", 'raise SystemExit("wrong answer")']
  : ["echo $((6 * 7))", "s=0; for i in 0 1 2 3 4 5 6 7 8 9; do s=$((s + i)); done; echo $s", 'echo "wrong answer" >&2; exit 1'];

const image = await Image.build({
  ref: pythonRef ?? (await defaultImageRef()),
  memoryMib: 512,
});

const pool = await image.pool({ min: 0, max: 8, restoreOnRelease: true });

async function runCandidate(source) {
  const vm = await pool.acquire();
  try {
    const out = await vm.exec({
      argv: [interpreter, file],
      stageFiles: { [file]: Buffer.from(source) },
      timeoutMs: 10_000,
    });
    return { ok: out.exitCode === 0, stdout: out.stdout.toString(), stderr: out.stderr.toString() };
  } finally {
    await vm.release();
  }
}

const results = await Promise.all(
  candidates.map(runCandidate),  // queues through pool of 8
);

results.forEach((r, i) => {
  console.log(`candidate ${i}: ${r.ok ? "ok" : "FAILED"}  stdout=${JSON.stringify(r.stdout.trim())}${r.ok ? "" : `  stderr=${JSON.stringify(r.stderr.trim())}`}`);
});
console.log(`${candidates.length} candidates run with ${interpreter}: ${results.filter((r) => r.ok).length} ok, ${results.filter((r) => !r.ok).length} failed`);
await pool.shutdown();
