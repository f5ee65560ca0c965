// Pattern 4: resource files baked into the snapshot. Files that are not part
// of the image (a config, a certificate, a binary) are staged into the guest
// at fixed paths before the snapshot; their contents are part of the
// snapshot's cache key, so editing one makes the next build bake again.
//
// The seed builds "alpine:latest"; offline this uses the default image, or
// the image named by SUPERMACHINE_EXAMPLE_IMAGE. The seed's "./config/..."
// paths are relative to the working directory; here they are resolved next
// to this file, so the example runs from anywhere.
//
//   node examples/04-resource-files.mjs

import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Image, defaultImageRef } from "@supermachine/core";

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const ref = process.env.SUPERMACHINE_EXAMPLE_IMAGE ?? (await defaultImageRef());

const image = await Image.build({
  ref,
  extraFiles: [
    { hostPath: here("./config/app.toml"),    guestPath: "/etc/app.toml" },
    { hostPath: here("./certs/server.pem"),   guestPath: "/etc/server.pem" },
  ],
});

const pool = await image.pool({ min: 1, max: 1 });
const vm = await pool.acquire();
try {
  const r = await vm.exec({ argv: ["sh", "-c", "cat /etc/app.toml; echo; head -n 1 /etc/server.pem; ls -l /etc/app.toml /etc/server.pem"] });
  console.log(r.stdout.toString().trimEnd().replace(/^/gm, "  guest> "));
} finally {
  await vm.release();
}
await pool.shutdown();

// The same inputs: the same snapshot, no boot.
const again = await Image.build({
  ref,
  extraFiles: [
    { hostPath: here("./config/app.toml"),    guestPath: "/etc/app.toml" },
    { hostPath: here("./certs/server.pem"),   guestPath: "/etc/server.pem" },
  ],
});
console.log(`same files again:  same snapshot: ${again.snapshotPath === image.snapshotPath}, booted: ${again.baked}`);

// An edited file: a new cache key, a new snapshot with the new contents.
// (An edited copy, so this checkout stays as it is.)
const tmp = await mkdtemp(join(tmpdir(), "sm-example-04-"));
try {
  await writeFile(join(tmp, "app.toml"), '[server]\nname = "edited"\nport = 9090\n');
  const edited = await Image.build({
    ref,
    extraFiles: [
      { hostPath: join(tmp, "app.toml"),      guestPath: "/etc/app.toml" },
      { hostPath: here("./certs/server.pem"), guestPath: "/etc/server.pem" },
    ],
  });
  const pool2 = await edited.pool({ min: 0, max: 1 });
  const vm2 = await pool2.acquire();
  try {
    const r = await vm2.exec({ argv: ["grep", "name", "/etc/app.toml"] });
    console.log(`edited app.toml:   new snapshot: ${edited.snapshotPath !== image.snapshotPath}, guest reads ${r.stdout.toString().trim()}`);
  } finally {
    await vm2.release();
  }
  await pool2.shutdown();
} finally {
  await rm(tmp, { recursive: true, force: true });
}
