//! supermachine guest agent: PID 1 of every supermachine microVM.
//!
//! It boots the guest (mounts, kernel modules, root filesystem with a
//! writable overlay, loopback, cgroups) and then serves the host protocol
//! (docs/protocol.md) on the `sm.agent` virtio-serial port: exec, files,
//! TCP forwarding, workload control. It never exits: a PID 1 exit is a
//! kernel panic, so every failure is logged and survived.

mod agent;
mod etcfiles;
mod exec;
mod files;
// Guest half of mounts (docs/mounts.md); not wired into the event loop yet.
#[allow(dead_code)]
mod fuse;
mod init;
mod io;
mod proto;
mod ring;
mod service;
mod sys;
mod tcp;
mod users;

use std::time::Duration;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes one line to the guest console (PID 1's stderr is /dev/console).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "supermachine-agent: {}", format!($($arg)*));
    }};
}

/// Verbose logging to the console (kernel command line `sm.debug=1`).
pub static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {{
        if $crate::DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
            $crate::log!($($arg)*);
        }
    }};
}

/// Host-side helper (`supermachine-agent --data-extents FILE`): prints the
/// file's size, then one `start end` line per data extent, as lseek's
/// SEEK_DATA/SEEK_HOLE report them. Everything outside them reads as zeros,
/// so the host's sparse digest of a snapshot's RAM file reads only these
/// (Node has no lseek; reading a fresh copy's holes costs the host a page
/// cache page each). A filesystem without SEEK_DATA reports one extent, the
/// whole file.
fn data_extents() -> ! {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    const SEEK_DATA: i32 = 3;
    const SEEK_HOLE: i32 = 4;
    let fail = |e: String| -> ! {
        eprintln!("supermachine-agent --data-extents: {}", e);
        std::process::exit(1)
    };
    let path = std::env::args_os().nth(2).unwrap_or_else(|| fail("usage: --data-extents FILE".into()));
    let f = std::fs::File::open(&path).unwrap_or_else(|e| fail(format!("{}: {}", path.to_string_lossy(), e)));
    let size = f.metadata().unwrap_or_else(|e| fail(e.to_string())).len() as i64;
    let fd = f.as_raw_fd();
    let out = std::io::stdout();
    let mut w = std::io::BufWriter::new(out.lock());
    let _ = writeln!(w, "{}", size);
    let mut off = 0i64;
    while off < size {
        let d = unsafe { sys::lseek(fd, off, SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // No data after off.
                Some(sys::ENXIO) => break,
                // No SEEK_DATA here: all of it is data.
                Some(sys::EINVAL) => {
                    let _ = writeln!(w, "{} {}", off, size);
                    break;
                }
                _ => fail(e.to_string()),
            }
        }
        let h = unsafe { sys::lseek(fd, d, SEEK_HOLE) };
        if h < 0 {
            fail(std::io::Error::last_os_error().to_string());
        }
        let h = h.min(size);
        if h <= d {
            break;
        }
        let _ = writeln!(w, "{} {}", d, h);
        off = h;
    }
    if w.flush().is_err() {
        std::process::exit(1);
    }
    std::process::exit(0)
}

fn main() {
    // Before anything reads argv as UTF-8: a program's arguments may be any bytes.
    if std::env::args_os().nth(1).map(|a| a == "--sm-exec").unwrap_or(false) {
        sm_exec();
    }
    if std::env::args_os().nth(1).map(|a| a == "--data-extents").unwrap_or(false) {
        data_extents();
    }
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    if args.iter().any(|a| a == "--version") {
        println!("{}", AGENT_VERSION);
        return;
    }
    let is_init = unsafe { sys::getpid() } == 1;
    let boot = if is_init { init::boot() } else { init::BootReport::not_init() };
    if is_init {
        // A batch task's wakeups do not preempt the running task: the process
        // that wrote output or exited runs on until it blocks or exits, and
        // the agent then finds its output, pipe hangups and SIGCHLD in one
        // round (one reply to the host) instead of a context switch for each.
        // Under emulation a switch between address spaces flushes the
        // software TLB. The cost: while a guest task spins, a request waits
        // for the scheduler tick (4 ms at HZ=250). The processes the agent
        // starts are put back to SCHED_OTHER (exec::spawn).
        let p = sys::SchedParam { priority: 0 };
        if unsafe { sys::sched_setscheduler(0, sys::SCHED_BATCH, &p) } != 0 {
            log!("SCHED_BATCH: {}", std::io::Error::last_os_error());
        }
    }
    if let Some(e) = &boot.error {
        log!("boot problem: {}", e);
    }
    std::panic::set_hook(Box::new(|info| {
        log!("panic: {}", info);
    }));
    loop {
        let result = std::panic::catch_unwind(|| agent::run(&boot));
        match result {
            Ok(Ok(())) => log!("agent loop returned; restarting"),
            Ok(Err(e)) => log!("agent loop failed: {}; restarting", e),
            Err(_) => log!("agent loop panicked; restarting"),
        }
        if !is_init {
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `--sm-exec CWD PROGRAM ARGS...`: what the agent's exec does for a process
/// whose working directory, program or PATH is on a host directory mount
/// (the agent's loop serves that mount and must not touch it itself): change
/// directory, find the program, exec it. Failures are reported like a shell's
/// (127 not found, 126 not runnable).
fn sm_exec() -> ! {
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    if args.len() < 2 {
        eprintln!("supermachine: --sm-exec CWD PROGRAM [ARGS...]");
        std::process::exit(125);
    }
    let cwd = args[0].as_bytes().to_vec();
    if let Err(e) = std::env::set_current_dir(std::path::Path::new(&args[0])) {
        eprintln!("supermachine: working directory {}: {}", String::from_utf8_lossy(&cwd), e);
        std::process::exit(126);
    }
    let argv: Vec<Vec<u8>> = args[1..].iter().map(|a| a.as_bytes().to_vec()).collect();
    let env: Vec<Vec<u8>> = std::env::vars_os()
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e
        })
        .collect();
    match exec::resolve_program(&argv[0], &env, &cwd) {
        Ok(program) => {
            let c: Vec<std::ffi::CString> = argv.iter().map(|a| std::ffi::CString::new(a.clone()).unwrap_or_default()).collect();
            let mut ptrs: Vec<*const std::os::raw::c_char> = c.iter().map(|a| a.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            extern "C" {
                fn execv(path: *const std::os::raw::c_char, argv: *const *const std::os::raw::c_char) -> i32;
            }
            unsafe { execv(program.as_ptr(), ptrs.as_ptr()) };
            let e = std::io::Error::last_os_error();
            eprintln!("supermachine: {}: {}", String::from_utf8_lossy(&argv[0]), e);
            std::process::exit(126);
        }
        Err(nr) => {
            eprintln!("supermachine: {}", nr.message);
            std::process::exit(nr.exit_code);
        }
    }
}
