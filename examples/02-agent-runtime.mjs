// Pattern 2: agent runtime. Each agent task gets a fresh, isolated VM from a
// warm pool; the image was warmed once at bake time and every VM starts from
// that warm snapshot.
//
// The seed uses "python:slim" and pre-imports numpy, pandas and requests.
// Offline, point SUPERMACHINE_EXAMPLE_PYTHON_IMAGE at a Python image (e.g.
// "oci:/path/to/layout:python"; the example imports standard modules, which
// a minimal Python has); without it the tasks are busybox sh scripts in the
// default image.
//
//   node examples/02-agent-runtime.mjs

import { Image, defaultImageRef } from "@supermachine/core";

const pythonRef = process.env.SUPERMACHINE_EXAMPLE_PYTHON_IMAGE;
const [interpreter, file] = pythonRef ? ["python3", "/tmp/task.py"] : ["sh", "/tmp/task.sh"];

const image = await Image.build({
  ref: pythonRef ?? (await defaultImageRef()),
  memoryMib: 512,
  // Pre-warm: import heavy libs once at bake time, snapshot the
  // warm state. Subsequent acquires land on the post-import snapshot.
  warmupTag: "v1",                       // bump to invalidate cache
  warmup: async (vm) => {
    await vm.exec({
      argv: pythonRef
        ? ["python3", "-c", "import hashlib, random, csv, json"]
        : ["sh", "-c", "ls -R /bin /usr > /dev/null"],
      timeoutMs: 60_000,
    });
    // State written at bake time is part of the snapshot: every task sees it.
    await vm.writeFile("/etc/agent-warmup", Buffer.from("warmed at bake time\n"));
  },
});

const pool = await image.pool({
  min: 4,                                // warm idle pool
  max: 32,                               // burst capacity
  restoreOnRelease: true,                // isolate per task
  acquireTimeoutMs: 30_000,
});

// In your request handler:
async function handleAgentTask(taskCode) {
  // The seed writes `using vm = await pool.acquire();` (TypeScript, or a
  // JavaScript runtime that parses `using`; Node 20 does not). This is what
  // that declaration does: Symbol.dispose gives the VM back at the end of
  // the block, whatever happens in it.
  const vm = await pool.acquire();
  try {
    return await vm.exec({
      argv: [interpreter, file],
      stageFiles: { [file]: Buffer.from(taskCode) },
      timeoutMs: 30_000,
    });
  } finally {
    vm[Symbol.dispose]();                // auto-released
  }
}

// Agent tasks: each reads the warm state, leaves a file behind, and checks
// whether an earlier task's file is there (it never is: restoreOnRelease).
const tasks = pythonRef
  ? [1, 2, 3].map((n) =>
      [
        "import os",
        "print(open('/etc/agent-warmup').read().strip())",
        "seen = sorted(f for f in os.listdir('/tmp') if f.startswith('left-by-'))",
        `open('/tmp/left-by-task-${n}', 'w').write('x')`,
        `print('task ${n}: files left by other tasks:', seen or 'none')`,
      ].join("\n"),
    )
  : [1, 2, 3].map((n) =>
      [
        "cat /etc/agent-warmup",
        "seen=$(ls /tmp | grep '^left-by-' | tr '\\n' ' ')",
        `touch /tmp/left-by-task-${n}`,
        `echo "task ${n}: files left by other tasks: \${seen:-none}"`,
      ].join("\n"),
    );

for (const task of tasks) {
  const out = await handleAgentTask(task);
  process.stdout.write(out.stdout.toString());
  if (out.exitCode !== 0) throw new Error(`task failed (exit ${out.exitCode}): ${out.stderr.toString()}`);
}
console.log(`pool: ${JSON.stringify(pool.stats())}`);
