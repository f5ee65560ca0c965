//! WRITE_FILE and READ_FILE streams (4 MiB cap, see docs/protocol.md).

use crate::io::{Io, ReqError, CHUNK};
use crate::proto::{self, tag, ty, Record, FILE_LIMIT};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn path_of(bytes: &[u8]) -> Result<PathBuf, ReqError> {
    if crate::fuse::under_active(bytes) {
        return Err(ReqError::BadRequest(format!(
            "{} is on a host directory mount: read and write it on the host (or through exec in the guest)",
            String::from_utf8_lossy(bytes)
        )));
    }
    if bytes.first() != Some(&b'/') {
        return Err(ReqError::BadRequest(format!(
            "path {:?} must be absolute",
            String::from_utf8_lossy(bytes)
        )));
    }
    if bytes.contains(&0) {
        return Err(ReqError::BadRequest("path contains a NUL byte".into()));
    }
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// An upload in progress: bytes go to a temporary file beside the target,
/// renamed into place after the last byte.
pub struct WriteFile {
    tmp: PathBuf,
    target: PathBuf,
    file: File,
    expected: u64,
    received: u64,
    mode: u32,
}

static mut TMP_COUNTER: u64 = 0;
/// rename(2) onto a mount point.
const EBUSY: i32 = 16;

impl WriteFile {
    pub fn start(p: &[u8]) -> Result<WriteFile, ReqError> {
        let mut path: Option<PathBuf> = None;
        let mut mode = 0o644u32;
        let mut size: Option<u64> = None;
        let mut mkdirs = false;
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::write_file::PATH => path = Some(path_of(v)?),
                tag::write_file::MODE => mode = proto::val_u32(t, v)? & 0o7777,
                tag::write_file::SIZE => size = Some(proto::val_u64(t, v)?),
                tag::write_file::MKDIRS => mkdirs = proto::val_bool(t, v)?,
                _ => {}
            }
        }
        let target = path.ok_or_else(|| ReqError::BadRequest("WRITE_FILE without a path".into()))?;
        let expected = size.ok_or_else(|| ReqError::BadRequest("WRITE_FILE without a size".into()))?;
        if expected > FILE_LIMIT {
            return Err(ReqError::TooLarge(format!(
                "{} is {} bytes, over the {}-byte limit",
                target.display(),
                expected,
                FILE_LIMIT
            )));
        }
        let parent = target.parent().unwrap_or_else(|| Path::new("/")).to_path_buf();
        if mkdirs {
            fs::create_dir_all(&parent).map_err(|e| ReqError::from_io(&format!("creating {}", parent.display()), &e))?;
        }
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = unsafe {
            TMP_COUNTER += 1;
            TMP_COUNTER
        };
        let tmp = parent.join(format!(".{}.sm-{}-{}", name, std::process::id(), n));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| ReqError::from_io(&format!("creating {}", target.display()), &e))?;
        Ok(WriteFile { tmp, target, file, expected, received: 0, mode })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), ReqError> {
        self.received += data.len() as u64;
        if self.received > self.expected {
            return Err(ReqError::BadRequest(format!(
                "{}: received more than the announced {} bytes",
                self.target.display(),
                self.expected
            )));
        }
        self.file.write_all(data).map_err(|e| ReqError::from_io(&format!("writing {}", self.target.display()), &e))
    }

    pub fn finish(self) -> Result<(), ReqError> {
        if self.received != self.expected {
            let e = ReqError::BadRequest(format!(
                "{}: got {} bytes, {} announced",
                self.target.display(),
                self.received,
                self.expected
            ));
            self.abort();
            return Err(e);
        }
        // The umask must not change the mode the host asked for.
        if let Err(e) = self.file.set_permissions(fs::Permissions::from_mode(self.mode)) {
            let err = ReqError::from_io(&format!("chmod {}", self.target.display()), &e);
            self.abort();
            return Err(err);
        }
        if let Err(e) = fs::rename(&self.tmp, &self.target) {
            // A mount point (/etc/hosts, /etc/hostname and /etc/machine-id
            // are bind mounts, see etcfiles.rs) cannot be replaced: its
            // content is, in place.
            let r = if e.raw_os_error() == Some(EBUSY) { self.copy_in_place() } else { Err(e) };
            if let Err(e) = r {
                let err = ReqError::from_io(&format!("renaming into {}", self.target.display()), &e);
                self.abort();
                return Err(err);
            }
            self.abort();
        }
        Ok(())
    }

    /// Overwrites the target with the temporary file's content, and its mode.
    fn copy_in_place(&self) -> std::io::Result<()> {
        let data = fs::read(&self.tmp)?;
        let mut f = OpenOptions::new().write(true).truncate(true).open(&self.target)?;
        f.write_all(&data)?;
        f.set_permissions(fs::Permissions::from_mode(self.mode))
    }

    pub fn abort(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// A download in progress: the content (≤ max_size) is read at once and sent
/// as flow-controlled DATA frames.
pub struct ReadFile {
    data: Vec<u8>,
    pos: usize,
    pub credit: u32,
}

impl ReadFile {
    pub fn start(p: &[u8]) -> Result<ReadFile, ReqError> {
        let mut path: Option<PathBuf> = None;
        let mut max = FILE_LIMIT;
        for f in proto::fields(p) {
            let (t, v) = f?;
            match t {
                tag::read_file::PATH => path = Some(path_of(v)?),
                tag::read_file::MAX_SIZE => max = proto::val_u64(t, v)?.min(FILE_LIMIT),
                _ => {}
            }
        }
        let path = path.ok_or_else(|| ReqError::BadRequest("READ_FILE without a path".into()))?;
        let file = File::open(&path).map_err(|e| ReqError::from_io(&format!("{}", path.display()), &e))?;
        let meta = file.metadata().map_err(|e| ReqError::from_io(&format!("{}", path.display()), &e))?;
        if !meta.is_file() {
            return Err(ReqError::BadRequest(format!("{} is not a regular file", path.display())));
        }
        if meta.len() > max {
            return Err(ReqError::TooLarge(format!(
                "{} is {} bytes, over the {}-byte limit",
                path.display(),
                meta.len(),
                max
            )));
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        // The file may grow while we read: never take more than the limit.
        file.take(max + 1)
            .read_to_end(&mut data)
            .map_err(|e| ReqError::from_io(&format!("reading {}", path.display()), &e))?;
        if data.len() as u64 > max {
            return Err(ReqError::TooLarge(format!("{} grew over the {}-byte limit while read", path.display(), max)));
        }
        Ok(ReadFile { data, pos: 0, credit: proto::INITIAL_WINDOW })
    }

    /// Sends what the window allows. Returns true when the stream is done.
    pub fn pump(&mut self, io: &mut Io, id: u32) -> bool {
        while self.pos < self.data.len() && self.credit > 0 {
            let n = (self.data.len() - self.pos).min(CHUNK).min(self.credit as usize);
            io.send(ty::DATA, 1, id, &self.data[self.pos..self.pos + n]);
            self.pos += n;
            self.credit -= n as u32;
        }
        if self.pos == self.data.len() {
            io.send(ty::EOF, 1, id, &[]);
            io.send_record(ty::OK, id, Record::new().u64(tag::read_file_ok::SIZE, self.data.len() as u64));
            return true;
        }
        false
    }
}
