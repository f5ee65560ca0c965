//! Thin FFI layer over the C library and Linux system calls the agent needs.
//!
//! The agent is std-only (no crates), so the few libc entry points std does
//! not wrap are declared here. std already links the C library, statically
//! in our release build. Layouts are the x86_64/aarch64 glibc ones.

#![allow(non_camel_case_types, dead_code)]

use std::ffi::CStr;
use std::io;
use std::os::raw::{c_char, c_int, c_long, c_short, c_uint, c_ulong, c_void};

pub type pid_t = c_int;
pub type uid_t = c_uint;
pub type gid_t = c_uint;

#[cfg_attr(target_arch = "x86_64", repr(C, packed))]
#[cfg_attr(not(target_arch = "x86_64"), repr(C))]
#[derive(Clone, Copy)]
pub struct EpollEvent {
    pub events: u32,
    pub data: u64,
}

#[repr(C)]
pub struct PollFd {
    pub fd: c_int,
    pub events: i16,
    pub revents: i16,
}
pub const POLLIN: i16 = 0x1;
pub const POLLOUT: i16 = 0x4;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SigSet {
    _v: [u64; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Timespec {
    pub tv_sec: i64,
    pub tv_nsec: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Winsize {
    pub ws_row: u16,
    pub ws_col: u16,
    pub ws_xpixel: u16,
    pub ws_ypixel: u16,
}

#[repr(C)]
pub struct SockaddrIn {
    pub sin_family: u16,
    pub sin_port: u16,
    pub sin_addr: u32,
    pub sin_zero: [u8; 8],
}

#[repr(C)]
pub struct Linger {
    pub l_onoff: c_int,
    pub l_linger: c_int,
}

#[repr(C)]
pub struct Ifreq {
    pub ifr_name: [u8; 16],
    pub ifr_flags: c_short,
    pub _pad: [u8; 22],
}

/// struct blkpg_partition (linux/blkpg.h): a partition by its byte offset and length.
#[repr(C)]
pub struct BlkpgPartition {
    pub start: i64,
    pub length: i64,
    pub pno: c_int,
    pub devname: [u8; 64],
    pub volname: [u8; 64],
}

/// struct blkpg_ioctl_arg (linux/blkpg.h), 64-bit layout.
#[repr(C)]
pub struct BlkpgIoctlArg {
    pub op: c_int,
    pub flags: c_int,
    pub datalen: c_int,
    pub data: *mut BlkpgPartition,
}

/// struct ifreq with the union read as a sockaddr_in (SIOCSIFADDR,
/// SIOCSIFNETMASK) or an int (SIOCSIFMTU: its first 4 bytes).
#[repr(C)]
pub struct IfreqAddr {
    pub ifr_name: [u8; 16],
    pub addr: SockaddrIn,
    pub _pad: [u8; 8],
}

/// struct rtentry (route(8)'s ioctl interface), 64-bit layout.
#[repr(C)]
pub struct Rtentry {
    pub rt_pad1: c_ulong,
    pub rt_dst: SockaddrIn,
    pub rt_gateway: SockaddrIn,
    pub rt_genmask: SockaddrIn,
    pub rt_flags: u16,
    pub rt_pad2: c_short,
    pub rt_pad3: c_ulong,
    pub rt_pad4: *mut c_void,
    pub rt_metric: c_short,
    pub rt_dev: *mut c_char,
    pub rt_mtu: c_ulong,
    pub rt_window: c_ulong,
    pub rt_irtt: u16,
}

/// sched_setscheduler(2)'s parameter.
#[repr(C)]
pub struct SchedParam {
    pub priority: c_int,
}
pub const SCHED_OTHER: c_int = 0;
pub const SCHED_BATCH: c_int = 3;

extern "C" {
    pub fn epoll_create1(flags: c_int) -> c_int;
    pub fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, event: *mut EpollEvent) -> c_int;
    pub fn epoll_wait(epfd: c_int, events: *mut EpollEvent, maxevents: c_int, timeout: c_int) -> c_int;
    pub fn poll(fds: *mut PollFd, nfds: u64, timeout: c_int) -> c_int;
    pub fn signalfd(fd: c_int, mask: *const SigSet, flags: c_int) -> c_int;
    pub fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    pub fn sigemptyset(set: *mut SigSet) -> c_int;
    pub fn sigfillset(set: *mut SigSet) -> c_int;
    pub fn sigaddset(set: *mut SigSet, sig: c_int) -> c_int;
    pub fn signal(sig: c_int, handler: usize) -> usize;
    pub fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
    pub fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize;
    pub fn pread(fd: c_int, buf: *mut c_void, n: usize, off: i64) -> isize;
    pub fn lseek(fd: c_int, off: i64, whence: c_int) -> i64;
    pub fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    pub fn close(fd: c_int) -> c_int;
    pub fn dup(fd: c_int) -> c_int;
    pub fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    pub fn ioctl(fd: c_int, req: c_ulong, ...) -> c_int;
    pub fn open(path: *const c_char, flags: c_int, ...) -> c_int;
    pub fn waitpid(pid: pid_t, status: *mut c_int, options: c_int) -> pid_t;
    pub fn kill(pid: pid_t, sig: c_int) -> c_int;
    pub fn mount(
        src: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_int;
    pub fn chroot(path: *const c_char) -> c_int;
    pub fn syscall(num: c_long, ...) -> c_long;
    pub fn sethostname(name: *const c_char, len: usize) -> c_int;
    pub fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int;
    pub fn connect(fd: c_int, addr: *const c_void, len: u32) -> c_int;
    pub fn shutdown(fd: c_int, how: c_int) -> c_int;
    pub fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: u32) -> c_int;
    pub fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut u32) -> c_int;
    pub fn clock_settime(clk: c_int, ts: *const Timespec) -> c_int;
    pub fn clock_gettime(clk: c_int, ts: *mut Timespec) -> c_int;
    pub fn posix_openpt(flags: c_int) -> c_int;
    pub fn grantpt(fd: c_int) -> c_int;
    pub fn unlockpt(fd: c_int) -> c_int;
    pub fn ptsname_r(fd: c_int, buf: *mut c_char, len: usize) -> c_int;
    pub fn fork() -> pid_t;
    pub fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void;
    pub fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    pub fn setsid() -> pid_t;
    pub fn setuid(uid: uid_t) -> c_int;
    pub fn setgid(gid: gid_t) -> c_int;
    pub fn setgroups(n: usize, list: *const gid_t) -> c_int;
    pub fn chdir(path: *const c_char) -> c_int;
    pub fn dup2(fd: c_int, newfd: c_int) -> c_int;
    pub fn _exit(code: c_int) -> !;
    pub fn getpid() -> pid_t;
    pub fn sched_setscheduler(pid: pid_t, policy: c_int, param: *const SchedParam) -> c_int;
    pub fn sync();
    pub fn umount2(target: *const c_char, flags: c_int) -> c_int;
    pub fn eventfd(initval: c_uint, flags: c_int) -> c_int;
    pub fn splice(fd_in: c_int, off_in: *mut i64, fd_out: c_int, off_out: *mut i64, len: usize, flags: c_uint) -> isize;
}

pub const SPLICE_F_NONBLOCK: c_uint = 2;
pub const FIONREAD: c_ulong = 0x541B;

pub const EPOLL_CLOEXEC: c_int = 0x80000;
pub const EPOLLIN: u32 = 0x1;
pub const EPOLLOUT: u32 = 0x4;
pub const EPOLLERR: u32 = 0x8;
pub const EPOLLHUP: u32 = 0x10;
pub const EPOLLRDHUP: u32 = 0x2000;
pub const EPOLLET: u32 = 1 << 31;
pub const EPOLL_CTL_ADD: c_int = 1;
pub const EPOLL_CTL_DEL: c_int = 2;
pub const EPOLL_CTL_MOD: c_int = 3;

pub const SFD_NONBLOCK: c_int = 0x800;
pub const SFD_CLOEXEC: c_int = 0x80000;
pub const O_RDONLY: c_int = 0;
pub const O_WRONLY: c_int = 1;
pub const O_RDWR: c_int = 2;
pub const O_CREAT: c_int = 0x40;
pub const O_EXCL: c_int = 0x80;
pub const O_NOCTTY: c_int = 0x100;
pub const O_TRUNC: c_int = 0x200;
pub const O_NONBLOCK: c_int = 0x800;
pub const O_CLOEXEC: c_int = 0x80000;
#[cfg(not(target_arch = "aarch64"))]
pub const O_DIRECTORY: c_int = 0o200000;
#[cfg(not(target_arch = "aarch64"))]
pub const O_NOFOLLOW: c_int = 0o400000;
#[cfg(not(target_arch = "aarch64"))]
pub const O_DIRECT: c_int = 0o40000;
// arm64 numbers these three differently (asm/fcntl.h).
#[cfg(target_arch = "aarch64")]
pub const O_DIRECTORY: c_int = 0o40000;
#[cfg(target_arch = "aarch64")]
pub const O_DIRECT: c_int = 0o200000;
#[cfg(target_arch = "aarch64")]
pub const O_NOFOLLOW: c_int = 0o100000;
pub const O_PATH: c_int = 0o10000000;
pub const F_GETFL: c_int = 3;
pub const F_SETFL: c_int = 4;
pub const F_SETPIPE_SZ: c_int = 1031;

pub const SIGHUP: c_int = 1;
pub const SIGINT: c_int = 2;
pub const SIGKILL: c_int = 9;
pub const SIGPIPE: c_int = 13;
pub const SIGTERM: c_int = 15;
pub const SIGCHLD: c_int = 17;
pub const SIG_BLOCK: c_int = 0;
pub const SIG_SETMASK: c_int = 2;
pub const SIG_IGN: usize = 1;
pub const WNOHANG: c_int = 1;

pub const MS_RDONLY: c_ulong = 1;
pub const MS_NOSUID: c_ulong = 2;
pub const MS_NODEV: c_ulong = 4;
pub const MS_NOEXEC: c_ulong = 8;
pub const MS_BIND: c_ulong = 4096;
pub const MS_MOVE: c_ulong = 8192;
pub const MS_REC: c_ulong = 16384;


pub const TIOCSCTTY: c_ulong = 0x540E;
pub const TIOCSWINSZ: c_ulong = 0x5414;
pub const SIOCGIFFLAGS: c_ulong = 0x8913;
pub const SIOCSIFFLAGS: c_ulong = 0x8914;
/// _IO(0x12, 105): partition table changes (linux/fs.h).
pub const BLKPG: c_ulong = 0x1269;
pub const BLKPG_ADD_PARTITION: c_int = 1;
pub const PROT_READ: c_int = 1;
pub const PROT_WRITE: c_int = 2;
pub const MAP_PRIVATE: c_int = 0x02;
pub const MAP_ANONYMOUS: c_int = 0x20;
pub const MAP_NORESERVE: c_int = 0x4000;
pub const MAP_POPULATE: c_int = 0x8000;
pub const SIOCSIFADDR: c_ulong = 0x8916;
pub const SIOCSIFNETMASK: c_ulong = 0x891c;
pub const SIOCSIFMTU: c_ulong = 0x8922;
pub const SIOCADDRT: c_ulong = 0x890B;
pub const SIOCDELRT: c_ulong = 0x890C;
pub const RTF_UP: u16 = 0x1;
pub const RTF_GATEWAY: u16 = 0x2;
pub const ESRCH: i32 = 3;
pub const IFF_UP: c_short = 0x1;
pub const IFF_RUNNING: c_short = 0x40;
pub const RNDADDENTROPY: c_ulong = 0x40085203;
pub const RNDRESEEDCRNG: c_ulong = 0x5207;

pub const AF_INET: c_int = 2;
pub const SOCK_STREAM: c_int = 1;
pub const SOCK_DGRAM: c_int = 2;
pub const SOCK_NONBLOCK: c_int = 0x800;
pub const SOCK_CLOEXEC: c_int = 0x80000;
pub const SOL_SOCKET: c_int = 1;
pub const SO_ERROR: c_int = 4;
pub const SO_LINGER: c_int = 13;
pub const IPPROTO_TCP: c_int = 6;
pub const TCP_NODELAY: c_int = 1;
pub const SHUT_WR: c_int = 1;
pub const CLOCK_REALTIME: c_int = 0;
pub const CLOCK_MONOTONIC: c_int = 1;

#[cfg(target_arch = "x86_64")]
pub const SYS_FINIT_MODULE: c_long = 313;
#[cfg(target_arch = "aarch64")]
pub const SYS_FINIT_MODULE: c_long = 273;
// Linux AIO (the stream ring's region reads).
#[cfg(target_arch = "x86_64")]
pub const SYS_IO_SETUP: c_long = 206;
#[cfg(target_arch = "x86_64")]
pub const SYS_IO_GETEVENTS: c_long = 208;
#[cfg(target_arch = "x86_64")]
pub const SYS_IO_SUBMIT: c_long = 209;
#[cfg(target_arch = "aarch64")]
pub const SYS_IO_SETUP: c_long = 0;
#[cfg(target_arch = "aarch64")]
pub const SYS_IO_SUBMIT: c_long = 2;
#[cfg(target_arch = "aarch64")]
pub const SYS_IO_GETEVENTS: c_long = 4;
pub const EFD_NONBLOCK: c_int = 0o4000;
pub const EFD_CLOEXEC: c_int = 0o2000000;

pub const EINTR: i32 = 4;
pub const EIO: i32 = 5;
pub const ENXIO: i32 = 6;
pub const EINVAL: i32 = 22;
pub const EAGAIN: i32 = 11;
pub const ENOENT: i32 = 2;
pub const EACCES: i32 = 13;
pub const EEXIST: i32 = 17;
pub const ECHILD: i32 = 10;
pub const EINPROGRESS: i32 = 115;
pub const ENOTCONN: i32 = 107;

/// Converts a C-style return value into an io::Result, reading errno on -1.
pub fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn cvt_isize(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// An owned file descriptor, closed on drop.
pub struct Fd(pub c_int);

impl Fd {
    pub fn raw(&self) -> c_int {
        self.0
    }
    /// Gives up ownership without closing.
    pub fn into_raw(self) -> c_int {
        let fd = self.0;
        std::mem::forget(self);
        fd
    }
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = unsafe { read(self.0, buf.as_mut_ptr() as *mut c_void, buf.len()) };
            match cvt_isize(r) {
                Err(e) if e.raw_os_error() == Some(EINTR) => continue,
                other => return other,
            }
        }
    }
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let r = unsafe { write(self.0, buf.as_ptr() as *const c_void, buf.len()) };
            match cvt_isize(r) {
                Err(e) if e.raw_os_error() == Some(EINTR) => continue,
                other => return other,
            }
        }
    }
    pub fn set_nonblocking(&self) -> io::Result<()> {
        let fl = cvt(unsafe { fcntl(self.0, F_GETFL) })?;
        cvt(unsafe { fcntl(self.0, F_SETFL, fl | O_NONBLOCK) })?;
        Ok(())
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            unsafe { close(self.0) };
        }
    }
}

/// A pipe as (read end, write end), both close-on-exec.
pub fn pipe(flags: c_int) -> io::Result<(Fd, Fd)> {
    let mut fds = [0 as c_int; 2];
    cvt(unsafe { pipe2(fds.as_mut_ptr(), O_CLOEXEC | flags) })?;
    Ok((Fd(fds[0]), Fd(fds[1])))
}

pub fn open_path(path: &CStr, flags: c_int, mode: c_uint) -> io::Result<Fd> {
    let fd = cvt(unsafe { open(path.as_ptr(), flags | O_CLOEXEC, mode) })?;
    Ok(Fd(fd))
}

pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

pub fn is_would_block(e: &io::Error) -> bool {
    e.raw_os_error() == Some(EAGAIN)
}

pub fn empty_sigset() -> SigSet {
    let mut s = SigSet { _v: [0; 16] };
    unsafe { sigemptyset(&mut s) };
    s
}

pub fn full_sigset() -> SigSet {
    let mut s = SigSet { _v: [0; 16] };
    unsafe { sigfillset(&mut s) };
    s
}

pub fn monotonic_ms() -> u64 {
    let mut ts = Timespec::default();
    unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

pub fn monotonic_us() -> u64 {
    let mut ts = Timespec::default();
    unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// A C string from bytes; interior NULs are rejected.
pub fn cstring(bytes: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(bytes.to_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}
