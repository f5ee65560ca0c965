//! The net service: the guest end of the VM's network, set from CONFIGURE
//! fields 9–14 (docs/protocol.md). No DHCP: the host's user-space stack owns
//! the addresses and sends them. Applying the same configuration again is a
//! no-op (CONFIGURE is re-sent after every snapshot restore).
//!
//! The interface is configured with the classic ioctls (SIOCSIFMTU,
//! SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFFLAGS, SIOCDELRT/SIOCADDRT), which the
//! kernel treats as no-ops when nothing changes.

use crate::io::ReqError;
use crate::proto::{self, tag};
use crate::sys::{self, Fd};
use std::fs;
use std::io;
use std::path::Path;

/// Largest `resolv_conf` the agent writes.
pub const MAX_RESOLV_CONF: usize = 4 * 1024;
/// Largest `hosts_file` the agent writes.
pub const MAX_HOSTS: usize = 64 * 1024;
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;

/// The network fields of one CONFIGURE, validated.
#[derive(Default, Debug, PartialEq)]
pub struct NetConfig {
    pub addr: Option<[u8; 4]>,
    pub prefix: Option<u32>,
    pub gateway: Option<[u8; 4]>,
    pub mtu: Option<u32>,
    pub resolv_conf: Option<Vec<u8>>,
    pub hosts: Option<Vec<u8>>,
}

fn ipv4(name: &str, v: &[u8]) -> Result<[u8; 4], ReqError> {
    if v.len() != 4 {
        return Err(ReqError::BadRequest(format!("{} must be 4 bytes (an IPv4 address), got {}", name, v.len())));
    }
    Ok([v[0], v[1], v[2], v[3]])
}

fn text(name: &str, v: &[u8], max: usize) -> Result<Vec<u8>, ReqError> {
    if v.len() > max {
        return Err(ReqError::TooLarge(format!("{} is {} bytes, over the limit of {}", name, v.len(), max)));
    }
    if v.contains(&0) {
        return Err(ReqError::BadRequest(format!("{} must not contain NUL bytes", name)));
    }
    Ok(v.to_vec())
}

impl NetConfig {
    /// Takes one CONFIGURE field. Returns false for a tag that is not ours.
    pub fn field(&mut self, t: u8, v: &[u8]) -> Result<bool, ReqError> {
        match t {
            tag::configure::NET_ADDR => self.addr = Some(ipv4("net_addr", v)?),
            tag::configure::NET_PREFIX => {
                let p = proto::val_u32(t, v)?;
                if p > 32 {
                    return Err(ReqError::BadRequest(format!("net_prefix {} is over 32", p)));
                }
                self.prefix = Some(p);
            }
            tag::configure::NET_GATEWAY => self.gateway = Some(ipv4("net_gateway", v)?),
            tag::configure::NET_MTU => {
                let m = proto::val_u32(t, v)?;
                if !(MIN_MTU..=MAX_MTU).contains(&m) {
                    return Err(ReqError::BadRequest(format!("net_mtu {} is outside {}..{}", m, MIN_MTU, MAX_MTU)));
                }
                self.mtu = Some(m);
            }
            tag::configure::RESOLV_CONF => self.resolv_conf = Some(text("resolv_conf", v, MAX_RESOLV_CONF)?),
            tag::configure::HOSTS_FILE => self.hosts = Some(text("hosts_file", v, MAX_HOSTS)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn touches_interface(&self) -> bool {
        self.addr.is_some() || self.prefix.is_some() || self.gateway.is_some() || self.mtu.is_some()
    }

    /// Field combinations that cannot be applied.
    pub fn check(&self) -> Result<(), ReqError> {
        if self.addr.is_some() != self.prefix.is_some() {
            return Err(ReqError::BadRequest("net_addr and net_prefix go together".into()));
        }
        if self.gateway.is_some() && self.addr.is_none() {
            return Err(ReqError::BadRequest("net_gateway needs net_addr and net_prefix".into()));
        }
        if let (Some(a), Some(p), Some(g)) = (self.addr, self.prefix, self.gateway) {
            let m = u32::from_be_bytes(netmask(p));
            if u32::from_be_bytes(a) & m != u32::from_be_bytes(g) & m {
                return Err(ReqError::BadRequest(format!(
                    "net_gateway {} is not in {}/{}",
                    dotted(g),
                    dotted(a),
                    p
                )));
            }
        }
        Ok(())
    }
}

pub fn netmask(prefix: u32) -> [u8; 4] {
    let m: u32 = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix.min(32)) };
    m.to_be_bytes()
}

fn dotted(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// /etc/hosts: the host's text, plus the lines a guest expects when the
/// host's text lacks them (localhost, and this VM's hostname).
pub fn hosts_content(given: &[u8], hostname: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(given);
    let names = |wanted: &[u8]| {
        text.lines().any(|l| {
            let l = l.split('#').next().unwrap_or("");
            l.split_whitespace().skip(1).any(|n| n.as_bytes() == wanted)
        })
    };
    let mut out = Vec::with_capacity(given.len() + 128);
    if !names(b"localhost") {
        out.extend_from_slice(b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    }
    out.extend_from_slice(given);
    if !given.is_empty() && !given.ends_with(b"\n") {
        out.push(b'\n');
    }
    if !hostname.is_empty() && !names(hostname) {
        out.extend_from_slice(b"127.0.1.1\t");
        out.extend_from_slice(hostname);
        out.push(b'\n');
    }
    out
}

/// Writes `path` whole through a temporary file and rename: a symlink the
/// image has there (e.g. /etc/resolv.conf → ../run/...) is replaced, not
/// followed.
fn replace_file(path: &str, bytes: &[u8]) -> io::Result<()> {
    let p = Path::new(path);
    if let Some(dir) = p.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = format!("{}.supermachine-tmp", path);
    let _ = fs::remove_file(&tmp);
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, p).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        e
    })
}

/// The first non-loopback Ethernet interface (ARPHRD_ETHER), by name.
fn find_interface() -> io::Result<Option<String>> {
    let mut names: Vec<String> = Vec::new();
    for e in fs::read_dir("/sys/class/net")? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ty = fs::read_to_string(e.path().join("type")).unwrap_or_default();
        if name != "lo" && ty.trim() == "1" && name.len() < 16 {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().next())
}

fn ifname(name: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    n[..name.len()].copy_from_slice(name.as_bytes());
    n
}

fn sockaddr(a: [u8; 4]) -> sys::SockaddrIn {
    sys::SockaddrIn { sin_family: sys::AF_INET as u16, sin_port: 0, sin_addr: u32::from_ne_bytes(a), sin_zero: [0; 8] }
}

fn rtentry(gateway: Option<[u8; 4]>) -> sys::Rtentry {
    sys::Rtentry {
        rt_pad1: 0,
        rt_dst: sockaddr([0; 4]),
        rt_gateway: sockaddr(gateway.unwrap_or([0; 4])),
        rt_genmask: sockaddr([0; 4]),
        rt_flags: sys::RTF_UP | if gateway.is_some() { sys::RTF_GATEWAY } else { 0 },
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    }
}

/// The interface fields of a NetConfig, as last applied.
type IfaceConfig = (Option<[u8; 4]>, Option<u32>, Option<[u8; 4]>, Option<u32>);

/// The guest's network interface; remembers its name once found, and what
/// it last applied (kept across a snapshot, like the rest of the agent).
pub struct NetService {
    iface: Option<String>,
    applied_iface: Option<IfaceConfig>,
    applied_resolv: Option<Vec<u8>>,
    applied_hosts: Option<Vec<u8>>,
}

impl NetService {
    pub fn new() -> NetService {
        NetService { iface: None, applied_iface: None, applied_resolv: None, applied_hosts: None }
    }

    /// Applies `c` (already checked). `hostname` is this VM's, for /etc/hosts.
    /// What equals the last configuration this agent applied is skipped: a
    /// restore re-sends the configuration the snapshot's VM already has,
    /// and under emulation each kernel path costs its translation again
    /// (docs/performance.md).
    pub fn apply(&mut self, c: &NetConfig, hostname: &[u8]) -> Result<(), ReqError> {
        if c.touches_interface() {
            let want: IfaceConfig = (c.addr, c.prefix, c.gateway, c.mtu);
            if self.applied_iface != Some(want) {
                self.applied_iface = None;
                self.configure_interface(c)?;
                self.applied_iface = Some(want);
            }
        }
        if let Some(r) = &c.resolv_conf {
            if self.applied_resolv.as_ref() != Some(r) {
                self.applied_resolv = None;
                replace_file("/etc/resolv.conf", r).map_err(|e| ReqError::from_io("write /etc/resolv.conf", &e))?;
                self.applied_resolv = Some(r.clone());
            }
        }
        if let Some(h) = &c.hosts {
            let content = hosts_content(h, hostname);
            if self.applied_hosts.as_ref() != Some(&content) {
                self.applied_hosts = None;
                crate::etcfiles::write("/etc/hosts", &content).map_err(|e| ReqError::from_io("write /etc/hosts", &e))?;
                self.applied_hosts = Some(content);
            }
        }
        Ok(())
    }

    fn configure_interface(&mut self, c: &NetConfig) -> Result<(), ReqError> {
        if self.iface.is_none() {
            self.iface = find_interface().map_err(|e| ReqError::from_io("list /sys/class/net", &e))?;
        }
        let name = match &self.iface {
            Some(n) => n.clone(),
            None => {
                return Err(ReqError::NotFound(
                    "the guest has no Ethernet interface (was the VM started with a network device and the virtio_net module?)".into(),
                ))
            }
        };
        let fd = sys::cvt(unsafe { sys::socket(sys::AF_INET, sys::SOCK_DGRAM | sys::SOCK_CLOEXEC, 0) })
            .map_err(|e| ReqError::from_io("socket for interface ioctls", &e))?;
        let fd = Fd(fd);
        let fail = |what: String| {
            let e = io::Error::last_os_error();
            ReqError::from_io(&what, &e)
        };
        if let Some(mtu) = c.mtu {
            let mut req = sys::IfreqAddr { ifr_name: ifname(&name), addr: sockaddr([0; 4]), _pad: [0; 8] };
            // ifr_mtu is the union's first int.
            let bytes = (mtu as i32).to_ne_bytes();
            req.addr.sin_family = u16::from_ne_bytes([bytes[0], bytes[1]]);
            req.addr.sin_port = u16::from_ne_bytes([bytes[2], bytes[3]]);
            if unsafe { sys::ioctl(fd.raw(), sys::SIOCSIFMTU, &mut req as *mut sys::IfreqAddr) } != 0 {
                return Err(fail(format!("set MTU {} on {} (SIOCSIFMTU)", mtu, name)));
            }
        }
        if let (Some(addr), Some(prefix)) = (c.addr, c.prefix) {
            let mut req = sys::IfreqAddr { ifr_name: ifname(&name), addr: sockaddr(addr), _pad: [0; 8] };
            if unsafe { sys::ioctl(fd.raw(), sys::SIOCSIFADDR, &mut req as *mut sys::IfreqAddr) } != 0 {
                return Err(fail(format!("set address {} on {} (SIOCSIFADDR)", dotted(addr), name)));
            }
            let mut req = sys::IfreqAddr { ifr_name: ifname(&name), addr: sockaddr(netmask(prefix)), _pad: [0; 8] };
            if unsafe { sys::ioctl(fd.raw(), sys::SIOCSIFNETMASK, &mut req as *mut sys::IfreqAddr) } != 0 {
                return Err(fail(format!("set prefix /{} on {} (SIOCSIFNETMASK)", prefix, name)));
            }
        }
        let mut req = sys::Ifreq { ifr_name: ifname(&name), ifr_flags: 0, _pad: [0; 22] };
        if unsafe { sys::ioctl(fd.raw(), sys::SIOCGIFFLAGS, &mut req as *mut sys::Ifreq) } != 0 {
            return Err(fail(format!("read the flags of {} (SIOCGIFFLAGS)", name)));
        }
        if req.ifr_flags & sys::IFF_UP == 0 {
            // The host's network carries IPv4 only (docs/network.md): without
            // this, every restore would redo the NIC's IPv6 link-local
            // autoconfiguration (DAD, router and MLD solicitations), ~60 ms of
            // emulated kernel work under TCG. Loopback keeps ::1.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", name), "1");
            req.ifr_flags |= sys::IFF_UP;
            if unsafe { sys::ioctl(fd.raw(), sys::SIOCSIFFLAGS, &mut req as *mut sys::Ifreq) } != 0 {
                return Err(fail(format!("bring {} up (SIOCSIFFLAGS)", name)));
            }
        }
        if let Some(gw) = c.gateway {
            // Replace every default route (whatever the image or an earlier
            // configuration left) with one via the gateway.
            for _ in 0..64 {
                let mut rt = rtentry(None);
                if unsafe { sys::ioctl(fd.raw(), sys::SIOCDELRT, &mut rt as *mut sys::Rtentry) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(sys::ESRCH) {
                        break;
                    }
                    return Err(ReqError::from_io("delete the default route (SIOCDELRT)", &e));
                }
            }
            let mut rt = rtentry(Some(gw));
            if unsafe { sys::ioctl(fd.raw(), sys::SIOCADDRT, &mut rt as *mut sys::Rtentry) } != 0 {
                return Err(fail(format!("add the default route via {} (SIOCADDRT)", dotted(gw))));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<sys::Rtentry>(), 120);
        assert_eq!(std::mem::size_of::<sys::IfreqAddr>(), 40);
        assert_eq!(std::mem::size_of::<sys::Ifreq>(), 40);
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), [255, 255, 255, 0]);
        assert_eq!(netmask(0), [0, 0, 0, 0]);
        assert_eq!(netmask(32), [255, 255, 255, 255]);
        assert_eq!(netmask(17), [255, 255, 128, 0]);
    }

    #[test]
    fn fields_are_validated() {
        let mut c = NetConfig::default();
        assert!(c.field(tag::configure::NET_ADDR, &[198, 19, 0, 2]).unwrap());
        assert!(c.field(tag::configure::NET_ADDR, &[1, 2, 3]).is_err());
        assert!(c.field(tag::configure::NET_PREFIX, &33u32.to_le_bytes()).is_err());
        assert!(c.field(tag::configure::NET_MTU, &67u32.to_le_bytes()).is_err());
        assert!(c.field(tag::configure::NET_MTU, &65536u32.to_le_bytes()).is_err());
        assert!(matches!(c.field(tag::configure::RESOLV_CONF, &vec![b'a'; MAX_RESOLV_CONF + 1]), Err(ReqError::TooLarge(_))));
        assert!(matches!(c.field(tag::configure::HOSTS_FILE, &vec![b'a'; MAX_HOSTS + 1]), Err(ReqError::TooLarge(_))));
        assert!(c.field(tag::configure::HOSTS_FILE, b"a\0b").is_err());
        assert!(!c.field(tag::configure::HOSTNAME, b"x").unwrap());
        // An address without a prefix, then a gateway outside the subnet.
        assert!(c.check().is_err());
        c.field(tag::configure::NET_PREFIX, &24u32.to_le_bytes()).unwrap();
        c.field(tag::configure::NET_GATEWAY, &[198, 19, 1, 1]).unwrap();
        assert!(c.check().is_err());
        c.field(tag::configure::NET_GATEWAY, &[198, 19, 0, 1]).unwrap();
        assert!(c.check().is_ok());
    }

    #[test]
    fn hosts_keeps_localhost_and_the_hostname() {
        let h = hosts_content(b"198.19.0.1 gateway", b"vm-1");
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n198.19.0.1 gateway\n127.0.1.1\tvm-1\n"
        );
        let given = b"127.0.0.1 localhost\n10.0.0.5 vm-1 # mine\n";
        assert_eq!(hosts_content(given, b"vm-1"), given.to_vec());
        // A name in a comment does not count.
        let h = hosts_content(b"127.0.0.1 localhost # vm-1\n", b"vm-1");
        assert!(String::from_utf8(h).unwrap().ends_with("127.0.1.1\tvm-1\n"));
    }
}
