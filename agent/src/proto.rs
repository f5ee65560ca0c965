//! Frame and record codec of the host <-> agent protocol (docs/protocol.md).
//!
//! Pure functions over byte slices: no I/O here, so the codec is tested
//! against the golden fixtures in `protocol/fixtures/` (see tests below).

#![allow(dead_code)]

pub const HEADER_LEN: usize = 12;
pub const MAX_PAYLOAD: usize = 1 << 20;
pub const INITIAL_WINDOW: u32 = 1024 * 1024;
pub const PROTOCOL_VERSION: u32 = 1;
pub const MAGIC: &[u8] = b"supermachine";
pub const FILE_LIMIT: u64 = 4 * 1024 * 1024;

/// Message types.
pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_ACK: u8 = 0x02;
    pub const PING: u8 = 0x03;
    pub const PONG: u8 = 0x04;
    pub const CONFIGURE: u8 = 0x05;
    pub const SNAPSHOT_PREPARE: u8 = 0x06;
    pub const EXEC: u8 = 0x10;
    pub const STARTED: u8 = 0x11;
    pub const EXIT: u8 = 0x12;
    pub const SIGNAL: u8 = 0x13;
    pub const RESIZE: u8 = 0x14;
    pub const CANCEL: u8 = 0x15;
    pub const DETACH: u8 = 0x16;
    pub const DATA: u8 = 0x20;
    pub const EOF: u8 = 0x21;
    pub const WINDOW: u8 = 0x22;
    pub const DATA_REF: u8 = 0x23;
    pub const RING_ACK: u8 = 0x24;
    pub const WRITE_FILE: u8 = 0x30;
    pub const READ_FILE: u8 = 0x31;
    pub const TCP_CONNECT: u8 = 0x40;
    pub const RESET: u8 = 0x41;
    pub const WORKLOAD_START: u8 = 0x50;
    pub const WORKLOAD_SIGNAL: u8 = 0x51;
    pub const WAIT_LISTEN: u8 = 0x52;
    pub const MOUNT: u8 = 0x60;
    pub const MOUNTED: u8 = 0x61;
    pub const FUSE: u8 = 0x62;
    pub const LOGS: u8 = 0x70;
    pub const LOG: u8 = 0x71;
    pub const OK: u8 = 0x7e;
    pub const ERROR: u8 = 0x7f;

    pub fn name(t: u8) -> Option<&'static str> {
        Some(match t {
            HELLO => "HELLO",
            HELLO_ACK => "HELLO_ACK",
            PING => "PING",
            PONG => "PONG",
            CONFIGURE => "CONFIGURE",
            SNAPSHOT_PREPARE => "SNAPSHOT_PREPARE",
            EXEC => "EXEC",
            STARTED => "STARTED",
            EXIT => "EXIT",
            SIGNAL => "SIGNAL",
            RESIZE => "RESIZE",
            CANCEL => "CANCEL",
            DETACH => "DETACH",
            DATA => "DATA",
            EOF => "EOF",
            WINDOW => "WINDOW",
            WRITE_FILE => "WRITE_FILE",
            READ_FILE => "READ_FILE",
            TCP_CONNECT => "TCP_CONNECT",
            RESET => "RESET",
            WORKLOAD_START => "WORKLOAD_START",
            WORKLOAD_SIGNAL => "WORKLOAD_SIGNAL",
            WAIT_LISTEN => "WAIT_LISTEN",
            MOUNT => "MOUNT",
            MOUNTED => "MOUNTED",
            FUSE => "FUSE",
            LOGS => "LOGS",
            LOG => "LOG",
            OK => "OK",
            ERROR => "ERROR",
            _ => return None,
        })
    }
}

/// Field tags, per message type.
pub mod tag {
    pub mod hello {
        pub const MAGIC: u8 = 1;
        pub const MIN_VERSION: u8 = 2;
        pub const MAX_VERSION: u8 = 3;
        pub const HOST_VERSION: u8 = 4;
    }
    pub mod hello_ack {
        pub const MAGIC: u8 = 1;
        pub const VERSION: u8 = 2;
        pub const AGENT_VERSION: u8 = 3;
        pub const FEATURE: u8 = 4;
        pub const MAX_PAYLOAD: u8 = 5;
        pub const BOOT_ERROR: u8 = 6;
    }
    pub mod configure {
        pub const ENV: u8 = 1;
        pub const CWD: u8 = 2;
        pub const USER: u8 = 3;
        pub const HOSTNAME: u8 = 4;
        pub const TIME_NS: u8 = 5;
        pub const ENTROPY: u8 = 6;
        pub const MACHINE_ID: u8 = 7;
        pub const BOOT_ID: u8 = 8;
        pub const NET_ADDR: u8 = 9;
        pub const NET_PREFIX: u8 = 10;
        pub const NET_GATEWAY: u8 = 11;
        pub const NET_MTU: u8 = 12;
        pub const RESOLV_CONF: u8 = 13;
        pub const HOSTS_FILE: u8 = 14;
    }
    pub mod exec {
        pub const ARGV: u8 = 1;
        pub const ENV: u8 = 2;
        pub const CWD: u8 = 3;
        pub const TIMEOUT_MS: u8 = 4;
        pub const TTY: u8 = 5;
        pub const COLS: u8 = 6;
        pub const ROWS: u8 = 7;
        pub const CHAIN: u8 = 8;
        pub const STDIN: u8 = 9;
        pub const USER: u8 = 10;
        pub const REPORT_STARTED: u8 = 11;
        pub const CGROUP: u8 = 12;
    }
    pub mod started {
        pub const PID: u8 = 1;
    }
    pub mod exit {
        pub const EXIT_CODE: u8 = 1;
        pub const SIGNAL: u8 = 2;
        pub const TIMED_OUT: u8 = 3;
        pub const PEAK_RSS_KIB: u8 = 4;
    }
    pub mod signal {
        pub const SIGNUM: u8 = 1;
    }
    pub mod resize {
        pub const COLS: u8 = 1;
        pub const ROWS: u8 = 2;
    }
    pub mod write_file {
        pub const PATH: u8 = 1;
        pub const MODE: u8 = 2;
        pub const SIZE: u8 = 3;
        pub const MKDIRS: u8 = 4;
    }
    pub mod read_file {
        pub const PATH: u8 = 1;
        pub const MAX_SIZE: u8 = 2;
    }
    pub mod read_file_ok {
        pub const SIZE: u8 = 1;
    }
    pub mod tcp_connect {
        pub const PORT: u8 = 1;
        pub const ADDR: u8 = 2;
    }
    pub mod workload_start {
        pub const ARGV: u8 = 1;
        pub const ENV: u8 = 2;
        pub const CWD: u8 = 3;
        pub const USER: u8 = 4;
    }
    pub mod workload_start_ok {
        pub const PID: u8 = 1;
    }
    pub mod workload_signal {
        pub const SIGNUM: u8 = 1;
    }
    pub mod wait_listen {
        pub const PORT: u8 = 1;
        pub const TIMEOUT_MS: u8 = 2;
    }
    pub mod mount {
        pub const TAG: u8 = 1;
        pub const GUEST_PATH: u8 = 2;
        pub const READ_ONLY: u8 = 3;
    }
    pub mod mounted {
        pub const GUEST_PATH: u8 = 1;
        pub const SETTLING: u8 = 2;
    }
    pub mod log {
        pub const PID: u8 = 1;
        pub const CHANNEL: u8 = 2;
        pub const DATA: u8 = 3;
        pub const DROPPED: u8 = 4;
    }
    pub mod configure_ok {
        pub const BOOT_ID: u8 = 1;
    }
    pub mod snapshot_prepare_ok {
        pub const STOPPED: u8 = 1;
    }
    pub mod error {
        pub const CODE: u8 = 1;
        pub const MESSAGE: u8 = 2;
    }
}

/// Wire error codes.
pub mod err {
    pub const BAD_REQUEST: u32 = 1;
    pub const NOT_FOUND: u32 = 2;
    pub const PERMISSION: u32 = 3;
    pub const TOO_LARGE: u32 = 4;
    pub const IO: u32 = 5;
    pub const REFUSED: u32 = 6;
    pub const UNSUPPORTED: u32 = 7;
    pub const TIMEOUT: u32 = 8;
    pub const INTERNAL: u32 = 9;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// `len` field below the 8-byte minimum.
    LengthTooSmall(u32),
    /// `len` field above 8 + MAX_PAYLOAD.
    LengthTooLarge(u32),
    /// Reserved header bytes not zero.
    ReservedNonZero(u16),
    /// A record field runs past the end of the payload.
    FieldOverrun { tag: u8 },
    /// A known field with a value of the wrong size.
    FieldSize { tag: u8, len: usize },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::LengthTooSmall(n) => write!(f, "frame length {} below minimum 8", n),
            DecodeError::LengthTooLarge(n) => write!(f, "frame length {} above maximum {}", n, 8 + MAX_PAYLOAD),
            DecodeError::ReservedNonZero(v) => write!(f, "reserved header field is {:#x}, must be 0", v),
            DecodeError::FieldOverrun { tag } => write!(f, "field {} runs past the end of the payload", tag),
            DecodeError::FieldSize { tag, len } => write!(f, "field {} has wrong size {}", tag, len),
        }
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Parses one frame from the front of `buf`.
/// Returns Ok(None) when more bytes are needed, and the frame plus the number
/// of bytes it used otherwise. A bad length is reported as soon as the 4
/// length bytes are present.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = le32(&buf[0..4]);
    if len < 8 {
        return Err(DecodeError::LengthTooSmall(len));
    }
    if len as usize > 8 + MAX_PAYLOAD {
        return Err(DecodeError::LengthTooLarge(len));
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let reserved = u16::from_le_bytes([buf[6], buf[7]]);
    if reserved != 0 {
        return Err(DecodeError::ReservedNonZero(reserved));
    }
    Ok(Some((
        Frame { ty: buf[4], flags: buf[5], stream: le32(&buf[8..12]), payload: &buf[12..total] },
        total,
    )))
}

/// Appends one encoded frame to `out`. Panics if the payload exceeds MAX_PAYLOAD
/// (callers chunk data; control payloads are small).
pub fn encode_frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    assert!(payload.len() <= MAX_PAYLOAD, "payload too large");
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&((8 + payload.len()) as u32).to_le_bytes());
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&stream.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Iterates over the (tag, value) fields of a record payload.
pub struct Fields<'a> {
    rest: &'a [u8],
}

pub fn fields(payload: &[u8]) -> Fields<'_> {
    Fields { rest: payload }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u8, &'a [u8]), DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < 5 {
            let tag = self.rest[0];
            self.rest = &[];
            return Some(Err(DecodeError::FieldOverrun { tag }));
        }
        let tag = self.rest[0];
        let vlen = le32(&self.rest[1..5]) as usize;
        if self.rest.len() - 5 < vlen {
            self.rest = &[];
            return Some(Err(DecodeError::FieldOverrun { tag }));
        }
        let value = &self.rest[5..5 + vlen];
        self.rest = &self.rest[5 + vlen..];
        Some(Ok((tag, value)))
    }
}

/// Decodes all fields at once, checking for overruns.
pub fn decode_fields(payload: &[u8]) -> Result<Vec<(u8, &[u8])>, DecodeError> {
    fields(payload).collect()
}

pub fn val_u32(tag: u8, v: &[u8]) -> Result<u32, DecodeError> {
    if v.len() != 4 {
        return Err(DecodeError::FieldSize { tag, len: v.len() });
    }
    Ok(le32(v))
}

pub fn val_i32(tag: u8, v: &[u8]) -> Result<i32, DecodeError> {
    Ok(val_u32(tag, v)? as i32)
}

pub fn val_u64(tag: u8, v: &[u8]) -> Result<u64, DecodeError> {
    if v.len() != 8 {
        return Err(DecodeError::FieldSize { tag, len: v.len() });
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(v);
    Ok(u64::from_le_bytes(b))
}

pub fn val_bool(tag: u8, v: &[u8]) -> Result<bool, DecodeError> {
    if v.len() != 1 || v[0] > 1 {
        return Err(DecodeError::FieldSize { tag, len: v.len() });
    }
    Ok(v[0] == 1)
}

/// Builds a record payload.
#[derive(Default)]
pub struct Record {
    pub buf: Vec<u8>,
}

impl Record {
    pub fn new() -> Record {
        Record { buf: Vec::new() }
    }
    pub fn bytes(mut self, tag: u8, v: &[u8]) -> Record {
        self.buf.push(tag);
        self.buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(v);
        self
    }
    pub fn u32(self, tag: u8, v: u32) -> Record {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn i32(self, tag: u8, v: i32) -> Record {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn u64(self, tag: u8, v: u64) -> Record {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn bool(self, tag: u8, v: bool) -> Record {
        self.bytes(tag, &[v as u8])
    }
}

#[cfg(test)]
mod tests {
    //! Golden fixtures shared with the host codec (protocol/fixtures/*.frame).
    use super::*;
    use std::path::PathBuf;

    fn type_by_name(n: &str) -> u8 {
        (0u8..=255).find(|t| ty::name(*t) == Some(n)).unwrap_or_else(|| panic!("unknown type {}", n))
    }

    fn tag_by_name(t: u8, name: &str) -> u8 {
        use tag::*;
        let table: &[(&str, u8)] = match t {
            ty::HELLO => &[("magic", hello::MAGIC), ("min_version", hello::MIN_VERSION), ("max_version", hello::MAX_VERSION), ("host_version", hello::HOST_VERSION)],
            ty::HELLO_ACK => &[("magic", hello_ack::MAGIC), ("version", hello_ack::VERSION), ("agent_version", hello_ack::AGENT_VERSION), ("feature", hello_ack::FEATURE), ("max_payload", hello_ack::MAX_PAYLOAD), ("boot_error", hello_ack::BOOT_ERROR)],
            ty::CONFIGURE => &[("env", configure::ENV), ("cwd", configure::CWD), ("user", configure::USER), ("hostname", configure::HOSTNAME), ("time_ns", configure::TIME_NS), ("entropy", configure::ENTROPY), ("machine_id", configure::MACHINE_ID), ("boot_id", configure::BOOT_ID), ("net_addr", configure::NET_ADDR), ("net_prefix", configure::NET_PREFIX), ("net_gateway", configure::NET_GATEWAY), ("net_mtu", configure::NET_MTU), ("resolv_conf", configure::RESOLV_CONF), ("hosts_file", configure::HOSTS_FILE)],
            ty::EXEC => &[("argv", exec::ARGV), ("env", exec::ENV), ("cwd", exec::CWD), ("timeout_ms", exec::TIMEOUT_MS), ("tty", exec::TTY), ("cols", exec::COLS), ("rows", exec::ROWS), ("chain", exec::CHAIN), ("stdin", exec::STDIN), ("user", exec::USER), ("report_started", exec::REPORT_STARTED), ("cgroup", exec::CGROUP)],
            ty::STARTED => &[("pid", started::PID)],
            ty::EXIT => &[("exit_code", exit::EXIT_CODE), ("signal", exit::SIGNAL), ("timed_out", exit::TIMED_OUT), ("peak_rss_kib", exit::PEAK_RSS_KIB)],
            ty::SIGNAL => &[("signum", signal::SIGNUM)],
            ty::RESIZE => &[("cols", resize::COLS), ("rows", resize::ROWS)],
            ty::WRITE_FILE => &[("path", write_file::PATH), ("mode", write_file::MODE), ("size", write_file::SIZE), ("mkdirs", write_file::MKDIRS)],
            ty::READ_FILE => &[("path", read_file::PATH), ("max_size", read_file::MAX_SIZE)],
            ty::TCP_CONNECT => &[("port", tcp_connect::PORT), ("addr", tcp_connect::ADDR)],
            ty::WORKLOAD_START => &[("argv", workload_start::ARGV), ("env", workload_start::ENV), ("cwd", workload_start::CWD), ("user", workload_start::USER)],
            ty::WORKLOAD_SIGNAL => &[("signum", workload_signal::SIGNUM)],
            ty::WAIT_LISTEN => &[("port", wait_listen::PORT), ("timeout_ms", wait_listen::TIMEOUT_MS)],
            ty::MOUNT => &[("tag", mount::TAG), ("guest_path", mount::GUEST_PATH), ("read_only", mount::READ_ONLY)],
            ty::MOUNTED => &[("guest_path", mounted::GUEST_PATH), ("settling", mounted::SETTLING)],
            ty::LOG => &[("pid", log::PID), ("channel", log::CHANNEL), ("data", log::DATA), ("dropped", log::DROPPED)],
            ty::ERROR => &[("code", error::CODE), ("message", error::MESSAGE)],
            ty::OK => &[("size", read_file_ok::SIZE)],
            _ => &[],
        };
        if let Ok(n) = name.parse::<u8>() {
            return n;
        }
        table.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).unwrap_or_else(|| panic!("unknown field {} of type {}", name, t))
    }

    fn unhex(s: &str) -> Vec<u8> {
        let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        assert!(clean.len() % 2 == 0, "odd hex length");
        (0..clean.len()).step_by(2).map(|i| u8::from_str_radix(&clean[i..i + 2], 16).unwrap()).collect()
    }

    fn encode_value(kind: &str, v: &str) -> Vec<u8> {
        match kind {
            "bytes" => unhex(v),
            "str" => v.as_bytes().to_vec(),
            "u32" => v.parse::<u32>().unwrap().to_le_bytes().to_vec(),
            "i32" => v.parse::<i32>().unwrap().to_le_bytes().to_vec(),
            "u64" => v.parse::<u64>().unwrap().to_le_bytes().to_vec(),
            "bool" => vec![if v == "true" { 1 } else { 0 }],
            _ => panic!("unknown kind {}", kind),
        }
    }

    struct Fixture {
        name: String,
        ty: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
        hex: Vec<u8>,
        error: Option<String>,
    }

    fn load() -> Vec<Fixture> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../protocol/fixtures");
        let mut names: Vec<_> = std::fs::read_dir(&dir).expect("fixtures dir").map(|e| e.unwrap().path()).collect();
        names.sort();
        let mut out = Vec::new();
        for p in names {
            if p.extension().and_then(|e| e.to_str()) != Some("frame") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let mut f = Fixture { name: p.file_stem().unwrap().to_string_lossy().into_owned(), ty: 0, flags: 0, stream: 0, payload: Vec::new(), hex: Vec::new(), error: None };
            for line in text.lines() {
                let line = line.split('#').next().unwrap().trim();
                if line.is_empty() {
                    continue;
                }
                let mut parts = line.splitn(2, ' ');
                let key = parts.next().unwrap();
                let rest = parts.next().unwrap_or("").trim();
                match key {
                    "type" => f.ty = if let Ok(n) = rest.parse::<u8>() { n } else { type_by_name(rest) },
                    "flags" => f.flags = rest.parse().unwrap(),
                    "stream" => f.stream = rest.parse().unwrap(),
                    "raw" => f.payload.extend(unhex(rest)),
                    "field" => {
                        let mut it = rest.splitn(3, ' ');
                        let name = it.next().unwrap();
                        let kind = it.next().unwrap();
                        let value = it.next().unwrap_or("");
                        let t = tag_by_name(f.ty, name);
                        let v = encode_value(kind, value);
                        f.payload.push(t);
                        f.payload.extend_from_slice(&(v.len() as u32).to_le_bytes());
                        f.payload.extend(v);
                    }
                    "hex" => f.hex.extend(unhex(rest)),
                    "error" => f.error = Some(rest.to_string()),
                    _ => panic!("{}: unknown line {}", f.name, line),
                }
            }
            out.push(f);
        }
        assert!(out.len() >= 10, "expected the golden fixtures, found {}", out.len());
        out
    }

    #[test]
    fn golden_fixtures_round_trip() {
        for f in load() {
            if let Some(rule) = &f.error {
                let res = parse_frame(&f.hex).and_then(|r| match r {
                    None => Ok(None),
                    Some((fr, _)) => decode_fields(fr.payload).map(|_| Some(())),
                });
                let got = match res {
                    Err(DecodeError::LengthTooSmall(_)) => "length-too-small",
                    Err(DecodeError::LengthTooLarge(_)) => "length-too-large",
                    Err(DecodeError::ReservedNonZero(_)) => "reserved-nonzero",
                    Err(DecodeError::FieldOverrun { .. }) => "field-overrun",
                    Err(DecodeError::FieldSize { .. }) => "field-size",
                    Ok(_) => "accepted",
                };
                assert_eq!(got, rule, "fixture {}", f.name);
                continue;
            }
            let mut enc = Vec::new();
            encode_frame(&mut enc, f.ty, f.flags, f.stream, &f.payload);
            assert_eq!(enc, f.hex, "fixture {}: encoding differs", f.name);
            let (fr, used) = parse_frame(&f.hex).unwrap().unwrap();
            assert_eq!(used, f.hex.len(), "fixture {}", f.name);
            assert_eq!((fr.ty, fr.flags, fr.stream, fr.payload), (f.ty, f.flags, f.stream, &f.payload[..]), "fixture {}", f.name);
            if fr.ty != ty::DATA && fr.ty != ty::PING && fr.ty != ty::PONG && fr.ty != ty::WINDOW && fr.ty != ty::FUSE {
                decode_fields(fr.payload).unwrap_or_else(|e| panic!("fixture {}: {}", f.name, e));
            }
        }
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let mut enc = Vec::new();
        encode_frame(&mut enc, ty::PING, 0, 0, b"abc");
        for cut in 0..enc.len() {
            assert_eq!(parse_frame(&enc[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn length_checked_before_body() {
        let huge = ((8 + MAX_PAYLOAD + 1) as u32).to_le_bytes();
        assert_eq!(parse_frame(&huge), Err(DecodeError::LengthTooLarge((8 + MAX_PAYLOAD + 1) as u32)));
    }
}
