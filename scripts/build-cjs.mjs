#!/usr/bin/env node
// The CommonJS build: `require("@supermachine/core")` loads dist/cjs/index.js.
//
// The package is ESM (dist/src, built by tsc). This transpiles the same
// sources (src/**/*.ts) file by file to CommonJS into dist/cjs/, one folder
// level shallower than dist/src/ so that paths computed from a module's own
// location (PACKAGE_ROOT in src/guest/assets.ts) land on the same package
// root. `import.meta.url`, the one ESM-only construct the sources use, becomes
// the module's file URL. Type checking is tsc's job (the ESM build): its
// declarations (dist/src/**/*.d.ts) are copied beside the CommonJS files, so
// TypeScript sees CommonJS types for `require` (run after tsc).
//
// Usage: node scripts/build-cjs.mjs   (run by `npm run build` and setup)

import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const ts = require("typescript");

const srcDir = join(root, "src");
const outDir = join(root, "dist", "cjs");

function sources(dir, acc = []) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) sources(p, acc);
    else if (e.name.endsWith(".ts") && !e.name.endsWith(".d.ts")) acc.push(p);
  }
  return acc;
}

rmSync(outDir, { recursive: true, force: true });
let failed = false;
for (const file of sources(srcDir)) {
  const text = readFileSync(file, "utf8").replace(/\bimport\.meta\.url\b/g, 'require("node:url").pathToFileURL(__filename).href');
  const out = ts.transpileModule(text, {
    fileName: file,
    reportDiagnostics: true,
    compilerOptions: {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.CommonJS,
      esModuleInterop: true,
      sourceMap: false,
      isolatedModules: true,
    },
  });
  for (const d of out.diagnostics ?? []) {
    failed = true;
    process.stderr.write(`build-cjs: ${relative(root, file)}: ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}\n`);
  }
  const dest = join(outDir, relative(srcDir, file)).replace(/\.ts$/, ".js");
  mkdirSync(dirname(dest), { recursive: true });
  writeFileSync(dest, out.outputText);
}
// Declarations from the ESM build, read as CommonJS ones here.
const dtsDir = join(root, "dist", "src");
function copyDeclarations(dir) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) copyDeclarations(p);
    else if (e.name.endsWith(".d.ts")) {
      const dest = join(outDir, relative(dtsDir, p));
      mkdirSync(dirname(dest), { recursive: true });
      writeFileSync(dest, readFileSync(p, "utf8").replace(/\n\/\/# sourceMappingURL=.*\n?$/, "\n"));
    }
  }
}
if (existsSync(join(dtsDir, "index.d.ts"))) copyDeclarations(dtsDir);
else process.stderr.write("build-cjs: dist/src has no declarations yet (run tsc first); dist/cjs has none\n");
// The package is "type": "module"; this folder is CommonJS.
writeFileSync(join(outDir, "package.json"), JSON.stringify({ type: "commonjs" }) + "\n");
if (failed) process.exit(1);
