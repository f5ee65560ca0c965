import { spawn } from "node:child_process";
import { join } from "node:path";
import { REPO_ROOT } from "../helpers.js";

/** Runs `dist/bench/<script>` with `args`; resolves with its exit code, stdout and the tail of its stderr. */
export function runBenchScript(script: string, args: readonly string[], stderrTailBytes = 100_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, [join(REPO_ROOT, "dist", "bench", script), ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    c.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    c.stderr.on("data", (b: Buffer) => (stderr = (stderr + b.toString()).slice(-stderrTailBytes)));
    c.once("error", reject);
    c.once("close", (code) => resolve({ code, stdout, stderr }));
  });
}
