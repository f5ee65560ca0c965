/**
 * A seccomp filter, added by bubblewrap (`--seccomp FD`) on top of QEMU's own
 * `-sandbox`, that keeps a QEMU taken over by its guest from creating or
 * joining namespaces: QEMU's filter allows `unshare`, and a new user
 * namespace would give it capabilities there, and with them kernel code
 * (netfilter, mounts, …) that an unprivileged process cannot otherwise reach.
 *
 *   unshare, setns               → EPERM
 *   clone with any CLONE_NEW*    → EPERM (QEMU creates threads, never namespaces)
 *   clone3                       → ENOSYS (its flags are in memory seccomp cannot read;
 *                                  glibc falls back to clone)
 *   x32 system calls             → EPERM (another numbering of the same calls)
 *   another architecture's calls → the process is killed (QEMU makes none)
 *
 * Classic BPF, as the kernel's seccomp(2) takes it: struct sock_filter
 * { u16 code; u8 jt; u8 jf; u32 k; }, evaluated against struct seccomp_data
 * { int nr; u32 arch; u64 ip; u64 args[6]; } (little-endian hosts only).
 */

const LD_W_ABS = 0x20;
const JEQ_K = 0x15;
const JGE_K = 0x35;
const JSET_K = 0x45;
const RET_K = 0x06;

const RET_ALLOW = 0x7fff0000;
const RET_ERRNO = 0x00050000;
const RET_KILL_PROCESS = 0x80000000;
const EPERM = 1;
const ENOSYS = 38;

/** CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET. */
const CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000;
const X32_SYSCALL_BIT = 0x40000000;

interface ArchTable {
  audit: number;
  unshare: number;
  setns: number;
  clone: number;
  clone3: number;
  x32: boolean;
}

const ARCHES: Record<string, ArchTable> = {
  x64: { audit: 0xc000003e, unshare: 272, setns: 308, clone: 56, clone3: 435, x32: true },
  arm64: { audit: 0xc00000b7, unshare: 97, setns: 268, clone: 220, clone3: 435, x32: false },
};

/** The filter for this host's architecture, or undefined where there is none (QEMU keeps its own). */
export function namespaceFilter(arch: string = process.arch): Buffer | undefined {
  const t = ARCHES[arch];
  if (!t) return undefined;
  // [code, jt, jf, k]; jumps are relative to the next instruction. Labels
  // are resolved below so the program reads top to bottom.
  type Ins = [number, number | string, number | string, number] | string;
  const prog: Ins[] = [
    [LD_W_ABS, 0, 0, 4], // arch
    [JEQ_K, "native", 0, t.audit],
    [RET_K, 0, 0, RET_KILL_PROCESS],
    "native",
    [LD_W_ABS, 0, 0, 0], // nr
    ...(t.x32 ? ([[JGE_K, "deny", 0, X32_SYSCALL_BIT]] as Ins[]) : []),
    [JEQ_K, "deny", 0, t.unshare],
    [JEQ_K, "deny", 0, t.setns],
    [JEQ_K, "enosys", 0, t.clone3],
    [JEQ_K, 0, "allow", t.clone],
    [LD_W_ABS, 0, 0, 16], // args[0], low 32 bits: the clone flags
    [JSET_K, "deny", "allow", CLONE_NEW_ANY],
    "allow",
    [RET_K, 0, 0, RET_ALLOW],
    "deny",
    [RET_K, 0, 0, RET_ERRNO | EPERM],
    "enosys",
    [RET_K, 0, 0, RET_ERRNO | ENOSYS],
  ];
  const labels = new Map<string, number>();
  const code: Exclude<Ins, string>[] = [];
  for (const i of prog) {
    if (typeof i === "string") labels.set(i, code.length);
    else code.push(i);
  }
  const out = Buffer.alloc(code.length * 8);
  code.forEach(([op, jt, jf, k], pc) => {
    const rel = (j: number | string): number => {
      if (typeof j === "number") return j;
      const off = labels.get(j)! - (pc + 1);
      if (off < 0 || off > 255) throw new Error(`seccomp filter: bad jump to ${j}`);
      return off;
    };
    out.writeUInt16LE(op, pc * 8);
    out.writeUInt8(rel(jt), pc * 8 + 2);
    out.writeUInt8(rel(jf), pc * 8 + 3);
    out.writeUInt32LE(k >>> 0, pc * 8 + 4);
  });
  return out;
}
