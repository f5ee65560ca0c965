//! The exec service: EXEC streams (processes with pipes or a pty), their
//! stdin/stdout/stderr under flow control, SIGNAL, RESIZE, timeouts, and
//! the reaping of children. Owns the per-exec cgroups.

use crate::exec::{self, Cgroups, NotRunnable, SpawnSpec, Stdio};
use crate::fuse;
use crate::io::{token, Io, ReqError, CHUNK, SPLICE_MAX, TK_IN, TK_OUT};
use crate::proto::{self, tag, ty, Record};
use crate::service::logs::Orphan;
use crate::service::session::Session;
use crate::sys::{self, Fd};
use crate::users::{self, Identity};
use crate::debug;
use std::collections::HashMap;
use std::ffi::CString;
use std::io as stdio;
use std::path::{Path, PathBuf};

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

/// The first read of a pump round copies at most this much (see pump_out).
const SMALL_READ: usize = 16 * 1024;

pub struct Exec {
    pid: i32,
    /// The pid of the process started last (kept after it is reaped): the
    /// label of this exec's output once no host reads it (logs service).
    label_pid: i32,
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


pub struct ExecService {
    streams: HashMap<u32, Box<Exec>>,
    pids: HashMap<i32, u32>,
    /// Output pipes no stream reads any more, for the logs service (the
    /// event loop moves them there after every round).
    pub orphans: Vec<Orphan>,
    pub cgroups: Cgroups,
}

impl ExecService {
    pub fn new(cgroups: bool) -> ExecService {
        ExecService { streams: HashMap::new(), pids: HashMap::new(), orphans: Vec::new(), cgroups: Cgroups::new(cgroups) }
    }

    pub fn owns(&self, id: u32) -> bool {
        self.streams.contains_key(&id)
    }

    /// A new session: forget the old one's streams; their processes keep
    /// running, detached, and their output goes to the logs service.
    pub fn reset(&mut self, io: &mut Io) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.let_go(io, id);
        }
    }

    /// Stops serving exec `id`: its stdin closes, its output pipes go to the
    /// orphans (read by the logs service), its process keeps running. False
    /// if there is no such exec.
    fn let_go(&mut self, io: &mut Io, id: u32) -> bool {
        let mut e = match self.streams.remove(&id) {
            Some(e) => e,
            None => return false,
        };
        if let Some(fd) = e.stdin.take() {
            io.remove(fd.raw());
        }
        for (i, ch) in e.out.iter_mut().enumerate() {
            if let Some(fd) = ch.fd.take() {
                io.remove(fd.raw());
                self.orphans.push(Orphan { pid: e.label_pid, channel: i as u8 + 1, fd });
            }
        }
        if e.pid > 0 {
            self.pids.remove(&e.pid);
        }
        true
    }

    /// The earliest exec deadline (monotonic ms).
    pub fn next_deadline(&self) -> Option<u64> {
        self.streams.values().filter_map(|e| e.deadline).min()
    }

    pub fn check_deadlines(&mut self, now: u64) {
        for e in self.streams.values_mut() {
            if let Some(d) = e.deadline {
                if d <= now {
                    e.deadline = None;
                    e.timed_out = true;
                    e.chain = None;
                    ExecService::kill_exec(e);
                }
            }
        }
    }

    /// DETACH: the host stops reading this exec. The process keeps running
    /// as if its session had ended (its output goes to the logs service);
    /// the stream ends with OK.
    pub fn detach(&mut self, io: &mut Io, id: u32) {
        // Already finished (its EXIT raced this frame): nothing to do.
        if self.let_go(io, id) {
            io.send_record(ty::OK, id, Record::new());
        }
    }

    pub fn cancel(&mut self, id: u32) {
        if let Some(e) = self.streams.get_mut(&id) {
            e.killed = true;
            e.chain = None;
            ExecService::kill_exec(e);
        }
    }

    pub fn data(&mut self, io: &mut Io, id: u32, ch: u8, p: &[u8]) {
        if let Some(e) = self.streams.get_mut(&id) {
            if ch != 0 {
                return;
            }
            if e.stdin.is_some() && e.stdin_buf.len() - e.stdin_pos + p.len() <= 2 * proto::INITIAL_WINDOW as usize + proto::MAX_PAYLOAD {
                // Nothing queued: straight into the pipe, and only what it
                // does not take is copied to the buffer (a copy less per byte).
                let mut off = 0;
                if e.stdin_pos == e.stdin_buf.len() {
                    if let Some(fd) = &e.stdin {
                        while off < p.len() {
                            match fd.write(&p[off..]) {
                                Ok(n) => off += n,
                                // Would block, or broken: pump_in sees it again and decides.
                                Err(_) => break,
                            }
                        }
                    }
                }
                e.stdin_buf.extend_from_slice(&p[off..]);
                if off > 0 {
                    io.send_window(id, 0, off);
                }
                self.pump_in(io, id);
            } else {
                io.send_window(id, 0, p.len());
            }
        }
    }

    /// The stdin pipe of exec `id` when bytes for channel `ch` may go into it
    /// directly (a pipe, not a terminal, open, with nothing queued before them).
    pub fn stdin_pipe(&self, id: u32, ch: u8) -> Option<i32> {
        let e = self.streams.get(&id)?;
        if ch != 0 || e.tty.is_some() || e.stdin_eof || e.stdin_pos != e.stdin_buf.len() {
            return None;
        }
        e.stdin.as_ref().map(|fd| fd.raw())
    }

    pub fn eof(&mut self, io: &mut Io, id: u32, ch: u8) {
        if ch != 0 {
            return;
        }
        if let Some(e) = self.streams.get_mut(&id) {
            e.stdin_eof = true;
            self.pump_in(io, id);
        }
    }

    pub fn window(&mut self, io: &mut Io, id: u32, ch: u8, n: u32) {
        if let Some(e) = self.streams.get_mut(&id) {
            let idx = match ch {
                1 => 0,
                2 => 1,
                _ => return,
            };
            e.out[idx].credit = e.out[idx].credit.saturating_add(n);
            self.pump_out(io, id, ch);
        }
    }

    /// A child was reaped. Returns false when it is not one of ours.
    pub fn on_exit(&mut self, io: &mut Io, pid: i32, status: i32, maxrss_kib: u64) -> bool {
        let id = match self.pids.remove(&pid) {
            Some(id) => id,
            None => return false,
        };
        if let Some(e) = self.streams.get_mut(&id) {
            e.status = Some(status);
            e.pid = 0;
            e.rusage_maxrss_kib = e.rusage_maxrss_kib.max(maxrss_kib);
            self.pump_out(io, id, 1);
            self.pump_out(io, id, 2);
            self.check_finish(io, id);
        }
        true
    }

    pub fn start(&mut self, io: &mut Io, session: &Session, id: u32, p: &[u8]) -> Result<(), ReqError> {
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
        let user = user.unwrap_or_else(|| session.user.clone());
        let identity = users::resolve(&user).map_err(ReqError::BadRequest)?;
        let env = exec::process_env(&session.env, &env, &identity);
        let cwd = cwd.unwrap_or_else(|| session.cwd.clone());
        {
            use std::os::unix::ffi::OsStrExt;
            let path = Path::new(std::ffi::OsStr::from_bytes(&cwd));
            // On a host directory mount the child checks (see launch).
            if !crate::fuse::under_active(&cwd) && !path.is_dir() {
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
            label_pid: 0,
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
        match self.launch(io, id, &mut e, &argv, want_stdin) {
            Ok(()) => {
                if report_started {
                    io.send_record(ty::STARTED, id, Record::new().u32(tag::started::PID, e.pid as u32));
                }
                self.streams.insert(id, e);
                Ok(())
            }
            Err(Launch::NotRunnable(nr)) => {
                // As a shell would: a message on stderr and 126/127.
                let msg = format!("supermachine: {}\n", nr.message);
                io.send(ty::DATA, 2, id, msg.as_bytes());
                io.send(ty::EOF, 1, id, &[]);
                io.send(ty::EOF, 2, id, &[]);
                io.send_record(
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
    fn launch(&mut self, io: &mut Io, id: u32, e: &mut Exec, argv: &[Vec<u8>], want_stdin: bool) -> Result<(), Launch> {
        let io_err = |what: &str, err: stdio::Error| Launch::Io(ReqError::from_io(what, &err));
        // A working directory, program or PATH entry on a host directory mount
        // is looked at by the child, never by this loop (it serves the mount):
        // the agent binary starts as `--sm-exec CWD ARGV...`, changes directory
        // and execs the program itself.
        let trampoline = fuse::any_active() && touches_mounts(&argv[0], &e.env, &e.cwd);
        let (program, cargv, ccwd) = if trampoline {
            let mut v: Vec<CString> = vec![CString::new("/proc/1/exe").unwrap_or_default(), CString::new("--sm-exec").unwrap_or_default()];
            v.push(CString::new(e.cwd.clone()).map_err(|_| Launch::Io(ReqError::BadRequest("cwd has a NUL byte".into())))?);
            v.extend(argv.iter().map(|a| CString::new(a.clone()).unwrap_or_default()));
            (CString::new("/proc/1/exe").unwrap_or_default(), v, CString::new("/").unwrap_or_default())
        } else {
            let program = exec::resolve_program(&argv[0], &e.env, &e.cwd).map_err(Launch::NotRunnable)?;
            let cargv: Vec<CString> = argv.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
            let ccwd = CString::new(e.cwd.clone()).map_err(|_| Launch::Io(ReqError::BadRequest("cwd has a NUL byte".into())))?;
            (program, cargv, ccwd)
        };
        let cenv: Vec<CString> = e.env.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
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
                // Larger pipes mean fewer wakeups per MiB streamed.
                unsafe { sys::fcntl(w.raw(), sys::F_SETPIPE_SZ, 1 << 20) };
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
        e.label_pid = pid;
        e.status = None;
        self.pids.insert(pid, id);
        for (i, ch) in e.out.iter_mut().enumerate() {
            if let Some(fd) = &ch.fd {
                let want = ch.credit > 0;
                io.add(fd.raw(), if want { sys::EPOLLIN } else { 0 }, token(TK_OUT, id, i as u8 + 1));
                ch.watching = want;
            }
        }
        if let Some(fd) = &e.stdin {
            io.add(fd.raw(), 0, token(TK_IN, id, 0));
        }
        Ok(())
    }

    /// Moves stdout/stderr bytes to the host while the channel has credit.
    pub fn pump_out(&mut self, io: &mut Io, id: u32, ch: u8) {
        let idx = match ch {
            1 => 0,
            2 => 1,
            _ => return,
        };
        let ExecService { streams, orphans, .. } = self;
        let e = match streams.get_mut(&id) {
            Some(e) => e,
            None => return,
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
            // A round starts by copying at most SMALL_READ bytes into a queued
            // frame: a short output (most execs) then leaves with the frames
            // that follow it (EOF, EXIT) in one write to the port. Only a pipe
            // that fills it is spliced from then on.
            let mut small = out.pipe;
            while out.credit > 0 && reads < 8 {
                reads += 1;
                if out.pipe && !small {
                    // splice_data needs an empty queue (frames stay in order).
                    io.flush();
                    let moved = io.splice_data(fd, ch, id, (out.credit as usize).min(SPLICE_MAX));
                    if moved > 0 {
                        out.credit -= moved as u32;
                        continue;
                    }
                }
                let want = (out.credit as usize).min(if small { SMALL_READ } else { CHUNK });
                let r = io.read_into_data(fd, ch, id, want);
                if r > 0 {
                    out.credit -= r as u32;
                    if small && r as usize == want {
                        small = false;
                    } else if small && !exited {
                        // Drained for now; the pipe reports again when written.
                        break;
                    }
                    continue;
                }
                if r == 0 {
                    done = true;
                    break;
                }
                let err = stdio::Error::last_os_error();
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
                    // Keep reading (logs service): a background child that
                    // still holds the pipe must not get SIGPIPE.
                    orphans.push(Orphan { pid: e.label_pid, channel: ch, fd });
                }
            } else {
                let want = out.credit > 0;
                if want != out.watching {
                    io.modify(fd, if want { sys::EPOLLIN } else { 0 }, token(TK_OUT, id, ch));
                    out.watching = want;
                }
            }
        }
        self.check_finish(io, id);
    }

    /// Writes buffered stdin bytes to the process; WINDOW credits the host.
    pub fn pump_in(&mut self, io: &mut Io, id: u32) {
        let e = match self.streams.get_mut(&id) {
            Some(e) => e,
            None => return,
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
        e.stdin_pos = crate::io::compact_written(&mut e.stdin_buf, e.stdin_pos);
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

    /// Once the process has exited and its output is delivered: run the
    /// chained command or report EXIT.
    fn check_finish(&mut self, io: &mut Io, id: u32) {
        let (status, code, chain) = {
            let e = match self.streams.get_mut(&id) {
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
                Some(e) => e,
                None => return,
            };
            if let Some(fd) = e.stdin.take() {
                io.remove(fd.raw());
            }
            match self.launch(io, id, &mut e, &argv, false) {
                Ok(()) => {
                    self.streams.insert(id, e);
                }
                Err(Launch::NotRunnable(nr)) => {
                    let msg = format!("supermachine: {}\n", nr.message);
                    io.send(ty::DATA, 2, id, msg.as_bytes());
                    self.finish(io, id, e, nr.exit_code, None);
                }
                Err(Launch::Io(err)) => {
                    let msg = format!("supermachine: chain: {:?}\n", err);
                    io.send(ty::DATA, 2, id, msg.as_bytes());
                    self.finish(io, id, e, 126, None);
                }
            }
            return;
        }
        let e = match self.streams.remove(&id) {
            Some(e) => e,
            None => return,
        };
        let signal = if status & 0x7f != 0 && status & 0x7f != 0x7f { Some((status & 0x7f) as u32) } else { None };
        self.finish(io, id, e, code, signal);
    }

    fn finish(&mut self, io: &mut Io, id: u32, mut e: Box<Exec>, code: i32, signal: Option<u32>) {
        if let Some(fd) = e.stdin.take() {
            io.remove(fd.raw());
        }
        for ch in e.out.iter_mut() {
            if let Some(fd) = ch.fd.take() {
                io.remove(fd.raw());
            }
        }
        io.send(ty::EOF, 1, id, &[]);
        io.send(ty::EOF, 2, id, &[]);
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
        io.send_record(ty::EXIT, id, r);
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

    pub fn signal(&mut self, id: u32, p: &[u8]) {
        let mut signum = 0u32;
        for (t, v) in proto::fields(p).flatten() {
            if t == tag::signal::SIGNUM {
                signum = proto::val_u32(t, v).unwrap_or(0);
            }
        }
        if signum == 0 || signum > 64 {
            return;
        }
        if let Some(e) = self.streams.get_mut(&id) {
            if e.pid > 0 {
                unsafe {
                    if sys::kill(-e.pid, signum as i32) != 0 {
                        sys::kill(e.pid, signum as i32);
                    }
                }
            }
        }
    }

    pub fn resize(&mut self, id: u32, p: &[u8]) {
        let (mut cols, mut rows) = (0u32, 0u32);
        for (t, v) in proto::fields(p).flatten() {
            match t {
                tag::resize::COLS => cols = proto::val_u32(t, v).unwrap_or(0),
                tag::resize::ROWS => rows = proto::val_u32(t, v).unwrap_or(0),
                _ => {}
            }
        }
        if let Some(e) = self.streams.get_mut(&id) {
            if let Some(m) = &e.master {
                let _ = exec::set_winsize(m, cols.min(65535) as u16, rows.min(65535) as u16);
            }
        }
    }
}

enum Launch {
    NotRunnable(NotRunnable),
    Io(ReqError),
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

extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut std::os::raw::c_void) -> i32;
}

/// Reaps every exited child: (pid, wait status, ru_maxrss in KiB).
pub fn reap_children() -> Vec<(i32, i32, u64)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0i32;
        let mut ru = [0i64; 18];
        let pid = unsafe { wait4(-1, &mut status, sys::WNOHANG, ru.as_mut_ptr() as *mut _) };
        if pid <= 0 {
            break;
        }
        // ru_maxrss: after two struct timevals.
        out.push((pid, status, ru[4] as u64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(9), -1);
    }
}

/// Does starting `argv0` in `cwd` with this environment look at a path on a
/// host directory mount (the working directory, a relative or absolute
/// program path, or a PATH entry)?
fn touches_mounts(argv0: &[u8], env: &[Vec<u8>], cwd: &[u8]) -> bool {
    let abs = |p: &[u8]| -> Vec<u8> {
        if p.first() == Some(&b'/') {
            p.to_vec()
        } else {
            let mut v = cwd.to_vec();
            v.push(b'/');
            v.extend_from_slice(p);
            v
        }
    };
    if fuse::under_active(cwd) {
        return true;
    }
    if argv0.contains(&b'/') {
        return fuse::under_active(&abs(argv0));
    }
    let path = exec::env_get(env, b"PATH").unwrap_or(exec::DEFAULT_PATH);
    path.split(|b| *b == b':').any(|d| fuse::under_active(&abs(if d.is_empty() { b"." } else { d })))
}
