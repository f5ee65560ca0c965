//! The agent's event loop: one thread, one epoll set, every stream of the
//! protocol multiplexed on the virtio-serial port.

use crate::exec::{self, Cgroups, NotRunnable, SpawnSpec, Stdio};
use crate::files::{ReadFile, WriteFile};
use crate::init::BootReport;
use crate::proto::{self, err, tag, ty, DecodeError, Record};
use crate::sys::{self, Fd};
use crate::tcp::Conn;
use crate::users::{self, Identity};
use crate::{debug, log, AGENT_VERSION};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const TK_PORT: u64 = 1 << 56;
const TK_SIG: u64 = 2 << 56;
const TK_OUT: u64 = 3 << 56;
const TK_IN: u64 = 4 << 56;
const TK_TCP: u64 = 5 << 56;
const TK_DRAIN: u64 = 6 << 56;
const TK_KIND: u64 = 0xff << 56;

/// Largest DATA payload the agent sends by copying.
pub const CHUNK: usize = 256 * 1024;
/// Largest DATA payload the agent splices (zero copy) from a pipe.
const SPLICE_MAX: usize = 1024 * 1024;
/// The read buffer holds at least one maximal frame.
const RBUF: usize = proto::HEADER_LEN + proto::MAX_PAYLOAD + 64 * 1024;

fn token(kind: u64, stream: u32, ch: u8) -> u64 {
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
    ep: Fd,
    /// The virtio-serial port (-1 before it is open), for splice.
    port_fd: i32,
    out: Vec<u8>,
    out_pos: usize,
    /// After SNAPSHOT_PREPARE: nothing is written to the port until the host
    /// sends again.
    pub quiesced: bool,
    pub scratch: Vec<u8>,
    /// The agent's own pipe between a process's pipe and the port (splice_data).
    relay: Option<(Fd, Fd)>,
    relay_cap: usize,
}

impl Io {
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

/// One output channel of a process (stdout or stderr) under flow control.
struct OutCh {
    fd: Option<Fd>,
    credit: u32,
    watching: bool,
    /// A pipe (not a pty): its data can be spliced to the port.
    pipe: bool,
}

impl OutCh {
    fn closed() -> OutCh {
        OutCh { fd: None, credit: proto::INITIAL_WINDOW, watching: false, pipe: false }
    }
}

struct Exec {
    pid: i32,
    /// Raw wait status of the current process once reaped.
    status: Option<i32>,
    rusage_maxrss_kib: u64,
    chain: Option<Vec<Vec<u8>>>,
    env: Vec<Vec<u8>>,
    cwd: Vec<u8>,
    identity: Identity,
    tty: Option<(u16, u16)>,
    /// pty master kept for RESIZE (tty mode only).
    master: Option<Fd>,
    out: [OutCh; 2],
    stdin: Option<Fd>,
    stdin_buf: Vec<u8>,
    stdin_pos: usize,
    stdin_eof: bool,
    stdin_watching: bool,
    cgroup: Option<PathBuf>,
    deadline: Option<u64>,
    timed_out: bool,
    killed: bool,
}

enum Stream {
    Exec(Box<Exec>),
    WriteFile(WriteFile),
    ReadFile(ReadFile),
    Tcp(Conn),
}

struct ListenWait {
    stream: u32,
    port: u16,
    deadline: u64,
}

pub struct Agent {
    io: Io,
    port: Option<Fd>,
    port_path: PathBuf,
    rbuf: Vec<u8>,
    sig: Fd,
    streams: HashMap<u32, Stream>,
    pids: HashMap<i32, u32>,
    drains: HashMap<u64, Fd>,
    next_drain: u64,
    cgroups: Cgroups,
    env: Vec<Vec<u8>>,
    cwd: Vec<u8>,
    user: Vec<u8>,
    workload: Option<i32>,
    listen_waits: Vec<ListenWait>,
    boot_error: Option<String>,
    console: Option<Fd>,
    /// The port reported end-of-file: the host may have gone, and a new
    /// host's HELLO may follow the tail of a frame the old one never finished.
    resync: bool,
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

fn open_port(path: &Path) -> io::Result<Fd> {
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
    let mut port_path = None;
    for _ in 0..500 {
        if let Ok(p) = find_port(&boot.port_name) {
            port_path = Some(p);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let port_path = port_path.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no sm.agent virtio port"))?;
    let console = CString::new("/dev/console").ok().and_then(|c| sys::open_path(&c, sys::O_WRONLY | sys::O_NOCTTY, 0).ok());
    let mut a = Agent {
        io: Io { ep, port_fd: -1, out: Vec::with_capacity(1 << 20), out_pos: 0, quiesced: false, scratch: vec![0u8; CHUNK], relay: None, relay_cap: 0 },
        port: None,
        port_path,
        rbuf: Vec::with_capacity(RBUF),
        sig,
        streams: HashMap::new(),
        pids: HashMap::new(),
        drains: HashMap::new(),
        next_drain: 1,
        cgroups: Cgroups::new(boot.cgroups),
        env: vec![b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_vec()],
        cwd: b"/".to_vec(),
        user: Vec::new(),
        workload: None,
        listen_waits: Vec::new(),
        boot_error: boot.error.clone(),
        console,
        resync: false,
    };
    a.io.add(a.sig.raw(), sys::EPOLLIN, TK_SIG);
    if let Ok((r, w)) = sys::pipe(sys::O_NONBLOCK) {
        let cap = unsafe { sys::fcntl(w.raw(), sys::F_SETPIPE_SZ, SPLICE_MAX as i32) };
        if cap > 0 {
            a.io.relay_cap = cap as usize;
            a.io.relay = Some((r, w));
        }
    }
    a.open_port()?;
    a.event_loop()
}

impl Agent {
    fn open_port(&mut self) -> io::Result<()> {
        let fd = open_port(&self.port_path)?;
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
            self.flush();
            let idle_work = self.cgroups.has_idle_work();
            let timeout = if idle_work { 0 } else { self.next_timeout() };
            let n = unsafe { sys::epoll_wait(self.io.ep.raw(), events.as_mut_ptr(), events.len() as i32, timeout) };
            if n == 0 && idle_work {
                // Nothing to serve: prepare cgroups for the next execs.
                let t0 = sys::monotonic_us();
                self.cgroups.idle_step();
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
                    TK_OUT => self.pump_out(stream, ch),
                    TK_IN => self.pump_in(stream),
                    TK_TCP => self.tcp_event(stream, bits),
                    TK_DRAIN => self.drain(tok & 0xffff_ffff_ffff),
                    _ => {}
                }
            }
            self.check_deadlines();
        }
    }

    fn next_timeout(&self) -> i32 {
        let now = sys::monotonic_ms();
        let mut t: Option<u64> = None;
        for s in self.streams.values() {
            if let Stream::Exec(e) = s {
                if let Some(d) = e.deadline {
                    t = Some(t.map_or(d, |x: u64| x.min(d)));
                }
            }
        }
        if !self.listen_waits.is_empty() {
            t = Some(t.map_or(now + 10, |x| x.min(now + 10)));
        }
        match t {
            None => -1,
            Some(d) if d <= now => 0,
            Some(d) => (d - now).min(i32::MAX as u64) as i32,
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
    }

    fn flush(&mut self) {
        if self.io.quiesced {
            return;
        }
        let fd = match &self.port {
            Some(fd) => fd.raw(),
            None => return,
        };
        while self.io.out_pos < self.io.out.len() {
            let rest = &self.io.out[self.io.out_pos..];
            let r = unsafe { sys::write(fd, rest.as_ptr() as *const _, rest.len()) };
            if r > 0 {
                self.io.out_pos += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(sys::EINTR) => continue,
                // EPOLLOUT (edge) tells us when to try again.
                Some(sys::EAGAIN) => return,
                _ => {
                    // No host to write to: output of this session is lost.
                    self.io.out.clear();
                    self.io.out_pos = 0;
                    return;
                }
            }
        }
        self.io.out.clear();
        self.io.out_pos = 0;
    }

    // ------------------------------------------------------------ dispatch

    fn dispatch(&mut self, t: u8, flags: u8, id: u32, p: &[u8]) {
        match t {
            ty::HELLO => self.hello(id, p),
            ty::PING => {
                let n = p.len().min(64);
                self.io.send(ty::PONG, 0, 0, &p[..n]);
            }
            ty::CONFIGURE => {
                let r = self.configure(p);
                self.reply(id, r);
            }
            ty::SNAPSHOT_PREPARE => {
                self.io.send_record(ty::OK, id, Record::new());
                // Flush the OK, then stay silent until the host speaks again.
                self.flush();
                self.io.quiesced = true;
                // A clone restored from this snapshot talks to a new host,
                // whose HELLO is found by its signature.
                self.resync = true;
            }
            ty::EXEC => {
                if let Err(e) = self.start_exec(id, p) {
                    self.io.send_error(id, e);
                }
            }
            ty::SIGNAL => self.signal(id, p),
            ty::RESIZE => self.resize(id, p),
            ty::CANCEL => self.cancel(id),
            ty::DATA => self.data(id, flags, p),
            ty::EOF => self.eof(id, flags),
            ty::WINDOW => {
                if p.len() == 4 {
                    let n = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    self.window(id, flags, n);
                }
            }
            ty::WRITE_FILE => match WriteFile::start(p) {
                Ok(w) => {
                    self.streams.insert(id, Stream::WriteFile(w));
                }
                Err(e) => self.io.send_error(id, e),
            },
            ty::READ_FILE => match ReadFile::start(p) {
                Ok(r) => {
                    self.streams.insert(id, Stream::ReadFile(r));
                    self.pump_read_file(id);
                }
                Err(e) => self.io.send_error(id, e),
            },
            ty::TCP_CONNECT => match Conn::start(p) {
                Ok(c) => {
                    self.io.add(c.fd(), c.interest(), token(TK_TCP, id, 0));
                    self.streams.insert(id, Stream::Tcp(c));
                }
                Err(e) => self.io.send_error(id, e),
            },
            ty::WORKLOAD_START => {
                let r = self.workload_start(p);
                self.reply(id, r);
            }
            ty::WORKLOAD_SIGNAL => {
                let r = self.workload_signal(p);
                self.reply(id, r);
            }
            ty::WAIT_LISTEN => {
                if let Err(e) = self.wait_listen(id, p) {
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

    fn reply(&mut self, id: u32, r: Result<Record, ReqError>) {
        match r {
            Ok(rec) => self.io.send_record(ty::OK, id, rec),
            Err(e) => self.io.send_error(id, e),
        }
    }

    fn hello(&mut self, _id: u32, p: &[u8]) {
        let mut magic_ok = false;
        let (mut min, mut max) = (0u32, 0u32);
        for f in proto::fields(p) {
            let (t, v) = match f {
                Ok(x) => x,
                Err(_) => break,
            };
            match t {
                tag::hello::MAGIC => magic_ok = v == proto::MAGIC,
                tag::hello::MIN_VERSION => min = proto::val_u32(t, v).unwrap_or(0),
                tag::hello::MAX_VERSION => max = proto::val_u32(t, v).unwrap_or(0),
                _ => {}
            }
        }
        // A new session: forget the streams of the old one; their processes
        // keep running, detached.
        self.reset_session();
        if !magic_ok || min > proto::PROTOCOL_VERSION || max < proto::PROTOCOL_VERSION {
            self.io.send_error(
                0,
                ReqError::Unsupported(format!(
                    "agent {} speaks protocol {}, host offered {}..{}",
                    AGENT_VERSION,
                    proto::PROTOCOL_VERSION,
                    min,
                    max
                )),
            );
            return;
        }
        let mut r = Record::new()
            .bytes(tag::hello_ack::MAGIC, proto::MAGIC)
            .u32(tag::hello_ack::VERSION, proto::PROTOCOL_VERSION)
            .bytes(tag::hello_ack::AGENT_VERSION, AGENT_VERSION.as_bytes());
        let mut features = vec!["exec", "files", "tcp", "tty", "workload", "snapshot"];
        if self.cgroups.enabled {
            features.push("cgroup");
        }
        for f in features {
            r = r.bytes(tag::hello_ack::FEATURE, f.as_bytes());
        }
        r = r.u32(tag::hello_ack::MAX_PAYLOAD, proto::MAX_PAYLOAD as u32);
        if let Some(e) = &self.boot_error {
            r = r.bytes(tag::hello_ack::BOOT_ERROR, e.as_bytes());
        }
        self.io.send_record(ty::HELLO_ACK, 0, r);
    }

    fn reset_session(&mut self) {
        // Frames queued for the previous host are meaningless to the new one.
        self.io.out.clear();
        self.io.out_pos = 0;
        self.io.quiesced = false;
        self.listen_waits.clear();
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            match self.streams.remove(&id) {
                Some(Stream::Exec(mut e)) => {
                    if let Some(fd) = e.stdin.take() {
                        self.io.remove(fd.raw());
                    }
                    for ch in e.out.iter_mut() {
                        if let Some(fd) = ch.fd.take() {
                            self.io.remove(fd.raw());
                            self.start_drain(fd);
                        }
                    }
                    if e.pid > 0 {
                        self.pids.remove(&e.pid);
                    }
                }
                Some(Stream::Tcp(c)) => self.io.remove(c.fd()),
                Some(Stream::WriteFile(w)) => w.abort(),
                Some(Stream::ReadFile(_)) | None => {}
            }
        }
    }

    // ----------------------------------------------------------- configure

    fn configure(&mut self, p: &[u8]) -> Result<Record, ReqError> {
        let mut env: Option<Vec<Vec<u8>>> = None;
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::configure::ENV => env.get_or_insert_with(Vec::new).push(v.to_vec()),
                tag::configure::CWD => {
                    // As Docker does: the image's WorkingDir exists in the container.
                    use std::os::unix::ffi::OsStrExt;
                    let _ = fs::create_dir_all(std::ffi::OsStr::from_bytes(v));
                    self.cwd = v.to_vec();
                }
                tag::configure::USER => self.user = v.to_vec(),
                tag::configure::HOSTNAME => {
                    crate::init::set_hostname(v).map_err(|e| ReqError::from_io("sethostname", &e))?;
                    let mut line = v.to_vec();
                    line.push(b'\n');
                    let _ = fs::write("/etc/hostname", &line);
                }
                tag::configure::TIME_NS => {
                    let ns = proto::val_u64(t, v)?;
                    let ts = sys::Timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 };
                    sys::cvt(unsafe { sys::clock_settime(sys::CLOCK_REALTIME, &ts) })
                        .map_err(|e| ReqError::from_io("clock_settime", &e))?;
                }
                tag::configure::ENTROPY => add_entropy(v).map_err(|e| ReqError::from_io("RNDADDENTROPY", &e))?,
                tag::configure::MACHINE_ID => {
                    let mut line = v.to_vec();
                    line.push(b'\n');
                    fs::write("/etc/machine-id", &line).map_err(|e| ReqError::from_io("/etc/machine-id", &e))?;
                }
                tag::configure::BOOT_ID => set_boot_id(v).map_err(|e| ReqError::from_io("boot_id", &e))?,
                _ => {}
            }
        }
        if let Some(env) = env {
            self.env = env;
        }
        let boot_id = fs::read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let boot_id: Vec<u8> = boot_id.into_iter().filter(|b| !b.is_ascii_whitespace()).collect();
        Ok(Record::new().bytes(tag::configure_ok::BOOT_ID, &boot_id))
    }

    // ---------------------------------------------------------------- exec

    fn start_exec(&mut self, id: u32, p: &[u8]) -> Result<(), ReqError> {
        if self.streams.contains_key(&id) {
            return Err(ReqError::BadRequest(format!("stream {} already open", id)));
        }
        let mut argv: Vec<Vec<u8>> = Vec::new();
        let mut env: Vec<Vec<u8>> = Vec::new();
        let mut cwd: Option<Vec<u8>> = None;
        let mut timeout_ms = 0u64;
        let mut tty = false;
        let (mut cols, mut rows) = (80u32, 24u32);
        let mut chain: Vec<Vec<u8>> = Vec::new();
        let mut want_stdin = false;
        let mut user: Option<Vec<u8>> = None;
        let mut report_started = false;
        let mut want_cgroup = true;
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::exec::ARGV => argv.push(v.to_vec()),
                tag::exec::ENV => env.push(v.to_vec()),
                tag::exec::CWD => cwd = Some(v.to_vec()),
                tag::exec::TIMEOUT_MS => timeout_ms = proto::val_u64(t, v)?,
                tag::exec::TTY => tty = proto::val_bool(t, v)?,
                tag::exec::COLS => cols = proto::val_u32(t, v)?,
                tag::exec::ROWS => rows = proto::val_u32(t, v)?,
                tag::exec::CHAIN => chain.push(v.to_vec()),
                tag::exec::STDIN => want_stdin = proto::val_bool(t, v)?,
                tag::exec::USER => user = Some(v.to_vec()),
                tag::exec::REPORT_STARTED => report_started = proto::val_bool(t, v)?,
                tag::exec::CGROUP => want_cgroup = proto::val_bool(t, v)?,
                _ => {}
            }
        }
        if argv.is_empty() {
            return Err(ReqError::BadRequest("argv is empty".into()));
        }
        if argv.iter().chain(env.iter()).chain(chain.iter()).any(|a| a.contains(&0)) {
            return Err(ReqError::BadRequest("argv and env entries must not contain NUL bytes".into()));
        }
        let user = user.unwrap_or_else(|| self.user.clone());
        let identity = users::resolve(&user).map_err(ReqError::BadRequest)?;
        let mut env = exec::merge_env(&self.env, &env);
        if exec::env_get(&env, b"HOME").is_none() {
            if let Some(h) = &identity.home {
                let mut e = b"HOME=".to_vec();
                e.extend_from_slice(h);
                env.push(e);
            }
        }
        let cwd = cwd.unwrap_or_else(|| self.cwd.clone());
        {
            use std::os::unix::ffi::OsStrExt;
            let path = Path::new(std::ffi::OsStr::from_bytes(&cwd));
            if !path.is_dir() {
                return Err(ReqError::NotFound(format!(
                    "working directory {} does not exist in the guest",
                    String::from_utf8_lossy(&cwd)
                )));
            }
        }
        let cgroup = if want_cgroup { self.cgroups.create("exec") } else { None };
        let now = sys::monotonic_ms();
        let mut e = Box::new(Exec {
            pid: 0,
            status: None,
            rusage_maxrss_kib: 0,
            chain: if chain.is_empty() { None } else { Some(chain) },
            env,
            cwd,
            identity,
            tty: if tty { Some((cols.min(u16::MAX as u32) as u16, rows.min(u16::MAX as u32) as u16)) } else { None },
            master: None,
            out: [OutCh::closed(), OutCh::closed()],
            stdin: None,
            stdin_buf: Vec::new(),
            stdin_pos: 0,
            stdin_eof: false,
            stdin_watching: false,
            cgroup,
            deadline: if timeout_ms > 0 { Some(now + timeout_ms) } else { None },
            timed_out: false,
            killed: false,
        });
        match self.launch(id, &mut e, &argv, want_stdin) {
            Ok(()) => {
                if report_started {
                    self.io.send_record(ty::STARTED, id, Record::new().u32(tag::started::PID, e.pid as u32));
                }
                self.streams.insert(id, Stream::Exec(e));
                Ok(())
            }
            Err(Launch::NotRunnable(nr)) => {
                // As a shell would: a message on stderr and 126/127.
                let msg = format!("supermachine: {}\n", nr.message);
                self.io.send(ty::DATA, 2, id, msg.as_bytes());
                self.io.send(ty::EOF, 1, id, &[]);
                self.io.send(ty::EOF, 2, id, &[]);
                self.io.send_record(
                    ty::EXIT,
                    id,
                    Record::new().i32(tag::exit::EXIT_CODE, nr.exit_code).bool(tag::exit::TIMED_OUT, false),
                );
                if let Some(cg) = e.cgroup.take() {
                    self.cgroups.remove(cg);
                }
                Ok(())
            }
            Err(Launch::Io(err)) => {
                if let Some(cg) = e.cgroup.take() {
                    self.cgroups.remove(cg);
                }
                Err(err)
            }
        }
    }

    /// Starts `argv` for exec stream `id` with fresh pipes (or a pty).
    fn launch(&mut self, id: u32, e: &mut Exec, argv: &[Vec<u8>], want_stdin: bool) -> Result<(), Launch> {
        let program = exec::resolve_program(&argv[0], &e.env, &e.cwd).map_err(Launch::NotRunnable)?;
        let io_err = |what: &str, err: io::Error| Launch::Io(ReqError::from_io(what, &err));
        let cargv: Vec<CString> = argv.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
        let cenv: Vec<CString> = e.env.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
        let ccwd = CString::new(e.cwd.clone()).map_err(|_| Launch::Io(ReqError::BadRequest("cwd has a NUL byte".into())))?;
        let pid;
        if let Some((cols, rows)) = e.tty {
            let pty = exec::open_pty(cols, rows).map_err(|x| io_err("open pty", x))?;
            let spec = SpawnSpec {
                program: &program,
                argv: &cargv,
                env: &cenv,
                cwd: &ccwd,
                stdio: Stdio::Tty { slave: &pty.slave_path },
                identity: &e.identity,
                cgroup: e.cgroup.as_deref(),
            };
            pid = exec::spawn(&spec).map_err(|x| io_err("spawn", x))?;
            let read_fd = Fd(sys::cvt(unsafe { sys::dup(pty.master.raw()) }).map_err(|x| io_err("dup", x))?);
            unsafe { sys::fcntl(read_fd.raw(), 2 /* F_SETFD */, 1 /* FD_CLOEXEC */) };
            e.out[0] = OutCh { fd: Some(read_fd), credit: e.out[0].credit, watching: false, pipe: false };
            e.out[1] = OutCh { fd: None, credit: e.out[1].credit, watching: false, pipe: false };
            if want_stdin {
                let w = Fd(sys::cvt(unsafe { sys::dup(pty.master.raw()) }).map_err(|x| io_err("dup", x))?);
                unsafe { sys::fcntl(w.raw(), 2, 1) };
                e.stdin = Some(w);
            }
            e.master = Some(pty.master);
        } else {
            let (out_r, out_w) = sys::pipe(sys::O_NONBLOCK).map_err(|x| io_err("pipe", x))?;
            let (err_r, err_w) = sys::pipe(sys::O_NONBLOCK).map_err(|x| io_err("pipe", x))?;
            // Larger pipes mean fewer wakeups per MiB streamed.
            unsafe { sys::fcntl(out_r.raw(), sys::F_SETPIPE_SZ, 1 << 20) };
            // The child's ends must be blocking.
            for fd in [&out_w, &err_w] {
                let fl = unsafe { sys::fcntl(fd.raw(), sys::F_GETFL) };
                unsafe { sys::fcntl(fd.raw(), sys::F_SETFL, fl & !sys::O_NONBLOCK) };
            }
            let stdin_pipe = if want_stdin {
                let (r, w) = sys::pipe(0).map_err(|x| io_err("pipe", x))?;
                w.set_nonblocking().map_err(|x| io_err("pipe", x))?;
                Some((r, w))
            } else {
                None
            };
            let spec = SpawnSpec {
                program: &program,
                argv: &cargv,
                env: &cenv,
                cwd: &ccwd,
                stdio: Stdio::Pipes {
                    stdin: stdin_pipe.as_ref().map(|(r, _)| r.raw()),
                    stdout: out_w.raw(),
                    stderr: err_w.raw(),
                },
                identity: &e.identity,
                cgroup: e.cgroup.as_deref(),
            };
            let t0 = sys::monotonic_us();
            pid = exec::spawn(&spec).map_err(|x| io_err("spawn", x))?;
            debug!("spawn {} us", sys::monotonic_us() - t0);
            drop(out_w);
            drop(err_w);
            e.out[0] = OutCh { fd: Some(out_r), credit: e.out[0].credit, watching: false, pipe: true };
            e.out[1] = OutCh { fd: Some(err_r), credit: e.out[1].credit, watching: false, pipe: true };
            if let Some((_r, w)) = stdin_pipe {
                e.stdin = Some(w);
            }
        }
        e.pid = pid;
        e.status = None;
        self.pids.insert(pid, id);
        for (i, ch) in e.out.iter_mut().enumerate() {
            if let Some(fd) = &ch.fd {
                let want = ch.credit > 0;
                self.io.add(fd.raw(), if want { sys::EPOLLIN } else { 0 }, token(TK_OUT, id, i as u8 + 1));
                ch.watching = want;
            }
        }
        if let Some(fd) = &e.stdin {
            self.io.add(fd.raw(), 0, token(TK_IN, id, 0));
        }
        Ok(())
    }

    fn exec_mut(&mut self, id: u32) -> Option<&mut Exec> {
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(e)) => Some(e),
            _ => None,
        }
    }

    /// Moves stdout/stderr bytes to the host while the channel has credit.
    fn pump_out(&mut self, id: u32, ch: u8) {
        let idx = match ch {
            1 => 0,
            2 => 1,
            _ => return,
        };
        let Agent { io, streams, drains, next_drain, .. } = self;
        let e = match streams.get_mut(&id) {
            Some(Stream::Exec(e)) => e,
            _ => return,
        };
        let exited = e.status.is_some();
        let mut done = false;
        {
            let out = &mut e.out[idx];
            let fd = match &out.fd {
                Some(fd) => fd.raw(),
                None => return,
            };
            let mut reads = 0;
            while out.credit > 0 && reads < 8 {
                reads += 1;
                if out.pipe {
                    let moved = io.splice_data(fd, ch, id, (out.credit as usize).min(SPLICE_MAX));
                    if moved > 0 {
                        out.credit -= moved as u32;
                        continue;
                    }
                }
                let want = (out.credit as usize).min(CHUNK);
                let r = io.read_into_data(fd, ch, id, want);
                if r > 0 {
                    out.credit -= r as u32;
                    continue;
                }
                if r == 0 {
                    done = true;
                    break;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(sys::EINTR) => continue,
                    Some(sys::EAGAIN) => {
                        // The process is gone and its pipe is empty: whatever a
                        // background child writes later is not this exec's.
                        if exited {
                            done = true;
                        }
                        break;
                    }
                    // EIO: pty slave closed.
                    _ => {
                        done = true;
                        break;
                    }
                }
            }
            if done {
                let fd = out.fd.take().unwrap();
                io.remove(fd.raw());
                out.watching = false;
                if exited {
                    // Keep reading and discarding: a background child that
                    // still holds the pipe must not get SIGPIPE.
                    let t = *next_drain;
                    *next_drain += 1;
                    io.add(fd.raw(), sys::EPOLLIN, TK_DRAIN | t);
                    drains.insert(t, fd);
                }
            } else {
                let want = out.credit > 0;
                if want != out.watching {
                    io.modify(fd, if want { sys::EPOLLIN } else { 0 }, token(TK_OUT, id, ch));
                    out.watching = want;
                }
            }
        }
        self.check_finish(id);
    }

    fn start_drain(&mut self, fd: Fd) {
        let t = self.next_drain;
        self.next_drain += 1;
        self.io.add(fd.raw(), sys::EPOLLIN, TK_DRAIN | t);
        self.drains.insert(t, fd);
    }

    fn drain(&mut self, t: u64) {
        let mut close = false;
        if let Some(fd) = self.drains.get(&t) {
            loop {
                match fd.read(&mut self.io.scratch) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if sys::is_would_block(&e) => break,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
        }
        if close {
            if let Some(fd) = self.drains.remove(&t) {
                self.io.remove(fd.raw());
            }
        }
    }

    /// Writes buffered stdin bytes to the process; WINDOW credits the host.
    fn pump_in(&mut self, id: u32) {
        let Agent { io, streams, .. } = self;
        let e = match streams.get_mut(&id) {
            Some(Stream::Exec(e)) => e,
            _ => return,
        };
        let mut written = 0usize;
        let mut broken = false;
        if let Some(fd) = &e.stdin {
            while e.stdin_pos < e.stdin_buf.len() {
                match fd.write(&e.stdin_buf[e.stdin_pos..]) {
                    Ok(n) => {
                        e.stdin_pos += n;
                        written += n;
                    }
                    Err(err) if sys::is_would_block(&err) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
        } else {
            broken = true;
        }
        if broken {
            // Nobody reads stdin any more: drop the bytes but keep the host's
            // window moving so its writes complete.
            written += e.stdin_buf.len() - e.stdin_pos;
            e.stdin_pos = e.stdin_buf.len();
            if let Some(fd) = e.stdin.take() {
                io.remove(fd.raw());
            }
        }
        if e.stdin_pos == e.stdin_buf.len() {
            e.stdin_buf.clear();
            e.stdin_pos = 0;
        }
        io.send_window(id, 0, written);
        let pending = e.stdin_pos < e.stdin_buf.len();
        if let Some(fd) = &e.stdin {
            if !pending && e.stdin_eof {
                if e.tty.is_some() {
                    // A terminal has no half-close: send VEOF (^D) instead.
                    let _ = fd.write(b"\x04");
                }
                let fd = e.stdin.take().unwrap();
                io.remove(fd.raw());
            } else if pending != e.stdin_watching {
                io.modify(fd.raw(), if pending { sys::EPOLLOUT } else { 0 }, token(TK_IN, id, 0));
                e.stdin_watching = pending;
            }
        }
    }

    fn reap(&mut self) {
        let mut buf = [0u8; 128 * 8];
        while let Ok(n) = self.sig.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        loop {
            let mut status = 0i32;
            let mut ru = [0i64; 18];
            let pid = unsafe { wait4(-1, &mut status, sys::WNOHANG, ru.as_mut_ptr() as *mut _) };
            if pid <= 0 {
                break;
            }
            if let Some(id) = self.pids.remove(&pid) {
                if let Some(e) = self.exec_mut(id) {
                    e.status = Some(status);
                    e.pid = 0;
                    // ru_maxrss: after two struct timevals.
                    e.rusage_maxrss_kib = e.rusage_maxrss_kib.max(ru[4] as u64);
                    self.pump_out(id, 1);
                    self.pump_out(id, 2);
                    self.check_finish(id);
                }
            } else if Some(pid) == self.workload {
                log!("workload (pid {}) ended with status {:#x}", pid, status);
                self.workload = None;
            }
        }
    }

    /// Once the process has exited and its output is delivered: run the
    /// chained command or report EXIT.
    fn check_finish(&mut self, id: u32) {
        let (status, code, chain) = {
            let e = match self.exec_mut(id) {
                Some(e) => e,
                None => return,
            };
            let status = match e.status {
                Some(s) => s,
                None => return,
            };
            if e.out.iter().any(|c| c.fd.is_some()) {
                return;
            }
            let code = exit_code(status);
            let chain = if code == 0 && !e.timed_out && !e.killed { e.chain.take() } else { None };
            (status, code, chain)
        };
        if let Some(argv) = chain {
            let mut e = match self.streams.remove(&id) {
                Some(Stream::Exec(e)) => e,
                _ => return,
            };
            if let Some(fd) = e.stdin.take() {
                self.io.remove(fd.raw());
            }
            match self.launch(id, &mut e, &argv, false) {
                Ok(()) => {
                    self.streams.insert(id, Stream::Exec(e));
                }
                Err(Launch::NotRunnable(nr)) => {
                    let msg = format!("supermachine: {}\n", nr.message);
                    self.io.send(ty::DATA, 2, id, msg.as_bytes());
                    self.finish(id, e, nr.exit_code, None);
                }
                Err(Launch::Io(err)) => {
                    let msg = format!("supermachine: chain: {:?}\n", err);
                    self.io.send(ty::DATA, 2, id, msg.as_bytes());
                    self.finish(id, e, 126, None);
                }
            }
            return;
        }
        let e = match self.streams.remove(&id) {
            Some(Stream::Exec(e)) => e,
            _ => return,
        };
        let signal = if status & 0x7f != 0 && status & 0x7f != 0x7f { Some((status & 0x7f) as u32) } else { None };
        self.finish(id, e, code, signal);
    }

    fn finish(&mut self, id: u32, mut e: Box<Exec>, code: i32, signal: Option<u32>) {
        if let Some(fd) = e.stdin.take() {
            self.io.remove(fd.raw());
        }
        for ch in e.out.iter_mut() {
            if let Some(fd) = ch.fd.take() {
                self.io.remove(fd.raw());
            }
        }
        self.io.send(ty::EOF, 1, id, &[]);
        self.io.send(ty::EOF, 2, id, &[]);
        let mut peak = None;
        if let Some(cg) = e.cgroup.take() {
            let t0 = sys::monotonic_us();
            peak = Cgroups::peak_kib(&cg);
            debug!("peak read {} us", sys::monotonic_us() - t0);
            self.cgroups.remove(cg);
        }
        let peak = peak.unwrap_or(e.rusage_maxrss_kib);
        let code = if e.timed_out || e.killed || signal.is_some() { -1 } else { code };
        let mut r = Record::new().i32(tag::exit::EXIT_CODE, code);
        if let Some(s) = signal {
            r = r.u32(tag::exit::SIGNAL, s);
        }
        r = r.bool(tag::exit::TIMED_OUT, e.timed_out).u64(tag::exit::PEAK_RSS_KIB, peak);
        self.io.send_record(ty::EXIT, id, r);
    }

    fn kill_exec(e: &mut Exec) {
        let by_cgroup = match &e.cgroup {
            Some(cg) => Cgroups::kill(cg),
            None => false,
        };
        if !by_cgroup && e.pid > 0 {
            exec::kill_session(e.pid);
        }
    }

    fn check_deadlines(&mut self) {
        let now = sys::monotonic_ms();
        for s in self.streams.values_mut() {
            if let Stream::Exec(e) = s {
                if let Some(d) = e.deadline {
                    if d <= now {
                        e.deadline = None;
                        e.timed_out = true;
                        e.chain = None;
                        Agent::kill_exec(e);
                    }
                }
            }
        }
        if !self.listen_waits.is_empty() {
            self.poll_listen_waits(now);
        }
    }

    fn signal(&mut self, id: u32, p: &[u8]) {
        let mut signum = 0u32;
        for (t, v) in proto::fields(p).flatten() {
            if t == tag::signal::SIGNUM {
                signum = proto::val_u32(t, v).unwrap_or(0);
            }
        }
        if signum == 0 || signum > 64 {
            return;
        }
        if let Some(e) = self.exec_mut(id) {
            if e.pid > 0 {
                unsafe {
                    if sys::kill(-e.pid, signum as i32) != 0 {
                        sys::kill(e.pid, signum as i32);
                    }
                }
            }
        }
    }

    fn resize(&mut self, id: u32, p: &[u8]) {
        let (mut cols, mut rows) = (0u32, 0u32);
        for (t, v) in proto::fields(p).flatten() {
            match t {
                tag::resize::COLS => cols = proto::val_u32(t, v).unwrap_or(0),
                tag::resize::ROWS => rows = proto::val_u32(t, v).unwrap_or(0),
                _ => {}
            }
        }
        if let Some(e) = self.exec_mut(id) {
            if let Some(m) = &e.master {
                let _ = exec::set_winsize(m, cols.min(65535) as u16, rows.min(65535) as u16);
            }
        }
    }

    fn cancel(&mut self, id: u32) {
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(e)) => {
                e.killed = true;
                e.chain = None;
                Agent::kill_exec(e);
            }
            Some(Stream::WriteFile(_)) | Some(Stream::ReadFile(_)) => {
                if let Some(Stream::WriteFile(w)) = self.streams.remove(&id) {
                    w.abort();
                }
                self.io.send_error(id, ReqError::Internal("cancelled by the host".into()));
            }
            Some(Stream::Tcp(_)) => {
                if let Some(Stream::Tcp(c)) = self.streams.remove(&id) {
                    self.io.remove(c.fd());
                    c.reset();
                }
                self.io.send(ty::RESET, 0, id, &[]);
            }
            None => {}
        }
        self.listen_waits.retain(|w| w.stream != id);
    }

    fn data(&mut self, id: u32, ch: u8, p: &[u8]) {
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(e)) if ch == 0 => {
                if e.stdin.is_some() && e.stdin_buf.len() - e.stdin_pos + p.len() <= 2 * proto::INITIAL_WINDOW as usize + proto::MAX_PAYLOAD {
                    e.stdin_buf.extend_from_slice(p);
                    self.pump_in(id);
                } else {
                    self.io.send_window(id, 0, p.len());
                }
            }
            Some(Stream::WriteFile(w)) if ch == 0 => {
                if let Err(err) = w.write(p) {
                    if let Some(Stream::WriteFile(w)) = self.streams.remove(&id) {
                        w.abort();
                    }
                    self.io.send_error(id, err);
                } else {
                    self.io.send_window(id, 0, p.len());
                }
            }
            Some(Stream::Tcp(c)) if ch == 0 => {
                c.queue(p);
                self.tcp_event(id, 0);
            }
            _ => {}
        }
    }

    fn eof(&mut self, id: u32, ch: u8) {
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(e)) if ch == 0 => {
                e.stdin_eof = true;
                self.pump_in(id);
            }
            Some(Stream::WriteFile(_)) if ch == 0 => {
                if let Some(Stream::WriteFile(w)) = self.streams.remove(&id) {
                    match w.finish() {
                        Ok(()) => self.io.send_record(ty::OK, id, Record::new()),
                        Err(e) => self.io.send_error(id, e),
                    }
                }
            }
            Some(Stream::Tcp(c)) if ch == 0 => {
                c.host_eof();
                self.tcp_event(id, 0);
            }
            _ => {}
        }
    }

    fn window(&mut self, id: u32, ch: u8, n: u32) {
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(e)) => {
                let idx = match ch {
                    1 => 0,
                    2 => 1,
                    _ => return,
                };
                e.out[idx].credit = e.out[idx].credit.saturating_add(n);
                self.pump_out(id, ch);
            }
            Some(Stream::ReadFile(r)) if ch == 1 => {
                r.credit = r.credit.saturating_add(n);
                self.pump_read_file(id);
            }
            Some(Stream::Tcp(c)) if ch == 1 => {
                c.credit = c.credit.saturating_add(n);
                self.tcp_event(id, 0);
            }
            _ => {}
        }
    }

    // --------------------------------------------------------------- files

    fn pump_read_file(&mut self, id: u32) {
        let finished = match self.streams.get_mut(&id) {
            Some(Stream::ReadFile(r)) => r.pump(&mut self.io, id),
            _ => return,
        };
        if finished {
            self.streams.remove(&id);
        }
    }

    // ----------------------------------------------------------------- tcp

    fn tcp_event(&mut self, id: u32, bits: u32) {
        let outcome = match self.streams.get_mut(&id) {
            Some(Stream::Tcp(c)) => c.on_event(&mut self.io, id, bits),
            _ => return,
        };
        if let Some(interest) = outcome {
            if let Some(Stream::Tcp(c)) = self.streams.get(&id) {
                self.io.modify(c.fd(), interest, token(TK_TCP, id, 0));
            }
        } else if let Some(Stream::Tcp(c)) = self.streams.remove(&id) {
            self.io.remove(c.fd());
        }
    }

    // ------------------------------------------------------------ workload

    fn workload_start(&mut self, p: &[u8]) -> Result<Record, ReqError> {
        let mut argv: Vec<Vec<u8>> = Vec::new();
        let mut env: Vec<Vec<u8>> = Vec::new();
        let mut cwd: Option<Vec<u8>> = None;
        let mut user: Option<Vec<u8>> = None;
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::workload_start::ARGV => argv.push(v.to_vec()),
                tag::workload_start::ENV => env.push(v.to_vec()),
                tag::workload_start::CWD => cwd = Some(v.to_vec()),
                tag::workload_start::USER => user = Some(v.to_vec()),
                _ => {}
            }
        }
        if argv.is_empty() {
            return Err(ReqError::BadRequest("workload argv is empty".into()));
        }
        if let Some(pid) = self.workload {
            return Err(ReqError::BadRequest(format!("a workload is already running (pid {})", pid)));
        }
        let identity = users::resolve(&user.unwrap_or_else(|| self.user.clone())).map_err(ReqError::BadRequest)?;
        let mut env = exec::merge_env(&self.env, &env);
        if exec::env_get(&env, b"HOME").is_none() {
            if let Some(h) = &identity.home {
                let mut e = b"HOME=".to_vec();
                e.extend_from_slice(h);
                env.push(e);
            }
        }
        let cwd = cwd.unwrap_or_else(|| self.cwd.clone());
        let program = exec::resolve_program(&argv[0], &env, &cwd).map_err(|nr| ReqError::NotFound(nr.message))?;
        let cargv: Vec<CString> = argv.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
        let cenv: Vec<CString> = env.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
        let ccwd = CString::new(cwd).map_err(|_| ReqError::BadRequest("cwd has a NUL byte".into()))?;
        let out = self.console.as_ref().map(|f| f.raw()).unwrap_or(2);
        let spec = SpawnSpec {
            program: &program,
            argv: &cargv,
            env: &cenv,
            cwd: &ccwd,
            stdio: Stdio::Detached { out },
            identity: &identity,
            cgroup: None,
        };
        let pid = exec::spawn(&spec).map_err(|e| ReqError::from_io("workload spawn", &e))?;
        self.workload = Some(pid);
        Ok(Record::new().u32(tag::workload_start_ok::PID, pid as u32))
    }

    fn workload_signal(&mut self, p: &[u8]) -> Result<Record, ReqError> {
        let mut signum = 0u32;
        for f in proto::fields(p) {
            let (t, v) = f?;
            if t == tag::workload_signal::SIGNUM {
                signum = proto::val_u32(t, v)?;
            }
        }
        if signum == 0 || signum > 64 {
            return Err(ReqError::BadRequest(format!("bad signal number {}", signum)));
        }
        match self.workload {
            Some(pid) => {
                sys::cvt(unsafe { sys::kill(pid, signum as i32) }).map_err(|e| ReqError::from_io("kill", &e))?;
                Ok(Record::new())
            }
            None => Err(ReqError::NotFound("no workload is running".into())),
        }
    }

    fn wait_listen(&mut self, id: u32, p: &[u8]) -> Result<(), ReqError> {
        let mut port = 0u32;
        let mut timeout = 30_000u64;
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::wait_listen::PORT => port = proto::val_u32(t, v)?,
                tag::wait_listen::TIMEOUT_MS => timeout = proto::val_u64(t, v)?,
                _ => {}
            }
        }
        if port == 0 || port > 65535 {
            return Err(ReqError::BadRequest(format!("bad port {}", port)));
        }
        let w = ListenWait { stream: id, port: port as u16, deadline: sys::monotonic_ms() + timeout };
        self.listen_waits.push(w);
        self.poll_listen_waits(sys::monotonic_ms());
        Ok(())
    }

    fn poll_listen_waits(&mut self, now: u64) {
        let listening = listening_ports();
        let waits = std::mem::take(&mut self.listen_waits);
        for w in waits {
            if listening.contains(&w.port) {
                self.io.send_record(ty::OK, w.stream, Record::new());
            } else if w.deadline <= now {
                self.io.send_error(w.stream, ReqError::Timeout(format!("nothing listens on port {}", w.port)));
            } else {
                self.listen_waits.push(w);
            }
        }
    }
}

enum Launch {
    NotRunnable(NotRunnable),
    Io(ReqError),
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

/// Decodes a wait status into an exit code: the status for a normal exit,
/// -1 for a signal.
fn exit_code(status: i32) -> i32 {
    if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        -1
    }
}

/// TCP ports in LISTEN state, from /proc/net/tcp and tcp6.
fn listening_ports() -> Vec<u16> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(f).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3 && cols[3] == "0A" {
                if let Some(port) = cols[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) {
                    out.push(port);
                }
            }
        }
    }
    out
}

fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > 512 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "entropy over 512 bytes"));
    }
    let c = CString::new("/dev/urandom").unwrap();
    let fd = sys::open_path(&c, sys::O_RDWR, 0)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_le_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_le_bytes());
    info.extend_from_slice(bytes);
    while info.len() % 4 != 0 {
        info.push(0);
    }
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::RNDADDENTROPY, info.as_ptr()) })?;
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::RNDRESEEDCRNG) })?;
    Ok(())
}

/// Gives the VM its own boot_id: a file bind-mounted over the kernel's.
fn set_boot_id(id: &[u8]) -> io::Result<()> {
    if id.len() != 36 || !id.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "boot_id must be a 36-character UUID"));
    }
    let _ = fs::create_dir_all("/run/supermachine");
    let mut line = id.to_vec();
    line.push(b'\n');
    let path = "/run/supermachine/boot_id";
    let already = Path::new(path).exists();
    fs::write(path, &line)?;
    if !already {
        crate::init::mount(path, "/proc/sys/kernel/random/boot_id", "", sys::MS_BIND, "")?;
    }
    Ok(())
}

extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut std::os::raw::c_void) -> i32;
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

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(9), -1);
    }
}
