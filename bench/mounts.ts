/**
 * Mount file server benchmark (issue 10), host side only: what one FUSE
 * request costs the TypeScript server, without a VM or a transport. It sizes
 * the cache timeout: with cacheTimeoutMs = T, a guest re-stat-ing N hot files
 * costs at most N / T GETATTRs per second, each costing the time below.
 *
 *   node dist/bench/mounts.js [--runs N] [--files N]
 */

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FuseClient, O_RDWR, O_CREAT, ROOT } from "../src/mounts/client.js";
import { FuseServer, MAX_WRITE_BYTES } from "../src/mounts/server.js";
import { Args, fmtMs, sample, summarize, table } from "./stats.js";

const args = new Args(process.argv.slice(2));
const runs = args.num("runs", 2000);
const files = args.num("files", 2000);
const MiB = 1 << 20;

const dir = mkdtempSync(join(tmpdir(), "sm-bench-mount-"));
try {
  mkdirSync(join(dir, "many"));
  for (let i = 0; i < files; i++) writeFileSync(join(dir, "many", `f${i}`), "x".repeat(100));
  writeFileSync(join(dir, "big"), Buffer.alloc(64 * MiB, 7));
  const server = await FuseServer.open({ hostPath: dir, guestTag: "bench" });
  const c = new FuseClient(server);
  await c.init();
  const many = await c.lookup(ROOT, "many");
  const rows: string[][] = [];
  const row = (name: string, samples: number[]): void => {
    const s = summarize(samples);
    rows.push([name, String(s.n), fmtMs(s.p50 * 1000), fmtMs(s.p90 * 1000), fmtMs(s.p99 * 1000)]);
  };

  const one = await c.lookup(many.nodeid, "f1");
  row("GETATTR", await sample(runs, () => c.getattr(one.nodeid)));
  let i = 0;
  row(
    "LOOKUP (new node) + FORGET",
    await sample(runs, async () => {
      const e = await c.lookup(many.nodeid, `f${i++ % files}`);
      if (e.nodeid !== one.nodeid) await c.forget(e.nodeid);
    }),
  );
  row("OPEN + READ 100 B + RELEASE", await sample(runs, () => c.readFile(one.nodeid)));
  let k = 0;
  row(
    "CREATE + RELEASE + UNLINK",
    await sample(Math.min(runs, 1000), async () => {
      const name = `new${k++}`;
      const made = await c.create(ROOT, name, 0o100644, O_RDWR | O_CREAT);
      await c.release(made.nodeid, made.fh);
      await c.forget(made.nodeid);
      await c.unlink(ROOT, name);
    }),
  );
  row(`READDIRPLUS of ${files} entries`, await sample(5, () => c.readdir(many.nodeid, true, 64 * 1024)));

  const big = await c.lookup(ROOT, "big");
  const fh = await c.open(big.nodeid);
  let t = performance.now();
  for (let off = 0; off < 64 * MiB; off += MAX_WRITE_BYTES) await c.read(big.nodeid, fh, off, MAX_WRITE_BYTES);
  const readMibS = 64 / ((performance.now() - t) / 1000);
  await c.release(big.nodeid, fh);
  const out = await c.create(ROOT, "out", 0o100644, O_RDWR | O_CREAT);
  const chunk = Buffer.alloc(MAX_WRITE_BYTES, 1);
  t = performance.now();
  for (let off = 0; off < 64 * MiB; off += MAX_WRITE_BYTES) await c.write(out.nodeid, out.fh, off, chunk);
  const writeMibS = 64 / ((performance.now() - t) / 1000);
  await c.release(out.nodeid, out.fh);
  await server.close();

  console.log("FuseServer, host side only (no VM, no transport); times in µs\n");
  console.log(table(["request", "n", "p50 µs", "p90 µs", "p99 µs"], rows));
  console.log(`\nsequential 128 KiB READs of a 64 MiB file: ${readMibS.toFixed(0)} MiB/s; WRITEs: ${writeMibS.toFixed(0)} MiB/s`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
