//! The agent's event loop: one thread, one epoll set, every stream of the
//! protocol multiplexed on the virtio-serial port. It reads frames and
//! routes them, and epoll events, to the services in crate::service, which
//! own their state; it owns only the port and the session's framing.

use crate::init::BootReport;
use crate::io::{Io, ReqError, TK_DRAIN, TK_IN, TK_KIND, TK_OUT, TK_PORT, TK_RING, TK_SIG, TK_TCP};
use crate::proto::{self, tag, ty, Record};
use crate::ring::Ring;
use crate::service::exec::{self as exec_service, ExecService};
use crate::service::files::FileService;
use crate::service::freeze::FreezeService;
use crate::service::logs::LogService;
use crate::service::mounts::{MountService, TK_FUSE, TK_MOUNT_JOB};
use crate::service::net::NetService;
use crate::service::session::Session;
use crate::service::tcp::TcpService;
use crate::service::workload::WorkloadService;
use crate::sys::{self, Fd};
use crate::{debug, log};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The read buffer holds at least one maximal frame.
const RBUF: usize = proto::HEADER_LEN + proto::MAX_PAYLOAD + 64 * 1024;

pub struct Agent {
    io: Io,
    port: Option<Fd>,
    port_path: PathBuf,
    rbuf: Vec<u8>,
    sig: Fd,
    /// The port reported end-of-file: the host may have gone, and a new
    /// host's HELLO may follow the tail of a frame the old one never finished.
    resync: bool,
    session: Session,
    exec: ExecService,
    files: FileService,
    tcp: TcpService,
    workload: WorkloadService,
    net: NetService,
    freeze: FreezeService,
    mounts: MountService,
    logs: LogService,
    /// The stream ring disk, when the host attached one (ring.rs).
    ring: Option<Ring>,
    /// Frames wait in `rbuf` behind region reads in flight (the port is
    /// not read until they are handed on).
    frames_held: bool,
}

fn find_port(name: &str) -> io::Result<PathBuf> {
    for e in fs::read_dir("/sys/class/virtio-ports")? {
        let e = e?;
        let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("virtio port {} not found", name)))
}

/// The device of virtio port `name`, waiting up to 5 s for it to appear.
pub fn wait_for_port(name: &str) -> io::Result<PathBuf> {
    for _ in 0..500 {
        if let Ok(p) = find_port(name) {
            return Ok(p);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("no {} virtio port", name)))
}

pub fn open_port(path: &Path) -> io::Result<Fd> {
    let c = sys::cstring(path.as_os_str().to_string_lossy().as_bytes())?;
    sys::open_path(&c, sys::O_RDWR | sys::O_NONBLOCK | sys::O_NOCTTY, 0)
}

/// Runs the agent until an unrecoverable error (the caller restarts it).
pub fn run(boot: &BootReport) -> io::Result<()> {
    let ep = Fd(sys::cvt(unsafe { sys::epoll_create1(sys::EPOLL_CLOEXEC) })?);
    let mut mask = sys::empty_sigset();
    unsafe {
        sys::sigaddset(&mut mask, sys::SIGCHLD);
        sys::sigprocmask(sys::SIG_BLOCK, &mask, std::ptr::null_mut());
    }
    let sig = Fd(sys::cvt(unsafe { sys::signalfd(-1, &mask, sys::SFD_NONBLOCK | sys::SFD_CLOEXEC) })?);
    let port_path = wait_for_port(&boot.port_name)?;
    let mut a = Agent {
        io: Io::new(ep),
        port: None,
        port_path,
        rbuf: Vec::with_capacity(RBUF),
        sig,
        resync: false,
        session: Session::new(boot.error.clone()),
        exec: ExecService::new(boot.cgroups),
        files: FileService::new(),
        tcp: TcpService::new(),
        workload: WorkloadService::new(),
        net: NetService::new(),
        freeze: FreezeService::new(),
        mounts: MountService::new(),
        logs: LogService::new(),
        ring: Ring::open(),
        frames_held: false,
    };
    a.io.add(a.sig.raw(), sys::EPOLLIN, TK_SIG);
    if let Some(fd) = a.ring.as_ref().and_then(|r| r.event_fd()) {
        a.io.add(fd, sys::EPOLLIN, TK_RING);
    }
    a.open_port()?;
    a.event_loop()
}

impl Agent {
    fn open_port(&mut self) -> io::Result<()> {
        let left = crate::init::TEMPLATE_PORT.swap(-1, std::sync::atomic::Ordering::SeqCst);
        let fd = if left >= 0 { Fd(left) } else { open_port(&self.port_path)? };
        // Edge-triggered: a disconnected port reports HUP; level triggering
        // would spin. A host (re)connect wakes the port's wait queue.
        self.io.add(fd.raw(), sys::EPOLLIN | sys::EPOLLOUT | sys::EPOLLRDHUP | sys::EPOLLET, TK_PORT);
        self.io.port_fd = fd.raw();
        self.port = Some(fd);
        Ok(())
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let mut events = vec![sys::EpollEvent { events: 0, data: 0 }; 64];
        loop {
            self.read_port();
            self.adopt_orphans();
            self.io.flush();
            let idle_work = self.exec.cgroups.has_idle_work();
            let timeout = if idle_work { 0 } else { self.next_timeout() };
            let n = unsafe { sys::epoll_wait(self.io.ep.raw(), events.as_mut_ptr(), events.len() as i32, timeout) };
            if n == 0 && idle_work {
                // Nothing to serve: prepare cgroups for the next execs.
                let t0 = sys::monotonic_us();
                self.exec.cgroups.idle_step();
                debug!("idle step {} us", sys::monotonic_us() - t0);
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(sys::EINTR) {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter().take(n as usize).copied() {
                let tok = ev.data;
                let bits = ev.events;
                let stream = ((tok >> 8) & 0xffff_ffff) as u32;
                let ch = (tok & 0xff) as u8;
                match tok & TK_KIND {
                    TK_PORT => {
                        debug!("port event {:#x}", bits);
                        if bits & (sys::EPOLLHUP | sys::EPOLLRDHUP) != 0 && bits & sys::EPOLLIN == 0 {
                            self.host_gone();
                        }
                        // Reading happens at the top of the loop.
                    }
                    TK_SIG => self.reap(),
                    TK_OUT => self.exec.pump_out(&mut self.io, stream, ch),
                    TK_IN => self.exec.pump_in(&mut self.io, stream),
                    TK_TCP => self.tcp.event(&mut self.io, stream, bits),
                    TK_DRAIN => self.logs.event(&mut self.io, tok & 0xffff_ffff_ffff),
                    TK_FUSE => self.mounts.event(&mut self.io, stream),
                    TK_MOUNT_JOB => self.mounts.job_event(&mut self.io, stream),
                    TK_RING => self.ring_reads_done(),
                    _ => {}
                }
            }
            let now = sys::monotonic_ms();
            self.exec.check_deadlines(now);
            self.mounts.check_deadlines(&mut self.io, now);
            if self.workload.waiting() {
                self.workload.poll_listen_waits(&mut self.io, now);
            }
        }
    }

    /// Output pipes the exec service let go of go to the logs service.
    fn adopt_orphans(&mut self) {
        for o in self.exec.orphans.drain(..) {
            self.logs.adopt(&mut self.io, o);
        }
        for o in self.workload.orphans.drain(..) {
            self.logs.adopt(&mut self.io, o);
        }
        self.logs.flush(&mut self.io);
    }

    fn next_timeout(&self) -> i32 {
        let now = sys::monotonic_ms();
        let mut t = self.exec.next_deadline();
        if let Some(m) = self.mounts.next_deadline() {
            t = Some(t.map_or(m, |x| x.min(m)));
        }
        if self.workload.waiting() {
            t = Some(t.map_or(now + 10, |x| x.min(now + 10)));
        }
        match t {
            None => -1,
            Some(d) if d <= now => 0,
            Some(d) => (d - now).min(i32::MAX as u64) as i32,
        }
    }

    fn reap(&mut self) {
        let mut buf = [0u8; 128 * 8];
        while let Ok(n) = self.sig.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        for (pid, status, maxrss_kib) in exec_service::reap_children() {
            if !self.exec.on_exit(&mut self.io, pid, status, maxrss_kib) {
                self.workload.on_exit(pid, status);
            }
        }
    }

    // ---------------------------------------------------------------- port

    /// End of file on the port. It does not prove the host is gone: data of a
    /// new connection can arrive before the port-open notice, and reads then
    /// see EOF in between. So nothing is dropped here; a HELLO that follows
    /// is found by its signature (see process_frames) and resets the session.
    fn host_gone(&mut self) {
        self.resync = true;
    }

    fn read_port(&mut self) {
        let fd = match &self.port {
            Some(fd) => fd.raw(),
            None => return,
        };
        if self.frames_held {
            return;
        }
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < 64 * 1024 {
                // A frame is never larger than RBUF; compact happened below.
                self.rbuf.reserve(64 * 1024);
            }
            let len = self.rbuf.len();
            let cap = self.rbuf.capacity();
            let r = unsafe { sys::read(fd, self.rbuf.as_mut_ptr().add(len) as *mut _, cap - len) };
            if r > 0 {
                unsafe { self.rbuf.set_len(len + r as usize) };
                self.process_frames();
                continue;
            }
            if r == 0 {
                // No host connected (or it went away).
                debug!("port read: EOF (host not connected)");
                self.host_gone();
                return;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(sys::EINTR) => continue,
                Some(sys::EAGAIN) => return,
                _ => {
                    debug!("port read error: {}", e);
                    self.host_gone();
                    return;
                }
            }
        }
    }

    fn process_frames(&mut self) {
        self.frames_held = false;
        let buf = std::mem::take(&mut self.rbuf);
        let mut pos = 0;
        if self.resync {
            match find_hello(&buf) {
                Some(at) => {
                    if at > 0 {
                        log!("dropping {} bytes left by a previous host before its HELLO", at);
                    }
                    pos = at;
                    self.resync = false;
                }
                // Whole frames and no HELLO: the same host is still there.
                None => {
                    if let Ok(Some(_)) = proto::parse_frame(&buf) {
                        self.resync = false;
                    }
                }
            }
        }
        loop {
            match proto::parse_frame(&buf[pos..]) {
                Ok(Some((f, used))) => {
                    if self.held_by_reads(f.ty, f.flags, f.stream, f.payload) {
                        self.frames_held = true;
                        break;
                    }
                    pos += used;
                    debug!("frame type {:#x} stream {} len {}", f.ty, f.stream, f.payload.len());
                    if self.io.quiesced {
                        self.io.quiesced = false;
                    }
                    self.dispatch(f.ty, f.flags, f.stream, f.payload);
                }
                Ok(None) => break,
                Err(e) => {
                    // The host is trusted, but a corrupt stream cannot be
                    // resynchronised: drop what we have and say so.
                    log!("bad frame from host: {}", e);
                    self.io.send_error(0, ReqError::BadRequest(format!("bad frame: {}", e)));
                    pos = buf.len();
                    break;
                }
            }
        }
        let mut buf = buf;
        buf.drain(..pos);
        self.rbuf = buf;
        self.send_ring_ack();
    }

    /// One acknowledgement for the ring regions read since the last.
    fn send_ring_ack(&mut self) {
        if let Some(r) = self.ring.as_mut() {
            if r.unacked > 0 {
                self.io.send(ty::RING_ACK, 0, 0, &r.unacked.to_le_bytes());
                r.unacked = 0;
            }
        }
    }

    /// Whether a frame must wait for the region reads in flight: every
    /// frame does, in order, except a valid DATA_REF whose read can be
    /// submitted too (stream order, and the order of RING_ACK counts, stay
    /// the order of the frames).
    fn held_by_reads(&self, t: u8, flags: u8, id: u32, p: &[u8]) -> bool {
        let ring = match self.ring.as_ref() {
            Some(r) if r.reads_in_flight() => r,
            _ => return false,
        };
        !(t == ty::DATA_REF && ring.can_submit() && ring.region(p).is_ok() && self.exec.stdin_pipe(id, flags).is_none())
    }

    /// Hands on the region reads that completed, oldest first, then goes on
    /// with the frames that waited for them.
    fn ring_reads_done(&mut self) {
        let mut ring = match self.ring.take() {
            Some(r) => r,
            None => return,
        };
        ring.reap();
        while let Some((id, ch, got)) = ring.front_done() {
            match got {
                Ok(bytes) => self.data(id, ch, bytes),
                Err(e) => {
                    log!("{}", e);
                    self.io.send_error(id, ReqError::BadRequest(e));
                }
            }
            ring.pop_front();
            ring.unacked += 1;
        }
        let resume = !ring.reads_in_flight() || ring.can_submit();
        self.ring = Some(ring);
        self.send_ring_ack();
        if self.frames_held && resume {
            self.process_frames();
        }
    }

    // ------------------------------------------------------------ dispatch

    /// Whether a stream id is taken by any service.
    fn stream_open(&self, id: u32) -> bool {
        self.exec.owns(id) || self.files.owns(id) || self.tcp.owns(id) || self.mounts.owns(id) || self.logs.owns(id)
    }

    /// Bytes for stream `id` on channel `ch` (a DATA frame, or a DATA_REF's region).
    fn data(&mut self, id: u32, ch: u8, p: &[u8]) {
        self.exec.data(&mut self.io, id, ch, p);
        self.files.data(&mut self.io, id, ch, p);
        self.tcp.data(&mut self.io, id, ch, p);
    }

    fn dispatch(&mut self, t: u8, flags: u8, id: u32, p: &[u8]) {
        let opens_stream = matches!(t, ty::EXEC | ty::WRITE_FILE | ty::READ_FILE | ty::TCP_CONNECT | ty::MOUNT | ty::LOGS);
        if opens_stream && self.stream_open(id) {
            self.io.send_error(id, ReqError::BadRequest(format!("stream {} already open", id)));
            return;
        }
        match t {
            ty::HELLO => {
                // A new session: forget the streams of the old one; their
                // processes keep running, detached.
                self.reset_session();
                self.session.hello(&mut self.io, p, self.exec.cgroups.enabled, self.ring.is_some());
            }
            ty::PING => {
                let n = p.len().min(64);
                self.io.send(ty::PONG, 0, 0, &p[..n]);
            }
            ty::CONFIGURE => {
                let r = self.session.configure(&mut self.net, p);
                // Processes frozen for a snapshot continue only now, after
                // this frame reseeded the RNG, stepped the clock and set the
                // identity of this VM.
                if r.is_ok() {
                    self.freeze.thaw();
                }
                self.io.reply(id, r);
            }
            ty::SNAPSHOT_PREPARE => {
                // Every guest process stops before the snapshot, and stays
                // stopped until the next CONFIGURE (in each clone, and in
                // this VM when it runs on).
                let n = self.freeze.freeze();
                debug!("snapshot: {} process(es) stopped", n);
                self.io.send_record(ty::OK, id, Record::new().u32(tag::snapshot_prepare_ok::STOPPED, n as u32));
                // Flush the OK, then stay silent until the host speaks again.
                self.io.flush();
                self.io.quiesced = true;
                // A clone restored from this snapshot talks to a new host,
                // whose HELLO is found by its signature.
                self.resync = true;
            }
            ty::EXEC => {
                if self.mounts.intercept_exec(&mut self.io, id, p) {
                    return;
                }
                if let Err(e) = self.exec.start(&mut self.io, &self.session, id, p) {
                    self.io.send_error(id, e);
                }
            }
            ty::SIGNAL => self.exec.signal(id, p),
            ty::DETACH => self.exec.detach(&mut self.io, id),
            ty::RESIZE => self.exec.resize(id, p),
            ty::CANCEL => {
                self.exec.cancel(id);
                self.files.cancel(&mut self.io, id);
                self.tcp.cancel(&mut self.io, id);
                self.workload.cancel(id);
                self.mounts.cancel(&mut self.io, id);
                self.logs.cancel(&mut self.io, id);
            }
            ty::LOGS => {
                if let Err(e) = self.logs.open(&mut self.io, id) {
                    self.io.send_error(id, e);
                }
            }
            ty::MOUNT => self.mounts.open(&mut self.io, id, p),
            ty::FUSE => self.mounts.message(&mut self.io, id, flags, p),
            ty::DATA => self.data(id, flags, p),
            ty::DATA_REF => {
                // Out of self while its buffer is lent to the services.
                let mut ring = match self.ring.take() {
                    Some(r) => r,
                    None => {
                        self.io.send_error(id, ReqError::BadRequest("DATA_REF without a stream ring".into()));
                        return;
                    }
                };
                let mut read_later = false;
                let got = ring.region(p).and_then(|(off, len)| {
                    // A process's stdin with nothing queued: the region's
                    // whole pages go into its pipe without a copy.
                    let mut moved = 0;
                    if let Some(fd) = self.exec.stdin_pipe(id, flags) {
                        moved = ring.splice_into(off, len, fd);
                        // Credited as bytes written into the pipe are.
                        self.io.send_window(id, 0, moved);
                    } else if ring.submit(id, flags, off, len) {
                        // Handed on (and acknowledged) when the read
                        // completes: ring_reads_done.
                        read_later = true;
                        return Ok(());
                    }
                    if moved < len {
                        let bytes = ring.read_at(off, moved, len)?;
                        self.data(id, flags, bytes);
                    }
                    Ok(())
                });
                if !read_later {
                    ring.unacked += 1;
                }
                if let Err(e) = got {
                    log!("{}", e);
                    self.io.send_error(id, ReqError::BadRequest(e));
                }
                self.ring = Some(ring);
            }
            ty::EOF => {
                self.exec.eof(&mut self.io, id, flags);
                self.files.eof(&mut self.io, id, flags);
                self.tcp.eof(&mut self.io, id, flags);
            }
            ty::WINDOW => {
                if p.len() == 4 {
                    let n = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    self.exec.window(&mut self.io, id, flags, n);
                    self.files.window(&mut self.io, id, flags, n);
                    self.tcp.window(&mut self.io, id, flags, n);
                    self.logs.window(&mut self.io, id, flags, n);
                }
            }
            ty::WRITE_FILE => self.files.write_file(&mut self.io, id, p),
            ty::READ_FILE => self.files.read_file(&mut self.io, id, p),
            ty::TCP_CONNECT => self.tcp.connect(&mut self.io, id, p),
            ty::WORKLOAD_START => {
                let r = self.workload.start(&self.session, p);
                self.io.reply(id, r);
            }
            ty::WORKLOAD_SIGNAL => {
                let r = self.workload.signal(p);
                self.io.reply(id, r);
            }
            ty::WAIT_LISTEN => {
                if let Err(e) = self.workload.wait_listen(&mut self.io, id, p) {
                    self.io.send_error(id, e);
                }
            }
            _ => {
                if id != 0 {
                    self.io.send_error(id, ReqError::Unsupported(format!("unknown message type {:#x}", t)));
                }
            }
        }
    }

    fn reset_session(&mut self) {
        // Frames queued for the previous host are meaningless to the new one.
        self.io.clear();
        self.workload.reset();
        self.exec.reset(&mut self.io);
        self.files.reset();
        self.tcp.reset(&mut self.io);
        self.mounts.reset(&mut self.io);
        self.logs.reset();
    }
}

/// Finds the start of a HELLO frame by its fixed prefix (type, flags,
/// reserved, stream 0, then the magic field first).
fn find_hello(buf: &[u8]) -> Option<usize> {
    let mut sig = vec![ty::HELLO, 0, 0, 0, 0, 0, 0, 0, tag::hello::MAGIC];
    sig.extend_from_slice(&(proto::MAGIC.len() as u32).to_le_bytes());
    sig.extend_from_slice(proto::MAGIC);
    if buf.len() < 4 + sig.len() {
        return None;
    }
    (4..=buf.len() - sig.len()).find(|&i| buf[i..i + sig.len()] == sig[..]).map(|i| i - 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Vec<u8> {
        let r = Record::new()
            .bytes(tag::hello::MAGIC, proto::MAGIC)
            .u32(tag::hello::MIN_VERSION, 1)
            .u32(tag::hello::MAX_VERSION, 1);
        let mut out = Vec::new();
        proto::encode_frame(&mut out, ty::HELLO, 0, 0, &r.buf);
        out
    }

    #[test]
    fn hello_found_after_garbage() {
        let h = hello();
        assert_eq!(find_hello(&h), Some(0));
        let mut buf = vec![200, 0, 0, 0, 0x10, 0, 0, 0, 9, 0, 0, 0, 1, 4];
        buf.extend_from_slice(&h);
        assert_eq!(find_hello(&buf), Some(14));
        assert_eq!(find_hello(&h[..20]), None);
        assert_eq!(find_hello(b"nothing here at all, just text"), None);
    }
}
