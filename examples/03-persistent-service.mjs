// Pattern 3: a persistent service inside the VM. The image is baked with its
// workload running and listening, so every VM restored from the snapshot is
// serving at once, with no start-up on the hot path.
//
// The seed bakes "nginx:alpine". Offline, this example runs busybox's httpd
// in the default image (cmd overrides the image's command); point
// SUPERMACHINE_EXAMPLE_NGINX_IMAGE at an nginx image to bake it as the seed
// writes it.
//
//   node examples/03-persistent-service.mjs

import { get } from "node:http";
import { Image, defaultImageRef } from "@supermachine/core";

const nginxRef = process.env.SUPERMACHINE_EXAMPLE_NGINX_IMAGE;

const image = await Image.build(
  nginxRef
    ? {
        ref: nginxRef,
        listenerRequired: true,   // wait for workload to bind before snapshot
        // (no warmup needed — listener-ready trigger fires when nginx is up)
      }
    : {
        ref: await defaultImageRef(),
        cmd: ["sh", "-c", "mkdir -p /www && echo 'hello from the service baked into the snapshot' > /www/index.html && exec httpd -f -p 80 -h /www"],
        guestPort: 80,            // the port listenerRequired waits for (80 is the default)
        listenerRequired: true,   // wait for workload to bind before snapshot
      },
);

const pool = await image.pool({ min: 1, max: 2 });
// Twice: the first VM may be the bake's own (warm handoff); the second is
// restored from the snapshot (restoreOnRelease), and serves just the same.
for (const round of [1, 2]) {
  const vm = await pool.acquire();
  try {
    // Inside the VM: the server is already up (it was running when the snapshot was taken).
    const inside = await vm.exec({ argv: ["wget", "-q", "-O", "-", "http://127.0.0.1:80/"], timeoutMs: 30_000 });
    console.log(`VM ${round}, inside the VM:  ${inside.stdout.toString().trim()}`);

    // From the host, through a forwarded port (127.0.0.1:<free port> → guest port 80).
    const web = await vm.exposeTcp(0, 80);
    try {
      const body = await new Promise((resolve, reject) => {
        get(`http://${web.localAddr}/`, { agent: false }, (res) => {
          let data = "";
          res.setEncoding("utf8");
          res.on("data", (c) => (data += c));
          res.on("end", () => resolve(`HTTP ${res.statusCode}: ${data.trim()}`));
        }).on("error", reject);
      });
      console.log(`VM ${round}, from the host:  ${body}  (via ${web.localAddr})`);
    } finally {
      await web.stop();
    }
  } finally {
    await vm.release();
  }
}
await pool.shutdown();
