/**
 * The VM network on real VMs: guest HTTP clients (busybox wget, Python
 * sockets) through the host stack to servers on the host's loopback, the
 * egress policy, setNetwork, snapshots and pools, and a hostile guest.
 * scripts/test.mjs runs every test in a network namespace with only
 * loopback; addresses in deny tests come from the documentation ranges.
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Image } from "../../src/image/image.js";
import { resolveImage } from "../../src/image/resolve.js";
import type { NetworkDeniedEvent } from "../../src/net/stack.js";
import { Vm } from "../../src/vm/vm.js";
import { DEFAULT_IMAGE_CONFIG } from "../../src/guest/default-image.js";
import { debianPythonLayout } from "../fixtures/oci/images.js";
import { VM_TEST_TIMEOUT, bootDefault, defaultRootfs } from "../helpers.js";

const BIG = 32 << 20;
/** A 32 MiB body that is not all one byte (so reordering or loss shows). */
const bigBody = Buffer.alloc(BIG);
for (let i = 0; i < BIG; i += 4) bigBody.writeUInt32LE((i * 2654435761) >>> 0, i);
const bigMd5 = createHash("md5").update(bigBody).digest("hex");

describe("VM network", { timeout: 4 * VM_TEST_TIMEOUT }, () => {
  let http: HttpServer;
  let httpPort: number;
  let httpConnections = 0;
  let raw: Server;
  let rawPort: number;
  let work: string;
  let hits = 0;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), "sm-vmnet-"));
    http = createHttpServer((req, res) => {
      if (req.url === "/big") return void res.end(bigBody);
      const m = /^\/id\/(\w+)$/.exec(req.url ?? "");
      if (m) return void res.end(`response for ${m[1]} #${++hits}\n`);
      res.end("hello from the host\n");
    });
    http.on("connection", () => httpConnections++);
    await new Promise<void>((r) => http.listen(0, "127.0.0.1", r));
    httpPort = (http.address() as { port: number }).port;
    // Upload sink: "<length>\n" then that many bytes; answers their md5 and closes.
    raw = createServer((s) => {
      let head = "";
      let want = -1;
      let got = 0;
      const h = createHash("md5");
      s.on("data", (c: Buffer) => {
        if (want < 0) {
          const nl = c.indexOf(10);
          if (nl < 0) return void (head += c.toString());
          want = Number(head + c.subarray(0, nl).toString());
          c = c.subarray(nl + 1);
        }
        got += c.length;
        h.update(c);
        if (got >= want) s.end(`${got} ${h.digest("hex")}\n`);
      });
      s.on("error", () => undefined);
    });
    await new Promise<void>((r) => raw.listen(0, "127.0.0.1", r));
    rawPort = (raw.address() as { port: number }).port;
  });

  after(async () => {
    http?.close();
    raw?.close();
    if (work) await rm(work, { recursive: true, force: true });
  });

  const myhost = { allow: ["myhost"], hosts: { myhost: "127.0.0.1" } };

  async function sh(vm: Vm, script: string, timeoutMs = 180_000): Promise<{ out: string; code: number }> {
    const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs });
    return { out: r.stdout.toString() + r.stderr.toString(), code: r.exitCode };
  }

  test("busybox wget through a hosts name: 32 MiB down and 32 MiB up arrive intact", async () => {
    const vm = await bootDefault({ network: myhost });
    try {
      const cfg = await sh(vm, "cat /etc/resolv.conf; cat /sys/class/net/eth0/mtu");
      assert.match(cfg.out, /nameserver 198\.19\.0\.1/);
      const hello = await sh(vm, `wget -q -O - http://myhost:${httpPort}/`);
      assert.equal(hello.out, "hello from the host\n");
      const down = await sh(vm, `wget -q -O - http://myhost:${httpPort}/big | md5sum`);
      assert.equal(down.out.split(" ")[0], bigMd5);
      const up = await sh(vm, `head -c ${BIG} /dev/urandom > /tmp/up && md5sum /tmp/up && { echo ${BIG}; cat /tmp/up; } | nc myhost ${rawPort}`);
      const [sum, reply] = up.out.trim().split("\n");
      assert.equal(reply, `${BIG} ${sum!.split(" ")[0]}`);
      const st = vm.network.stats();
      assert.ok(st.bytesIn >= BIG && st.bytesOut >= BIG, JSON.stringify(st));
      assert.equal(st.connectionsDenied, 0);
    } finally {
      await vm.destroy();
    }
  });

  test("allow list: a name not on it does not resolve, an IP literal not on it is refused at once, the server sees nothing", async () => {
    const vm = await bootDefault({ network: myhost });
    const denied: NetworkDeniedEvent[] = [];
    vm.network.on("denied", (e) => denied.push(e));
    try {
      const before = httpConnections;
      const name = await sh(vm, `nslookup other.example; wget -q -O - http://other.example:${httpPort}/`);
      assert.notEqual(name.code, 0);
      assert.match(name.out, /NXDOMAIN|bad address/i);
      const lit = await sh(vm, `wget -q -O - http://203.0.113.9:${httpPort}/; wget -q -O - http://127.0.0.1:${httpPort}/`);
      assert.match(lit.out, /Connection refused/);
      assert.equal(httpConnections, before, "the host-side server saw a connection");
      assert.ok(denied.some((d) => d.protocol === "dns" && d.name === "other.example"));
      assert.ok(denied.some((d) => d.protocol === "tcp" && d.address === "203.0.113.9" && /not on the allow list/.test(d.reason)));
    } finally {
      await vm.destroy();
    }
  });

  test("default policy: the gateway, cloud metadata and private addresses are refused at once", async () => {
    const vm = await bootDefault();
    const denied: NetworkDeniedEvent[] = [];
    vm.network.on("denied", (e) => denied.push(e));
    try {
      // (127.0.0.1 in the guest is the guest's own loopback: the stack never sees it.)
      for (const a of ["198.19.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.1", "100.64.0.1"]) {
        const r = await sh(vm, `wget -q -O - http://${a}:${httpPort}/`);
        assert.match(r.out, /Connection refused/, a);
      }
      assert.deepEqual(
        denied.map((d) => d.address),
        ["198.19.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.1", "100.64.0.1"],
      );
      assert.match(denied[1]!.reason, /metadata/);
      assert.equal(vm.network.stats().connectionsDenied, 5);
      // The guest's own loopback is its own.
      const lo = await sh(vm, "ping -c 1 -W 5 127.0.0.1 >/dev/null && echo lo-ok");
      assert.match(lo.out, /lo-ok/);
    } finally {
      await vm.destroy();
    }
  });

  test("network: false — DNS fails, nothing leaves, exec still works; setNetwork opens it without a restart", async () => {
    const vm = await bootDefault({ network: false });
    try {
      const r = await sh(vm, `nslookup myhost; wget -q -O - http://203.0.113.9:${httpPort}/; echo still-here`);
      assert.match(r.out, /still-here/);
      assert.match(r.out, /Connection refused/);
      assert.equal(vm.network.stats().bytesOut, 0);
      assert.equal(vm.network.stats().connectionsAllowed, 0);
      await vm.setNetwork(myhost);
      const ok = await sh(vm, `wget -q -O - http://myhost:${httpPort}/`);
      assert.equal(ok.out, "hello from the host\n");
      await vm.setNetwork(false);
      const again = await sh(vm, `wget -q -O - http://myhost:${httpPort}/ || echo refused`);
      assert.match(again.out, /refused/);
      await assert.rejects(vm.setNetwork({ allow: ["not a name"] }), /setNetwork\(policy\)\.allow: not a valid host name/);
    } finally {
      await vm.destroy();
    }
  });

  test("Python sockets in a Debian image resolve through the host's DNS and fetch", async () => {
    const img = await resolveImage(await debianPythonLayout(join(work, "layout")), { cacheDir: join(work, "cache") });
    const vm = await Vm.boot({ rootfsImage: img.rootfsImage, config: { env: ["PATH=/usr/bin:/bin"] }, network: myhost });
    try {
      const code = [
        "import socket, hashlib",
        `s = socket.create_connection(("myhost", ${httpPort}))`,
        `s.sendall(b"GET /big HTTP/1.0\\r\\nHost: myhost\\r\\n\\r\\n")`,
        "data = b''",
        "while True:",
        "    c = s.recv(1 << 20)",
        "    if not c: break",
        "    data += c",
        "body = data.split(b'\\r\\n\\r\\n', 1)[1]",
        "print(len(body), hashlib.md5(body).hexdigest())",
        "try:",
        "    socket.getaddrinfo('other.example', 80)",
        "    print('resolved')",
        "except socket.gaierror as e:",
        "    print('gaierror')",
      ].join("\n");
      const r = await vm.exec({ argv: ["python3", "-c", code], timeoutMs: 300_000 });
      assert.equal(r.stdout.toString(), `${BIG} ${bigMd5}\ngaierror\n`, r.stderr.toString());
    } finally {
      await vm.destroy();
    }
  });

  test("a snapshot baked with network: restored VMs fetch at once; 8 at a time each get their own response", async () => {
    const snapshotsDir = join(work, "snapshots");
    const image = await Image.build({
      ref: `dir:${await defaultRootfs()}`,
      snapshotsDir,
      network: myhost,
      warmupTag: randomBytes(4).toString("hex"),
      warmup: async (vm) => {
        // A connection open at snapshot time: the restored VMs' stacks never saw it.
        await vm.exec({ argv: ["sh", "-c", `wget -q -O /root/warm http://myhost:${httpPort}/id/warmup; (nc myhost ${rawPort} </dev/zero >/dev/null 2>&1 &)`] });
      },
    });
    // A pool with another policy than the build's: one snapshot serves both.
    const closed = await image.pool({ min: 0, max: 1, network: false });
    const pool = await image.pool({ min: 0, max: 8 });
    try {
      const vms = await Promise.all(Array.from({ length: 8 }, () => pool.acquire()));
      try {
        const outs = await Promise.all(vms.map((vm, i) => sh(vm, `cat /root/warm; wget -q -O - http://myhost:${httpPort}/id/vm${i}`)));
        outs.forEach((o, i) => {
          assert.match(o.out, /^response for warmup #\d+\n/);
          assert.match(o.out, new RegExp(`response for vm${i} #\\d+\\n$`), o.out);
        });
      } finally {
        await Promise.all(vms.map((vm) => vm.release()));
      }
      const c = await closed.acquire();
      try {
        const r = await sh(c, `wget -q -O - http://myhost:${httpPort}/ || echo cut-off`);
        assert.match(r.out, /cut-off/);
      } finally {
        await c.release();
      }
    } finally {
      await pool.shutdown();
      await closed.shutdown();
      await image.close();
    }
  });

  test("a hostile guest floods the NIC (raw garbage frames, a SYN flood, many connections): the host and another VM keep working", async () => {
    const layoutImg = await resolveImage(`oci:${join(work, "layout")}:python`, { cacheDir: join(work, "cache") });
    const attacker = await Vm.boot({ rootfsImage: layoutImg.rootfsImage, config: { env: ["PATH=/usr/bin:/bin"] }, network: myhost });
    const bystander = await bootDefault({ network: myhost, config: DEFAULT_IMAGE_CONFIG });
    try {
      let ticks = 0;
      const timer = setInterval(() => ticks++, 50);
      const code = [
        "import socket, os, struct, random",
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
        "s.bind(('eth0', 0))",
        "mac = open('/sys/class/net/eth0/address').read().strip().replace(':', '')",
        "src = bytes.fromhex(mac)",
        "gw = b'\\x52\\x54\\x00\\x53\\x4d\\x01'",
        "for i in range(20000):",
        "    s.send(os.urandom(random.randint(14, 1500)))",
        "def csum(b):",
        "    if len(b) % 2: b += b'\\0'",
        "    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))",
        "    while t >> 16: t = (t & 0xffff) + (t >> 16)",
        "    return ~t & 0xffff",
        "me = bytes([198, 19, 0, 2])",
        "for i in range(5000):",
        "    dst = bytes([203, 0, 113, i % 250 + 1]) if i % 2 else bytes([127, 0, 0, 1])",
        "    tcp = struct.pack('!HHIIBBHHH', 1024 + i % 60000, 80, i, 0, 5 << 4, 2, 65535, 0, 0)",
        "    pseudo = me + dst + struct.pack('!BBH', 0, 6, len(tcp))",
        "    tcp = tcp[:16] + struct.pack('!H', csum(pseudo + tcp)) + tcp[18:]",
        "    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(tcp), i, 0x4000, 64, 6, 0, me, dst)",
        "    ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]",
        "    s.send(gw + src + b'\\x08\\x00' + ip + tcp)",
        "conns = []",
        "for i in range(300):",
        "    try:",
        `        c = socket.create_connection(('myhost', ${httpPort}), timeout=10)`,
        "        conns.append(c)",
        "    except OSError as e:",
        "        pass",
        "print('open', len(conns))",
      ].join("\n");
      const flood = attacker.exec({ argv: ["python3", "-c", code], timeoutMs: 600_000 });
      // Meanwhile the other VM fetches as usual.
      const other = await sh(bystander, `wget -q -O - http://myhost:${httpPort}/big | md5sum`);
      assert.equal(other.out.split(" ")[0], bigMd5);
      const r = await flood;
      assert.match(r.stdout.toString(), /^open \d+/, r.stderr.toString());
      clearInterval(timer);
      assert.ok(ticks > 0, "the host's event loop kept running");
      const st = attacker.network.stats();
      assert.ok(st.connectionsDenied > 0, JSON.stringify(st));
      // The attacker itself still works.
      assert.equal((await sh(attacker, "echo alive")).out, "alive\n");
      // Without TX NAPI (the agent's module parameter), the flood's raw sends
      // could block for good on TX buffers the driver never reclaimed.
      assert.equal((await sh(attacker, "cat /sys/module/virtio_net/parameters/napi_tx")).out, "N\n");
    } finally {
      await attacker.destroy();
      await bystander.destroy();
    }
  });
});
