//! What every service shares: the epoll set, the outgoing frame queue, and
//! request errors (converted to wire ERRORs in exactly one place,
//! [`Io::send_error`]).

use crate::proto::{self, err, tag, ty, DecodeError, Record};
use crate::sys::{self, Fd};
use std::io;

/// epoll token kinds (top byte); the rest is the stream id and channel.
pub const TK_PORT: u64 = 1 << 56;
pub const TK_SIG: u64 = 2 << 56;
pub const TK_OUT: u64 = 3 << 56;
pub const TK_IN: u64 = 4 << 56;
pub const TK_TCP: u64 = 5 << 56;
pub const TK_DRAIN: u64 = 6 << 56;
/// The stream ring's completed region reads (mounts use 7 and 8).
pub const TK_RING: u64 = 9 << 56;
pub const TK_KIND: u64 = 0xff << 56;

/// Largest DATA payload the agent sends by copying.
pub const CHUNK: usize = 256 * 1024;
/// Largest DATA payload the agent splices (zero copy) from a pipe.
pub const SPLICE_MAX: usize = 1024 * 1024;

pub fn token(kind: u64, stream: u32, ch: u8) -> u64 {
    kind | (stream as u64) << 8 | ch as u64
}

/// An error for one request, converted to a wire ERROR in one place
/// ([`Io::send_error`]).
#[derive(Debug)]
pub enum ReqError {
    BadRequest(String),
    NotFound(String),
    Permission(String),
    TooLarge(String),
    Io(String),
    Refused(String),
    Unsupported(String),
    Timeout(String),
    Internal(String),
}

impl ReqError {
    pub fn from_io(context: &str, e: &io::Error) -> ReqError {
        let msg = format!("{}: {}", context, e);
        match e.kind() {
            io::ErrorKind::NotFound => ReqError::NotFound(msg),
            io::ErrorKind::PermissionDenied => ReqError::Permission(msg),
            io::ErrorKind::ConnectionRefused => ReqError::Refused(msg),
            _ => ReqError::Io(msg),
        }
    }
}

impl From<DecodeError> for ReqError {
    fn from(e: DecodeError) -> ReqError {
        ReqError::BadRequest(e.to_string())
    }
}

/// The epoll set and the outgoing byte queue, shared by every stream.
pub struct Io {
    pub ep: Fd,
    /// The virtio-serial port (-1 before it is open), for splice.
    pub port_fd: i32,
    pub out: Vec<u8>,
    pub out_pos: usize,
    /// After SNAPSHOT_PREPARE: nothing is written to the port until the host
    /// sends again.
    pub quiesced: bool,
    pub scratch: Vec<u8>,
    /// The agent's own pipe between a process's pipe and the port (splice_data).
    relay: Option<(Fd, Fd)>,
    relay_cap: usize,
}

impl Io {
    pub fn new(ep: Fd) -> Io {
        let mut io = Io { ep, port_fd: -1, out: Vec::with_capacity(1 << 20), out_pos: 0, quiesced: false, scratch: vec![0u8; CHUNK], relay: None, relay_cap: 0 };
        if let Ok((r, w)) = sys::pipe(sys::O_NONBLOCK) {
            let cap = unsafe { sys::fcntl(w.raw(), sys::F_SETPIPE_SZ, SPLICE_MAX as i32) };
            if cap > 0 {
                io.relay_cap = cap as usize;
                io.relay = Some((r, w));
            }
        }
        io
    }

    /// Drops every queued frame (they were for a host that is gone).
    pub fn clear(&mut self) {
        self.out.clear();
        self.out_pos = 0;
        self.quiesced = false;
    }

    /// Writes the queued frames to the port, as far as it takes them; the
    /// rest waits for EPOLLOUT (edge). Nothing is written while quiesced.
    pub fn flush(&mut self) {
        if self.quiesced || self.port_fd < 0 {
            return;
        }
        while self.out_pos < self.out.len() {
            let rest = &self.out[self.out_pos..];
            let r = unsafe { sys::write(self.port_fd, rest.as_ptr() as *const _, rest.len()) };
            if r > 0 {
                self.out_pos += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(sys::EINTR) => continue,
                // EPOLLOUT (edge) tells us when to try again.
                Some(sys::EAGAIN) => return,
                _ => {
                    // No host to write to: output of this session is lost.
                    self.out.clear();
                    self.out_pos = 0;
                    return;
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
    }

    pub fn send(&mut self, t: u8, flags: u8, stream: u32, payload: &[u8]) {
        proto::encode_frame(&mut self.out, t, flags, stream, payload);
    }

    /**
     * Reads up to `max` bytes from `fd` straight into a DATA frame at the end
     * of the output queue (no intermediate copy: under emulation every guest
     * memcpy is expensive). Returns what read(2) returned.
     */
    pub fn read_into_data(&mut self, fd: i32, ch: u8, stream: u32, max: usize) -> isize {
        let start = self.out.len();
        self.out.reserve(proto::HEADER_LEN + max);
        let r = unsafe { sys::read(fd, self.out.as_mut_ptr().add(start + proto::HEADER_LEN) as *mut _, max) };
        if r > 0 {
            let n = r as usize;
            unsafe { self.out.set_len(start + proto::HEADER_LEN + n) };
            self.out[start..start + 4].copy_from_slice(&((8 + n) as u32).to_le_bytes());
            self.out[start + 4] = ty::DATA;
            self.out[start + 5] = ch;
            self.out[start + 6] = 0;
            self.out[start + 7] = 0;
            self.out[start + 8..start + 12].copy_from_slice(&stream.to_le_bytes());
        }
        r
    }

    /**
     * Moves up to `max` bytes of a pipe to the host as one DATA frame without
     * copying them in the guest: splice(2) hands the pipe's pages to
     * virtio-serial. Only when nothing else is queued (frames must stay in
     * order). Returns the bytes framed (0: nothing available or no relay;
     * the caller falls back to read_into_data). When the port is full, the
     * framed bytes wait in the output queue.
     *
     * The bytes go through `relay`, a pipe only the agent touches, first:
     * virtio_console's splice_write sizes its scatterlist by the pipe's
     * buffer count and then queues every entry of it, so a splice that takes
     * less than the whole pipe (because of the credit, or because the
     * process wrote more meanwhile) queues zero-length buffers, and QEMU
     * then marks the device broken ("zero sized buffers are not allowed").
     * Pipe-to-pipe splice takes an exact byte count; the relay is then
     * spliced to the port whole.
     */
    pub fn splice_data(&mut self, pipe: i32, ch: u8, stream: u32, max: usize) -> usize {
        if self.quiesced || self.port_fd < 0 || self.out_pos != self.out.len() {
            return 0;
        }
        let (relay_r, relay_w) = match &self.relay {
            Some((r, w)) => (r.raw(), w.raw()),
            None => return 0,
        };
        let max = max.min(self.relay_cap);
        let n = unsafe { sys::splice(pipe, std::ptr::null_mut(), relay_w, std::ptr::null_mut(), max, sys::SPLICE_F_NONBLOCK) };
        if n <= 0 {
            return 0;
        }
        let n = n as usize;
        let mut head = [0u8; proto::HEADER_LEN];
        head[0..4].copy_from_slice(&((8 + n) as u32).to_le_bytes());
        head[4] = ty::DATA;
        head[5] = ch;
        head[8..12].copy_from_slice(&stream.to_le_bytes());
        // Writes up to 32 KiB to a virtio port are all or nothing.
        let w = unsafe { sys::write(self.port_fd, head.as_ptr() as *const _, head.len()) };
        let moved = if w == head.len() as isize {
            let m = unsafe { sys::splice(relay_r, std::ptr::null_mut(), self.port_fd, std::ptr::null_mut(), n, sys::SPLICE_F_NONBLOCK) };
            if m > 0 { m as usize } else { 0 }
        } else {
            // The port is full: the whole frame, header included, is queued.
            self.out.clear();
            self.out_pos = 0;
            self.out.extend_from_slice(&head);
            0
        };
        if moved < n {
            // The rest of the frame is in the relay: queue it, leaving the
            // relay empty for the next call.
            let rest = n - moved;
            let start = self.out.len();
            self.out.reserve(rest);
            let mut got = 0;
            while got < rest {
                let r = unsafe { sys::read(relay_r, self.out.as_mut_ptr().add(start + got) as *mut _, rest - got) };
                if r <= 0 {
                    break;
                }
                got += r as usize;
            }
            unsafe { self.out.set_len(start + got) };
            // Only the agent reads the relay, so its bytes cannot vanish;
            // were they to, padding keeps the stream in sync.
            self.out.resize(start + rest, 0);
        }
        n
    }

    pub fn send_record(&mut self, t: u8, stream: u32, r: Record) {
        self.send(t, 0, stream, &r.buf);
    }

    /// OK with the record, or the error.
    pub fn reply(&mut self, stream: u32, r: Result<Record, ReqError>) {
        match r {
            Ok(rec) => self.send_record(ty::OK, stream, rec),
            Err(e) => self.send_error(stream, e),
        }
    }

    pub fn send_window(&mut self, stream: u32, ch: u8, n: usize) {
        if n > 0 {
            self.send(ty::WINDOW, ch, stream, &(n as u32).to_le_bytes());
        }
    }

    /// The one place request errors become wire errors.
    pub fn send_error(&mut self, stream: u32, e: ReqError) {
        let (code, msg) = match e {
            ReqError::BadRequest(m) => (err::BAD_REQUEST, m),
            ReqError::NotFound(m) => (err::NOT_FOUND, m),
            ReqError::Permission(m) => (err::PERMISSION, m),
            ReqError::TooLarge(m) => (err::TOO_LARGE, m),
            ReqError::Io(m) => (err::IO, m),
            ReqError::Refused(m) => (err::REFUSED, m),
            ReqError::Unsupported(m) => (err::UNSUPPORTED, m),
            ReqError::Timeout(m) => (err::TIMEOUT, m),
            ReqError::Internal(m) => (err::INTERNAL, m),
        };
        let mut m = msg.into_bytes();
        m.truncate(4096);
        let m = String::from_utf8_lossy(&m).into_owned();
        self.send_record(ty::ERROR, stream, Record::new().u32(tag::error::CODE, code).bytes(tag::error::MESSAGE, m.as_bytes()));
    }

    pub fn ctl(&self, op: i32, fd: i32, events: u32, tok: u64) {
        let mut ev = sys::EpollEvent { events, data: tok };
        unsafe { sys::epoll_ctl(self.ep.raw(), op, fd, &mut ev) };
    }

    pub fn add(&self, fd: i32, events: u32, tok: u64) {
        self.ctl(sys::EPOLL_CTL_ADD, fd, events, tok);
    }

    pub fn modify(&self, fd: i32, events: u32, tok: u64) {
        self.ctl(sys::EPOLL_CTL_MOD, fd, events, tok);
    }

    pub fn remove(&self, fd: i32) {
        self.ctl(sys::EPOLL_CTL_DEL, fd, 0, 0);
    }
}

/// A send buffer whose front up to `pos` was written: drops that front once
/// it is at least 256 KiB and half the buffer (moving at most as many bytes
/// as were written), so a reader that never quite catches up does not make
/// the buffer grow by everything ever sent. Returns the new position.
pub fn compact_written(buf: &mut Vec<u8>, pos: usize) -> usize {
    if pos == buf.len() {
        buf.clear();
        0
    } else if pos >= 256 * 1024 && pos * 2 >= buf.len() {
        buf.drain(..pos);
        0
    } else {
        pos
    }
}

#[cfg(test)]
mod compact_tests {
    use super::compact_written;

    #[test]
    fn drops_the_written_front_only_when_it_is_large_and_half() {
        let mut b = vec![1u8; 10];
        assert_eq!(compact_written(&mut b, 10), 0);
        assert!(b.is_empty(), "all written: cleared");
        let mut b = vec![1u8; 300 * 1024];
        assert_eq!(compact_written(&mut b, 1000), 1000, "a small front stays");
        assert_eq!(b.len(), 300 * 1024);
        let mut b: Vec<u8> = (0..600 * 1024).map(|i| (i % 251) as u8).collect();
        let want = b[256 * 1024..].to_vec();
        assert_eq!(compact_written(&mut b, 256 * 1024), 256 * 1024, "under half the buffer: kept");
        assert_eq!(compact_written(&mut b, 300 * 1024), 0);
        assert_eq!(b, want[44 * 1024..].to_vec(), "the unwritten rest, in order");
    }
}
