//! Block volumes and the disk-backed writable layer (docs/volumes.md).
//!
//! The host gives every disk a virtio-blk serial and says on the kernel
//! command line what each one is for: `sm.disk=SERIAL` (the ext4 disk that
//! holds the root overlay's upper and work directories instead of a tmpfs)
//! and `sm.vol=SERIAL:/mount/point` (an ext4 volume). init mounts them at
//! boot; a restored VM has them mounted already (the mounts are part of the
//! snapshot's kernel state, the disks' contents are the snapshot's images).

use crate::init::mount;
use crate::sys;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Serial of the root filesystem's disk.
pub const ROOT_SERIAL: &str = "sm-root";
/// How long a disk the command line names may take to appear.
const DISK_WAIT: Duration = Duration::from_secs(10);
/// The longest mount point the host sends (spec.ts MAX_MOUNT_POINT).
const MAX_MOUNT_POINT: usize = 128;

/// What the command line says about disks.
#[derive(Default)]
pub struct DiskConfig {
    /// Serial of the writable layer's disk.
    pub disk: Option<String>,
    /// (serial, mount point) of each volume.
    pub volumes: Vec<(String, String)>,
}

impl DiskConfig {
    /// Takes one `key=value` word of the command line; false if not ours.
    pub fn take(&mut self, k: &str, v: &str) -> bool {
        match k {
            "sm.disk" => self.disk = Some(v.to_string()),
            "sm.vol" => {
                if let Some((serial, path)) = v.split_once(':') {
                    self.volumes.push((serial.to_string(), path.to_string()));
                }
            }
            _ => return false,
        }
        true
    }
}

fn serial_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn mount_point_ok(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && p.len() <= MAX_MOUNT_POINT
        && p.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
        && !["/proc", "/sys", "/dev"].iter().any(|r| p == *r || p.starts_with(&format!("{}/", r)))
}

/// The /dev node of the virtio disk whose serial is `serial`, if present now.
pub fn lookup(serial: &str) -> Option<String> {
    let entries = fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("vd") {
            continue;
        }
        let s = fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim_end_matches(|c| c == '\n' || c == '\0') == serial {
            let dev = format!("/dev/{}", name);
            if Path::new(&dev).exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// Waits up to `timeout` for the disk with serial `serial`.
pub fn find_by_serial(serial: &str, timeout: Duration) -> Option<String> {
    let start = Instant::now();
    loop {
        if let Some(d) = lookup(serial) {
            return Some(d);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn mount_ext4(serial: &str, target: &str) -> Result<(), String> {
    if !serial_ok(serial) {
        return Err(format!("bad disk serial {:?}", serial));
    }
    let dev = match find_by_serial(serial, DISK_WAIT) {
        Some(d) => d,
        None => return Err(format!("disk {} did not appear", serial)),
    };
    fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {}", target, e))?;
    mount(&dev, target, "ext4", sys::MS_NODEV, "").map_err(|e| e.to_string())
}

/// Mounts the writable layer's disk on `target` (before the root overlay).
pub fn mount_disk(serial: &str, target: &str) -> Result<(), String> {
    mount_ext4(serial, target).map_err(|e| format!("writable layer: {}", e))
}

/// Mounts every volume (after the root and /tmp, /run are in place: a volume
/// may live below them), parents before children. Returns the errors.
pub fn mount_volumes(cfg: &DiskConfig) -> Vec<String> {
    let mut vols: Vec<&(String, String)> = cfg.volumes.iter().collect();
    vols.sort_by_key(|(_, p)| p.len());
    let mut errors = Vec::new();
    for (serial, path) in vols {
        if !mount_point_ok(path) {
            errors.push(format!("volume {}: bad mount point {:?}", serial, path));
            continue;
        }
        if let Err(e) = mount_ext4(serial, path) {
            errors.push(format!("volume {} on {}: {}", serial, path, e));
        }
    }
    errors
}
