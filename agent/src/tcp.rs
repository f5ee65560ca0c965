//! TCP_CONNECT streams: a guest socket bridged to a host connection, with
//! half-close and flow control both ways (docs/protocol.md).

use crate::io::{Io, ReqError, CHUNK};
use crate::proto::{self, tag, ty, Record};
use crate::sys::{self, Fd};
use std::io;

pub struct Conn {
    sock: Fd,
    connected: bool,
    /// Credit for DATA towards the host (channel 1).
    pub credit: u32,
    /// Bytes from the host waiting to be written to the socket.
    pending: Vec<u8>,
    pending_pos: usize,
    /// Bytes `queue` wrote straight to the socket, not yet credited to the
    /// host (the next `on_event` does).
    written_direct: usize,
    host_eof: bool,
    shut_wr: bool,
    sock_eof: bool,
    /// Granted EXTRA_WINDOW (crate::service::tcp) over the initial window.
    pub extra: bool,
}

fn parse_ipv4(s: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(s).ok()?;
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut b = [0u8; 4];
    for (i, p) in parts.iter().enumerate() {
        b[i] = p.parse().ok()?;
    }
    Some(u32::from_ne_bytes(b))
}

impl Conn {
    pub fn start(p: &[u8]) -> Result<Conn, ReqError> {
        let mut port = 0u32;
        let mut addr = u32::from_ne_bytes([127, 0, 0, 1]);
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::tcp_connect::PORT => port = proto::val_u32(t, v)?,
                tag::tcp_connect::ADDR => {
                    addr = parse_ipv4(v).ok_or_else(|| ReqError::BadRequest("bad IPv4 address".into()))?
                }
                _ => {}
            }
        }
        if port == 0 || port > 65535 {
            return Err(ReqError::BadRequest(format!("bad port {}", port)));
        }
        let fd = sys::cvt(unsafe {
            sys::socket(sys::AF_INET, sys::SOCK_STREAM | sys::SOCK_NONBLOCK | sys::SOCK_CLOEXEC, 0)
        })
        .map_err(|e| ReqError::from_io("socket", &e))?;
        let sock = Fd(fd);
        let one: i32 = 1;
        unsafe {
            sys::setsockopt(fd, sys::IPPROTO_TCP, sys::TCP_NODELAY, &one as *const i32 as *const _, 4);
        }
        let sa = sys::SockaddrIn { sin_family: sys::AF_INET as u16, sin_port: (port as u16).to_be(), sin_addr: addr, sin_zero: [0; 8] };
        let r = unsafe { sys::connect(fd, &sa as *const sys::SockaddrIn as *const _, std::mem::size_of::<sys::SockaddrIn>() as u32) };
        // Connected at once or not, the first EPOLLOUT says STARTED (on_event).
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(sys::EINPROGRESS) {
                return Err(ReqError::Refused(format!("connect to guest port {}: {}", port, e)));
            }
        }
        let c = Conn {
            sock,
            connected: false,
            credit: proto::INITIAL_WINDOW,
            pending: Vec::new(),
            pending_pos: 0,
            written_direct: 0,
            host_eof: false,
            shut_wr: false,
            sock_eof: false,
            extra: false,
        };
        Ok(c)
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn fd(&self) -> i32 {
        self.sock.raw()
    }

    /// The epoll interest the connection needs now.
    pub fn interest(&self) -> u32 {
        if !self.connected {
            return sys::EPOLLOUT;
        }
        let mut ev = 0;
        if !self.sock_eof && self.credit > 0 {
            ev |= sys::EPOLLIN | sys::EPOLLRDHUP;
        }
        if self.pending_pos < self.pending.len() {
            ev |= sys::EPOLLOUT;
        }
        ev
    }

    /// Bytes from the host for the socket: with nothing queued before them,
    /// as much as the socket takes now goes straight from `data` (no copy
    /// into `pending`: for a stream-ring region, `data` is the ring's
    /// buffer); the rest waits in `pending`.
    pub fn queue(&mut self, data: &[u8]) {
        let mut from = 0;
        if self.connected && self.pending_pos == self.pending.len() {
            while from < data.len() {
                match self.sock.write(&data[from..]) {
                    Ok(n) if n > 0 => from += n,
                    // Would block, or an error on_event meets again.
                    _ => break,
                }
            }
            self.written_direct += from;
        }
        if from < data.len() {
            self.pending_pos = crate::io::compact_written(&mut self.pending, self.pending_pos);
            self.pending.extend_from_slice(&data[from..]);
        }
    }

    pub fn host_eof(&mut self) {
        self.host_eof = true;
    }

    /// Aborts with a RST (SO_LINGER 0).
    pub fn reset(self) {
        let l = sys::Linger { l_onoff: 1, l_linger: 0 };
        unsafe {
            sys::setsockopt(self.sock.raw(), sys::SOL_SOCKET, sys::SO_LINGER, &l as *const sys::Linger as *const _, 8);
        }
    }

    /// Makes progress; returns the new epoll interest, or None when the
    /// stream has ended (its terminal frame is queued).
    pub fn on_event(&mut self, io: &mut Io, id: u32, bits: u32) -> Option<u32> {
        if !self.connected {
            let mut err: i32 = 0;
            let mut len: u32 = 4;
            unsafe {
                sys::getsockopt(self.sock.raw(), sys::SOL_SOCKET, sys::SO_ERROR, &mut err as *mut i32 as *mut _, &mut len);
            }
            if err != 0 {
                let e = io::Error::from_raw_os_error(err);
                io.send_error(id, ReqError::Refused(format!("connect to guest port: {}", e)));
                return None;
            }
            // Still connecting (spurious wakeup)?
            let mut probe = [0u8; 0];
            let r = unsafe { sys::write(self.sock.raw(), probe.as_mut_ptr() as *const _, 0) };
            if r < 0 && io::Error::last_os_error().raw_os_error() == Some(sys::ENOTCONN) {
                return Some(self.interest());
            }
            self.connected = true;
            io.send_record(ty::STARTED, id, Record::new());
        }
        // Host -> guest.
        let mut written = std::mem::take(&mut self.written_direct);
        while self.pending_pos < self.pending.len() {
            match self.sock.write(&self.pending[self.pending_pos..]) {
                Ok(n) => {
                    self.pending_pos += n;
                    written += n;
                }
                Err(e) if sys::is_would_block(&e) => break,
                Err(_) => {
                    io.send_window(id, 0, written);
                    io.send(ty::RESET, 0, id, &[]);
                    return None;
                }
            }
        }
        io.send_window(id, 0, written);
        if self.pending_pos == self.pending.len() {
            self.pending.clear();
            self.pending_pos = 0;
            if self.host_eof && !self.shut_wr {
                unsafe { sys::shutdown(self.sock.raw(), sys::SHUT_WR) };
                self.shut_wr = true;
            }
        }
        // Guest -> host.
        let mut reads = 0;
        while !self.sock_eof && self.credit > 0 && reads < 8 {
            reads += 1;
            let want = (self.credit as usize).min(CHUNK);
            let r = io.read_into_data(self.sock.raw(), 1, id, want);
            if r > 0 {
                self.credit -= r as u32;
                continue;
            }
            if r == 0 {
                self.sock_eof = true;
                io.send(ty::EOF, 1, id, &[]);
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(sys::EINTR) => continue,
                Some(sys::EAGAIN) => break,
                _ => {
                    io.send(ty::RESET, 0, id, &[]);
                    return None;
                }
            }
        }
        // Both directions closed, or the guest side is completely gone (HUP
        // after its EOF): the connection is over.
        if self.sock_eof && (self.shut_wr || bits & sys::EPOLLHUP != 0) {
            io.send_record(ty::OK, id, Record::new());
            return None;
        }
        if bits & sys::EPOLLERR != 0 && !self.sock_eof {
            let mut err: i32 = 0;
            let mut len: u32 = 4;
            unsafe {
                sys::getsockopt(self.sock.raw(), sys::SOL_SOCKET, sys::SO_ERROR, &mut err as *mut i32 as *mut _, &mut len);
            }
            if err != 0 {
                io.send(ty::RESET, 0, id, &[]);
                return None;
            }
        }
        Some(self.interest())
    }
}
