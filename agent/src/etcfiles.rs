//! The per-VM files of /etc (hostname, hosts, machine-id): kept on the
//! /run tmpfs and bind-mounted over their /etc names, as Docker does for
//! /etc/hostname and /etc/hosts.
//!
//! Every restore of a snapshot gives the VM a new hostname and machine-id,
//! so these files are written again each time. Written through the root
//! overlay (a temporary file and `rename`, or an overwrite) that takes the
//! overlay's kernel paths, which under emulation are translated anew in every
//! fresh QEMU (docs/performance.md). Once the file is a bind mount of a tmpfs
//! file, a restore overwrites that file in place: the same tmpfs write path
//! the boot_id already takes.
//!
//! The first write (at boot or bake) replaces what the image has there (a
//! symlink is replaced, not followed; a directory is an error) with an
//! empty regular file and mounts the tmpfs file over it. Like Docker's, the
//! file can be edited in place but not replaced by `rename` (EBUSY).

use crate::sys;
use std::fs;
use std::io;
use std::path::Path;

/// Where the files live.
const DIR: &str = "/run/supermachine/etc";

/// The tmpfs file behind `target` (e.g. /etc/hosts → /run/supermachine/etc/hosts).
fn backing(target: &str) -> String {
    let name = Path::new(target).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}/{}", DIR, name)
}

/// Writes `bytes` as the content of `target` (an absolute path in /etc).
pub fn write(target: &str, bytes: &[u8]) -> io::Result<()> {
    let run = backing(target);
    // Mounted already (by an earlier write of this VM or of the VM the
    // snapshot was taken from): an in-place write of the tmpfs file.
    if Path::new(&run).exists() {
        return fs::write(&run, bytes);
    }
    fs::create_dir_all(DIR)?;
    fs::write(&run, bytes)?;
    let r = mount_over(&run, target);
    if r.is_err() {
        let _ = fs::remove_file(&run);
    }
    r
}

/// Makes `target` an empty regular file and bind-mounts `run` over it.
fn mount_over(run: &str, target: &str) -> io::Result<()> {
    let t = Path::new(target);
    match fs::symlink_metadata(t) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) if m.file_type().is_dir() => {
            return Err(io::Error::new(io::ErrorKind::Other, format!("{} is a directory in the image", target)));
        }
        Ok(_) => {
            // A symlink (or another kind of file): replaced, not followed.
            fs::remove_file(t)?;
            fs::write(t, b"")?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = t.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::write(t, b"")?;
        }
        Err(e) => return Err(e),
    }
    crate::init::mount(run, target, "", sys::MS_BIND, "")
}
