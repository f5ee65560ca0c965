/**
 * Pull benchmark (issue 3): the Debian + python3 image from a registry on
 * 127.0.0.1 into a bootable erofs root filesystem (pull + verify + unpack +
 * pack), cold and cached, beside the peer tool — `skopeo copy` of the same
 * image to an OCI layout, which only downloads and writes blobs — in the
 * same run, samples interleaved.
 *
 *   node dist/bench/pull.js [--cold N] [--hits N]
 */

import { spawnSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { resolveImage } from "../src/image/resolve.js";
import { pushLayout, startRegistry } from "../test/fixtures/registry/registry.js";
import { pythonImage } from "./images.js";
import { Args, fmtMs, summarize, table } from "./stats.js";

async function main(): Promise<void> {
  const a = new Args();
  const cold = a.num("cold", 3);
  const hits = a.num("hits", 20);
  const log = (s: string) => process.stderr.write(`[pull] ${s}\n`);
  const img = await pythonImage(log);
  const reg = await startRegistry();
  const work = await mkdtemp(join(tmpdir(), "sm-bench-pull-"));
  try {
    log("pushing the image to the registry");
    await pushLayout(reg, img.layout!.dir, img.layout!.tag, "bench/python:3");
    log("pushed");
    // Both pull straight from the registry (not through the fixture's
    // counting proxy, which skopeo's TLS probe would stall).
    const ref = `${reg.directHost}/bench/python:3`;
    const ours: number[] = [];
    const peer: number[] = [];
    const hit: number[] = [];
    let warm = "";
    for (let i = 0; i < cold; i++) {
      // Ours: a fresh cache each time (nothing of the image cached).
      const cacheDir = join(work, `cache-${i}`);
      let t = performance.now();
      await resolveImage(ref, { cacheDir });
      ours.push(performance.now() - t);
      warm = cacheDir;
      // The peer: skopeo copy to a fresh OCI layout.
      const dest = join(work, `skopeo-${i}`);
      t = performance.now();
      const r = spawnSync("skopeo", ["--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", `docker://${ref}`, `oci:${dest}:bench`], { encoding: "utf8", timeout: 300_000 });
      if (r.status !== 0) throw new Error(`skopeo copy failed: ${r.stderr}`);
      peer.push(performance.now() - t);
      await rm(dest, { recursive: true, force: true });
      if (i < cold - 1) await rm(cacheDir, { recursive: true, force: true });
      log(`cold ${i + 1}/${cold}`);
    }
    for (let i = 0; i < hits; i++) {
      const t = performance.now();
      await resolveImage(ref, { cacheDir: warm });
      hit.push(performance.now() - t);
    }
    const offline: number[] = [];
    for (let i = 0; i < hits; i++) {
      const t = performance.now();
      await resolveImage(ref, { cacheDir: warm, pullPolicy: "never" });
      offline.push(performance.now() - t);
    }
    const row = (what: string, xs: number[]) => {
      const s = summarize(xs);
      return [what, String(s.n), fmtMs(s.p50), fmtMs(s.p90), fmtMs(s.max)];
    };
    console.log(`\nPull benchmark — ${img.description}, from a docker-registry on 127.0.0.1\n`);
    console.log(
      table(
        ["operation", "n", "p50 ms", "p90 ms", "max ms"],
        [
          row("Image resolution, cold: pull + verify + unpack + erofs pack", ours),
          row("skopeo copy to an OCI layout (the peer: download + write only)", peer),
          row("Image resolution, cached (default pullPolicy: missing)", hit),
          row("Image resolution, cached (pullPolicy never: no request)", offline),
        ],
      ),
    );
    const ratio = summarize(ours).p50 / summarize(peer).p50;
    console.log(`\ncold pull+pack / skopeo copy = ${ratio.toFixed(2)}× (target ≤ 1.5×); cached resolution p50 ${fmtMs(summarize(hit).p50)} ms (target ≤ 20 ms)`);
  } finally {
    await reg.stop();
    await rm(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
