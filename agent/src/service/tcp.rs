//! The TCP service: TCP_CONNECT streams, each a guest socket bridged to a
//! host connection (the socket work itself is in crate::tcp).

use crate::io::{token, Io, TK_TCP};
use crate::proto::ty;
use crate::tcp::Conn;
use std::collections::HashMap;

pub struct TcpService {
    conns: HashMap<u32, Conn>,
}

impl TcpService {
    pub fn new() -> TcpService {
        TcpService { conns: HashMap::new() }
    }

    pub fn owns(&self, id: u32) -> bool {
        self.conns.contains_key(&id)
    }

    pub fn reset(&mut self, io: &mut Io) {
        for (_, c) in self.conns.drain() {
            io.remove(c.fd());
        }
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
        if let Some(c) = self.conns.remove(&id) {
            io.remove(c.fd());
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
            if let Some(c) = self.conns.get(&id) {
                io.modify(c.fd(), interest, token(TK_TCP, id, 0));
            }
        } else if let Some(c) = self.conns.remove(&id) {
            io.remove(c.fd());
        }
    }
}
