//! supermachine guest agent: PID 1 of every supermachine microVM.
//!
//! It boots the guest (mounts, kernel modules, root filesystem with a
//! writable overlay, loopback, cgroups) and then serves the host protocol
//! (docs/protocol.md) on the `sm.agent` virtio-serial port: exec, files,
//! TCP forwarding, workload control. It never exits: a PID 1 exit is a
//! kernel panic, so every failure is logged and survived.

mod agent;
mod exec;
mod files;
// Guest half of mounts (docs/mounts.md); not wired into the event loop yet.
#[allow(dead_code)]
mod fuse;
mod init;
mod io;
mod proto;
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--version") {
        println!("{}", AGENT_VERSION);
        return;
    }
    let is_init = unsafe { sys::getpid() } == 1;
    let boot = if is_init { init::boot() } else { init::BootReport::not_init() };
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
