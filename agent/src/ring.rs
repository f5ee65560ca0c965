//! The stream ring: bulk host → guest bytes that skip the virtio-serial port.
//!
//! The port's driver posts page-sized receive buffers, so every 4 KiB the
//! host sends costs the guest an interrupt, a `read` and a buffer re-post;
//! under TCG that per-page work, not the copy, bounded stdin, file uploads
//! and TCP uploads. The host instead writes large payloads into the backing
//! file of a read-only virtio-blk disk (serial `sm-ring`) and sends a small
//! `DATA_REF` frame naming the region; the agent reads it with one O_DIRECT
//! request and hands the bytes to the same code a `DATA` frame reaches.
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

    /// The `len` bytes of the region at `off` (a DATA_REF payload: u64 offset, u32 length).
    pub fn read(&mut self, p: &[u8]) -> Result<&[u8], String> {
        // Every DATA_REF is acknowledged once, in order, valid or not.
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
        let mut got = 0;
        while got < padded {
            let r = unsafe { sys::pread(self.fd.raw(), self.buf.add(got) as *mut _, padded - got, (off + got as u64) as i64) };
            if r > 0 {
                got += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if r < 0 && e.raw_os_error() == Some(sys::EINTR) {
                continue;
            }
            return Err(format!("stream ring read at {}: {}", off + got as u64, if r == 0 { "end of disk".to_string() } else { e.to_string() }));
        }
        Ok(unsafe { std::slice::from_raw_parts(self.buf, len) })
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
