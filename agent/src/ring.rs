//! The stream ring: bulk host → guest bytes that skip the virtio-serial port.
//!
//! The port's driver posts page-sized receive buffers, so every 4 KiB the
//! host sends costs the guest an interrupt, a `read` and a buffer re-post;
//! under TCG that per-page work, not the copy, bounded stdin, file uploads
//! and TCP uploads. The host instead writes large payloads into the backing
//! file of a read-only virtio-blk disk (serial `sm-ring`) and sends a small
//! `DATA_REF` frame naming the region; the agent reads it with one O_DIRECT
//! request and hands the bytes to the same code a `DATA` frame reaches, or,
//! for a process's stdin pipe with nothing queued before them, splices the
//! region's whole pages straight into the pipe (the read lands in pages the
//! pipe then owns: no copy in the guest).
//! `RING_ACK` frames tell the host which regions it may write again
//! (docs/protocol.md, "Stream ring").
//!
//! The guest cannot write the disk (QEMU opens it read-only), and everything
//! a frame says is checked against the disk's size before it is used.

use crate::log;
use crate::proto;
use crate::service::volumes;
use crate::sys::{self, Fd};
use std::alloc::{alloc, dealloc, Layout};
use std::fs;
use std::io;

pub const SERIAL: &str = "sm-ring";
/// Regions start at multiples of this (O_DIRECT alignment) and so do lengths read.
pub const ALIGN: usize = 4096;

pub struct Ring {
    fd: Fd,
    size: u64,
    buf: *mut u8,
    cap: usize,
    /// Regions read since the last RING_ACK.
    pub unacked: u32,
}

impl Ring {
    /// Opens the ring disk when the host attached one.
    pub fn open() -> Option<Ring> {
        let dev = volumes::lookup(SERIAL)?;
        let name = dev.trim_start_matches("/dev/");
        let sectors: u64 = fs::read_to_string(format!("/sys/block/{}/size", name)).ok()?.trim().parse().ok()?;
        let size = sectors.checked_mul(512)?;
        let c = sys::cstring(dev.as_bytes()).ok()?;
        let fd = match sys::open_path(&c, sys::O_RDONLY | sys::O_DIRECT | sys::O_CLOEXEC, 0) {
            Ok(fd) => fd,
            Err(e) => {
                log!("stream ring {}: {}", dev, e);
                return None;
            }
        };
        let cap = round_up(proto::MAX_PAYLOAD);
        let buf = unsafe { alloc(Layout::from_size_align(cap, ALIGN).ok()?) };
        if buf.is_null() {
            return None;
        }
        Some(Ring { fd, size, buf, cap, unacked: 0 })
    }

    /// The region a DATA_REF payload (u64 offset, u32 length) names, checked
    /// against the disk. Every DATA_REF is acknowledged once, in order,
    /// valid or not: this counts it for the next RING_ACK.
    pub fn region(&mut self, p: &[u8]) -> Result<(u64, usize), String> {
        self.unacked += 1;
        if p.len() != 12 {
            return Err(format!("DATA_REF payload of {} bytes (expected 12)", p.len()));
        }
        let off = u64::from_le_bytes(p[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(p[8..12].try_into().unwrap()) as usize;
        let padded = round_up(len);
        if len == 0 || padded > self.cap || off % ALIGN as u64 != 0 || off.checked_add(padded as u64).map_or(true, |end| end > self.size) {
            return Err(format!("DATA_REF region {}+{} outside the {}-byte ring", off, len, self.size));
        }
        Ok((off, len))
    }

    /// Moves what it can of the region's whole pages into the pipe `fd`
    /// without blocking: a splice from the O_DIRECT disk reads into fresh
    /// pages that become the pipe's (the device writes them; the guest CPU
    /// copies nothing, and nothing else holds them). Returns the bytes moved,
    /// a multiple of ALIGN: 0 when the pipe is full, closed, or the splice
    /// fails, and the caller reads the rest with `read_at`. (A splice from an
    /// O_DIRECT file reads directly since Linux 4.9; before, it went through
    /// the page cache, which could hold a region's earlier bytes; the
    /// project's guest kernel is 6.1.)
    pub fn splice_into(&self, off: u64, len: usize, fd: i32) -> usize {
        let whole = len / ALIGN * ALIGN;
        let mut moved = 0;
        while moved < whole {
            let mut at = (off + moved as u64) as i64;
            let n = unsafe { sys::splice(self.fd.raw(), &mut at, fd, std::ptr::null_mut(), whole - moved, sys::SPLICE_F_NONBLOCK) };
            if n <= 0 {
                break;
            }
            moved += n as usize;
            if moved % ALIGN != 0 {
                // Not expected from a direct read; stop where read_at can
                // still take over (it rereads from the page boundary).
                break;
            }
        }
        moved
    }

    /// Bytes `from..len` of the region at `off` (`off` as `region` returned it).
    pub fn read_at(&mut self, off: u64, from: usize, len: usize) -> Result<&[u8], String> {
        let start = from / ALIGN * ALIGN;
        let padded = round_up(len) - start;
        let at = off + start as u64;
        let mut got = 0;
        while got < padded {
            let r = unsafe { sys::pread(self.fd.raw(), self.buf.add(got) as *mut _, padded - got, (at + got as u64) as i64) };
            if r > 0 {
                got += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if r < 0 && e.raw_os_error() == Some(sys::EINTR) {
                continue;
            }
            return Err(format!("stream ring read at {}: {}", at + got as u64, if r == 0 { "end of disk".to_string() } else { e.to_string() }));
        }
        Ok(unsafe { std::slice::from_raw_parts(self.buf.add(from - start), len - from) })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        unsafe { dealloc(self.buf, Layout::from_size_align_unchecked(self.cap, ALIGN)) };
    }
}

fn round_up(n: usize) -> usize {
    (n + ALIGN - 1) / ALIGN * ALIGN
}
