//! Guest boot: what PID 1 does before it serves the host.
//!
//! initramfs (rootfs) → /dev, /proc, /sys → kernel modules in modules.dep
//! order → root filesystem image (read-only, erofs) from /dev/vda with a
//! tmpfs overlay on top → switch root → /dev/pts, /dev/shm, /tmp, /run,
//! cgroup2 → hostname, loopback.

use crate::log;
use crate::service::volumes::{self, DiskConfig};
use crate::sys::{self, cstring};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::raw::c_ulong;
use std::path::Path;
use std::time::{Duration, Instant};

/// What boot achieved; reported to the host in HELLO_ACK.
pub struct BootReport {
    pub error: Option<String>,
    pub cgroups: bool,
    pub port_name: String,
}

/// The port as a boot template left it open (-1: none). Closing and
/// reopening it would drop what the host sends in between, so the agent
/// serves on this descriptor (taken once).
pub static TEMPLATE_PORT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

impl BootReport {
    pub fn not_init() -> BootReport {
        BootReport { error: None, cgroups: false, port_name: "sm.agent".to_string() }
    }
}

struct Cmdline {
    /// A boot template (docs/boot-templates.md): stop after the modules and
    /// wait for the real command line on the port.
    template: bool,
    root: String,
    rootfstype: String,
    port: String,
    hostname: String,
    cgroups: bool,
    memcg: bool,
    /// User-space address randomization (`sm.aslr=0` turns it off: under
    /// TCG, a program at the same addresses reuses the translations of its
    /// earlier runs; docs/performance.md).
    aslr: bool,
    /// Whether a woken task may preempt the running one (`sm.wakeup_preempt=0`
    /// turns it off: under TCG each switch between address spaces flushes
    /// QEMU's software TLB; docs/performance.md).
    wakeup_preempt: bool,
    /// The root image's size in bytes (`sm.rootsize`, from the host after
    /// a boot template): the root becomes a partition of that size on the
    /// template's root disk (see root_partition), 0: not given.
    root_size: u64,
    /// A boot template zeroes the guest's free memory before it is saved (`sm.zerofree=0`: not; see zero_free_memory).
    zero_free: bool,
    disks: DiskConfig,
}

fn parse_cmdline(text: &str) -> Cmdline {
    let mut c = Cmdline {
        template: false,
        root: "/dev/vda".to_string(),
        rootfstype: "erofs".to_string(),
        port: "sm.agent".to_string(),
        hostname: "supermachine".to_string(),
        cgroups: true,
        memcg: true,
        aslr: true,
        wakeup_preempt: true,
        root_size: 0,
        zero_free: true,
        disks: DiskConfig::default(),
    };
    for word in text.split_whitespace() {
        if let Some((k, v)) = word.split_once('=') {
            match k {
                "sm.template" => c.template = v == "1",
                "sm.root" => c.root = v.to_string(),
                "sm.rootfstype" => c.rootfstype = v.to_string(),
                "sm.port" => c.port = v.to_string(),
                "sm.hostname" => c.hostname = v.to_string(),
                "sm.cgroups" => c.cgroups = v != "0" && v != "off",
                "sm.memcg" => c.memcg = v != "0" && v != "off",
                "sm.aslr" => c.aslr = v != "0" && v != "off",
                "sm.wakeup_preempt" => c.wakeup_preempt = v != "0" && v != "off",
                "sm.rootsize" => c.root_size = v.parse().unwrap_or(0),
                "sm.zerofree" => c.zero_free = v != "0" && v != "off",
                "sm.debug" => crate::DEBUG.store(v == "1", std::sync::atomic::Ordering::Relaxed),
                _ => {
                    c.disks.take(k, v);
                }
            }
        }
    }
    c
}

pub fn mount(src: &str, target: &str, fstype: &str, flags: c_ulong, data: &str) -> io::Result<()> {
    let s = cstring(src.as_bytes())?;
    let t = cstring(target.as_bytes())?;
    let f = cstring(fstype.as_bytes())?;
    let d = cstring(data.as_bytes())?;
    let dp = if data.is_empty() { std::ptr::null() } else { d.as_ptr() as *const _ };
    sys::cvt(unsafe { sys::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, dp) })
        .map(|_| ())
        .map_err(|e| io::Error::new(e.kind(), format!("mount {} on {} ({}): {}", src, target, fstype, e)))
}

/// Turns the scheduler's wakeup preemption off (the `NO_WAKEUP_PREEMPTION`
/// feature, which the kernel only exposes in debugfs): a task that wakes
/// runs when the running one blocks or its slice ends, not at once. Under
/// TCG every switch between two processes flushes QEMU's whole software
/// TLB and jump cache, and a writer into a loopback socket was preempted by
/// its reader once per 64 KiB segment (≈ 16 switches per MiB). debugfs is
/// mounted only for the write: guest programs never see it.
fn no_wakeup_preemption() -> Result<(), String> {
    const AT: &str = "/sys/kernel/debug";
    mount("debugfs", AT, "debugfs", sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC, "").map_err(|e| e.to_string())?;
    let r = fs::write(format!("{}/sched/features", AT), "NO_WAKEUP_PREEMPTION").map_err(|e| format!("sched/features: {}", e));
    let t = cstring(AT.as_bytes()).map_err(|e| e.to_string())?;
    if unsafe { sys::umount2(t.as_ptr(), 0) } != 0 {
        return Err(format!("umount {}: {}", AT, io::Error::last_os_error()));
    }
    r
}

fn mkdir_p(path: &str) {
    let _ = fs::create_dir_all(path);
}

/// Parameters for a module of the initramfs (its file name). virtio_net
/// without TX NAPI releases a sent packet from its socket's buffer at once:
/// with TX NAPI, a raw-frame flood now and then left completed TX buffers
/// unreclaimed and the sender blocked for good (docs/networking-guest.md).
fn module_params(name: &str) -> &'static str {
    if name.starts_with("virtio_net.") {
        "napi_tx=0"
    } else {
        ""
    }
}

/// Loads the modules listed in /lib/modules/order (dependency order, one file
/// name per line) with finit_module. Already-loaded modules are fine.
fn load_modules() -> Result<(), String> {
    let order = match fs::read_to_string("/lib/modules/order") {
        Ok(s) => s,
        Err(_) => return Ok(()),
    };
    let mut failures = Vec::new();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{}", name);
        let c = match cstring(path.as_bytes()) {
            Ok(c) => c,
            Err(_) => continue,
        };
        let fd = match sys::open_path(&c, sys::O_RDONLY, 0) {
            Ok(fd) => fd,
            Err(e) => {
                failures.push(format!("{}: {}", name, e));
                continue;
            }
        };
        let params = CString::new(module_params(name)).unwrap_or_default();
        let r = unsafe { sys::syscall(sys::SYS_FINIT_MODULE, fd.raw() as i64, params.as_ptr(), 0i64) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(sys::EEXIST) {
                failures.push(format!("{}: {}", name, e));
            }
        }
        // The module file is no longer needed; free the initramfs memory.
        let _ = fs::remove_file(&path);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("kernel modules failed to load: {}", failures.join("; ")))
    }
}

/// Memory a template leaves free while it zeroes the rest (see zero_free_memory).
const ZERO_KEEP_FREE: u64 = 8 << 20;

/// Zeroes the guest's free memory before a boot template is saved: free
/// pages still hold what the boot left in them (the compressed kernel, the
/// initramfs image, early allocations), and the template's RAM file, and
/// every snapshot baked from it, carried those bytes (their sparse copies
/// skip only zero blocks). A child takes all free memory but a margin
/// (anonymous pages, zeroed by the kernel as it hands them out) and exits,
/// leaving them free and zero. The child is the OOM killer's first choice;
/// a failure only leaves the bytes there.
fn zero_free_memory() {
    let free_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemFree:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0);
    let len = (free_kib * 1024).saturating_sub(ZERO_KEEP_FREE) as usize;
    if len == 0 {
        return;
    }
    let pid = unsafe { sys::fork() };
    if pid == 0 {
        let _ = fs::write("/proc/self/oom_score_adj", "1000");
        let p = unsafe { sys::mmap(std::ptr::null_mut(), len, sys::PROT_READ | sys::PROT_WRITE, sys::MAP_PRIVATE | sys::MAP_ANONYMOUS | sys::MAP_NORESERVE | sys::MAP_POPULATE, -1, 0) };
        unsafe { sys::_exit(if p as isize == -1 { 1 } else { 0 }) };
    }
    if pid > 0 {
        let mut status = 0;
        unsafe { sys::waitpid(pid, &mut status, 0) };
    }
}

/// The longest command line a template accepts from the host.
const TEMPLATE_LINE_MAX: usize = 16 * 1024;

/// A boot template waits here, after the modules, for the command line of
/// the VM it becomes: it says `SMTPL ready` on the port (again each second
/// until a host reads it: nothing is connected before), the host saves the
/// VM, and every VM restored from that state goes on from this read with
/// its own line (`sm.root=… sm.hostname=…`, up to a newline), answered with
/// `SMTPL ok`. The port stays open: the agent serves on it.
fn template_wait(port_name: &str) -> Result<(String, sys::Fd), String> {
    let path = crate::agent::wait_for_port(port_name).map_err(|e| format!("template: {}", e))?;
    let fd = crate::agent::open_port(&path).map_err(|e| format!("template: open port: {}", e))?;
    let mut line: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut said = false;
    let mut last_say = Instant::now() - Duration::from_secs(10);
    loop {
        // Until the host has answered, say ready now and then: a write
        // while no host is connected is lost (or fails).
        if !said || (line.is_empty() && last_say.elapsed() >= Duration::from_secs(1)) {
            let msg = b"SMTPL ready\n";
            let r = unsafe { sys::write(fd.raw(), msg.as_ptr() as *const _, msg.len()) };
            said = r == msg.len() as isize;
            last_say = Instant::now();
        }
        let mut pfd = sys::PollFd { fd: fd.raw(), events: sys::POLLIN, revents: 0 };
        unsafe { sys::poll(&mut pfd, 1, 200) };
        let r = unsafe { sys::read(fd.raw(), buf.as_mut_ptr() as *mut _, buf.len()) };
        if r > 0 {
            line.extend_from_slice(&buf[..r as usize]);
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                line.truncate(end);
                say_ok(&fd);
                return match String::from_utf8(line) {
                    Ok(l) => Ok((l, fd)),
                    Err(_) => Err("template: the command line is not UTF-8".to_string()),
                };
            }
            if line.len() > TEMPLATE_LINE_MAX {
                return Err("template: command line too long".to_string());
            }
        }
    }
}

/// Answers the host's command line with `SMTPL ok`, the only answer it
/// waits for. Just restored, the port may not know yet that the host is
/// connected (the port-open message comes on another queue), and a write then
/// fails with EAGAIN: it is tried again, each time the port can take it, for
/// up to 30 s, instead of being dropped and leaving the host to time out.
fn say_ok(fd: &sys::Fd) {
    let ok = b"SMTPL ok\n";
    let mut sent = 0usize;
    let until = Instant::now() + Duration::from_secs(30);
    while sent < ok.len() && Instant::now() < until {
        let r = unsafe { sys::write(fd.raw(), ok[sent..].as_ptr() as *const _, ok.len() - sent) };
        if r > 0 {
            sent += r as usize;
            continue;
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if !sys::is_would_block(&e) && e.raw_os_error() != Some(sys::EINTR) {
                log!("template: SMTPL ok: {}", e);
                return;
            }
        }
        let mut pfd = sys::PollFd { fd: fd.raw(), events: sys::POLLOUT, revents: 0 };
        unsafe { sys::poll(&mut pfd, 1, 200) };
    }
}

/// The root after a boot template, without probing the disk again: the
/// template's root disk is a sparse placeholder larger than any root image
/// (src/vm/boot-template.ts), and its VMs put their own image in its place
/// at the same device. The kernel still has the placeholder's size and
/// cached blocks for `disk`; a partition from byte 0 of the image's `size`
/// is a new block device with the image's bounds and its own empty cache.
/// Adding it (BLKPG) costs the guest about a millisecond; finding the disk
/// by its serial, then unbinding and binding its device, which it replaces,
/// cost 100-120 ms under TCG (docs/boot-templates.md). Err (an old template's small placeholder, a
/// kernel that refuses): the caller probes the disk again instead.
fn root_partition(disk: &str, size: u64) -> Result<String, String> {
    if size == 0 || size % 512 != 0 || size > i64::MAX as u64 {
        return Err(format!("root size {} is not a whole number of sectors", size));
    }
    let path = cstring(disk.as_bytes()).map_err(|e| e.to_string())?;
    let fd = sys::open_path(&path, sys::O_RDONLY, 0).map_err(|e| format!("open {}: {}", disk, e))?;
    let mut part = sys::BlkpgPartition { start: 0, length: size as i64, pno: 1, devname: [0; 64], volname: [0; 64] };
    let mut arg = sys::BlkpgIoctlArg {
        op: sys::BLKPG_ADD_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<sys::BlkpgPartition>() as i32,
        data: &mut part,
    };
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::BLKPG, &mut arg as *mut sys::BlkpgIoctlArg) }).map_err(|e| format!("add a partition to {}: {}", disk, e))?;
    // The kernel's name for it: "vda" -> "vda1" (a name ending in a digit takes a "p").
    let sep = if disk.ends_with(|c: char| c.is_ascii_digit()) { "p" } else { "" };
    let part_path = format!("{}{}1", disk, sep);
    // devtmpfs makes the node before the ioctl returns; a short wait in case.
    if !wait_for(&part_path, Duration::from_secs(1)) {
        return Err(format!("{} did not appear", part_path));
    }
    Ok(part_path)
}

/// The template's root disk was a placeholder: unbind and bind its virtio
/// device so the kernel reads the real disk's size (and drops the
/// placeholder's cached blocks with the old disk).
fn reprobe_disk(serial: &str) -> Result<(), String> {
    let dev = volumes::lookup(serial).ok_or_else(|| format!("template: no disk {}", serial))?;
    let name = dev.trim_start_matches("/dev/");
    let link = fs::read_link(format!("/sys/block/{}/device", name)).map_err(|e| format!("template: {}: {}", name, e))?;
    let vdev = link.file_name().and_then(|n| n.to_str()).ok_or("template: no virtio device")?.to_string();
    fs::write("/sys/bus/virtio/drivers/virtio_blk/unbind", &vdev).map_err(|e| format!("template: unbind {}: {}", vdev, e))?;
    fs::write("/sys/bus/virtio/drivers/virtio_blk/bind", &vdev).map_err(|e| format!("template: bind {}: {}", vdev, e))?;
    if volumes::find_by_serial(serial, Duration::from_secs(10)).is_none() {
        return Err(format!("template: disk {} did not come back", serial));
    }
    Ok(())
}

fn wait_for(path: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Path::new(path).exists()
}

/// Mounts the root image (on `known`, a device found already, else the disk
/// with the root's serial) under the writable layer and moves into it.
fn mount_root(c: &Cmdline, known: Option<&str>) -> Result<(), String> {
    if c.root == "none" {
        return Ok(());
    }
    let root = match known {
        Some(dev) => dev.to_string(),
        None => {
            if !wait_for(&c.root, Duration::from_secs(10)) {
                return Err(format!("root disk {} did not appear", c.root));
            }
            // With several disks the root is not necessarily the first one
            // probed: the host names it by its serial.
            volumes::find_by_serial(volumes::ROOT_SERIAL, Duration::from_secs(if c.disks.disk.is_some() || !c.disks.volumes.is_empty() { 10 } else { 1 }))
                .unwrap_or_else(|| c.root.clone())
        }
    };
    mkdir_p("/mnt/lower");
    mkdir_p("/mnt/rw");
    mkdir_p("/mnt/root");
    mount(&root, "/mnt/lower", &c.rootfstype, sys::MS_RDONLY, "").map_err(|e| e.to_string())?;
    match &c.disks.disk {
        // The writable layer on its own ext4 disk (diskMib).
        Some(serial) => volumes::mount_disk(serial, "/mnt/rw")?,
        None => mount("tmpfs", "/mnt/rw", "tmpfs", 0, "mode=0755").map_err(|e| e.to_string())?,
    }
    mkdir_p("/mnt/rw/upper");
    mkdir_p("/mnt/rw/work");
    mount("overlay", "/mnt/root", "overlay", 0, "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work")
        .map_err(|e| e.to_string())?;
    for d in ["dev", "proc", "sys"] {
        let target = format!("/mnt/root/{}", d);
        mkdir_p(&target);
        mount(&format!("/{}", d), &target, "", sys::MS_MOVE, "").map_err(|e| e.to_string())?;
    }
    std::env::set_current_dir("/mnt/root").map_err(|e| e.to_string())?;
    mount(".", "/", "", sys::MS_MOVE, "").map_err(|e| e.to_string())?;
    let dot = CString::new(".").unwrap();
    sys::cvt(unsafe { sys::chroot(dot.as_ptr()) }).map_err(|e| format!("chroot: {}", e))?;
    std::env::set_current_dir("/").map_err(|e| e.to_string())?;
    Ok(())
}

fn mount_runtime_dirs() -> Vec<String> {
    let mut errors = Vec::new();
    let mut m = |src: &str, target: &str, fstype: &str, flags: c_ulong, data: &str| {
        mkdir_p(target);
        if let Err(e) = mount(src, target, fstype, flags, data) {
            errors.push(e.to_string());
        }
    };
    m("devpts", "/dev/pts", "devpts", sys::MS_NOSUID | sys::MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5");
    m("tmpfs", "/dev/shm", "tmpfs", sys::MS_NOSUID | sys::MS_NODEV, "mode=1777");
    m("tmpfs", "/tmp", "tmpfs", sys::MS_NOSUID | sys::MS_NODEV, "mode=1777");
    m("tmpfs", "/run", "tmpfs", sys::MS_NOSUID | sys::MS_NODEV, "mode=0755");
    // favordynmods (6.0+): moving a process between cgroups then needs no RCU
    // grace period, which under emulation costs milliseconds per exec.
    mkdir_p("/sys/fs/cgroup");
    let cg_flags = sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC;
    if mount("cgroup2", "/sys/fs/cgroup", "cgroup2", cg_flags, "favordynmods").is_err() {
        m("cgroup2", "/sys/fs/cgroup", "cgroup2", cg_flags, "");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    errors
}

pub fn set_hostname(name: &[u8]) -> io::Result<()> {
    sys::cvt(unsafe { sys::sethostname(name.as_ptr() as *const _, name.len()) })?;
    Ok(())
}

fn loopback_up() -> io::Result<()> {
    let fd = sys::cvt(unsafe { sys::socket(sys::AF_INET, sys::SOCK_DGRAM | sys::SOCK_CLOEXEC, 0) })?;
    let fd = sys::Fd(fd);
    let mut req = sys::Ifreq { ifr_name: [0; 16], ifr_flags: 0, _pad: [0; 22] };
    req.ifr_name[..2].copy_from_slice(b"lo");
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::SIOCGIFFLAGS, &mut req as *mut sys::Ifreq) })?;
    req.ifr_flags |= sys::IFF_UP | sys::IFF_RUNNING;
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::SIOCSIFFLAGS, &mut req as *mut sys::Ifreq) })?;
    Ok(())
}

fn enable_cgroups(memcg: bool) -> bool {
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return false;
    }
    let controllers = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let wanted: Vec<&str> = ["memory", "pids"].iter().copied().filter(|c| memcg && controllers.split_whitespace().any(|x| x == *c)).collect();
    let spec: Vec<String> = wanted.iter().map(|c| format!("+{}", c)).collect();
    if !spec.is_empty() {
        let _ = fs::write("/sys/fs/cgroup/cgroup.subtree_control", spec.join(" "));
    }
    // cgroup.kill (5.14+) is what makes a tree kill reliable.
    true
}

fn default_etc_files(hostname: &str) {
    if !Path::new("/etc/hosts").exists() {
        let _ = fs::create_dir_all("/etc");
        let _ = fs::write(
            "/etc/hosts",
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n", hostname),
        );
    }
}

/// Boots the guest. Never fails outright: problems are collected so the
/// agent can still answer the host and say what went wrong.
pub fn boot() -> BootReport {
    let mut errors: Vec<String> = Vec::new();
    unsafe {
        // Writes to a closed pipe or socket must fail with EPIPE, not kill PID 1.
        sys::signal(sys::SIGPIPE, sys::SIG_IGN);
    }
    mkdir_p("/dev");
    mkdir_p("/proc");
    mkdir_p("/sys");
    for (src, target, fstype) in [("devtmpfs", "/dev", "devtmpfs"), ("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs")] {
        if let Err(e) = mount(src, target, fstype, sys::MS_NOSUID, if fstype == "devtmpfs" { "mode=0755" } else { "" }) {
            errors.push(e.to_string());
        }
    }
    let mut c = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Err(e) = load_modules() {
        errors.push(e);
    }
    // The root device when a template's VM has its own image in place (a partition of the placeholder disk).
    let mut root_dev: Option<String> = None;
    let mut lo_up = false;
    if c.template {
        // The placeholder's /dev name, found while the template is made: its
        // VMs have the same devices in the same order.
        let placeholder = if c.root != "none" { volumes::find_by_serial(volumes::ROOT_SERIAL, Duration::from_secs(10)) } else { None };
        if c.zero_free {
            zero_free_memory();
        }
        // Loopback is the same in every VM: up in the template already
        // (≈ 10-15 ms of a template VM's boot under TCG otherwise).
        lo_up = loopback_up().is_ok();
        match template_wait(&c.port) {
            Ok((line, fd)) => {
                TEMPLATE_PORT.store(fd.raw(), std::sync::atomic::Ordering::SeqCst);
                std::mem::forget(fd);
                c = parse_cmdline(&line);
                if c.root != "none" {
                    let part = match &placeholder {
                        Some(disk) if c.root_size > 0 => root_partition(disk, c.root_size).map_err(|e| log!("template: the root goes on the disk probed again: {}", e)).ok(),
                        _ => None,
                    };
                    if part.is_none() {
                        if let Err(e) = reprobe_disk(volumes::ROOT_SERIAL) {
                            errors.push(e);
                        }
                    }
                    root_dev = part;
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if let Err(e) = mount_root(&c, root_dev.as_deref()) {
        errors.push(format!("root filesystem: {}", e));
    }
    errors.extend(mount_runtime_dirs());
    if c.root != "none" {
        errors.extend(volumes::mount_volumes(&c.disks));
    }
    if let Err(e) = set_hostname(c.hostname.as_bytes()) {
        errors.push(format!("sethostname: {}", e));
    }
    if !c.aslr {
        if let Err(e) = fs::write("/proc/sys/kernel/randomize_va_space", "0") {
            errors.push(format!("randomize_va_space: {}", e));
        }
    }
    if !c.wakeup_preempt {
        // A tuning only: without it the guest runs as before.
        if let Err(e) = no_wakeup_preemption() {
            log!("wakeup preemption stays on: {}", e);
        }
    }
    if !lo_up {
        if let Err(e) = loopback_up() {
            errors.push(format!("loopback: {}", e));
        }
    }
    default_etc_files(&c.hostname);
    let cgroups = c.cgroups && enable_cgroups(c.memcg);
    if !errors.is_empty() {
        log!("boot: {}", errors.join("; "));
    }
    BootReport {
        error: if errors.is_empty() { None } else { Some(errors.join("; ")) },
        cgroups,
        port_name: c.port,
    }
}
