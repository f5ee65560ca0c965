/**
 * The commands and their options: one table that parsing, help and shell
 * completion all read.
 */

import type { CommandSpec, OptionSpec } from "./args.js";

const JSON_OPT: OptionSpec = { name: "json", type: "boolean", help: "print JSON instead of a table" };
const QUIET: OptionSpec = { name: "quiet", short: "q", type: "boolean", help: "no progress on stderr" };
const PULL: OptionSpec = { name: "pull", type: "string", arg: "POLICY", choices: ["always", "missing", "never"], help: "always, missing or never (default missing)" };
const PLATFORM: OptionSpec = { name: "platform", type: "string", arg: "OS/ARCH", help: "image platform, e.g. linux/amd64 (default the host's)" };
const MEMORY: OptionSpec = { name: "memory", short: "m", type: "string", arg: "SIZE", help: "guest memory ceiling: 512, 512m, 1g (MiB by default; default 256)" };
const CPUS: OptionSpec = { name: "cpus", type: "string", arg: "N", aliases: ["vcpus"], help: "virtual CPUs (default 1)" };
const NETWORK: OptionSpec = {
  name: "network",
  type: "string",
  arg: "MODE",
  choices: ["default", "none"],
  help: "default (public internet), none, or a JSON file holding a NetworkPolicy ({allow, deny, hosts})",
};
const ENV: OptionSpec = { name: "env", short: "e", type: "string", multiple: true, arg: "KEY=VALUE", help: "environment variable (KEY alone takes the host's value); repeatable" };
const ACCEL: OptionSpec = { name: "accel", type: "string", arg: "MODE", choices: ["auto", "kvm", "tcg"], help: "kvm, tcg or auto (default auto, or SUPERMACHINE_ACCEL)" };

export const RUN: CommandSpec = {
  name: "run",
  usage: "run [OPTIONS] IMAGE [COMMAND [ARG...]]",
  summary:
    "Runs COMMAND in a fresh VM of IMAGE, streams its output and exits with its status. The first run of an image pulls it and bakes a snapshot; later runs restore the snapshot (no boot).",
  stopAtPositional: true,
  options: [
    { name: "interactive", short: "i", type: "boolean", help: "forward standard input to the command" },
    { name: "tty", short: "t", type: "boolean", help: "allocate a pseudo-terminal (raw mode on yours, window size followed)" },
    ENV,
    { name: "env-file", type: "string", multiple: true, arg: "FILE", help: "read KEY=VALUE lines (# comments) from FILE; repeatable" },
    { name: "workdir", short: "w", type: "string", arg: "DIR", help: "working directory in the guest" },
    { name: "user", short: "u", type: "string", arg: "USER", help: "user to run as: name or uid[:gid]" },
    { name: "entrypoint", type: "string", arg: "CMD", help: "replace the image's ENTRYPOINT (\"\" clears it)" },
    { name: "volume", short: "v", type: "string", multiple: true, arg: "HOST:GUEST[:ro]", help: "mount a host directory at GUEST; repeatable" },
    { name: "disk", type: "string", multiple: true, arg: "NAME:SIZE:/PATH", help: "a block-device volume of SIZE (MiB, or 1g) mounted at /PATH; repeatable" },
    { name: "publish", short: "p", type: "string", multiple: true, arg: "[HOST:]GUEST", help: "forward 127.0.0.1:HOST (0 or omitted: any free port) to guest port GUEST; prints the address" },
    NETWORK,
    MEMORY,
    CPUS,
    { name: "timeout", type: "string", arg: "DURATION", help: "kill the command after DURATION (seconds, or 500ms, 2m); exit 124" },
    PULL,
    PLATFORM,
    { name: "rootfs", type: "string", arg: "DIR", help: "boot this host directory as the root filesystem (cold boot, no IMAGE)" },
    ACCEL,
    QUIET,
  ],
  details: `IMAGE is an OCI reference (alpine, host:port/repo:tag, repo@sha256:...), an
offline source (oci:DIR[:tag], oci-archive:FILE, docker-archive:FILE), dir:PATH
(a host directory as an image), or \`default\` (the busybox image built by
setup). \`supermachine run -- COMMAND\` also runs the default image. Without a
COMMAND the image's ENTRYPOINT + CMD run; a COMMAND replaces CMD.

Exit status: the command's; 128+N when signal N killed it; 124 when --timeout
killed it; 125 when supermachine itself failed (bad flag, image, VM).`,
};

export const PULL_CMD: CommandSpec = {
  name: "pull",
  usage: "pull [OPTIONS] IMAGE",
  summary: "Pulls IMAGE into the cache and builds its root filesystem (progress on stderr, the digest on stdout).",
  options: [PLATFORM, QUIET, { name: "insecure", type: "boolean", help: "reach the registry over plain HTTP (loopback always is)" }],
};

export const BUILD: CommandSpec = {
  name: "build",
  usage: "build [OPTIONS] [IMAGE [COMMAND [ARG...]]]",
  summary:
    "Bakes the snapshot of IMAGE (pull, unpack, boot, start the workload, snapshot) so pools and `run` restore it. Options come from flags, a JSON file of BuildOptions (-f), or both (flags win). COMMAND replaces the workload's ENTRYPOINT + CMD.",
  stopAtPositional: true,
  options: [
    { name: "file", short: "f", type: "string", arg: "FILE", help: "JSON file holding BuildOptions (ref, name, memoryMib, vcpus, cmd, env, guestPort, listenerRequired, network, ...)" },
    { name: "name", type: "string", arg: "NAME", help: "snapshot name (default derived from the cache key)" },
    MEMORY,
    CPUS,
    ENV,
    { name: "listen", type: "string", arg: "PORT", help: "start the workload and wait for it to listen on guest PORT before the snapshot" },
    { name: "no-workload", type: "boolean", help: "do not start the image's ENTRYPOINT/CMD in restored VMs" },
    NETWORK,
    PULL,
    PLATFORM,
    ACCEL,
    QUIET,
    JSON_OPT,
  ],
};

export const IMAGES: CommandSpec = {
  name: "images",
  usage: "images [OPTIONS]",
  summary: "Lists the images in the cache: references, id, size on disk, last use.",
  options: [JSON_OPT],
};

export const SNAPSHOTS: CommandSpec = {
  name: "snapshots",
  usage: "snapshots ls [OPTIONS] | snapshots rm [--force] NAME...",
  summary: "Lists (ls) or removes (rm) baked snapshots: name, image, memory, size, last use, and the processes using each.",
  subcommands: ["ls", "rm"],
  options: [JSON_OPT, { name: "force", type: "boolean", help: "rm: remove even while a process uses it" }],
};

export const RM: CommandSpec = {
  name: "rm",
  usage: "rm [OPTIONS] NAME...",
  summary: "Removes snapshots (by name) and cached images (by reference, id or digest). A snapshot in use is refused unless --force.",
  options: [{ name: "force", short: "f", type: "boolean", help: "remove a snapshot even while a process uses it" }, JSON_OPT],
};

export const PRUNE: CommandSpec = {
  name: "prune",
  usage: "prune [OPTIONS]",
  summary:
    "Removes cached images and snapshots by last use: unused for --unused-for, then the least recently used until the total fits in --max-size, or everything unused with --all. Snapshots in use (a pool or Image holds them) are kept.",
  options: [
    { name: "unused-for", type: "string", arg: "DURATION", aliases: ["older-than"], help: "unused for this long: 7d, 12h, 30m (days by default)" },
    { name: "max-size", type: "string", arg: "SIZE", help: "then remove least recently used entries down to SIZE (500m, 10g)" },
    { name: "all", short: "a", type: "boolean", help: "remove everything not in use" },
    { name: "images", type: "boolean", help: "only the image cache" },
    { name: "snapshots", type: "boolean", help: "only snapshots" },
    { name: "dry-run", short: "n", type: "boolean", help: "list what would be removed, remove nothing" },
    JSON_OPT,
  ],
};

export const INFO: CommandSpec = {
  name: "info",
  usage: "info [OPTIONS]",
  summary: "Prints the accelerator, QEMU, boot assets, cache and snapshot directories, and which confinements apply to QEMU (docs/confinement.md).",
  options: [JSON_OPT],
};

export const DOCTOR: CommandSpec = {
  name: "doctor",
  usage: "doctor [OPTIONS]",
  summary: "Checks QEMU, the boot assets, /dev/kvm, hardware virtualization, cgroups, bubblewrap/setpriv and disk space, and prints what to do about each problem; exits 1 when something required is missing.",
  options: [JSON_OPT],
};

export const SETUP: CommandSpec = {
  name: "setup",
  usage: "setup [OPTIONS]",
  summary: "Installs what doctor finds missing with apt-get (as root), then runs doctor.",
  options: [
    JSON_OPT,
    { name: "dry-run", type: "boolean", help: "print the commands instead of running them" },
    { name: "qemu", type: "boolean", help: "also build QEMU with the reload patch from Debian's source (TCG hosts: pools reuse QEMU processes; a few minutes)" },
  ],
};

export const COMPLETION: CommandSpec = {
  name: "completion",
  usage: "completion bash|zsh|fish",
  summary: "Prints a shell completion script. bash: `source <(supermachine completion bash)`; zsh: `source <(supermachine completion zsh)`; fish: `supermachine completion fish | source`.",
  options: [],
};

export const VERSION: CommandSpec = { name: "version", usage: "version", summary: "Prints the version.", options: [] };

export const HELP: CommandSpec = { name: "help", usage: "help [COMMAND]", summary: "Prints help for COMMAND (or the list of commands).", options: [] };

export const COMMANDS: readonly CommandSpec[] = [RUN, PULL_CMD, BUILD, IMAGES, SNAPSHOTS, RM, PRUNE, INFO, DOCTOR, SETUP, COMPLETION, VERSION, HELP];
