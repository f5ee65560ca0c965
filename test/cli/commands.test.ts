/**
 * The command line without VMs: parsing with Docker's habits, help on every
 * command, one-line errors with exit 125, version, completion scripts.
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { parseCommand, parseDurationMs, parseMib, UsageError } from "../../src/cli/args.js";
import { COMMANDS, RUN } from "../../src/cli/commands.js";
import { parseDisk, parseEnv, parsePublish, parseVolume } from "../../src/cli/run.js";
import { REPO_ROOT } from "../helpers.js";

const BIN = join(REPO_ROOT, "bin", "supermachine.js");
const work = mkdtempSync(join(tmpdir(), "sm-cli-cmds-"));
const env = { ...process.env, SUPERMACHINE_CACHE_DIR: join(work, "cache"), SUPERMACHINE_SNAPSHOTS_DIR: join(work, "snaps"), SUPERMACHINE_DEBUG: "" };

function sm(args: string[]) {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: "utf8", timeout: 60_000, env });
}

describe("parsing", () => {
  it("run stops at IMAGE: the command's own flags are left alone; -it bundles", () => {
    const p = parseCommand(RUN, ["-it", "-e", "A=1", "-eB=2", "--memory=512m", "alpine", "ls", "-la", "--help"]);
    assert.equal(p.values.interactive, true);
    assert.equal(p.values.tty, true);
    assert.deepEqual(p.values.env, ["A=1", "B=2"]);
    assert.equal(p.values.memory, "512m");
    assert.deepEqual(p.positionals, ["alpine", "ls", "-la", "--help"]);
    assert.equal(p.help, false);
  });
  it("`--` first means the default image; unknown flags are UsageErrors", () => {
    const p = parseCommand(RUN, ["-q", "--", "sh", "-c", "echo"]);
    assert.equal(p.dashDashFirst, true);
    assert.deepEqual(p.positionals, ["sh", "-c", "echo"]);
    assert.throws(() => parseCommand(RUN, ["--nope", "alpine"]), UsageError);
    assert.throws(() => parseCommand(RUN, ["-Z"]), /unknown flag -Z/);
    assert.throws(() => parseCommand(RUN, ["-e"]), /needs a value/);
  });
  it("sizes, durations, ports, volumes, disks and env files", () => {
    assert.equal(parseMib("512", "-m"), 512);
    assert.equal(parseMib("1g", "-m"), 1024);
    assert.throws(() => parseMib("lots", "-m"), UsageError);
    assert.equal(parseDurationMs("1", "--timeout"), 1000);
    assert.equal(parseDurationMs("500ms", "--timeout"), 500);
    assert.equal(parseDurationMs("7", "--unused-for", "d"), 7 * 86_400_000);
    assert.deepEqual(parsePublish("8080:80"), { hostPort: 8080, guestPort: 80 });
    assert.deepEqual(parsePublish("80"), { hostPort: 0, guestPort: 80 });
    assert.throws(() => parsePublish("0.0.0.0:1:2"), UsageError);
    assert.throws(() => parsePublish("80:99999"), UsageError);
    assert.deepEqual(parseVolume("/tmp:/work:ro", 0), { hostPath: "/tmp", guestTag: "v0", guestPath: "/work", readOnly: true });
    assert.throws(() => parseVolume("/tmp:relative", 0), UsageError);
    assert.deepEqual(parseDisk("data:1g:/data"), { name: "data", sizeMib: 1024, mountPoint: "/data" });
    assert.throws(() => parseDisk("data:/data"), UsageError);
    const f = join(work, "env");
    writeFileSync(f, "# comment\nA=1\n\nB=two words\nHOME\n");
    assert.deepEqual(parseEnv(["A=3"], [f]), { A: "3", B: "two words", HOME: process.env.HOME });
    assert.throws(() => parseEnv(["=x"], []), UsageError);
  });
});

describe("supermachine (no VM)", { timeout: 5 * 60_000 }, () => {
  it("every command's --help, -h and `help COMMAND` exit 0 and show its usage", () => {
    for (const c of COMMANDS) {
      for (const args of [[c.name, "--help"], [c.name, "-h"], ["help", c.name]]) {
        const r = sm(args);
        assert.equal(r.status, 0, `${args.join(" ")}: ${r.stderr}`);
        assert.match(r.stdout, new RegExp(`usage: supermachine ${c.name}`), args.join(" "));
      }
    }
    const top = sm(["--help"]);
    assert.equal(top.status, 0);
    for (const c of COMMANDS) assert.match(top.stdout, new RegExp(`\\n  ${c.name} `));
  });
  it("an unknown flag or command exits 125 with one line and no stack", () => {
    for (const args of [["run", "--bogus", "alpine"], ["images", "--bogus"], ["prune", "-x"], ["frobnicate"], ["--bogus"], ["run"], ["prune"], ["completion", "tcsh"]]) {
      const r = sm(args);
      assert.equal(r.status, 125, `${args.join(" ")}: ${r.stderr}`);
      assert.equal(r.stderr.trimEnd().split("\n").length, 1, `${args.join(" ")} prints one line: ${r.stderr}`);
      assert.doesNotMatch(r.stderr, /\n\s+at /);
    }
  });
  it("-v needs HOST:GUEST[:ro] with an absolute guest path", () => {
    const r = sm(["run", "-v", `${work}:relative`, "alpine", "ls"]);
    assert.equal(r.status, 125);
    assert.match(r.stderr, /-v expects HOST:GUEST\[:ro\]/);
  });
  it("a bad --network policy file is named", () => {
    const f = join(work, "policy.json");
    writeFileSync(f, JSON.stringify({ allow: ["example.com"], nope: 1 }));
    const r = sm(["run", "--network", f, "alpine", "true"]);
    assert.equal(r.status, 125);
    assert.match(r.stderr, /nope/);
  });
  it("--version prints the package version", () => {
    const r = sm(["--version"]);
    assert.equal(r.status, 0);
    assert.match(r.stdout, /^supermachine \d+\.\d+\.\d+/);
  });
  it("images, snapshots ls and prune on empty caches", () => {
    const i = sm(["images", "--json"]);
    assert.equal(i.status, 0, i.stderr);
    assert.deepEqual(JSON.parse(i.stdout), []);
    const s = sm(["snapshots", "ls", "--json"]);
    assert.equal(s.status, 0, s.stderr);
    assert.deepEqual(JSON.parse(s.stdout), []);
    const p = sm(["prune", "--all", "--json"]);
    assert.equal(p.status, 0, p.stderr);
    assert.equal(JSON.parse(p.stdout).freedBytes, 0);
    const rm = sm(["rm", "nothing-here"]);
    assert.equal(rm.status, 125);
    assert.match(rm.stderr, /snapshots ls/);
  });
  it("completion scripts: bash parses, each names every command", () => {
    for (const sh of ["bash", "zsh", "fish"]) {
      const r = sm(["completion", sh]);
      assert.equal(r.status, 0, r.stderr);
      for (const c of COMMANDS) assert.ok(r.stdout.includes(c.name), `${sh} completes ${c.name}`);
    }
    const f = join(work, "c.bash");
    writeFileSync(f, sm(["completion", "bash"]).stdout);
    const check = spawnSync("bash", ["-n", f], { encoding: "utf8" });
    assert.equal(check.status, 0, check.stderr);
    // Completing `supermachine run --me` offers --memory.
    const r = spawnSync("bash", ["-c", `source ${f}; COMP_WORDS=(supermachine run --me); COMP_CWORD=2; _supermachine; echo "\${COMPREPLY[@]}"`], { encoding: "utf8" });
    assert.equal(r.stdout.trim(), "--memory");
  });
  it("cleans up", () => rmSync(work, { recursive: true, force: true }));
});
