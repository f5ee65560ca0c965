//! The files service: WRITE_FILE and READ_FILE streams (the file work itself
//! is in crate::files).

use crate::files::{ReadFile, WriteFile};
use crate::io::{Io, ReqError};
use crate::proto::{ty, Record};
use std::collections::HashMap;

enum FileStream {
    Write(WriteFile),
    Read(ReadFile),
}

pub struct FileService {
    streams: HashMap<u32, FileStream>,
}

impl FileService {
    pub fn new() -> FileService {
        FileService { streams: HashMap::new() }
    }

    pub fn owns(&self, id: u32) -> bool {
        self.streams.contains_key(&id)
    }

    pub fn reset(&mut self) {
        for (_, s) in self.streams.drain() {
            if let FileStream::Write(w) = s {
                w.abort();
            }
        }
    }

    pub fn write_file(&mut self, io: &mut Io, id: u32, p: &[u8]) {
        match WriteFile::start(p) {
            Ok(w) => {
                self.streams.insert(id, FileStream::Write(w));
            }
            Err(e) => io.send_error(id, e),
        }
    }

    pub fn read_file(&mut self, io: &mut Io, id: u32, p: &[u8]) {
        match ReadFile::start(p) {
            Ok(r) => {
                self.streams.insert(id, FileStream::Read(r));
                self.pump_read(io, id);
            }
            Err(e) => io.send_error(id, e),
        }
    }

    pub fn cancel(&mut self, io: &mut Io, id: u32) {
        match self.streams.remove(&id) {
            Some(FileStream::Write(w)) => w.abort(),
            Some(FileStream::Read(_)) => {}
            None => return,
        }
        io.send_error(id, ReqError::Internal("cancelled by the host".into()));
    }

    pub fn data(&mut self, io: &mut Io, id: u32, ch: u8, p: &[u8]) {
        if ch != 0 {
            return;
        }
        if let Some(FileStream::Write(w)) = self.streams.get_mut(&id) {
            if let Err(err) = w.write(p) {
                if let Some(FileStream::Write(w)) = self.streams.remove(&id) {
                    w.abort();
                }
                io.send_error(id, err);
            } else {
                io.send_window(id, 0, p.len());
            }
        }
    }

    pub fn eof(&mut self, io: &mut Io, id: u32, ch: u8) {
        if ch != 0 {
            return;
        }
        if let Some(FileStream::Write(_)) = self.streams.get(&id) {
            if let Some(FileStream::Write(w)) = self.streams.remove(&id) {
                match w.finish() {
                    Ok(()) => io.send_record(ty::OK, id, Record::new()),
                    Err(e) => io.send_error(id, e),
                }
            }
        }
    }

    pub fn window(&mut self, io: &mut Io, id: u32, ch: u8, n: u32) {
        if ch != 1 {
            return;
        }
        if let Some(FileStream::Read(r)) = self.streams.get_mut(&id) {
            r.credit = r.credit.saturating_add(n);
            self.pump_read(io, id);
        }
    }

    fn pump_read(&mut self, io: &mut Io, id: u32) {
        let finished = match self.streams.get_mut(&id) {
            Some(FileStream::Read(r)) => r.pump(io, id),
            _ => return,
        };
        if finished {
            self.streams.remove(&id);
        }
    }
}
