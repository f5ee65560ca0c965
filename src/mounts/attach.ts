/**
 * Wiring a mount to a running VM: validates the `mounts` option, registers
 * each tag with the agent (a MOUNT stream), serves the guest kernel's FUSE
 * requests with a {@link FuseServer} and detaches before snapshots. See
 * docs/mounts.md ("Transport", "Snapshots").
 */

import { stat } from "node:fs/promises";
import { resolve } from "node:path";
import { MountError, invalidOption } from "../errors.js";
import type { AgentConnection, MountStream } from "../agent-client/connection.js";
import { FuseServer, type FuseServerOptions, type MountSpec, type SymlinkPolicy } from "./server.js";
import { Errno, encodeError } from "./wire.js";

/** A validated mount: every field present. */
export interface ValidMount {
  readonly hostPath: string;
  readonly guestTag: string;
  readonly symlinks: SymlinkPolicy;
  readonly readOnly: boolean;
  /** Where it is mounted on every VM (the option, or where warmup mounted it). */
  readonly guestPath?: string;
}

/** Most mounts per VM (the agent registers at most 64). */
export const MAX_MOUNTS = 64;
/**
 * FUSE requests of one mount the host holds at once (queued or running);
 * beyond it a request is answered EIO at once. The agent forwards at most 64.
 */
export const MAX_PENDING_REQUESTS = 128;
/** How long a detach (unmount in the guest) may take. */
const DETACH_TIMEOUT_MS = 30_000;

const TAG_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,35}$/;

/**
 * Checks the shape of a `mounts` list (no I/O): TypeErrors naming
 * `mounts[i].<field>`, MountError for duplicate tags or guest paths.
 */
export function validateMounts(list: unknown, option = "mounts"): ValidMount[] {
  if (list === undefined) return [];
  if (!Array.isArray(list)) throw invalidOption(option, "an array of { hostPath, guestTag, symlinks?, readOnly?, guestPath? }", list);
  if (list.length > MAX_MOUNTS) throw invalidOption(option, `at most ${MAX_MOUNTS} mounts`, list.length);
  const out: ValidMount[] = [];
  list.forEach((m: unknown, i) => {
    const name = `${option}[${i}]`;
    if (typeof m !== "object" || m === null) throw invalidOption(name, "an object { hostPath, guestTag }", m);
    const s = m as MountSpec;
    if (typeof s.hostPath !== "string" || s.hostPath === "" || s.hostPath.includes("\0")) throw invalidOption(`${name}.hostPath`, "a host directory path", s.hostPath);
    if (typeof s.guestTag !== "string" || !TAG_RE.test(s.guestTag)) {
      throw invalidOption(`${name}.guestTag`, "1-36 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)", s.guestTag);
    }
    const symlinks = s.symlinks ?? "opaque";
    if (symlinks !== "deny" && symlinks !== "opaque" && symlinks !== "follow") throw invalidOption(`${name}.symlinks`, '"deny", "opaque" or "follow"', s.symlinks);
    if (s.readOnly !== undefined && typeof s.readOnly !== "boolean") throw invalidOption(`${name}.readOnly`, "a boolean", s.readOnly);
    if (s.guestPath !== undefined) {
      if (typeof s.guestPath !== "string" || !s.guestPath.startsWith("/") || s.guestPath.includes("\0") || s.guestPath.length > 4096) {
        throw invalidOption(`${name}.guestPath`, "an absolute guest path", s.guestPath);
      }
      if (s.guestPath.split("/").some((c) => c === "..")) throw invalidOption(`${name}.guestPath`, "an absolute guest path without '..'", s.guestPath);
    }
    const guestPath = s.guestPath !== undefined ? normalGuestPath(s.guestPath) : undefined;
    if (guestPath === "/") throw invalidOption(`${name}.guestPath`, "a directory other than /", s.guestPath);
    const dupTag = out.findIndex((o) => o.guestTag === s.guestTag);
    if (dupTag >= 0) throw new MountError(`${name}.guestTag ${JSON.stringify(s.guestTag)} is also ${option}[${dupTag}].guestTag: give each mount its own tag`, "guestTag");
    const dupPath = guestPath === undefined ? -1 : out.findIndex((o) => o.guestPath === guestPath);
    if (dupPath >= 0) throw new MountError(`${name}.guestPath ${JSON.stringify(guestPath)} is also ${option}[${dupPath}].guestPath: mount each at its own place`, "guestPath");
    out.push({ hostPath: resolve(s.hostPath), guestTag: s.guestTag, symlinks, readOnly: s.readOnly ?? false, ...(guestPath !== undefined ? { guestPath } : {}) });
  });
  return out;
}

function normalGuestPath(p: string): string {
  const parts = p.split("/").filter((c) => c !== "" && c !== ".");
  return "/" + parts.join("/");
}

/** Checks every hostPath is an existing directory: MountError naming `mounts[i].hostPath`. */
export async function checkHostPaths(mounts: readonly ValidMount[], option = "mounts"): Promise<void> {
  for (const [i, m] of mounts.entries()) {
    const st = await stat(m.hostPath).catch((e: NodeJS.ErrnoException) => e);
    if (st instanceof Error) {
      const why = st.code === "ENOENT" ? "does not exist" : st.code === "EACCES" ? "is not accessible to this user" : `cannot be read (${st.code ?? st.message})`;
      throw new MountError(`${option}[${i}].hostPath ${JSON.stringify(m.hostPath)} ${why}: give an existing host directory`, "hostPath", { cause: st });
    }
    if (!st.isDirectory()) throw new MountError(`${option}[${i}].hostPath ${JSON.stringify(m.hostPath)} is not a directory: give a host directory`, "hostPath");
  }
}

/**
 * One mount registered with a VM's agent. Each time the guest mounts the
 * tag (MOUNTED with a path) a fresh FuseServer serves that FUSE connection;
 * when it is unmounted the server is closed.
 */
export class MountAttachment {
  /** Where the tag is mounted in the guest right now (undefined: not mounted). */
  guestPath: string | undefined;
  private server: Promise<FuseServer> | undefined;
  /** Bumped on every (un)mount: replies of an older connection are dropped. */
  private generation = 0;
  private pending = 0;

  private constructor(
    readonly spec: ValidMount,
    private readonly stream: MountStream,
    private readonly options: FuseServerOptions,
  ) {
    stream.onMounted = (p) => this.mounted(p);
    stream.onRequest = (r) => this.request(r);
  }

  /**
   * Registers `spec.guestTag` with the agent and mounts it at `at` (when
   * given). Resolves once the agent answered; rejects with its error (the
   * stream is then gone).
   */
  static async attach(conn: AgentConnection, spec: ValidMount, at: string | undefined, options: FuseServerOptions = {}): Promise<MountAttachment> {
    const stream = conn.mount(spec.guestTag, at, spec.readOnly);
    const a = new MountAttachment(spec, stream, options);
    try {
      await stream.registered;
    } catch (e) {
      await a.closeServer();
      throw new MountError(`could not mount ${spec.guestTag}${at ? ` on ${at}` : ""} in the guest: ${(e as Error).message}`, "guestPath", { cause: e });
    }
    return a;
  }

  private mounted(path: string | null): void {
    this.generation++;
    void this.closeServer();
    this.guestPath = path ?? undefined;
    if (path !== null) {
      const s = FuseServer.open({ hostPath: this.spec.hostPath, guestTag: this.spec.guestTag, symlinks: this.spec.symlinks, readOnly: this.spec.readOnly }, this.options);
      s.catch(() => undefined);
      this.server = s;
      const gen = this.generation;
      void s.then(
        (srv) => {
          srv.onNotify = (msg) => {
            if (gen === this.generation) this.stream.notify(msg);
          };
        },
        () => undefined,
      );
    }
  }

  private request(req: Buffer): void {
    const unique = req.readBigUInt64LE(8);
    const server = this.server;
    if (!server || this.pending >= MAX_PENDING_REQUESTS) {
      this.stream.reply(encodeError(unique, Errno.EIO));
      return;
    }
    const gen = this.generation;
    this.pending++;
    void server
      .then((s) => s.handle(req))
      .then(
        (reply) => {
          if (reply && gen === this.generation) this.stream.reply(reply);
        },
        () => {
          // hostPath vanished since the build checked it (or the server failed to open).
          if (gen === this.generation) this.stream.reply(encodeError(unique, Errno.EIO));
        },
      )
      .finally(() => this.pending--);
  }

  private async closeServer(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (s) await s.then((x) => x.close(), () => undefined);
  }

  /**
   * Unmounts in the guest and forgets the tag there (before a snapshot, or
   * when the VM is done); closes the host server. Returns where it was
   * mounted. Idempotent.
   */
  async detach(): Promise<string | undefined> {
    const at = this.guestPath;
    try {
      await this.stream.detach(DETACH_TIMEOUT_MS);
    } finally {
      this.generation++;
      await this.closeServer();
    }
    return at;
  }

  /** The VM is gone: closes the host server. */
  async close(): Promise<void> {
    this.generation++;
    await this.closeServer();
  }
}
