/**
 * Pull + boot, end to end: images built locally, pushed to a real registry
 * on 127.0.0.1, pulled, turned into erofs root filesystems and booted in real
 * VMs. Also offline sources (oci:, docker-archive:) and concurrent builders.
 */

import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { mkdirSync, readdirSync, symlinkSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { resolveImage, type ImageProgress } from "../../src/image/resolve.js";
import { defaultCacheDir } from "../../src/paths.js";
import { Vm } from "../../src/vm/vm.js";
import { busyboxTar, debianPythonTar, dockerArchiveTar, multiLayerTars, newLayout } from "../fixtures/oci/images.js";
import { buildTar } from "../fixtures/oci/tar.js";
import { removeDir, tempDir } from "../fixtures/oci/util.js";
import { pushLayout, startRegistry, type RegistryFixture } from "../fixtures/registry/registry.js";
import { REPO_ROOT, VM_TEST_TIMEOUT } from "../helpers.js";

const execFileP = promisify(execFile);

const APP_CONFIG = {
  config: {
    Env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello from the image"],
    Entrypoint: ["/bin/sh", "-c"],
    Cmd: ['echo "entrypoint ran as $(id -u) in $(pwd): $GREETING"'],
    WorkingDir: "/srv/app",
    User: "nobody",
  },
};

describe("pull + boot", { timeout: 3 * VM_TEST_TIMEOUT }, () => {
  let reg: RegistryFixture;
  let work: string;
  let cacheDir: string;
  let layoutDir: string;
  let archive: string;

  before(async () => {
    work = await tempDir("pull-boot");
    cacheDir = join(work, "cache");
    // Images go to a cache of their own; the guest kernel is shared.
    mkdirSync(cacheDir, { recursive: true });
    symlinkSync(join(defaultCacheDir(), "kernel"), join(cacheDir, "kernel"));
    reg = await startRegistry();
    const layout = await newLayout(join(work, "layout"));
    layoutDir = layout.dir;
    const bb = busyboxTar();
    const app = await layout.addImage({ layers: [{ tar: bb }, { tar: buildTar([{ name: "srv", type: "dir" }]) }], config: APP_CONFIG });
    layout.tag(app.manifest, "app");
    // busybox underneath, then the whiteout / opaque / hard link layers.
    const multi = await layout.addImage({
      layers: [{ tar: bb }, ...multiLayerTars().map((tar, i) => ({ tar, compression: i === 1 ? ("tar" as const) : ("gzip" as const) }))],
      config: { config: { Env: ["PATH=/bin"] } },
    });
    layout.tag(multi.manifest, "multi");
    const python = await layout.addImage({
      layers: [{ tar: await readFile(await debianPythonTar()) }],
      config: { config: { Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE=1"], Cmd: ["python3"], WorkingDir: "/tmp" } },
    });
    layout.tag(python.manifest, "python");
    await layout.save();
    await pushLayout(reg, layout.dir, "app", "test/app:1");
    await pushLayout(reg, layout.dir, "multi", "test/multi:1");
    await pushLayout(reg, layout.dir, "python", "test/python:3");
    archive = join(work, "app.docker.tar");
    await writeFile(archive, dockerArchiveTar({ configBytes: app.configBytes, layers: [bb, buildTar([{ name: "srv", type: "dir" }])], repoTags: ["test/app:1"] }));
  });

  after(async () => {
    await reg?.stop();
    if (work) await removeDir(work);
  });

  test("the image's Env, WorkingDir and User are in effect; progress is reported", async () => {
    const events: ImageProgress[] = [];
    const img = await resolveImage(`${reg.host}/test/app:1`, { cacheDir, onProgress: (e) => events.push(e) });
    assert.ok(events.some((e) => e.stage === "pull"));
    assert.ok(events.some((e) => e.stage === "unpack"));
    assert.deepEqual(img.imageConfig.entrypoint, ["/bin/sh", "-c"]);
    const vm = await Vm.boot({ rootfsImage: img.rootfsImage, config: img.config });
    try {
      const r = await vm.exec({ argv: ["sh", "-c", 'echo "$GREETING|$(pwd)|$(id -u)|$HOME"'] });
      assert.equal(r.exitCode, 0, r.stderr.toString());
      assert.equal(r.stdout.toString(), "hello from the image|/srv/app|65534|/\n");
    } finally {
      await vm.destroy();
    }
    // A second resolution is all cache: same image file, no unpacking.
    const again: ImageProgress[] = [];
    const img2 = await resolveImage(`${reg.host}/test/app:1`, { cacheDir, onProgress: (e) => again.push(e) });
    assert.equal(img2.rootfsImage, img.rootfsImage);
    assert.ok(again.some((e) => e.stage === "rootfs-cached"));
    assert.ok(!again.some((e) => e.stage === "unpack"));
  });

  test("the CLI runs the image's Entrypoint + Cmd when no command is given", async () => {
    const r = await new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
      const c = spawn(process.execPath, [join(REPO_ROOT, "bin", "supermachine.js"), "run", "-q", `${reg.host}/test/app:1`], {
        env: { ...process.env, SUPERMACHINE_CACHE_DIR: cacheDir },
      });
      let out = "";
      let err = "";
      c.stdout.on("data", (b: Buffer) => (out += b.toString()));
      c.stderr.on("data", (b: Buffer) => (err += b.toString()));
      c.on("close", (code) => resolve({ code, out, err }));
    });
    assert.equal(r.code, 0, r.err);
    assert.equal(r.out, "entrypoint ran as 65534 in /srv/app: hello from the image\n");
  });

  test("layers apply with whiteouts, opaque dirs, hard links and symlinks, file by file", async () => {
    const img = await resolveImage(`${reg.host}/test/multi:1`, { cacheDir });
    const vm = await Vm.boot({ rootfsImage: img.rootfsImage, config: img.config });
    try {
      const check = async (script: string) => (await vm.exec({ argv: ["sh", "-c", script] })).stdout.toString();
      assert.equal(await check("cat /a/keep; test -e /a/gone && echo GONE-STILL-THERE; true"), "keep\n");
      assert.equal(await check("ls /opaque"), "new\n");
      assert.equal(await check("cat /hard/link; [ $(stat -c %i /hard/link) = $(stat -c %i /hard/orig) ] && echo same-inode; stat -c %a /hard/orig"), "linked content\nsame-inode\n600\n");
      assert.equal(await check("readlink /link-to-keep; cat /link-to-keep"), "/a/keep\nkeep\n");
      assert.equal(await check("cat /top.txt; stat -c '%F %t,%T' /dev/null"), "top layer\ncharacter special file 1,3\n");
      assert.equal(await check(`cat /deep/${"d".repeat(60)}/${"e".repeat(60)}/file-with-a-long-name.txt`), "long\n");
      // The lower layer's busybox is still there under the others.
      assert.equal(await check("busybox --help >/dev/null && echo ok"), "ok\n");
    } finally {
      await vm.destroy();
    }
  });

  test("Debian + python3: python3 -c 'print(1+1)' prints 2; a python REPL is driven line by line (pipes and a tty)", async () => {
    const img = await resolveImage(`${reg.host}/test/python:3`, { cacheDir });
    const vm = await Vm.boot({ rootfsImage: img.rootfsImage, config: img.config, memoryMib: 512 });
    try {
      const r = await vm.exec({ argv: ["python3", "-c", "print(1+1)"], timeoutMs: 120_000 });
      assert.equal(r.stdout.toString(), "2\n", r.stderr.toString());
      const cwd = await vm.exec({ argv: ["python3", "-c", "import os; print(os.getcwd(), os.environ['PYTHONDONTWRITEBYTECODE'])"], timeoutMs: 120_000 });
      assert.equal(cwd.stdout.toString(), "/tmp 1\n");

      // A Python REPL driven line by line: state carries from line to line.
      const repl = await vm.spawn({ argv: ["python3", "-i", "-q", "-u"] });
      const readOut = async (want: string): Promise<string> => {
        let text = "";
        while (!text.includes(want)) {
          const b = await repl.readStdout();
          if (b.length === 0) break;
          text += b.toString();
        }
        return text;
      };
      await repl.writeStdin(Buffer.from("x = 21\n"));
      await repl.writeStdin(Buffer.from("print(x * 2)\n"));
      assert.equal(await readOut("\n"), "42\n");
      await repl.writeStdin(Buffer.from("def f(n):\n    return n + x\n\nprint(f(1))\n"));
      assert.equal(await readOut("\n"), "22\n");
      await repl.writeStdin(Buffer.from("1/0\n"));
      let err = "";
      while (!err.includes("ZeroDivisionError")) {
        const b = await repl.readStderr();
        assert.ok(b.length > 0, `stderr ended before the traceback: ${err}`);
        err += b.toString();
      }
      await repl.writeStdin(Buffer.from("raise SystemExit(3)\n"));
      assert.equal((await repl.wait()).exitCode, 3);

      // The same REPL on a terminal: the prompt and the echo come through the pty.
      const tty = await vm.spawn({ argv: ["python3", "-q"], tty: true, winsize: { cols: 100, rows: 30 } });
      let screen = "";
      const until = async (want: string) => {
        while (!screen.includes(want)) {
          const b = await tty.readStdout();
          if (b.length === 0) break;
          screen += b.toString();
        }
      };
      await until(">>> ");
      await tty.writeStdin(Buffer.from("import os; print(os.get_terminal_size())\r"));
      await until("columns=100, lines=30");
      assert.match(screen, /os\.terminal_size\(columns=100, lines=30\)/);
      await tty.writeStdin(Buffer.from("exit()\r"));
      assert.equal((await tty.wait()).exitCode, 0);
    } finally {
      await vm.destroy();
    }
  });

  test("oci: and docker-archive: sources boot the same image as the registry pull", async () => {
    const fromRegistry = await resolveImage(`${reg.host}/test/app:1`, { cacheDir });
    const fromLayout = await resolveImage(`oci:${layoutDir}:app`, { cacheDir });
    assert.equal(fromLayout.manifestDigest, fromRegistry.manifestDigest);
    assert.equal(fromLayout.rootfsImage, fromRegistry.rootfsImage);
    const fromArchive = await resolveImage(`docker-archive:${archive}`, { cacheDir });
    assert.deepEqual(fromArchive.config, fromRegistry.config);
    const vm = await Vm.boot({ rootfsImage: fromArchive.rootfsImage, config: fromArchive.config });
    try {
      const r = await vm.exec({ argv: ["sh", "-c", "echo $GREETING; ls /srv"] });
      assert.equal(r.stdout.toString(), "hello from the image\napp\n");
    } finally {
      await vm.destroy();
    }
  });

  test("two processes resolving the same new image at once build one root filesystem", async () => {
    const fresh = join(work, "fresh-cache");
    const script = join(work, "resolve.mjs");
    await writeFile(
      script,
      `import { resolveImage } from ${JSON.stringify(join(REPO_ROOT, "dist", "src", "image", "resolve.js"))};
       const r = await resolveImage(process.argv[2], { cacheDir: process.argv[3] });
       console.log(r.rootfsImage);`,
    );
    const ref = `${reg.host}/test/app:1`;
    const [a, b] = await Promise.all([execFileP(process.execPath, [script, ref, fresh]), execFileP(process.execPath, [script, ref, fresh])]);
    assert.equal(a.stdout.trim(), b.stdout.trim());
    const files = readdirSync(join(fresh, "rootfs"));
    assert.deepEqual(files.filter((f) => f.endsWith(".erofs")).length, 1);
    // Beside it, its record (last use, references: src/image/cache-admin.ts), and nothing else.
    assert.deepEqual(files.filter((f) => f.endsWith(".json")).length, 1, `records: ${files.join(", ")}`);
    assert.deepEqual(files.filter((f) => !f.endsWith(".erofs") && !f.endsWith(".json")), [], `leftovers: ${files.join(", ")}`);
  });
});
