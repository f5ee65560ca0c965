import { Image } from "../src/index.js";
import { pythonImage } from "./images.js";
const T = ["python3", "-c", "print(sum(i * i for i in range(10000)))"];
async function main() {
  const img = await pythonImage();
  const warm = process.argv[2] === "warm";
  const image = await Image.build({ ref: img.ref, snapshotsDir: "/work/scratch/aslr/snaps", warmupTag: warm ? "py1" : "default", ...(warm ? { warmup: async (vm) => { await vm.exec({ argv: ["setarch", "-R", ...T] }); await vm.exec({ argv: T }); } } : {}) });
  const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: true, prewarm: false });
  for (const mode of ["aslr", "noaslr", "aslr", "noaslr"]) {
    const argv = mode === "aslr" ? T : ["setarch", "-R", ...T];
    const ts: number[] = [];
    for (let i = 0; i < 6; i++) {
      const vm = await pool.acquire();
      const t0 = performance.now();
      const r = await vm.exec({ argv });
      const t1 = performance.now();
      const r2 = await vm.exec({ argv });
      const t2 = performance.now();
      ts.push(Math.round(t1 - t0), Math.round(t2 - t1));
      if (r.exitCode !== 0) console.log(r);
      await vm.release();
    }
    console.log(mode, "first/second per VM:", ts.join(" "));
  }
  await pool.shutdown();
}
main().catch((e) => { console.error(e); process.exit(1); });
