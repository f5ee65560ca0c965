//! The workload service: WORKLOAD_START (the image's entrypoint, detached,
//! its output on pipes read by the logs service), WORKLOAD_SIGNAL, and
//! WAIT_LISTEN (until a guest port accepts connections).

use crate::exec::{self, SpawnSpec, Stdio};
use crate::io::{Io, ReqError};
use crate::log;
use crate::proto::{self, tag, ty, Record};
use crate::service::logs::Orphan;
use crate::service::session::Session;
use crate::sys::{self, Fd};
use crate::users;
use std::ffi::CString;
use std::fs;

struct ListenWait {
    stream: u32,
    port: u16,
    deadline: u64,
}

pub struct WorkloadService {
    workload: Option<i32>,
    listen_waits: Vec<ListenWait>,
    console: Option<Fd>,
    /// The workload's output pipes, for the logs service (moved there by
    /// the event loop).
    pub orphans: Vec<Orphan>,
}

impl WorkloadService {
    pub fn new() -> WorkloadService {
        let console = CString::new("/dev/console").ok().and_then(|c| sys::open_path(&c, sys::O_WRONLY | sys::O_NOCTTY, 0).ok());
        WorkloadService { workload: None, listen_waits: Vec::new(), console, orphans: Vec::new() }
    }

    pub fn reset(&mut self) {
        self.listen_waits.clear();
    }

    pub fn cancel(&mut self, id: u32) {
        self.listen_waits.retain(|w| w.stream != id);
    }

    pub fn waiting(&self) -> bool {
        !self.listen_waits.is_empty()
    }

    /// A child the exec service does not know was reaped.
    pub fn on_exit(&mut self, pid: i32, status: i32) {
        if Some(pid) == self.workload {
            log!("workload (pid {}) ended with status {:#x}", pid, status);
            self.workload = None;
        }
    }

    pub fn start(&mut self, session: &Session, p: &[u8]) -> Result<Record, ReqError> {
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
        let identity = users::resolve(&user.unwrap_or_else(|| session.user.clone())).map_err(ReqError::BadRequest)?;
        let env = exec::process_env(&session.env, &env, &identity);
        let cwd = cwd.unwrap_or_else(|| session.cwd.clone());
        let program = exec::resolve_program(&argv[0], &env, &cwd).map_err(|nr| ReqError::NotFound(nr.message))?;
        let cargv: Vec<CString> = argv.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
        let cenv: Vec<CString> = env.iter().map(|a| CString::new(a.clone()).unwrap_or_default()).collect();
        let ccwd = CString::new(cwd).map_err(|_| ReqError::BadRequest("cwd has a NUL byte".into()))?;
        // stdout and stderr on pipes the logs service reads (the host sees
        // them with vm.logs()); the console only when pipes cannot be made.
        let pipes = match (sys::pipe(sys::O_NONBLOCK), sys::pipe(sys::O_NONBLOCK)) {
            (Ok(o), Ok(e)) => {
                for fd in [&o.1, &e.1] {
                    let fl = unsafe { sys::fcntl(fd.raw(), sys::F_GETFL) };
                    unsafe { sys::fcntl(fd.raw(), sys::F_SETFL, fl & !sys::O_NONBLOCK) };
                }
                Some((o, e))
            }
            _ => None,
        };
        let console = self.console.as_ref().map(|f| f.raw()).unwrap_or(2);
        let stdio = match &pipes {
            Some((o, e)) => Stdio::Pipes { stdin: None, stdout: o.1.raw(), stderr: e.1.raw() },
            None => Stdio::Detached { out: console },
        };
        let spec = SpawnSpec {
            program: &program,
            argv: &cargv,
            env: &cenv,
            cwd: &ccwd,
            stdio,
            identity: &identity,
            cgroup: None,
        };
        let pid = exec::spawn(&spec).map_err(|e| ReqError::from_io("workload spawn", &e))?;
        if let Some((o, e)) = pipes {
            self.orphans.push(Orphan { pid, channel: 1, fd: o.0 });
            self.orphans.push(Orphan { pid, channel: 2, fd: e.0 });
        }
        self.workload = Some(pid);
        Ok(Record::new().u32(tag::workload_start_ok::PID, pid as u32))
    }

    pub fn signal(&mut self, p: &[u8]) -> Result<Record, ReqError> {
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

    pub fn wait_listen(&mut self, io: &mut Io, id: u32, p: &[u8]) -> Result<(), ReqError> {
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
        self.poll_listen_waits(io, sys::monotonic_ms());
        Ok(())
    }

    pub fn poll_listen_waits(&mut self, io: &mut Io, now: u64) {
        let listening = listening_ports();
        let waits = std::mem::take(&mut self.listen_waits);
        for w in waits {
            if listening.contains(&w.port) {
                io.send_record(ty::OK, w.stream, Record::new());
            } else if w.deadline <= now {
                io.send_error(w.stream, ReqError::Timeout(format!("nothing listens on port {}", w.port)));
            } else {
                self.listen_waits.push(w);
            }
        }
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

