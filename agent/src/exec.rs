//! Starting processes: PATH resolution, environment merging, pipes or a pty,
//! a cgroup per exec, and the spawn itself.
//!
//! Root processes start with clone(CLONE_VM|CLONE_VFORK), as glibc's
//! posix_spawn does (no page-table copy, the cheapest start under TCG) but
//! without its per-call stack mapping and signal loop (spawn_vfork);
//! processes of another user need setuid/setgid and start through fork +
//! execve.

use crate::sys::{self, cstring, Fd};
use crate::users::Identity;
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of a process the agent starts: `overlay` merged over the
/// image's `base`, plus HOME from the user's passwd entry when neither has it.
pub fn process_env(base: &[Vec<u8>], overlay: &[Vec<u8>], identity: &Identity) -> Vec<Vec<u8>> {
    let mut env = merge_env(base, overlay);
    if env_get(&env, b"HOME").is_none() {
        if let Some(h) = &identity.home {
            let mut e = b"HOME=".to_vec();
            e.extend_from_slice(h);
            env.push(e);
        }
    }
    env
}

/// Merges `overlay` (KEY=VALUE entries) over `base`: a key in the overlay
/// replaces the base entry in place; new keys are appended in order.
pub fn merge_env(base: &[Vec<u8>], overlay: &[Vec<u8>]) -> Vec<Vec<u8>> {
    fn key(e: &[u8]) -> &[u8] {
        match e.iter().position(|b| *b == b'=') {
            Some(i) => &e[..i],
            None => e,
        }
    }
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(base.len() + overlay.len());
    for e in base.iter().chain(overlay.iter()) {
        let k = key(e);
        if let Some(slot) = out.iter_mut().find(|x| key(x) == k) {
            *slot = e.clone();
        } else {
            out.push(e.clone());
        }
    }
    out
}

pub fn env_get<'a>(env: &'a [Vec<u8>], name: &[u8]) -> Option<&'a [u8]> {
    env.iter().find_map(|e| {
        if e.len() > name.len() && e.starts_with(name) && e[name.len()] == b'=' {
            Some(&e[name.len() + 1..])
        } else {
            None
        }
    })
}

/// Why a program could not be started, in shell terms.
pub struct NotRunnable {
    pub exit_code: i32,
    pub message: String,
}

fn is_executable_file(p: &Path) -> Option<bool> {
    match fs::metadata(p) {
        Ok(m) if m.is_file() => Some(m.permissions().mode() & 0o111 != 0),
        Ok(_) => Some(false),
        Err(_) => None,
    }
}

/// Resolves argv[0] through PATH as execvp would; names with a '/' are used as
/// they are (relative to `cwd`).
pub fn resolve_program(argv0: &[u8], env: &[Vec<u8>], cwd: &[u8]) -> Result<CString, NotRunnable> {
    use std::os::unix::ffi::OsStrExt;
    let shown = String::from_utf8_lossy(argv0).into_owned();
    if argv0.is_empty() {
        return Err(NotRunnable { exit_code: 127, message: "empty program name".into() });
    }
    if argv0.contains(&b'/') {
        let p = if argv0[0] == b'/' {
            PathBuf::from(std::ffi::OsStr::from_bytes(argv0))
        } else {
            Path::new(std::ffi::OsStr::from_bytes(cwd)).join(std::ffi::OsStr::from_bytes(argv0))
        };
        return match is_executable_file(&p) {
            Some(true) => cstring(argv0).map_err(|_| NotRunnable { exit_code: 127, message: format!("{}: bad name", shown) }),
            Some(false) => Err(NotRunnable { exit_code: 126, message: format!("{}: Permission denied", shown) }),
            None => Err(NotRunnable { exit_code: 127, message: format!("{}: No such file or directory", shown) }),
        };
    }
    let path = env_get(env, b"PATH").unwrap_or(DEFAULT_PATH);
    let mut denied = false;
    for dir in path.split(|b| *b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut full = dir.to_vec();
        full.push(b'/');
        full.extend_from_slice(argv0);
        let p = if full[0] == b'/' {
            PathBuf::from(std::ffi::OsStr::from_bytes(&full))
        } else {
            Path::new(std::ffi::OsStr::from_bytes(cwd)).join(std::ffi::OsStr::from_bytes(&full))
        };
        match is_executable_file(&p) {
            Some(true) => {
                return cstring(p.as_os_str().as_bytes())
                    .map_err(|_| NotRunnable { exit_code: 127, message: format!("{}: bad name", shown) })
            }
            Some(false) => denied = true,
            None => {}
        }
    }
    if denied {
        Err(NotRunnable { exit_code: 126, message: format!("{}: Permission denied", shown) })
    } else {
        Err(NotRunnable { exit_code: 127, message: format!("{}: command not found", shown) })
    }
}

/// A pseudo-terminal: the agent keeps the master, the child opens the slave.
pub struct Pty {
    pub master: Fd,
    pub slave_path: CString,
}

pub fn open_pty(cols: u16, rows: u16) -> io::Result<Pty> {
    let fd = sys::cvt(unsafe { sys::posix_openpt(sys::O_RDWR | sys::O_NOCTTY | sys::O_CLOEXEC) })?;
    let master = Fd(fd);
    sys::cvt(unsafe { sys::grantpt(master.raw()) })?;
    sys::cvt(unsafe { sys::unlockpt(master.raw()) })?;
    let mut buf = [0 as c_char; 128];
    let r = unsafe { sys::ptsname_r(master.raw(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let slave_path = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_owned();
    set_winsize(&master, cols, rows)?;
    master.set_nonblocking()?;
    Ok(Pty { master, slave_path })
}

pub fn set_winsize(fd: &Fd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = sys::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::TIOCSWINSZ, &ws as *const sys::Winsize) })?;
    Ok(())
}

/// Where the child's standard streams go.
pub enum Stdio<'a> {
    /// stdin, stdout, stderr file descriptors (stdin None = /dev/null).
    Pipes { stdin: Option<c_int>, stdout: c_int, stderr: c_int },
    /// All three on the pty slave, which becomes the controlling terminal.
    Tty { slave: &'a CStr },
    /// stdin /dev/null, stdout and stderr to this fd (the console).
    Detached { out: c_int },
}

pub struct SpawnSpec<'a> {
    pub program: &'a CStr,
    pub argv: &'a [CString],
    pub env: &'a [CString],
    pub cwd: &'a CStr,
    pub stdio: Stdio<'a>,
    pub identity: &'a Identity,
    /// cgroup directory whose cgroup.procs the child joins before exec.
    pub cgroup: Option<&'a Path>,
}

fn ptr_array(v: &[CString]) -> Vec<*const c_char> {
    let mut p: Vec<*const c_char> = v.iter().map(|s| s.as_ptr()).collect();
    p.push(std::ptr::null());
    p
}

/// Starts a process; returns its pid. The child is the leader of a new
/// session (and so of its own process group), with default signal dispositions
/// and an empty signal mask.
pub fn spawn(spec: &SpawnSpec) -> io::Result<i32> {
    if spec.identity.uid == 0 && spec.identity.gid == 0 {
        spawn_vfork(spec)
    } else {
        spawn_fork(spec)
    }
}

/// Kills, without a cgroup, what can be found of a process tree: the process
/// group and every process still in the session the exec leader created.
/// Processes that left the session (setsid) are out of reach: that is what a
/// cgroup is for.
pub fn kill_session(sid: i32) {
    unsafe {
        sys::kill(-sid, sys::SIGKILL);
        sys::kill(sid, sys::SIGKILL);
    }
    let dir = match fs::read_dir("/proc") {
        Ok(d) => d,
        Err(_) => return,
    };
    for e in dir.flatten() {
        let pid: i32 = match e.file_name().to_str().and_then(|n| n.parse().ok()) {
            Some(p) => p,
            None => continue,
        };
        let stat = match fs::read_to_string(format!("/proc/{}/stat", pid)) {
            Ok(s) => s,
            Err(_) => continue,
        };
        // Fields after the command (which may contain spaces): state ppid pgrp session ...
        let rest = match stat.rfind(')') {
            Some(i) => &stat[i + 1..],
            None => continue,
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 3 && f[3].parse::<i32>().ok() == Some(sid) {
            unsafe { sys::kill(pid, sys::SIGKILL) };
        }
    }
}

/// What the child of [`spawn_vfork`] reads. It shares the agent's memory
/// until it execs, so it only reads this, and writes `err`.
struct VforkChild<'a> {
    spec: &'a SpawnSpec<'a>,
    argv: *const *const c_char,
    envp: *const *const c_char,
    devnull: &'a CStr,
    /// errno of the step that failed (0: none).
    err: c_int,
}

/// The child's stack (its frames are small; execve copies argv and env from
/// the agent's heap). Only the agent's one thread spawns, and the agent is
/// suspended while the child uses it (CLONE_VFORK).
#[repr(C, align(16))]
struct VforkStack([u8; 64 * 1024]);
static mut VFORK_STACK: VforkStack = VforkStack([0; 64 * 1024]);

/// Runs in the child of [`spawn_vfork`]: raw system calls only (no
/// allocation, no lock: the agent's memory is shared and it is suspended).
extern "C" fn vfork_child(arg: *mut c_void) -> c_int {
    unsafe {
        let c = &mut *(arg as *mut VforkChild);
        let fail = |c: &mut VforkChild, code: c_int| -> ! {
            std::ptr::write_volatile(&mut c.err, *errno_ptr());
            sys::_exit(code)
        };
        let empty = sys::empty_sigset();
        sys::sigprocmask(sys::SIG_SETMASK, &empty, std::ptr::null_mut());
        // execve resets handled signals; SIGPIPE is the one the agent ignores
        // (init.rs), and an ignored signal would stay ignored.
        sys::signal(sys::SIGPIPE, 0);
        // The agent runs as SCHED_BATCH (main.rs); its processes do not.
        let param = sys::SchedParam { priority: 0 };
        sys::sched_setscheduler(0, sys::SCHED_OTHER, &param);
        sys::setsid();
        match &c.spec.stdio {
            Stdio::Pipes { stdin, stdout, stderr } => {
                let in_fd = match stdin {
                    Some(fd) => *fd,
                    None => sys::open(c.devnull.as_ptr(), sys::O_RDONLY | sys::O_CLOEXEC),
                };
                if in_fd < 0 || sys::dup2(in_fd, 0) < 0 || sys::dup2(*stdout, 1) < 0 || sys::dup2(*stderr, 2) < 0 {
                    fail(c, 126);
                }
            }
            Stdio::Tty { slave } => {
                // A session leader opening a tty acquires it as its
                // controlling terminal.
                let fd = sys::open(slave.as_ptr(), sys::O_RDWR | sys::O_CLOEXEC);
                if fd < 0 || sys::dup2(fd, 0) < 0 || sys::dup2(fd, 1) < 0 || sys::dup2(fd, 2) < 0 {
                    fail(c, 126);
                }
            }
            Stdio::Detached { out } => {
                let fd = sys::open(c.devnull.as_ptr(), sys::O_RDONLY | sys::O_CLOEXEC);
                if fd < 0 || sys::dup2(fd, 0) < 0 || sys::dup2(*out, 1) < 0 || sys::dup2(*out, 2) < 0 {
                    fail(c, 126);
                }
            }
        }
        if sys::chdir(c.spec.cwd.as_ptr()) != 0 {
            fail(c, 126);
        }
        sys::execve(c.spec.program.as_ptr(), c.argv, c.envp);
        fail(c, 127)
    }
}

/// Starts a root process with clone(CLONE_VM | CLONE_VFORK), as posix_spawn
/// does, but without its per-call costs, which under emulation are most of
/// the agent's share of an exec: a fresh stack mapped and unmapped (the
/// munmap flushes the software TLB), a sigaction for each of the 64 signals
/// and a getrlimit for each file action. Returns once the child has exec'd;
/// a failure before or in execve comes back as its errno. The child's fds
/// the agent opened are all close-on-exec.
fn spawn_vfork(spec: &SpawnSpec) -> io::Result<i32> {
    extern "C" {
        fn clone(f: extern "C" fn(*mut c_void) -> c_int, stack: *mut c_void, flags: c_int, arg: *mut c_void, ...) -> c_int;
    }
    const CLONE_VM: c_int = 0x100;
    const CLONE_VFORK: c_int = 0x4000;
    let argv = ptr_array(spec.argv);
    let envp = ptr_array(spec.env);
    let devnull = CString::new("/dev/null").unwrap();
    let mut child = VforkChild { spec, argv: argv.as_ptr(), envp: envp.as_ptr(), devnull: &devnull, err: 0 };
    // The child inherits the cgroup of its parent at clone time: the agent
    // steps into the exec's cgroup for the duration of the spawn.
    let joined = match spec.cgroup {
        Some(cg) => fs::write(cg.join("cgroup.procs"), b"0").is_ok(),
        None => false,
    };
    let pid = unsafe {
        let top = (std::ptr::addr_of_mut!(VFORK_STACK) as *mut u8).add(std::mem::size_of::<VforkStack>());
        clone(vfork_child, top as *mut c_void, CLONE_VM | CLONE_VFORK | sys::SIGCHLD, &mut child as *mut VforkChild as *mut c_void)
    };
    let clone_err = io::Error::last_os_error();
    if joined {
        let _ = fs::write("/sys/fs/cgroup/cgroup.procs", b"0");
    }
    if pid < 0 {
        return Err(clone_err);
    }
    let err = unsafe { std::ptr::read_volatile(&child.err) };
    if err != 0 {
        let mut status = 0;
        unsafe { sys::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(pid)
}

fn spawn_fork(spec: &SpawnSpec) -> io::Result<i32> {
    let argv = ptr_array(spec.argv);
    let envp = ptr_array(spec.env);
    let devnull = CString::new("/dev/null").unwrap();
    let procs = match spec.cgroup {
        Some(cg) => Some(cstring(cg.join("cgroup.procs").as_os_str().to_string_lossy().as_bytes())?),
        None => None,
    };
    let groups: Vec<sys::gid_t> = spec.identity.groups.clone();
    // Reports an exec failure (errno) from the child; closed by a successful exec.
    let (err_r, err_w) = sys::pipe(0)?;
    // With a cgroup, clone3(CLONE_INTO_CGROUP) creates the child inside it:
    // no migration afterwards, no window in which it could fork outside.
    let cg_fd = match spec.cgroup {
        Some(cg) => cstring(cg.as_os_str().to_string_lossy().as_bytes())
            .ok()
            .and_then(|c| sys::open_path(&c, sys::O_RDONLY | sys::O_DIRECTORY, 0).ok()),
        None => None,
    };
    let mut pid = -1;
    let mut in_cgroup = false;
    if let Some(fd) = &cg_fd {
        pid = clone_into_cgroup(fd.raw());
        in_cgroup = pid >= 0;
    }
    if !in_cgroup {
        pid = unsafe { sys::fork() };
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Child: async-signal-safe calls only, no allocation.
        unsafe {
            let fail = |code: i32| -> ! {
                let e = *errno_ptr();
                let b = e.to_le_bytes();
                sys::write(err_w.raw(), b.as_ptr() as *const _, 4);
                sys::_exit(code)
            };
            let empty = sys::empty_sigset();
            sys::sigprocmask(sys::SIG_SETMASK, &empty, std::ptr::null_mut());
            // The agent runs as SCHED_BATCH (main.rs); its processes do not.
            let param = sys::SchedParam { priority: 0 };
            sys::sched_setscheduler(0, sys::SCHED_OTHER, &param);
            for sig in 1..32 {
                sys::signal(sig, 0);
            }
            if let (Some(p), false) = (&procs, in_cgroup) {
                let fd = sys::open(p.as_ptr(), sys::O_WRONLY | sys::O_CLOEXEC);
                if fd >= 0 {
                    sys::write(fd, b"0".as_ptr() as *const _, 1);
                    sys::close(fd);
                }
            }
            sys::setsid();
            match &spec.stdio {
                Stdio::Pipes { stdin, stdout, stderr } => {
                    match stdin {
                        Some(fd) => {
                            sys::dup2(*fd, 0);
                        }
                        None => {
                            let fd = sys::open(devnull.as_ptr(), sys::O_RDONLY);
                            if fd >= 0 && fd != 0 {
                                sys::dup2(fd, 0);
                                sys::close(fd);
                            }
                        }
                    }
                    sys::dup2(*stdout, 1);
                    sys::dup2(*stderr, 2);
                }
                Stdio::Tty { slave } => {
                    let fd = sys::open(slave.as_ptr(), sys::O_RDWR);
                    if fd < 0 {
                        fail(126);
                    }
                    sys::ioctl(fd, sys::TIOCSCTTY, 0);
                    sys::dup2(fd, 0);
                    sys::dup2(fd, 1);
                    sys::dup2(fd, 2);
                    if fd > 2 {
                        sys::close(fd);
                    }
                }
                Stdio::Detached { out } => {
                    let fd = sys::open(devnull.as_ptr(), sys::O_RDONLY);
                    if fd >= 0 && fd != 0 {
                        sys::dup2(fd, 0);
                        sys::close(fd);
                    }
                    sys::dup2(*out, 1);
                    sys::dup2(*out, 2);
                }
            }
            if sys::chdir(spec.cwd.as_ptr()) != 0 {
                fail(126);
            }
            if sys::setgroups(groups.len(), groups.as_ptr()) != 0 {
                fail(126);
            }
            if sys::setgid(spec.identity.gid) != 0 {
                fail(126);
            }
            if sys::setuid(spec.identity.uid) != 0 {
                fail(126);
            }
            sys::execve(spec.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail(127);
        }
    }
    drop(err_w);
    let mut b = [0u8; 4];
    let n = err_r.read(&mut b).unwrap_or(0);
    if n == 4 {
        let mut status = 0;
        unsafe { sys::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_le_bytes(b)));
    }
    Ok(pid)
}

extern "C" {
    fn __errno_location() -> *mut c_int;
}

/// clone3 with CLONE_INTO_CGROUP and fork semantics (the child gets a copy of
/// the address space and returns here with 0). -1 with errno on failure
/// (e.g. ENOSYS before Linux 5.7).
fn clone_into_cgroup(cgroup_fd: c_int) -> i32 {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    #[cfg(target_arch = "x86_64")]
    const SYS_CLONE3: i64 = 435;
    #[cfg(target_arch = "aarch64")]
    const SYS_CLONE3: i64 = 435;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: sys::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup_fd as u64,
    };
    unsafe { sys::syscall(SYS_CLONE3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) as i32 }
}

unsafe fn errno_ptr() -> *mut c_int {
    __errno_location()
}

/// Per-exec cgroups under /sys/fs/cgroup: the tree's peak memory
/// (memory.peak) and a reliable kill of every process in it (cgroup.kill).
///
/// Creating and removing a memory cgroup costs about a millisecond each under
/// emulation, so both happen off the request path: a few empty cgroups are
/// kept ready, and used ones are removed when the agent is idle.
pub struct Cgroups {
    pub enabled: bool,
    counter: u64,
    ready: Vec<PathBuf>,
    /// Used cgroups waiting for rmdir (it fails while processes remain).
    retired: Vec<(PathBuf, u32)>,
}

const READY_TARGET: usize = 4;

impl Cgroups {
    pub fn new(enabled: bool) -> Cgroups {
        Cgroups { enabled, counter: 0, ready: Vec::new(), retired: Vec::new() }
    }

    fn make(&mut self, prefix: &str) -> Option<PathBuf> {
        self.counter += 1;
        let p = PathBuf::from(format!("/sys/fs/cgroup/{}-{}", prefix, self.counter));
        match fs::create_dir(&p) {
            Ok(()) => Some(p),
            Err(_) => None,
        }
    }

    /// A fresh cgroup for one exec.
    pub fn create(&mut self, prefix: &str) -> Option<PathBuf> {
        if !self.enabled {
            return None;
        }
        self.ready.pop().or_else(|| self.make(prefix))
    }

    /// Kills every process in the cgroup. Returns false when cgroup.kill is
    /// not available (the caller falls back to the process group).
    pub fn kill(cg: &Path) -> bool {
        fs::write(cg.join("cgroup.kill"), b"1").is_ok()
    }

    pub fn peak_kib(cg: &Path) -> Option<u64> {
        let s = fs::read_to_string(cg.join("memory.peak")).ok()?;
        s.trim().parse::<u64>().ok().map(|b| b / 1024)
    }

    /// Hands a used cgroup back; it is removed later, when idle.
    pub fn remove(&mut self, cg: PathBuf) {
        self.retired.push((cg, 0));
    }

    /// True when there is background work for [`Cgroups::idle_step`].
    pub fn has_idle_work(&self) -> bool {
        self.enabled && (!self.retired.is_empty() || self.ready.len() < READY_TARGET)
    }

    /// Does one piece of background work (one rmdir or one mkdir).
    pub fn idle_step(&mut self) {
        if let Some((cg, tries)) = self.retired.pop() {
            if fs::remove_dir(&cg).is_err() && cg.exists() {
                // Processes (a daemon started by an exec) still live there:
                // try again later, then give up on it.
                if tries < 1000 {
                    self.retired.insert(0, (cg, tries + 1));
                }
            }
            return;
        }
        if self.ready.len() < READY_TARGET {
            match self.make("exec") {
                Some(p) => self.ready.push(p),
                None => self.enabled = self.ready.len() > 0,
            }
        }
    }
}
