//! The freeze service: every guest process (all but PID 1 and kernel
//! threads) is stopped while a snapshot is taken (SNAPSHOT_PREPARE), and
//! continued only by the next successful CONFIGURE, after that frame has
//! reseeded the kernel RNG, stepped the clock and set the VM's identity. So
//! in a clone no process captured in the snapshot (the workload, warmup
//! leftovers) runs an instruction before the clone is unique.
//!
//! Mechanism: `kill(-1, SIGSTOP)`, which reaches every process but PID 1 in
//! one pass of the kernel's task list; a fork in progress is restarted after
//! the stop (copy_process backs out when a signal is pending), so no child
//! escapes. Then the agent waits (bounded) until each process reports the
//! stopped state. Processes that were stopped before (by the user) are left
//! stopped on thaw: only the ones this service stopped get SIGCONT.

use crate::log;
use crate::sys;
use std::fs;
use std::time::{Duration, Instant};

/// How long SNAPSHOT_PREPARE waits for every process to reach the stopped
/// state (a process in uninterruptible sleep stops when its I/O ends).
const STOP_WAIT: Duration = Duration::from_millis(2000);
/// The kernel thread flag in /proc/PID/stat's `flags` field.
const PF_KTHREAD: u64 = 0x0020_0000;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

pub struct FreezeService {
    /// Processes this service stopped, to continue on thaw.
    stopped: Vec<i32>,
    frozen: bool,
}

/// What /proc/PID/stat says that matters here.
struct ProcState {
    state: u8,
    kthread: bool,
}

fn proc_state(pid: i32) -> Option<ProcState> {
    // Bounded read: the comm field is at most 16 bytes, the rest is numbers.
    let text = fs::read(format!("/proc/{}/stat", pid)).ok()?;
    let text = &text[..text.len().min(4096)];
    // "pid (comm) S ppid ...": comm may hold spaces or ')', so parse after the last ')'.
    let close = text.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] = state (3rd field), fields[6] = flags (9th field).
    let state = *fields.first()?.as_bytes().first()?;
    let flags: u64 = fields.get(6)?.parse().ok()?;
    Some(ProcState { state, kthread: flags & PF_KTHREAD != 0 })
}

/// Every user process but PID 1, with its state.
fn user_processes() -> Vec<(i32, u8)> {
    let mut out = Vec::new();
    let dir = match fs::read_dir("/proc") {
        Ok(d) => d,
        Err(_) => return out,
    };
    for e in dir.flatten() {
        let pid: i32 = match e.file_name().to_str().and_then(|s| s.parse().ok()) {
            Some(p) => p,
            None => continue,
        };
        if pid <= 1 {
            continue;
        }
        if let Some(s) = proc_state(pid) {
            if !s.kthread {
                out.push((pid, s.state));
            }
        }
    }
    out
}

fn is_stopped(state: u8) -> bool {
    state == b'T' || state == b't'
}

fn is_gone(state: u8) -> bool {
    state == b'Z' || state == b'X'
}

impl FreezeService {
    pub fn new() -> FreezeService {
        FreezeService { stopped: Vec::new(), frozen: false }
    }

    /// Stops every user process; returns how many this call stopped.
    pub fn freeze(&mut self) -> usize {
        if self.frozen {
            return self.stopped.len();
        }
        let before: Vec<i32> = user_processes().into_iter().filter(|(_, s)| is_stopped(*s)).map(|(p, _)| p).collect();
        // From PID 1, kill(-1) reaches every process except itself.
        unsafe { sys::kill(-1, SIGSTOP) };
        self.frozen = true;
        let start = Instant::now();
        loop {
            let procs = user_processes();
            let running: Vec<i32> = procs.iter().filter(|(_, s)| !is_stopped(*s) && !is_gone(*s)).map(|(p, _)| *p).collect();
            if running.is_empty() || start.elapsed() >= STOP_WAIT {
                if !running.is_empty() {
                    log!("snapshot: {} process(es) did not stop within {:?}: {:?}", running.len(), STOP_WAIT, running);
                }
                self.stopped = procs.iter().filter(|(p, s)| !is_gone(*s) && !before.contains(p)).map(|(p, _)| *p).collect();
                return self.stopped.len();
            }
            // A process that appeared after kill(-1) (none should) is stopped too.
            for p in running {
                unsafe { sys::kill(p, SIGSTOP) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Continues what freeze() stopped. Nothing ran in between (the agent
    /// starts nothing while frozen), so no pid was reused.
    pub fn thaw(&mut self) {
        if !self.frozen {
            return;
        }
        for p in self.stopped.drain(..) {
            unsafe { sys::kill(p, SIGCONT) };
        }
        self.frozen = false;
    }
}
