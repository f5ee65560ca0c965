/** Shared by the file server's tests: a served tmp tree and errno checks. */

import type { TestContext } from "node:test";
import { FuseServer, type FuseServerOptions, type MountSpec } from "../../src/mounts/server.js";
import { FuseCallError, FuseClient } from "../../src/mounts/client.js";

/** A file server on `spec.hostPath` (tag "work" unless given), closed after the test, with a client past INIT. */
export async function serve(t: TestContext, spec: Partial<MountSpec> & { hostPath: string }, options?: FuseServerOptions): Promise<FuseClient> {
  const server = await FuseServer.open({ guestTag: "work", ...spec }, options);
  t.after(() => server.close());
  const c = new FuseClient(server);
  await c.init();
  return c;
}

/** The errno a FUSE call failed with, or 0 when it succeeded. */
export async function errnoOf(p: Promise<unknown>): Promise<number> {
  try {
    await p;
  } catch (err) {
    if (err instanceof FuseCallError) return err.errno;
    throw err;
  }
  return 0;
}
