//! The session service: HELLO (version negotiation, features, boot report)
//! and CONFIGURE (the image's defaults for every exec, identity of this VM:
//! hostname, clock, entropy, machine-id, boot_id).

use crate::io::{Io, ReqError};
use crate::proto::{self, tag, ty, Record};
use crate::service::net::{NetConfig, NetService};
use crate::sys;
use crate::AGENT_VERSION;
use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;

/// The defaults CONFIGURE sets for the processes the other services start.
pub struct Session {
    pub env: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
    pub user: Vec<u8>,
    boot_error: Option<String>,
}

impl Session {
    pub fn new(boot_error: Option<String>) -> Session {
        Session {
            env: vec![b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_vec()],
            cwd: b"/".to_vec(),
            user: Vec::new(),
            boot_error,
        }
    }

    /// HELLO: the caller has already reset every service for the new session.
    pub fn hello(&mut self, io: &mut Io, p: &[u8], cgroups: bool, ring: bool) {
        let mut magic_ok = false;
        let (mut min, mut max) = (0u32, 0u32);
        for f in proto::fields(p) {
            let (t, v) = match f {
                Ok(x) => x,
                Err(_) => break,
            };
            match t {
                tag::hello::MAGIC => magic_ok = v == proto::MAGIC,
                tag::hello::MIN_VERSION => min = proto::val_u32(t, v).unwrap_or(0),
                tag::hello::MAX_VERSION => max = proto::val_u32(t, v).unwrap_or(0),
                _ => {}
            }
        }
        if !magic_ok || min > proto::PROTOCOL_VERSION || max < proto::PROTOCOL_VERSION {
            io.send_error(
                0,
                ReqError::Unsupported(format!(
                    "agent {} speaks protocol {}, host offered {}..{}",
                    AGENT_VERSION,
                    proto::PROTOCOL_VERSION,
                    min,
                    max
                )),
            );
            return;
        }
        let mut r = Record::new()
            .bytes(tag::hello_ack::MAGIC, proto::MAGIC)
            .u32(tag::hello_ack::VERSION, proto::PROTOCOL_VERSION)
            .bytes(tag::hello_ack::AGENT_VERSION, AGENT_VERSION.as_bytes());
        let mut features = vec!["exec", "files", "tcp", "tty", "workload", "snapshot", "net", "freeze", "mounts", "logs"];
        if cgroups {
            features.push("cgroup");
        }
        if ring {
            features.push("ring");
        }
        for f in features {
            r = r.bytes(tag::hello_ack::FEATURE, f.as_bytes());
        }
        r = r.u32(tag::hello_ack::MAX_PAYLOAD, proto::MAX_PAYLOAD as u32);
        if let Some(e) = &self.boot_error {
            r = r.bytes(tag::hello_ack::BOOT_ERROR, e.as_bytes());
        }
        io.send_record(ty::HELLO_ACK, 0, r);
    }

    /// CONFIGURE. The network fields go to `net` (applied after the others,
    /// so that /etc/hosts names the hostname of this same frame).
    pub fn configure(&mut self, net: &mut NetService, p: &[u8]) -> Result<Record, ReqError> {
        let mut env: Option<Vec<Vec<u8>>> = None;
        let mut net_config = NetConfig::default();
        let mut hostname: Option<Vec<u8>> = None;
        let mut boot_id: Option<Vec<u8>> = None;
        for f in proto::fields(p) {
            let (t, v) = f?;
            if net_config.field(t, v)? {
                continue;
            }
            match t {
                tag::configure::ENV => env.get_or_insert_with(Vec::new).push(v.to_vec()),
                tag::configure::CWD => {
                    // As Docker does: the image's WorkingDir exists in the container.
                    use std::os::unix::ffi::OsStrExt;
                    let _ = fs::create_dir_all(std::ffi::OsStr::from_bytes(v));
                    self.cwd = v.to_vec();
                }
                tag::configure::USER => self.user = v.to_vec(),
                tag::configure::HOSTNAME => {
                    crate::init::set_hostname(v).map_err(|e| ReqError::from_io("sethostname", &e))?;
                    hostname = Some(v.to_vec());
                    let mut line = v.to_vec();
                    line.push(b'\n');
                    let _ = crate::etcfiles::write("/etc/hostname", &line);
                }
                tag::configure::TIME_NS => {
                    let ns = proto::val_u64(t, v)?;
                    let ts = sys::Timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 };
                    sys::cvt(unsafe { sys::clock_settime(sys::CLOCK_REALTIME, &ts) })
                        .map_err(|e| ReqError::from_io("clock_settime", &e))?;
                }
                tag::configure::ENTROPY => add_entropy(v).map_err(|e| ReqError::from_io("RNDADDENTROPY", &e))?,
                tag::configure::MACHINE_ID => {
                    let mut line = v.to_vec();
                    line.push(b'\n');
                    crate::etcfiles::write("/etc/machine-id", &line).map_err(|e| ReqError::from_io("/etc/machine-id", &e))?;
                }
                tag::configure::BOOT_ID => {
                    set_boot_id(v).map_err(|e| ReqError::from_io("boot_id", &e))?;
                    boot_id = Some(v.to_vec());
                }
                _ => {}
            }
        }
        if let Some(env) = env {
            self.env = env;
        }
        net_config.check()?;
        let hostname = match hostname {
            Some(h) => h,
            None => fs::read("/proc/sys/kernel/hostname").unwrap_or_default().into_iter().filter(|b| !b.is_ascii_whitespace()).collect(),
        };
        net.apply(&net_config, &hostname)?;
        // The one this frame set, else what the guest reads now (one file
        // read less on the restore path).
        let boot_id = match boot_id {
            Some(b) => b,
            None => fs::read("/proc/sys/kernel/random/boot_id").unwrap_or_default().into_iter().filter(|b| !b.is_ascii_whitespace()).collect(),
        };
        Ok(Record::new().bytes(tag::configure_ok::BOOT_ID, &boot_id))
    }
}

fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > 512 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "entropy over 512 bytes"));
    }
    let c = CString::new("/dev/urandom").unwrap();
    let fd = sys::open_path(&c, sys::O_RDWR, 0)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_le_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_le_bytes());
    info.extend_from_slice(bytes);
    while info.len() % 4 != 0 {
        info.push(0);
    }
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::RNDADDENTROPY, info.as_ptr()) })?;
    sys::cvt(unsafe { sys::ioctl(fd.raw(), sys::RNDRESEEDCRNG) })?;
    Ok(())
}

/// Gives the VM its own boot_id: a file bind-mounted over the kernel's.
fn set_boot_id(id: &[u8]) -> io::Result<()> {
    if id.len() != 36 || !id.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "boot_id must be a 36-character UUID"));
    }
    let _ = fs::create_dir_all("/run/supermachine");
    let mut line = id.to_vec();
    line.push(b'\n');
    let path = "/run/supermachine/boot_id";
    let already = Path::new(path).exists();
    fs::write(path, &line)?;
    if !already {
        crate::init::mount(path, "/proc/sys/kernel/random/boot_id", "", sys::MS_BIND, "")?;
    }
    Ok(())
}

