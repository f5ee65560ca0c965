//! Guest half of mounts (docs/mounts.md): opens /dev/fuse, mounts a FUSE
//! filesystem served by the host's FuseServer, and moves raw FUSE messages
//! between /dev/fuse and the protocol unchanged. The agent never interprets
//! a request beyond its header: the host file server is the security
//! boundary and answers every request.
//!
//! Used by crate::service::mounts: it opens a `FuseDevice`, mounts it,
//! makes it non-blocking, reads requests with `read_request` from its epoll
//! loop, forwards them, and writes each host reply (and, from a thread of
//! its own, each notification) with `write_message`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::raw::{c_char, c_int, c_ulong, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

extern "C" {
    fn mount(src: *const c_char, target: *const c_char, fstype: *const c_char, flags: c_ulong, data: *const c_void) -> c_int;
    fn umount2(target: *const c_char, flags: c_int) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
}

const F_GETFL: c_int = 3;
const F_SETFL: c_int = 4;
const O_NONBLOCK: c_int = 0x800;

const O_CLOEXEC: c_int = 0x80000;
const MS_RDONLY: c_ulong = 1;
const MS_NOSUID: c_ulong = 2;
const MS_NODEV: c_ulong = 4;
const MNT_DETACH: c_int = 2;

/// Size of fuse_in_header.
pub const IN_HEADER_SIZE: usize = 40;
/// Size of fuse_out_header.
pub const OUT_HEADER_SIZE: usize = 16;
/// max_write the host announces in INIT (src/mounts/server.ts MAX_WRITE_BYTES).
pub const MAX_WRITE: usize = 128 * 1024;
/// A read of /dev/fuse must offer at least max_write + headers (the kernel
/// answers EINVAL otherwise); a page more keeps every request whole.
pub const REQUEST_BUFFER_SIZE: usize = MAX_WRITE + 4096;
/// Largest message the host may send back (one protocol frame payload).
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// The opcodes the kernel expects no reply to.
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_BATCH_FORGET: u32 = 42;

/// The header fields the agent looks at (routing and logging only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    /// Parses a request's header and checks its length matches `buf`.
    pub fn parse(buf: &[u8]) -> io::Result<InHeader> {
        if buf.len() < IN_HEADER_SIZE {
            return Err(invalid("FUSE request shorter than its header"));
        }
        let h = InHeader {
            len: u32_at(buf, 0),
            opcode: u32_at(buf, 4),
            unique: u64_at(buf, 8),
            nodeid: u64_at(buf, 16),
        };
        if h.len as usize != buf.len() {
            return Err(invalid("FUSE request length does not match its header"));
        }
        Ok(h)
    }

    /// True when the kernel expects no reply (the host answers none either).
    pub fn expects_reply(&self) -> bool {
        !matches!(self.opcode, FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT)
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Where FUSE file systems served by this agent are mounted now. The agent
/// serves them from its own event loop, so the agent itself must never
/// touch a path under one synchronously (a stat there would wait for an
/// answer only the blocked loop could forward): exec moves such work into
/// the child (`--sm-exec`), file transfers refuse such paths.
static ACTIVE_MOUNTS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

pub fn register_active(p: &Path) {
    if let Ok(mut v) = ACTIVE_MOUNTS.lock() {
        v.push(p.to_path_buf());
    }
}

pub fn unregister_active(p: &Path) {
    if let Ok(mut v) = ACTIVE_MOUNTS.lock() {
        v.retain(|x| x != p);
    }
}

/// Is `path` (absolute, as bytes) on a FUSE mount this agent serves?
pub fn under_active(path: &[u8]) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let v = match ACTIVE_MOUNTS.lock() {
        Ok(v) => v,
        Err(_) => return false,
    };
    v.iter().any(|m| {
        let m = m.as_os_str().as_bytes();
        path.starts_with(m) && (path.len() == m.len() || path[m.len()] == b'/' || m == b"/")
    })
}

/// Whether any FUSE mount is active.
pub fn any_active() -> bool {
    ACTIVE_MOUNTS.lock().map(|v| !v.is_empty()).unwrap_or(false)
}

/// Options of one FUSE mount, as mount(2) data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The /dev/fuse descriptor serving the mount.
    pub fd: RawFd,
    /// File type and mode of the root (S_IFDIR = 0o40000, in octal in the string).
    pub rootmode: u32,
    /// Owner of the mount (who may unmount it); root here.
    pub user_id: u32,
    pub group_id: u32,
    /// Let every guest user in, not only `user_id`.
    pub allow_other: bool,
    /// Let the guest kernel check modes against the attributes the host reports.
    pub default_permissions: bool,
    /// Largest read request, in bytes (None: the kernel's default, bounded by max_pages).
    pub max_read: Option<u32>,
}

impl MountOptions {
    /// The options every supermachine mount uses.
    pub fn new(fd: RawFd) -> MountOptions {
        MountOptions {
            fd,
            rootmode: 0o40000,
            user_id: 0,
            group_id: 0,
            allow_other: true,
            default_permissions: true,
            max_read: None,
        }
    }

    /// "fd=N,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions".
    pub fn to_data(&self) -> String {
        let mut s = format!("fd={},rootmode={:o},user_id={},group_id={}", self.fd, self.rootmode, self.user_id, self.group_id);
        if self.allow_other {
            s.push_str(",allow_other");
        }
        if self.default_permissions {
            s.push_str(",default_permissions");
        }
        if let Some(m) = self.max_read {
            s.push_str(&format!(",max_read={}", m));
        }
        s
    }
}

/// Is `tag` acceptable as a mount source (the host's guestTag rule)?
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 36
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'_' || *c == b'-')
}

/// One open /dev/fuse: a FUSE connection once mounted.
pub struct FuseDevice {
    file: File,
}

impl FuseDevice {
    /// Opens /dev/fuse (the `fuse` module must be loaded).
    pub fn open() -> io::Result<FuseDevice> {
        let file = OpenOptions::new().read(true).write(true).custom_flags(O_CLOEXEC).open("/dev/fuse")?;
        Ok(FuseDevice { file })
    }

    /// Wraps another file (tests: a regular file or a pipe stands in for /dev/fuse).
    pub fn from_file(file: File) -> FuseDevice {
        FuseDevice { file }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads return WouldBlock instead of waiting (the agent's epoll loop).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.fd();
        let fl = unsafe { fcntl(fd, F_GETFL) };
        if fl < 0 || unsafe { fcntl(fd, F_SETFL, fl | O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A second descriptor of the same connection (for the notification writer).
    pub fn try_clone(&self) -> io::Result<FuseDevice> {
        Ok(FuseDevice { file: self.file.try_clone()? })
    }

    /// Mounts this connection on `target` (which must exist), with `tag` as
    /// the source shown in /proc/mounts. nosuid and nodev always: host files
    /// must not become set-id programs or devices in the guest.
    pub fn mount(&self, tag: &str, target: &Path, read_only: bool) -> io::Result<()> {
        if !valid_tag(tag) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad mount tag {:?}", tag)));
        }
        let src = cstring(tag.as_bytes())?;
        let dst = cstring(target.as_os_str().as_bytes())?;
        let fstype = cstring(b"fuse")?;
        let data = cstring(MountOptions::new(self.fd()).to_data().as_bytes())?;
        let mut flags = MS_NOSUID | MS_NODEV;
        if read_only {
            flags |= MS_RDONLY;
        }
        let rc = unsafe { mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), flags, data.as_ptr() as *const c_void) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one whole request into `buf` (at least REQUEST_BUFFER_SIZE
    /// bytes) and returns its length. Retries EINTR and ENOENT (a request
    /// interrupted before it was read). ENODEV means the filesystem was
    /// unmounted: the connection is over.
    pub fn read_request(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.len() < REQUEST_BUFFER_SIZE {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "FUSE read buffer smaller than REQUEST_BUFFER_SIZE"));
        }
        loop {
            match self.file.read(buf) {
                Ok(n) => {
                    InHeader::parse(&buf[..n])?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.raw_os_error() == Some(2) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one reply or notification from the host, whole, in one
    /// write(2) as the kernel requires. Checks the header's length against
    /// the message first (the host is trusted less than nothing here: a bad
    /// message is refused, not written). ENOENT from the kernel (the request
    /// was interrupted or aborted meanwhile) is not an error.
    pub fn write_message(&mut self, msg: &[u8]) -> io::Result<()> {
        check_out_message(msg)?;
        match self.file.write(msg) {
            Ok(n) if n == msg.len() => Ok(()),
            Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, "short write to /dev/fuse")),
            Err(e) if e.raw_os_error() == Some(2) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A reply or notification must be a fuse_out_header whose len is the
/// message's length, at most MAX_MESSAGE bytes.
pub fn check_out_message(msg: &[u8]) -> io::Result<()> {
    if msg.len() < OUT_HEADER_SIZE || msg.len() > MAX_MESSAGE {
        return Err(invalid("FUSE reply size out of range"));
    }
    if u32_at(msg, 0) as usize != msg.len() {
        return Err(invalid("FUSE reply length does not match its header"));
    }
    Ok(())
}

/// Detaches a mount (before a snapshot; the host re-attaches after restore).
pub fn unmount(target: &Path) -> io::Result<()> {
    let dst = cstring(target.as_os_str().as_bytes())?;
    if unsafe { umount2(dst.as_ptr(), MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b.to_vec()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a mount argument"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    #[test]
    fn option_string_is_what_fuse_ko_parses() {
        assert_eq!(
            MountOptions::new(7).to_data(),
            "fd=7,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
        );
        let mut o = MountOptions::new(12);
        o.allow_other = false;
        o.default_permissions = false;
        o.max_read = Some(131072);
        o.user_id = 1000;
        o.group_id = 100;
        assert_eq!(o.to_data(), "fd=12,rootmode=40000,user_id=1000,group_id=100,max_read=131072");
    }

    #[test]
    fn tags() {
        assert!(valid_tag("workspace"));
        assert!(valid_tag("src-1.b_c"));
        assert!(!valid_tag(""));
        assert!(!valid_tag("-x"));
        assert!(!valid_tag("a/b"));
        assert!(!valid_tag("a,fd=3"));
        assert!(!valid_tag(&"x".repeat(37)));
    }

    fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; IN_HEADER_SIZE];
        let len = (IN_HEADER_SIZE + body.len()) as u32;
        v[0..4].copy_from_slice(&len.to_le_bytes());
        v[4..8].copy_from_slice(&opcode.to_le_bytes());
        v[8..16].copy_from_slice(&unique.to_le_bytes());
        v[16..24].copy_from_slice(&1u64.to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_parse_and_reply_expectation() {
        let r = request(1, 99, b"name\0");
        let h = InHeader::parse(&r).unwrap();
        assert_eq!(h, InHeader { len: 45, opcode: 1, unique: 99, nodeid: 1 });
        assert!(h.expects_reply());
        assert!(!InHeader::parse(&request(FUSE_FORGET, 1, &[0; 8])).unwrap().expects_reply());
        assert!(!InHeader::parse(&request(FUSE_BATCH_FORGET, 1, &[0; 8])).unwrap().expects_reply());
        assert!(InHeader::parse(&r[..30]).is_err());
        assert!(InHeader::parse(&r[..44]).is_err(), "length mismatch");
    }

    fn temp_file(name: &str) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("sm-fuse-test-{}-{}", std::process::id(), name));
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        (p, f)
    }

    #[test]
    fn read_request_and_write_message_move_bytes_unchanged() {
        let (p, mut f) = temp_file("rw");
        let r = request(3, 5, &[0u8; 16]);
        f.write_all(&r).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut dev = FuseDevice::from_file(f);
        let mut small = vec![0u8; 4096];
        assert!(dev.read_request(&mut small).is_err(), "a buffer the kernel would refuse");
        let mut buf = vec![0u8; REQUEST_BUFFER_SIZE];
        let n = dev.read_request(&mut buf).unwrap();
        assert_eq!(&buf[..n], &r[..]);

        let mut reply = vec![0u8; OUT_HEADER_SIZE + 8];
        let len = reply.len() as u32;
        reply[0..4].copy_from_slice(&len.to_le_bytes());
        reply[8..16].copy_from_slice(&5u64.to_le_bytes());
        dev.write_message(&reply).unwrap();
        let mut bad = reply.clone();
        bad[0] = 99;
        assert!(dev.write_message(&bad).is_err(), "a reply whose header lies is not written");
        assert!(dev.write_message(&reply[..8]).is_err());
        let written = std::fs::read(&p).unwrap();
        assert_eq!(&written[r.len()..], &reply[..]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn mount_refuses_bad_tags_before_mounting() {
        let (p, f) = temp_file("tag");
        let dev = FuseDevice::from_file(f);
        let e = dev.mount("bad,fd=0", Path::new("/nonexistent"), false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        std::fs::remove_file(&p).unwrap();
    }
}
