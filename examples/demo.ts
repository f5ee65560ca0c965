/**
 * The demo (`npm run demo`): boot the default image (busybox, built locally,
 * offline) as a microVM and run commands in it.
 */

import { Vm } from "../src/index.js";
import { DEFAULT_IMAGE_CONFIG, ensureDefaultImage } from "../src/guest/default-image.js";
import { defaultCacheDir } from "../src/paths.js";

function show(label: string, r: { stdout: Buffer; stderr: Buffer; exitCode: number }): void {
  const out = r.stdout.toString().trimEnd();
  const err = r.stderr.toString().trimEnd();
  console.log(`$ ${label}    (exit ${r.exitCode})`);
  if (out) console.log(out.replace(/^/gm, "  "));
  if (err) console.log(err.replace(/^/gm, "  stderr: "));
}

async function main(): Promise<void> {
  const rootfs = await ensureDefaultImage(defaultCacheDir());
  const t0 = performance.now();
  const vm = await Vm.boot({ rootfs, config: DEFAULT_IMAGE_CONFIG, memoryMib: 256 });
  try {
    console.log(`booted VM ${vm.id} in ${(performance.now() - t0).toFixed(0)} ms on ${vm.accelerator} (${vm.acceleratorReason}), agent ${vm.agentVersion}\n`);
    show("uname -a", await vm.exec({ argv: ["uname", "-a"] }));
    show("cat /proc/cpuinfo | grep 'model name'", await vm.exec({ argv: ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"] }));
    show("echo hello from the VM", await vm.exec({ argv: ["echo", "hello from the VM"] }));
    show("ip -4 addr show eth0; cat /etc/resolv.conf    (the VM network: docs/network.md)", await vm.exec({ argv: ["sh", "-c", "ip -4 addr show eth0; cat /etc/resolv.conf"] }));
    await vm.setNetwork(false);
    show("nslookup example.com    (after vm.setNetwork(false): refused by the host)", await vm.exec({ argv: ["sh", "-c", "nslookup example.com 2>&1 | grep -m1 NXDOMAIN"] }));
    show("sh -c 'echo to stderr >&2; exit 3'", await vm.exec({ argv: ["sh", "-c", "echo to stderr >&2; exit 3"] }));

    await vm.writeFile("/tmp/script.sh", Buffer.from("#!/bin/sh\necho \"args: $*\"; echo \"cwd: $(pwd)\"\n"));
    show("staged script (chmod +x, run in /tmp)", await vm.exec({ argv: ["sh", "/tmp/script.sh", "a b", "c"], cwd: "/tmp" }));

    const r = await vm.exec({ argv: ["sleep", "100"], timeoutMs: 1000 });
    console.log(`$ sleep 100 with timeoutMs 1000    (exit ${r.exitCode}, timedOut ${r.timedOut})`);

    const n = 50;
    const t1 = performance.now();
    for (let i = 0; i < n; i++) await vm.exec({ argv: ["true"] });
    console.log(`\n${n} sequential execs of 'true': ${((performance.now() - t1) / n).toFixed(2)} ms each`);
    const pings: number[] = [];
    for (let i = 0; i < 200; i++) pings.push(await vm.ping());
    pings.sort((a, b) => a - b);
    console.log(`agent round trip (ping): p50 ${pings[100]!.toFixed(3)} ms`);
  } finally {
    await vm.close();
  }
  console.log("\nVM closed; nothing left running.");
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
