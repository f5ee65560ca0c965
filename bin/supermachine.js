#!/usr/bin/env node
// The `supermachine` command; the code lives in dist/ (built by `npm run setup`).
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const entry = new URL("../dist/src/cli/main.js", import.meta.url);
if (!existsSync(fileURLToPath(entry))) {
  process.stderr.write("supermachine: not built yet; run `npm run setup` in the package directory first\n");
  process.exit(125);
}
const { main } = await import(entry.href);
main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    // main() never rejects; this is the last resort.
    process.stderr.write(`supermachine: internal error: ${process.env.SUPERMACHINE_DEBUG === "1" ? err?.stack ?? err : err?.message ?? err}\n`);
    process.exitCode = 125;
  },
);
