//! The mounts service (docs/mounts.md): live host directories as FUSE
//! filesystems. Each MOUNT stream registers one tag; the FUSE connection
//! mounted for it moves raw requests from /dev/fuse to the host (FUSE
//! frames on the stream) and writes the host's raw replies back. The host's
//! file server answers every request; the agent only routes them.
//!
//! - /dev/fuse is non-blocking and in the agent's epoll set: the event loop
//!   never waits on it.
//! - At most MAX_IN_FLIGHT requests per mount are forwarded and unanswered;
//!   beyond that the agent stops reading /dev/fuse (the kernel queues them).
//! - A request the host has not answered within REPLY_DEADLINE_MS gets EIO
//!   from the agent, so no guest process hangs forever on a silent host.
//! - Notifications (FUSE frames with flags 1) are written by a thread of the
//!   mount's own, from a bounded queue: a FUSE_NOTIFY_INVAL_ENTRY write can
//!   block on a directory lock that only a later reply releases, so replies
//!   never wait behind notifications. A full queue drops the notification
//!   (they only invalidate caches; the host repeats eviction notices).
//! - `mount -t virtiofs <tag> <dir>` run through EXEC is performed here
//!   (see [`MountService::intercept_exec`]).
//! - Mounts that were below the guest path before the tag was mounted there
//!   (the seed's Pattern 6: a volume at /work/node_modules, the source then
//!   mounted at /work) are bound back on top of the new mount, so they stay
//!   visible. The originals stay where they were, hidden under the FUSE
//!   mount; unmounting the tag (lazily, with the binds) uncovers them again,
//!   which is what a snapshot needs. Placing the binds walks the new FUSE
//!   mount (mkdir of the mount point on the host when missing), which only
//!   this loop can serve, so a thread does it; the loop finishes the MOUNT or
//!   the intercepted exec when the thread reports (a socket pair in epoll).

use crate::fuse::{self, FuseDevice, InHeader, OUT_HEADER_SIZE, REQUEST_BUFFER_SIZE};
use crate::io::{token, Io, ReqError};
use crate::proto::{self, tag, ty, Record};
use crate::sys;
use crate::log;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};

/// epoll token kind of a mount's /dev/fuse.
pub const TK_FUSE: u64 = 7 << 56;
/// Requests forwarded to the host and not answered yet, per mount.
pub const MAX_IN_FLIGHT: usize = 64;
/// How long the agent waits for the host's reply before answering EIO.
pub const REPLY_DEADLINE_MS: u64 = 30_000;
/// Notifications queued for the writer thread, per mount.
const NOTIFY_QUEUE: usize = 256;
const EIO: i32 = 5;
const ENODEV: i32 = 19;
/// Mounts registered at once.
const MAX_MOUNTS: usize = 64;
/// Read-ahead of a mount, KiB. The kernel starts a FUSE mount at 128 KiB
/// (one 128 KiB READ in flight at a time, so a sequential read waits a whole
/// round trip per 128 KiB); a larger window keeps several READs in flight.
const READ_AHEAD_KB: u32 = 1024;
/// epoll token kind of a mount's submount job (its end of the socket pair).
pub const TK_MOUNT_JOB: u64 = 8 << 56;
/// Mounts below a guest path that are bound back on top of it, at most.
const MAX_SUBMOUNTS: usize = 16;
/// Bytes of a job's report read, at most.
const MAX_JOB_REPORT: usize = 16 * 1024;

struct Conn {
    dev: FuseDevice,
    path: PathBuf,
    /// unique → deadline (monotonic ms).
    pending: HashMap<u64, u64>,
    notify: SyncSender<Vec<u8>>,
    /// EPOLLIN is off while MAX_IN_FLIGHT requests are pending.
    paused: bool,
    /// The unique of the connection's FUSE_INIT, until its reply is written.
    init_unique: Option<u64>,
}

struct Mount {
    tag: String,
    read_only: bool,
    conn: Option<Conn>,
    /// Submounts being bound back on top of the new mount.
    job: Option<Job>,
}

/// Who is told when a mount is complete.
enum Reply {
    /// A MOUNT with a guest path: the final MOUNTED.
    Mounted,
    /// An intercepted `mount` exec on stream `exec_id`: its exit.
    Exec { exec_id: u32, dir: Vec<u8> },
}

/// A thread binding submounts back on top of a new mount.
struct Job {
    /// The loop's end: the thread writes its report (one error per line)
    /// and closes its end.
    sock: UnixStream,
    report: Vec<u8>,
    reply: Reply,
}

pub struct MountService {
    mounts: HashMap<u32, Mount>,
    buf: Vec<u8>,
}

fn eio_reply(unique: u64) -> [u8; OUT_HEADER_SIZE] {
    let mut r = [0u8; OUT_HEADER_SIZE];
    r[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_le_bytes());
    r[4..8].copy_from_slice(&(-EIO).to_le_bytes());
    r[8..16].copy_from_slice(&unique.to_le_bytes());
    r
}

fn req_message(e: ReqError) -> String {
    match e {
        ReqError::BadRequest(m) | ReqError::NotFound(m) | ReqError::Permission(m) | ReqError::TooLarge(m) | ReqError::Io(m) | ReqError::Refused(m) | ReqError::Unsupported(m) | ReqError::Timeout(m) | ReqError::Internal(m) => m,
    }
}

fn mounted_record(path: Option<&Path>) -> Record {
    Record::new().bytes(tag::mounted::GUEST_PATH, path.map(|p| p.as_os_str().as_bytes()).unwrap_or(b""))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The mount points strictly below `dir` in `mountinfo`, outermost only
/// (a bind with MS_REC carries the ones nested in them), as paths relative
/// to `dir`, in mount order.
pub fn submounts_below(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        let mp = match line.split(' ').nth(4) {
            Some(m) => PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(m))),
            None => continue,
        };
        let rel = match mp.strip_prefix(dir) {
            Ok(r) if !r.as_os_str().is_empty() => r.to_path_buf(),
            _ => continue,
        };
        if found.iter().any(|f| rel.starts_with(f)) {
            continue;
        }
        found.retain(|f| !f.starts_with(&rel));
        found.push(rel);
    }
    found
}

/// The `major:minor` of the topmost FUSE mount on `path` in `mountinfo`.
pub fn fuse_device_at(mountinfo: &str, path: &Path) -> Option<String> {
    let mut found = None;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 7 || Path::new(std::ffi::OsStr::from_bytes(&unescape_mountinfo(f[4]))) != path {
            continue;
        }
        let sep = match f.iter().position(|x| *x == "-") {
            Some(i) => i,
            None => continue,
        };
        if f.get(sep + 1) == Some(&"fuse") {
            found = Some(f[2].to_string());
        }
    }
    found
}

/// Sets the read-ahead of the FUSE mount on `path` (its backing device's
/// `read_ahead_kb`). Reads mountinfo and sysfs only: nothing here touches
/// the mount itself, which this loop serves.
fn set_read_ahead(path: &Path, kb: u32) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dev = match fuse_device_at(&info, path) {
        Some(d) => d,
        None => return,
    };
    if !dev.bytes().all(|b| b.is_ascii_digit() || b == b':') {
        return;
    }
    if let Err(e) = std::fs::write(format!("/sys/class/bdi/{}/read_ahead_kb", dev), kb.to_string()) {
        log!("read-ahead of {}: {}", path.display(), e);
    }
}

/// An O_PATH handle on the directory `p` (a final symlink is not followed).
fn dir_handle(p: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).custom_flags(sys::O_PATH | sys::O_NOFOLLOW | sys::O_DIRECTORY | sys::O_CLOEXEC).open(p)
}

/// The job's thread: binds each submount (an O_PATH handle of its root,
/// taken before the tag was mounted over it) on `rel` inside the new mount
/// at `dir`, creating the directory there when missing. `covered_dev` is the
/// device `dir` had before: if `dir` shows it again, the mount is gone and
/// nothing is bound. Returns one message per failure.
fn place_submounts(dir: &Path, covered_dev: u64, subs: Vec<(PathBuf, File)>) -> Vec<String> {
    let root = match dir_handle(dir) {
        Ok(r) => r,
        Err(e) => return vec![format!("open {}: {}", dir.display(), e)],
    };
    match root.metadata() {
        Ok(m) if m.dev() != covered_dev => {}
        Ok(_) => return vec![format!("{} was unmounted before the mounts below it were placed", dir.display())],
        Err(e) => return vec![format!("stat {}: {}", dir.display(), e)],
    }
    let mut errors = Vec::new();
    for (rel, src) in subs {
        let shown = dir.join(&rel);
        let target = PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd())).join(&rel);
        let placed = std::fs::create_dir_all(&target)
            .map_err(|e| format!("create {} on the mount: {}", shown.display(), e))
            .and_then(|_| match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(format!("{} on the mount is not a directory", shown.display())),
                Err(e) => Err(format!("stat {}: {}", shown.display(), e)),
            })
            .and_then(|_| {
                crate::init::mount(&format!("/proc/self/fd/{}", src.as_raw_fd()), &target.to_string_lossy(), "", sys::MS_BIND | sys::MS_REC, "")
                    .map_err(|e| format!("bind the mount of {} back on top: {}", shown.display(), e))
            });
        if let Err(e) = placed {
            errors.push(e);
        }
    }
    errors
}

/// What an intercepted `mount -t virtiofs TAG DIR` asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct MountCommand {
    pub tag: String,
    pub dir: Vec<u8>,
    pub read_only: bool,
}

/// Recognises `mount -t virtiofs [-o OPTS] TAG DIR` (argv[0] `mount` or a
/// path ending in `/mount`; `-t virtiofs`, `-tvirtiofs`, `--types virtiofs`
/// and `--types=virtiofs`; `-o` options may include `ro`). Anything else,
/// including a `sh -c "mount ..."`, is not a mount command here.
pub fn parse_mount_command(argv: &[&[u8]]) -> Option<MountCommand> {
    let a0 = *argv.first()?;
    if a0 != b"mount" && !a0.ends_with(b"/mount") {
        return None;
    }
    let mut fstype: Option<&[u8]> = None;
    let mut read_only = false;
    let mut positional: Vec<&[u8]> = Vec::new();
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i];
        if a == b"-t" || a == b"--types" {
            fstype = Some(*argv.get(i + 1)?);
            i += 2;
            continue;
        }
        if a == b"-o" || a == b"--options" {
            let o = *argv.get(i + 1)?;
            read_only |= o.split(|c| *c == b',').any(|x| x == b"ro");
            i += 2;
            continue;
        }
        if let Some(t) = a.strip_prefix(b"--types=".as_ref()) {
            fstype = Some(t);
        } else if a.starts_with(b"-t") && a.len() > 2 {
            fstype = Some(&a[2..]);
        } else if a == b"-r" || a == b"--read-only" {
            read_only = true;
        } else if a.starts_with(b"-") {
            return None;
        } else {
            positional.push(a);
        }
        i += 1;
    }
    if fstype != Some(b"virtiofs".as_ref()) || positional.len() != 2 {
        return None;
    }
    let tag = std::str::from_utf8(positional[0]).ok()?.to_string();
    Some(MountCommand { tag, dir: positional[1].to_vec(), read_only })
}

impl MountService {
    pub fn new() -> MountService {
        MountService { mounts: HashMap::new(), buf: vec![0u8; REQUEST_BUFFER_SIZE] }
    }

    pub fn owns(&self, id: u32) -> bool {
        self.mounts.contains_key(&id)
    }

    /// MOUNT: registers a tag on stream `id`, and mounts it at once when
    /// the request names a guest path. Answers MOUNTED (the path, or empty).
    pub fn open(&mut self, io: &mut Io, id: u32, p: &[u8]) {
        if let Err(e) = self.try_open(io, id, p) {
            self.mounts.remove(&id);
            io.send_error(id, e);
        }
    }

    fn try_open(&mut self, io: &mut Io, id: u32, p: &[u8]) -> Result<(), ReqError> {
        let mut tag_v: Option<String> = None;
        let mut path: Option<Vec<u8>> = None;
        let mut read_only = false;
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::mount::TAG => tag_v = Some(String::from_utf8_lossy(v).into_owned()),
                tag::mount::GUEST_PATH => path = Some(v.to_vec()),
                tag::mount::READ_ONLY => read_only = proto::val_bool(t, v)?,
                _ => {}
            }
        }
        let tag_s = tag_v.ok_or_else(|| ReqError::BadRequest("MOUNT without a tag".into()))?;
        if !fuse::valid_tag(&tag_s) {
            return Err(ReqError::BadRequest(format!("bad mount tag {:?}", tag_s)));
        }
        if self.mounts.values().any(|m| m.tag == tag_s) {
            return Err(ReqError::BadRequest(format!("mount tag {} is already registered", tag_s)));
        }
        if self.mounts.len() >= MAX_MOUNTS {
            return Err(ReqError::TooLarge(format!("more than {} mounts", MAX_MOUNTS)));
        }
        self.mounts.insert(id, Mount { tag: tag_s, read_only, conn: None, job: None });
        match path {
            Some(pth) if !pth.is_empty() => self.attach(io, id, &pth, false, Reply::Mounted)?,
            _ => io.send_record(ty::MOUNTED, id, mounted_record(None)),
        }
        Ok(())
    }

    /// Mounts the tag of stream `id` on `dir` (created if missing) and
    /// answers `reply` (now, or when the submounts are placed).
    fn attach(&mut self, io: &mut Io, id: u32, dir: &[u8], read_only: bool, reply: Reply) -> Result<(), ReqError> {
        let m = self.mounts.get_mut(&id).ok_or_else(|| ReqError::NotFound("no such mount".into()))?;
        if dir.first() != Some(&b'/') || dir.contains(&0) {
            return Err(ReqError::BadRequest(format!("mount point {:?} is not an absolute path", String::from_utf8_lossy(dir))));
        }
        if m.job.is_some() {
            return Err(ReqError::BadRequest(format!("{} is still being mounted", m.tag)));
        }
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(dir));
        if let Some(c) = &m.conn {
            // The same mount again (warmup mounted it; the restored VM has it): done.
            if c.path == path {
                Self::finish(io, id, reply, &path, Vec::new());
                return Ok(());
            }
            return Err(ReqError::BadRequest(format!("{} is already mounted on {}", m.tag, c.path.display())));
        }
        // Making the mount point would walk a mount this loop serves.
        if fuse::under_active(dir) {
            return Err(ReqError::BadRequest(format!("{} is inside another mount of this VM: mount {} outside it", path.display(), m.tag)));
        }
        std::fs::create_dir_all(&path).map_err(|e| ReqError::from_io(&format!("create mount point {}", path.display()), &e))?;
        // What the mount will cover: handles on the roots of the mounts
        // below `dir`, taken while they are still reachable.
        let covered_dev = std::fs::metadata(&path).map(|m| m.dev()).map_err(|e| ReqError::from_io(&format!("stat {}", path.display()), &e))?;
        let mut subs: Vec<(PathBuf, File)> = Vec::new();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for rel in submounts_below(&info, &path).into_iter().take(MAX_SUBMOUNTS) {
            match dir_handle(&path.join(&rel)) {
                Ok(f) => subs.push((rel, f)),
                Err(e) => log!("mount {}: {} stays hidden: {}", m.tag, path.join(&rel).display(), e),
            }
        }
        let dev = FuseDevice::open().map_err(|e| ReqError::from_io("open /dev/fuse", &e))?;
        dev.set_nonblocking().map_err(|e| ReqError::from_io("/dev/fuse O_NONBLOCK", &e))?;
        let writer = dev.try_clone().map_err(|e| ReqError::from_io("dup /dev/fuse", &e))?;
        // The loop's end and the thread's end of the job's socket pair.
        let pair = if subs.is_empty() {
            None
        } else {
            let (a, b) = UnixStream::pair().map_err(|e| ReqError::from_io("socketpair", &e))?;
            a.set_nonblocking(true).map_err(|e| ReqError::from_io("socketpair O_NONBLOCK", &e))?;
            Some((a, b))
        };
        dev.mount(&m.tag, &path, m.read_only || read_only).map_err(|e| ReqError::from_io(&format!("mount {} on {}", m.tag, path.display()), &e))?;
        let (tx, rx) = sync_channel::<Vec<u8>>(NOTIFY_QUEUE);
        let spawned = std::thread::Builder::new().name("fuse-notify".into()).spawn(move || {
            let mut w = writer;
            for msg in rx {
                if let Err(e) = w.write_message(&msg) {
                    if e.raw_os_error() == Some(ENODEV) {
                        break;
                    }
                }
            }
        });
        if let Err(e) = spawned {
            let _ = fuse::unmount(&path);
            return Err(ReqError::from_io("start the notification writer", &e));
        }
        io.add(dev.fd(), sys::EPOLLIN, token(TK_FUSE, id, 0));
        fuse::register_active(&path);
        m.conn = Some(Conn { dev, path: path.clone(), pending: HashMap::new(), notify: tx, paused: false, init_unique: None });
        let (sock, mut tsock) = match pair {
            Some(p) => p,
            None => {
                io.send_record(ty::MOUNTED, id, mounted_record(Some(&path)));
                Self::finish(io, id, reply, &path, Vec::new());
                return Ok(());
            }
        };
        // Mounted and served from here on; the submounts follow.
        io.send_record(ty::MOUNTED, id, mounted_record(Some(&path)).bool(tag::mounted::SETTLING, true));
        let tdir = path.clone();
        let spawned = std::thread::Builder::new().name("mount-place".into()).spawn(move || {
            let errors = place_submounts(&tdir, covered_dev, subs);
            let _ = tsock.write_all(errors.join("\n").as_bytes());
        });
        if let Err(e) = spawned {
            Self::finish(io, id, reply, &path, vec![format!("start the thread that places the mounts below {}: {}", path.display(), e)]);
            return Ok(());
        }
        io.add(sock.as_raw_fd(), sys::EPOLLIN, token(TK_MOUNT_JOB, id, 0));
        m.job = Some(Job { sock, report: Vec::new(), reply });
        Ok(())
    }

    /// A mount is complete: the final MOUNTED, or the intercepted exec's
    /// output and exit (32, mount(8)'s "mount failure", when something
    /// below the mount could not be placed back on top).
    fn finish(io: &mut Io, id: u32, reply: Reply, path: &Path, errors: Vec<String>) {
        for e in &errors {
            log!("mount on {}: {}", path.display(), e);
        }
        match reply {
            Reply::Mounted => io.send_record(ty::MOUNTED, id, mounted_record(Some(path))),
            Reply::Exec { exec_id, dir } => Self::exec_done(io, exec_id, &dir, &errors),
        }
    }

    /// Ends an intercepted `mount DIR` exec: each error as a `mount: DIR:`
    /// line on stderr, then exit 0, or 32 (mount(8)'s "mount failure") when
    /// there were errors.
    fn exec_done(io: &mut Io, exec_id: u32, dir: &[u8], errors: &[String]) {
        let d = String::from_utf8_lossy(dir);
        for e in errors {
            io.send(ty::DATA, 2, exec_id, format!("mount: {}: {}\n", d, e).as_bytes());
        }
        io.send(ty::EOF, 1, exec_id, &[]);
        io.send(ty::EOF, 2, exec_id, &[]);
        let code = if errors.is_empty() { 0 } else { 32 };
        io.send_record(ty::EXIT, exec_id, Record::new().i32(tag::exit::EXIT_CODE, code).bool(tag::exit::TIMED_OUT, false));
    }

    /// The job socket of mount `id` is readable: collect the report; at its
    /// end (the thread closed its side) finish the mount.
    pub fn job_event(&mut self, io: &mut Io, id: u32) {
        let m = match self.mounts.get_mut(&id) {
            Some(m) => m,
            None => return,
        };
        let done = match m.job.as_mut() {
            None => return,
            Some(j) => {
                let mut buf = [0u8; 4096];
                loop {
                    match j.sock.read(&mut buf) {
                        Ok(0) => break true,
                        Ok(n) => {
                            let room = MAX_JOB_REPORT.saturating_sub(j.report.len());
                            j.report.extend_from_slice(&buf[..n.min(room)]);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break true,
                    }
                }
            }
        };
        if !done {
            return;
        }
        let j = match m.job.take() {
            Some(j) => j,
            None => return,
        };
        io.remove(j.sock.as_raw_fd());
        let errors: Vec<String> = String::from_utf8_lossy(&j.report).lines().filter(|l| !l.is_empty()).map(|l| l.to_string()).collect();
        // Detached meanwhile (no connection): the mount's answer went out then.
        if let Some(p) = m.conn.as_ref().map(|c| c.path.clone()) {
            Self::finish(io, id, j.reply, &p, errors);
        }
    }

    /// Ends the FUSE connection of `m` (not the registration): pending
    /// requests get EIO, the mount is detached, the descriptors closed.
    fn detach(io: &mut Io, m: &mut Mount) -> bool {
        if let Some(j) = m.job.take() {
            io.remove(j.sock.as_raw_fd());
            // The thread finds the mount gone (or its binds go with it).
            if let Reply::Exec { exec_id, dir } = j.reply {
                Self::exec_done(io, exec_id, &dir, &["unmounted while it was being mounted".to_string()]);
            }
        }
        let mut c = match m.conn.take() {
            Some(c) => c,
            None => return false,
        };
        for (unique, _) in c.pending.drain() {
            let _ = c.dev.write_message(&eio_reply(unique));
        }
        io.remove(c.dev.fd());
        fuse::unregister_active(&c.path);
        if let Err(e) = fuse::unmount(&c.path) {
            // EINVAL: the guest unmounted it itself.
            if e.raw_os_error() != Some(22) {
                log!("unmount {}: {}", c.path.display(), e);
            }
        }
        true
    }

    /// CANCEL of a MOUNT stream: unmount, forget the tag, answer OK.
    pub fn cancel(&mut self, io: &mut Io, id: u32) {
        if let Some(mut m) = self.mounts.remove(&id) {
            Self::detach(io, &mut m);
            io.send_record(ty::OK, id, Record::new());
        }
    }

    /// A new session: the old host's file servers are gone.
    pub fn reset(&mut self, io: &mut Io) {
        for (_, mut m) in self.mounts.drain() {
            Self::detach(io, &mut m);
        }
    }

    /// /dev/fuse of stream `id` is readable.
    pub fn event(&mut self, io: &mut Io, id: u32) {
        let now = sys::monotonic_ms();
        let mut gone = false;
        {
            let m = match self.mounts.get_mut(&id) {
                Some(m) => m,
                None => return,
            };
            let c = match m.conn.as_mut() {
                Some(c) => c,
                None => return,
            };
            while c.pending.len() < MAX_IN_FLIGHT {
                match c.dev.read_request(&mut self.buf) {
                    Ok(n) => {
                        let h = match InHeader::parse(&self.buf[..n]) {
                            Ok(h) => h,
                            Err(_) => continue,
                        };
                        if h.expects_reply() {
                            c.pending.insert(h.unique, now + REPLY_DEADLINE_MS);
                        }
                        if h.opcode == fuse::FUSE_INIT {
                            c.init_unique = Some(h.unique);
                        }
                        io.send(ty::FUSE, 0, id, &self.buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.raw_os_error() == Some(ENODEV) => {
                        gone = true;
                        break;
                    }
                    Err(e) => {
                        log!("read /dev/fuse ({}): {}", m.tag, e);
                        gone = true;
                        break;
                    }
                }
            }
            if !gone && c.pending.len() >= MAX_IN_FLIGHT && !c.paused {
                c.paused = true;
                io.modify(c.dev.fd(), 0, token(TK_FUSE, id, 0));
            }
        }
        if gone {
            // Unmounted in the guest (umount): the tag stays registered.
            if let Some(m) = self.mounts.get_mut(&id) {
                Self::detach(io, m);
            }
            io.send_record(ty::MOUNTED, id, mounted_record(None));
        }
    }

    /// A FUSE frame from the host: a reply (flags 0) or a notification (flags 1).
    pub fn message(&mut self, io: &mut Io, id: u32, flags: u8, p: &[u8]) {
        let c = match self.mounts.get_mut(&id).and_then(|m| m.conn.as_mut()) {
            Some(c) => c,
            None => return,
        };
        if fuse::check_out_message(p).is_err() {
            log!("bad FUSE message from the host ({} bytes): dropped", p.len());
            return;
        }
        if flags == 1 {
            let _ = c.notify.try_send(p.to_vec());
            return;
        }
        let mut u = [0u8; 8];
        u.copy_from_slice(&p[8..16]);
        let unique = u64::from_le_bytes(u);
        // A reply the agent already answered (EIO after the deadline) is late.
        if c.pending.remove(&unique).is_none() {
            return;
        }
        if let Err(e) = c.dev.write_message(p) {
            log!("write reply to /dev/fuse: {}", e);
        }
        if c.init_unique == Some(unique) {
            // The kernel applied INIT (and its read-ahead) in that write.
            c.init_unique = None;
            set_read_ahead(&c.path, READ_AHEAD_KB);
        }
        if c.paused && c.pending.len() < MAX_IN_FLIGHT {
            c.paused = false;
            io.modify(c.dev.fd(), sys::EPOLLIN, token(TK_FUSE, id, 0));
            self.event(io, id);
        }
    }

    /// Answers EIO for every request past its deadline.
    pub fn check_deadlines(&mut self, io: &mut Io, now: u64) {
        let mut rearm = Vec::new();
        for (id, m) in self.mounts.iter_mut() {
            if let Some(c) = m.conn.as_mut() {
                let late: Vec<u64> = c.pending.iter().filter(|(_, d)| **d <= now).map(|(u, _)| *u).collect();
                for u in late {
                    c.pending.remove(&u);
                    log!("mount {}: no reply from the host within {} ms: EIO", m.tag, REPLY_DEADLINE_MS);
                    let _ = c.dev.write_message(&eio_reply(u));
                }
                if c.paused && c.pending.len() < MAX_IN_FLIGHT {
                    c.paused = false;
                    io.modify(c.dev.fd(), sys::EPOLLIN, token(TK_FUSE, *id, 0));
                    rearm.push(*id);
                }
            }
        }
        for id in rearm {
            self.event(io, id);
        }
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.mounts.values().filter_map(|m| m.conn.as_ref()).flat_map(|c| c.pending.values().copied()).min()
    }

    /// EXEC of `mount -t virtiofs TAG DIR`: performed here (Debian images
    /// have no mount binary, and no virtio-fs device exists). Returns false
    /// when the request is not such a command (the exec runs as usual).
    pub fn intercept_exec(&mut self, io: &mut Io, id: u32, p: &[u8]) -> bool {
        let mut argv: Vec<&[u8]> = Vec::new();
        let mut report_started = false;
        for f in proto::fields(p) {
            match f {
                Ok((tag::exec::ARGV, v)) => argv.push(v),
                Ok((tag::exec::REPORT_STARTED, v)) => report_started = v == [1],
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        let cmd = match parse_mount_command(&argv) {
            Some(c) => c,
            None => return false,
        };
        let found = self.mounts.iter().find(|(_, m)| m.tag == cmd.tag).map(|(k, _)| *k);
        if report_started {
            io.send_record(ty::STARTED, id, Record::new().u32(tag::started::PID, 0));
        }
        let result = match found {
            Some(mid) => self.attach(io, mid, &cmd.dir, cmd.read_only, Reply::Exec { exec_id: id, dir: cmd.dir.clone() }).map_err(req_message),
            None => {
                let mut tags: Vec<&str> = self.mounts.values().map(|m| m.tag.as_str()).collect();
                tags.sort();
                Err(format!("no mount with tag {} is configured for this VM (mounts option: {})", cmd.tag, if tags.is_empty() { "none".to_string() } else { tags.join(", ") }))
            }
        };
        // Success is answered by attach (at once, or when the job ends).
        if let Err(msg) = result {
            Self::exec_done(io, id, &cmd.dir, &[msg]);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&'static str]) -> Vec<&'static [u8]> {
        s.iter().map(|a| a.as_bytes()).collect()
    }

    #[test]
    fn recognises_the_seeds_mount_command() {
        let c = parse_mount_command(&argv(&["mount", "-t", "virtiofs", "workspace", "/workspace"])).unwrap();
        assert_eq!(c, MountCommand { tag: "workspace".into(), dir: b"/workspace".to_vec(), read_only: false });
        let c = parse_mount_command(&argv(&["/bin/mount", "-tvirtiofs", "-o", "ro,noatime", "src", "/src"])).unwrap();
        assert!(c.read_only);
        assert!(parse_mount_command(&argv(&["/usr/bin/mount", "--types=virtiofs", "a", "/b"])).is_some());
        assert!(parse_mount_command(&argv(&["mount", "-t", "ext4", "/dev/vdb", "/data"])).is_none());
        assert!(parse_mount_command(&argv(&["mount", "-t", "virtiofs", "onlytag"])).is_none());
        assert!(parse_mount_command(&argv(&["sh", "-c", "mount -t virtiofs a /b"])).is_none());
        assert!(parse_mount_command(&argv(&["mount", "-a"])).is_none());
        assert!(parse_mount_command(&argv(&["umount", "-t", "virtiofs", "a", "/b"])).is_none());
        assert!(parse_mount_command(&argv(&["mount", "-t"])).is_none());
    }

    #[test]
    fn finds_the_outermost_mounts_below_a_path() {
        let info = "\
22 1 0:20 / / rw - overlay overlay rw
30 22 254:16 / /work/node_modules rw,nodev - ext4 /dev/vdb rw
31 30 0:40 / /work/node_modules/.cache rw - tmpfs tmpfs rw
32 22 0:41 / /workspace rw - tmpfs tmpfs rw
33 22 0:42 / /work rw - tmpfs tmpfs rw
34 22 254:32 / /work/my\\040dir rw - ext4 /dev/vdc rw
35 22 0:43 / /work2/x rw - tmpfs tmpfs rw
";
        let subs = submounts_below(info, Path::new("/work"));
        assert_eq!(subs, vec![PathBuf::from("node_modules"), PathBuf::from("my dir")]);
        assert!(submounts_below(info, Path::new("/srv")).is_empty());
        // A nested mount seen before its parent is replaced by the parent.
        let info2 = "40 1 0:1 / /a/b/c rw - tmpfs t rw\n41 1 0:2 / /a/b rw - tmpfs t rw\n";
        assert_eq!(submounts_below(info2, Path::new("/a")), vec![PathBuf::from("b")]);
        assert_eq!(unescape_mountinfo("x\\134y\\011"), b"x\\y\t".to_vec());
        let info3 = "50 1 0:44 / /work rw - tmpfs tmpfs rw\n51 1 0:45 / /work rw,nosuid,nodev - fuse src rw,user_id=0\n";
        assert_eq!(fuse_device_at(info3, Path::new("/work")), Some("0:45".to_string()));
        assert_eq!(fuse_device_at(info3, Path::new("/wor")), None);
        assert_eq!(unescape_mountinfo("end\\04"), b"end\\04".to_vec());
    }

    #[test]
    fn eio_reply_is_a_valid_out_header() {
        let r = eio_reply(77);
        fuse::check_out_message(&r).unwrap();
        assert_eq!(i32::from_le_bytes([r[4], r[5], r[6], r[7]]), -EIO);
        assert_eq!(u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]), 77);
    }
}
