//! The logs service: output of processes no host stream reads any more.
//!
//! A process started by EXEC whose session ended (a new HELLO: the host
//! went away, or a clone restored from a snapshot) keeps running detached,
//! and a background child that still holds an exec's pipes after the exec
//! finished keeps writing; and the workload (WORKLOAD_START) from its
//! start. Their pipes come here. The service always reads
//! them (a writer never blocks on a full pipe, as before), labels each chunk
//! with the pid of the exec it came from and the channel, and sends it as
//! LOG frames on the session's LOGS stream under its channel-1 window. With
//! no stream open, or no credit, chunks wait in a ring of
//! [`BUFFER_BYTES`]; the oldest are dropped past it and counted, and the
//! count goes out with the next LOG frame.

use crate::io::{Io, ReqError, TK_DRAIN};
use crate::proto::{self, tag, ty, Record};
use crate::sys::{self, Fd};
use std::collections::{HashMap, VecDeque};

/// Detached output kept in the agent while no host reads it.
pub const BUFFER_BYTES: usize = 256 * 1024;
/// Largest chunk read (and sent in one LOG frame).
const READ_BYTES: usize = 32 * 1024;
/// Reads per wakeup of one pipe (epoll is level-triggered: the rest waits).
const READS_PER_EVENT: usize = 4;

/// A pipe end whose writer no host reads any more.
pub struct Orphan {
    pub pid: i32,
    /// 1 = stdout, 2 = stderr.
    pub channel: u8,
    pub fd: Fd,
}

struct Chunk {
    pid: i32,
    channel: u8,
    data: Vec<u8>,
}

pub struct LogService {
    sources: HashMap<u64, Orphan>,
    next: u64,
    /// The LOGS stream of this session, if the host opened one.
    stream: Option<u32>,
    credit: u32,
    pending: VecDeque<Chunk>,
    pending_bytes: usize,
    /// Bytes dropped since the last LOG frame.
    dropped: u64,
}

impl LogService {
    pub fn new() -> LogService {
        LogService { sources: HashMap::new(), next: 1, stream: None, credit: 0, pending: VecDeque::new(), pending_bytes: 0, dropped: 0 }
    }

    pub fn owns(&self, id: u32) -> bool {
        self.stream == Some(id)
    }

    /// Starts reading `o` (its output goes to the LOGS stream from now on).
    pub fn adopt(&mut self, io: &mut Io, o: Orphan) {
        let t = self.next;
        self.next += 1;
        io.add(o.fd.raw(), sys::EPOLLIN, TK_DRAIN | t);
        self.sources.insert(t, o);
    }

    /// A new session: the old one's stream is gone. Sources and what no
    /// host was sent yet stay (in a clone: the workload's output from
    /// before the snapshot, e.g. its start-up lines).
    pub fn reset(&mut self) {
        self.stream = None;
        self.credit = 0;
    }

    /// LOGS: opens the session's log stream (one per session).
    pub fn open(&mut self, io: &mut Io, id: u32) -> Result<(), ReqError> {
        if let Some(s) = self.stream {
            return Err(ReqError::BadRequest(format!("a LOGS stream is already open (stream {})", s)));
        }
        self.stream = Some(id);
        self.credit = proto::INITIAL_WINDOW;
        self.flush(io);
        Ok(())
    }

    pub fn cancel(&mut self, io: &mut Io, id: u32) {
        if self.stream == Some(id) {
            self.stream = None;
            self.credit = 0;
            io.send_record(ty::OK, id, Record::new());
        }
    }

    pub fn window(&mut self, io: &mut Io, id: u32, ch: u8, n: u32) {
        if self.stream == Some(id) && ch == 1 {
            self.credit = self.credit.saturating_add(n);
            self.flush(io);
        }
    }

    /// A source pipe is readable (or closed).
    pub fn event(&mut self, io: &mut Io, t: u64) {
        let mut close = false;
        for _ in 0..READS_PER_EVENT {
            let (pid, channel, r) = match self.sources.get(&t) {
                Some(o) => {
                    let n = READ_BYTES.min(io.scratch.len());
                    (o.pid, o.channel, o.fd.read(&mut io.scratch[..n]))
                }
                None => return,
            };
            match r {
                Ok(0) => {
                    close = true;
                    break;
                }
                Ok(n) => {
                    let data = io.scratch[..n].to_vec();
                    self.push(io, Chunk { pid, channel, data });
                }
                Err(e) if sys::is_would_block(&e) => break,
                Err(e) if e.raw_os_error() == Some(sys::EINTR) => continue,
                Err(_) => {
                    close = true;
                    break;
                }
            }
        }
        if close {
            if let Some(o) = self.sources.remove(&t) {
                io.remove(o.fd.raw());
            }
        }
    }

    fn push(&mut self, io: &mut Io, c: Chunk) {
        self.pending_bytes += c.data.len();
        self.pending.push_back(c);
        while self.pending_bytes > BUFFER_BYTES {
            match self.pending.pop_front() {
                Some(old) => {
                    self.pending_bytes -= old.data.len();
                    self.dropped += old.data.len() as u64;
                }
                None => break,
            }
        }
        self.flush(io);
    }

    /// Sends what waits while the stream has credit (the data bytes count).
    pub fn flush(&mut self, io: &mut Io) {
        let id = match self.stream {
            Some(id) => id,
            None => return,
        };
        if io.quiesced {
            return;
        }
        while let Some(front) = self.pending.front_mut() {
            if self.credit == 0 {
                break;
            }
            let n = front.data.len().min(self.credit as usize);
            let mut r = Record::new()
                .u32(tag::log::PID, front.pid.max(0) as u32)
                .u32(tag::log::CHANNEL, front.channel as u32)
                .bytes(tag::log::DATA, &front.data[..n]);
            if self.dropped > 0 {
                r = r.u64(tag::log::DROPPED, self.dropped);
                self.dropped = 0;
            }
            io.send_record(ty::LOG, id, r);
            self.credit -= n as u32;
            self.pending_bytes -= n;
            if n == front.data.len() {
                self.pending.pop_front();
            } else {
                front.data.drain(..n);
            }
        }
    }
}
