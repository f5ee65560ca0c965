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
use std::collections::VecDeque;
use std::fs;
use std::io;

pub const SERIAL: &str = "sm-ring";
/// Regions start at multiples of this (O_DIRECT alignment) and so do lengths read.
pub const ALIGN: usize = 4096;

/// Region reads the agent keeps in flight at once.
const SLOTS: usize = 4;
const IOCB_CMD_PREAD: u16 = 0;
const IOCB_FLAG_RESFD: u32 = 1;

/// `struct iocb` of linux/aio_abi.h (little-endian field order).
#[repr(C)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: u32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// `struct io_event` of linux/aio_abi.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// A region read in flight, kept in the order its DATA_REF came.
struct Read {
    stream: u32,
    ch: u8,
    off: u64,
    len: usize,
    slot: usize,
    /// What the read returned, once it completed.
    res: Option<i64>,
}

/// Region reads submitted with Linux AIO: the agent goes on serving sockets
/// and pipes while the device reads (under TCG a region read is ≈ 0.7 ms of
/// waiting for QEMU's I/O thread, during which the blocking read left the
/// guest idle), and the bytes are handed on in frame order.
struct Aio {
    ctx: u64,
    /// Signalled once per completed read; in the agent's epoll set.
    efd: Fd,
    bufs: [*mut u8; SLOTS],
    reads: VecDeque<Read>,
}

pub struct Ring {
    fd: Fd,
    size: u64,
    buf: *mut u8,
    cap: usize,
    /// Regions read since the last RING_ACK.
    pub unacked: u32,
    aio: Option<Aio>,
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
        Ring::with_fd(fd, size)
    }

    fn with_fd(fd: Fd, size: u64) -> Option<Ring> {
        let cap = round_up(proto::MAX_PAYLOAD);
        let buf = unsafe { alloc(Layout::from_size_align(cap, ALIGN).ok()?) };
        if buf.is_null() {
            return None;
        }
        Some(Ring { fd, size, buf, cap, unacked: 0, aio: Aio::new() })
    }

    /// The region a DATA_REF payload (u64 offset, u32 length) names, checked
    /// against the disk. Every DATA_REF is acknowledged once, in order,
    /// valid or not: the caller counts it in `unacked` once it is read (or
    /// found invalid).
    pub fn region(&self, p: &[u8]) -> Result<(u64, usize), String> {
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

impl Ring {
    /// The eventfd that signals completed region reads (none: reads block).
    pub fn event_fd(&self) -> Option<i32> {
        self.aio.as_ref().map(|a| a.efd.raw())
    }

    /// Region reads submitted and not handed on yet.
    pub fn reads_in_flight(&self) -> bool {
        self.aio.as_ref().map_or(false, |a| !a.reads.is_empty())
    }

    /// Whether another read can be submitted now.
    pub fn can_submit(&self) -> bool {
        self.aio.as_ref().map_or(false, |a| a.reads.len() < SLOTS)
    }

    /// Submits the read of a region (`off`, `len` as `region` returned them)
    /// for stream `stream`'s channel `ch`. False when it could not be
    /// submitted: the caller reads it with `read_at`.
    pub fn submit(&mut self, stream: u32, ch: u8, off: u64, len: usize) -> bool {
        let cap = self.cap;
        let fd = self.fd.raw();
        let a = match self.aio.as_mut() {
            Some(a) if a.reads.len() < SLOTS => a,
            _ => return false,
        };
        let slot = match (0..SLOTS).find(|s| !a.reads.iter().any(|r| r.slot == *s)) {
            Some(s) => s,
            None => return false,
        };
        if a.bufs[slot].is_null() {
            a.bufs[slot] = unsafe { alloc(Layout::from_size_align_unchecked(cap, ALIGN)) };
            if a.bufs[slot].is_null() {
                return false;
            }
        }
        let mut cb = Iocb {
            data: slot as u64,
            key: 0,
            rw_flags: 0,
            opcode: IOCB_CMD_PREAD,
            reqprio: 0,
            fildes: fd as u32,
            buf: a.bufs[slot] as u64,
            nbytes: round_up(len) as u64,
            offset: off as i64,
            reserved2: 0,
            flags: IOCB_FLAG_RESFD,
            resfd: a.efd.raw() as u32,
        };
        let mut list = [&mut cb as *mut Iocb];
        let r = unsafe { sys::syscall(sys::SYS_IO_SUBMIT, a.ctx, 1i64, list.as_mut_ptr()) };
        if r != 1 {
            return false;
        }
        a.reads.push_back(Read { stream, ch, off, len, slot, res: None });
        true
    }

    /// Collects completed reads (after the eventfd said so).
    pub fn reap(&mut self) {
        let a = match self.aio.as_mut() {
            Some(a) => a,
            None => return,
        };
        let mut count = [0u8; 8];
        let _ = a.efd.read(&mut count);
        let mut ev = [IoEvent { data: 0, obj: 0, res: 0, res2: 0 }; SLOTS];
        let zero = sys::Timespec { tv_sec: 0, tv_nsec: 0 };
        loop {
            let n = unsafe { sys::syscall(sys::SYS_IO_GETEVENTS, a.ctx, 0i64, SLOTS as i64, ev.as_mut_ptr(), &zero as *const sys::Timespec) };
            if n <= 0 {
                break;
            }
            for e in ev.iter().take(n as usize) {
                if let Some(r) = a.reads.iter_mut().find(|r| r.slot as u64 == e.data && r.res.is_none()) {
                    r.res = Some(e.res);
                }
            }
        }
    }

    /// The oldest read, once it has completed: its stream, channel and bytes.
    pub fn front_done(&self) -> Option<(u32, u8, Result<&[u8], String>)> {
        let a = self.aio.as_ref()?;
        let r = a.reads.front()?;
        let res = r.res?;
        let got = if res < 0 {
            Err(format!("stream ring read at {}: {}", r.off, io::Error::from_raw_os_error(-res as i32)))
        } else if (res as usize) < r.len {
            Err(format!("stream ring read at {}: {} of {} bytes", r.off, res, r.len))
        } else {
            Ok(unsafe { std::slice::from_raw_parts(a.bufs[r.slot] as *const u8, r.len) })
        };
        Some((r.stream, r.ch, got))
    }

    /// Drops the oldest read (after `front_done` handed it on).
    pub fn pop_front(&mut self) {
        if let Some(a) = self.aio.as_mut() {
            a.reads.pop_front();
        }
    }
}

impl Aio {
    fn new() -> Option<Aio> {
        let mut ctx: u64 = 0;
        if unsafe { sys::syscall(sys::SYS_IO_SETUP, SLOTS as i64, &mut ctx as *mut u64) } != 0 {
            log!("stream ring: no Linux AIO ({}); region reads block", io::Error::last_os_error());
            return None;
        }
        let efd = unsafe { sys::eventfd(0, sys::EFD_NONBLOCK | sys::EFD_CLOEXEC) };
        if efd < 0 {
            return None;
        }
        Some(Aio { ctx, efd: Fd(efd), bufs: [std::ptr::null_mut(); SLOTS], reads: VecDeque::new() })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        unsafe { dealloc(self.buf, Layout::from_size_align_unchecked(self.cap, ALIGN)) };
        if let Some(a) = self.aio.as_ref() {
            // The agent drops its ring only when it exits; a read still in
            // flight would write into a freed buffer, so the buffers stay.
            if !a.reads.is_empty() {
                return;
            }
            for b in a.bufs.iter().filter(|b| !b.is_null()) {
                unsafe { dealloc(*b, Layout::from_size_align_unchecked(self.cap, ALIGN)) };
            }
        }
    }
}

fn round_up(n: usize) -> usize {
    (n + ALIGN - 1) / ALIGN * ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aio_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<Iocb>(), 64);
        assert_eq!(std::mem::size_of::<IoEvent>(), 32);
    }

    /// Reads submitted together complete into their own buffers and are
    /// handed on in submission order (a buffered file: the kernel completes
    /// its AIO reads at once, which exercises the same paths).
    #[test]
    fn submitted_reads_come_back_in_order_with_their_bytes() {
        let path = std::env::temp_dir().join(format!("sm-ring-test-{}", std::process::id()));
        let data: Vec<u8> = (0..4 * ALIGN * 4).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&path, &data).unwrap();
        let c = sys::cstring(path.as_os_str().to_string_lossy().as_bytes()).unwrap();
        let fd = sys::open_path(&c, sys::O_RDONLY | sys::O_CLOEXEC, 0).unwrap();
        let _ = fs::remove_file(&path);
        let mut ring = Ring::with_fd(fd, data.len() as u64).unwrap();
        assert!(ring.event_fd().is_some(), "Linux AIO is available");
        let regions = [(3 * ALIGN as u64 * 4, 5000usize, 7u32), (0, 100, 8), (ALIGN as u64 * 4, 4 * ALIGN, 9), (2 * ALIGN as u64 * 4, 1, 7)];
        for (off, len, id) in regions.iter() {
            assert!(ring.submit(*id, 0, *off, *len));
        }
        assert!(!ring.can_submit(), "at most SLOTS reads in flight");
        assert!(!ring.submit(1, 0, 0, 1));
        let mut got = Vec::new();
        for _ in 0..100 {
            ring.reap();
            while let Some((id, _, r)) = ring.front_done() {
                got.push((id, r.unwrap().to_vec()));
                ring.pop_front();
            }
            if got.len() == regions.len() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(got.len(), regions.len());
        for ((off, len, id), (gid, bytes)) in regions.iter().zip(got.iter()) {
            assert_eq!(id, gid);
            assert_eq!(&bytes[..], &data[*off as usize..*off as usize + len]);
        }
        assert!(!ring.reads_in_flight());
        assert!(ring.can_submit());
    }
}
