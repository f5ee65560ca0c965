/**
 * `supermachine run -it` through a real pseudo-terminal (python3's pty
 * module drives it, as a user's terminal would): an interactive shell gets
 * a prompt, `stty size` follows a window resize, Ctrl-C interrupts a guest
 * `sleep` and the shell survives, `exit 3` exits 3.
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { after, before, describe, it } from "node:test";
import { VM_TEST_TIMEOUT } from "../helpers.js";
import { BIN, cliEnv, type CliEnv } from "./cli-env.js";

/**
 * Runs argv on a new pty (rows 24, cols 80) and plays `steps`:
 * ["send", text] | ["expect", regex, timeoutS] | ["pause", s] | ["winsize", rows, cols].
 * Prints {"status": exit status, "log": [...]} as JSON; a failed expect
 * ends the run with the output seen so far.
 */
const DRIVER = String.raw`
import json, os, pty, re, select, signal, struct, sys, time, fcntl, termios
argv, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.execvp(argv[0], argv)
buf, log = b"", []
def read_until(rx, timeout):
    global buf
    end = time.time() + timeout
    while True:
        m = re.search(rx.encode(), buf)
        if m:
            buf = buf[m.end():]
            return True
        left = end - time.time()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return False
            if not chunk:
                return False
            buf += chunk
ok = True
for st in steps:
    if st[0] == "send":
        os.write(fd, st[1].encode())
        log.append(["sent", st[1]])
    elif st[0] == "expect":
        seen = buf
        if not read_until(st[1], st[2]):
            log.append(["missed", st[1], (seen + buf).decode("utf8", "replace")[-2000:]])
            ok = False
            break
        log.append(["matched", st[1]])
    elif st[0] == "pause":
        time.sleep(st[1])
    elif st[0] == "winsize":
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", st[1], st[2], 0, 0))
        log.append(["winsize", st[1], st[2]])
if not ok:
    os.kill(pid, signal.SIGKILL)
# Drain until the child exits.
end = time.time() + 120
while time.time() < end:
    r, _, _ = select.select([fd], [], [], 1)
    if r:
        try:
            if not os.read(fd, 65536):
                break
        except OSError:
            break
_, st = os.waitpid(pid, 0)
print(json.dumps({"ok": ok, "status": os.waitstatus_to_exitcode(st) if hasattr(os, "waitstatus_to_exitcode") else st >> 8, "log": log}))
`;

describe("supermachine run -it (pseudo-terminal)", { timeout: VM_TEST_TIMEOUT }, () => {
  let c: CliEnv;
  before(() => {
    c = cliEnv("pty");
  });
  after(() => {
    try {
      assert.deepEqual(c.qemus(), [], "no VM left behind");
    } finally {
      c.remove();
    }
  });

  it("prompt, stty size follows a resize, Ctrl-C interrupts sleep and the shell survives, exit 3 exits 3", () => {
    const steps = [
      ["expect", "PROMPT> ", 300],
      ["send", "stty size\r"],
      ["expect", "\\r*\\n24 80\\r*\\n", 30],
      ["expect", "PROMPT> ", 30],
      ["winsize", 40, 100],
      ["send", "sleep 0.5; stty size\r"],
      ["expect", "\\r*\\n40 100\\r*\\n", 30],
      ["expect", "PROMPT> ", 30],
      // Ctrl-C once the sleep runs (sent earlier, the shell would read it as input).
      ["send", "echo started; sleep 60; echo sleep-status=$?\r"],
      ["expect", "\\nstarted\\r*\\n", 30],
      ["pause", 2],
      ["send", "\x03"],
      ["expect", "PROMPT> ", 30],
      ["send", "echo still-$((40+2))\r"],
      ["expect", "still-42", 30],
      ["send", "exit 3\r"],
    ];
    const r = spawnSync("python3", ["-c", DRIVER, JSON.stringify([process.execPath, BIN, "run", "-it", "-e", "PS1=PROMPT> ", "default", "sh"]), JSON.stringify(steps)], {
      encoding: "utf8",
      env: { ...c.env, SUPERMACHINE_DEBUG: "" },
      timeout: 8 * 60_000,
    });
    assert.equal(r.status, 0, `driver: ${r.stderr}`);
    const out = JSON.parse(r.stdout) as { ok: boolean; status: number; log: unknown[] };
    assert.ok(out.ok, JSON.stringify(out.log, null, 1));
    // Ctrl-C reached the guest's sleep, not our process: it printed nothing and the shell went on.
    assert.equal(out.status, 3, JSON.stringify(out.log, null, 1));
  });
});
