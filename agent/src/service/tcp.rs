//! The TCP service: TCP_CONNECT streams, each a guest socket bridged to a
//! host connection (the socket work itself is in crate::tcp).

use crate::io::{token, Io, TK_TCP};
use crate::proto::ty;
use crate::tcp::Conn;
use std::collections::HashMap;

/// Host → guest credit each connection gets over the initial window (1 MiB):
/// one more stream-ring region of the largest size, so that one region is
/// in flight while the agent writes the last to the socket (without it the
/// guest waited for every region; docs/performance.md, "TCP upload").
const EXTRA_WINDOW: usize = 1 << 20;
/// The most extra credit all connections hold at once: what a connection's
/// window allows may wait in the agent's memory (its reader is slow), so
/// past this many connections the others keep the initial window.
const EXTRA_BUDGET: usize = 8 << 20;

pub struct TcpService {
    conns: HashMap<u32, Conn>,
    /// Extra credit granted to the open connections (at most EXTRA_BUDGET).
    extra: usize,
}

impl TcpService {
    pub fn new() -> TcpService {
        TcpService { conns: HashMap::new(), extra: 0 }
    }

    fn forget(&mut self, io: &mut Io, id: u32) -> Option<Conn> {
        let c = self.conns.remove(&id)?;
        io.remove(c.fd());
        if c.extra {
            self.extra -= EXTRA_WINDOW;
        }
        Some(c)
    }

    pub fn owns(&self, id: u32) -> bool {
        self.conns.contains_key(&id)
    }

    pub fn reset(&mut self, io: &mut Io) {
        for (_, c) in self.conns.drain() {
            io.remove(c.fd());
        }
        self.extra = 0;
    }

    pub fn connect(&mut self, io: &mut Io, id: u32, p: &[u8]) {
        match Conn::start(p) {
            Ok(c) => {
                io.add(c.fd(), c.interest(), token(TK_TCP, id, 0));
                self.conns.insert(id, c);
            }
            Err(e) => io.send_error(id, e),
        }
    }

    pub fn cancel(&mut self, io: &mut Io, id: u32) {
        if let Some(c) = self.forget(io, id) {
            c.reset();
            io.send(ty::RESET, 0, id, &[]);
        }
    }

    pub fn data(&mut self, io: &mut Io, id: u32, ch: u8, p: &[u8]) {
        if ch != 0 {
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.queue(p);
            self.event(io, id, 0);
        }
    }

    pub fn eof(&mut self, io: &mut Io, id: u32, ch: u8) {
        if ch != 0 {
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.host_eof();
            self.event(io, id, 0);
        }
    }

    pub fn window(&mut self, io: &mut Io, id: u32, ch: u8, n: u32) {
        if ch != 1 {
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.credit = c.credit.saturating_add(n);
            self.event(io, id, 0);
        }
    }

    /// Socket readiness (or a host frame) for connection `id`.
    pub fn event(&mut self, io: &mut Io, id: u32, bits: u32) {
        let outcome = match self.conns.get_mut(&id) {
            Some(c) => c.on_event(io, id, bits),
            None => return,
        };
        if let Some(interest) = outcome {
            if let Some(c) = self.conns.get_mut(&id) {
                if c.is_connected() && !c.extra && self.extra + EXTRA_WINDOW <= EXTRA_BUDGET {
                    c.extra = true;
                    self.extra += EXTRA_WINDOW;
                    io.send_window(id, 0, EXTRA_WINDOW);
                }
                io.modify(c.fd(), interest, token(TK_TCP, id, 0));
            }
        } else {
            self.forget(io, id);
        }
    }
}
