/**
 * Constants of the host ↔ agent protocol, version 1 (docs/protocol.md).
 * The agent's copy is agent/src/proto.rs; the golden fixtures in
 * protocol/fixtures/ keep the two in step.
 */

export const HEADER_LEN = 12;
export const MAX_PAYLOAD = 1 << 20;
export const INITIAL_WINDOW = 1024 * 1024;
export const PROTOCOL_VERSION = 1;
export const MAGIC = Buffer.from("supermachine", "latin1");
/** writeFile/readFile/stageFiles limit, enforced on both sides. */
export const FILE_LIMIT = 4 * 1024 * 1024;
/** Largest DATA payload the host sends. */
export const DATA_CHUNK = 128 * 1024;

export const MsgType = {
  HELLO: 0x01,
  HELLO_ACK: 0x02,
  PING: 0x03,
  PONG: 0x04,
  CONFIGURE: 0x05,
  SNAPSHOT_PREPARE: 0x06,
  EXEC: 0x10,
  STARTED: 0x11,
  EXIT: 0x12,
  SIGNAL: 0x13,
  RESIZE: 0x14,
  CANCEL: 0x15,
  DETACH: 0x16,
  DATA: 0x20,
  EOF: 0x21,
  WINDOW: 0x22,
  DATA_REF: 0x23,
  RING_ACK: 0x24,
  WRITE_FILE: 0x30,
  READ_FILE: 0x31,
  TCP_CONNECT: 0x40,
  RESET: 0x41,
  WORKLOAD_START: 0x50,
  WORKLOAD_SIGNAL: 0x51,
  WAIT_LISTEN: 0x52,
  MOUNT: 0x60,
  MOUNTED: 0x61,
  FUSE: 0x62,
  LOGS: 0x70,
  LOG: 0x71,
  OK: 0x7e,
  ERROR: 0x7f,
} as const;
export type MsgTypeName = keyof typeof MsgType;

const TYPE_NAMES = new Map<number, MsgTypeName>(
  (Object.entries(MsgType) as [MsgTypeName, number][]).map(([k, v]) => [v, k]),
);

export function typeName(t: number): MsgTypeName | undefined {
  return TYPE_NAMES.get(t);
}

/** Field tags per message type. */
export const Tag = {
  HELLO: { magic: 1, min_version: 2, max_version: 3, host_version: 4 },
  HELLO_ACK: { magic: 1, version: 2, agent_version: 3, feature: 4, max_payload: 5, boot_error: 6 },
  CONFIGURE: {
    env: 1,
    cwd: 2,
    user: 3,
    hostname: 4,
    time_ns: 5,
    entropy: 6,
    machine_id: 7,
    boot_id: 8,
    net_addr: 9,
    net_prefix: 10,
    net_gateway: 11,
    net_mtu: 12,
    resolv_conf: 13,
    hosts_file: 14,
  },
  CONFIGURE_OK: { boot_id: 1 },
  SNAPSHOT_PREPARE_OK: { stopped: 1 },
  EXEC: {
    argv: 1,
    env: 2,
    cwd: 3,
    timeout_ms: 4,
    tty: 5,
    cols: 6,
    rows: 7,
    chain: 8,
    stdin: 9,
    user: 10,
    report_started: 11,
    cgroup: 12,
  },
  STARTED: { pid: 1 },
  EXIT: { exit_code: 1, signal: 2, timed_out: 3, peak_rss_kib: 4 },
  SIGNAL: { signum: 1 },
  RESIZE: { cols: 1, rows: 2 },
  WRITE_FILE: { path: 1, mode: 2, size: 3, mkdirs: 4 },
  READ_FILE: { path: 1, max_size: 2 },
  READ_FILE_OK: { size: 1 },
  TCP_CONNECT: { port: 1, addr: 2 },
  WORKLOAD_START: { argv: 1, env: 2, cwd: 3, user: 4 },
  WORKLOAD_START_OK: { pid: 1 },
  WORKLOAD_SIGNAL: { signum: 1 },
  WAIT_LISTEN: { port: 1, timeout_ms: 2 },
  MOUNT: { tag: 1, guest_path: 2, read_only: 3 },
  MOUNTED: { guest_path: 1, settling: 2 },
  LOG: { pid: 1, channel: 2, data: 3, dropped: 4 },
  ERROR: { code: 1, message: 2 },
} as const;

/** FUSE frame flags: a reply to a request, or a notification (host → agent). */
export const FuseFlags = { REPLY: 0, NOTIFY: 1 } as const;

export const WireError = {
  BAD_REQUEST: 1,
  NOT_FOUND: 2,
  PERMISSION: 3,
  TOO_LARGE: 4,
  IO: 5,
  REFUSED: 6,
  UNSUPPORTED: 7,
  TIMEOUT: 8,
  INTERNAL: 9,
} as const;

export const Channel = { STDIN: 0, STDOUT: 1, STDERR: 2 } as const;
