//! qemu's `blklogwrites` log: every write, discard and flush the guest
//! sent to the disk, in order (the format of Linux's dm-log-writes).
//!
//! Sector 0 holds the superblock: magic, version and entry count (u64
//! each) and the log's sector size (u32), all little-endian. From sector 1
//! on, each entry is one sector of header (the disk sector written, the
//! number of sectors, flags and a data length, u64 each), followed by the
//! written sectors, except for a discard.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: u64 = 0x6a736677736872;
const FLUSH: u64 = 1;
const DISCARD: u64 = 1 << 2;

#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Where the entry's data starts in the log, in bytes.
    data_at: u64,
    /// Where it goes on the disk, in bytes.
    disk_at: u64,
    len: u64,
    pub flush: bool,
    discard: bool,
}

pub struct Log {
    file: File,
    pub entries: Vec<Entry>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Log {
    pub fn open(path: &Path) -> io::Result<Log> {
        let file = File::open(path)?;
        let mut sb = [0u8; 28];
        file.read_exact_at(&mut sb, 0)?;
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        if le64(&sb, 0) != MAGIC {
            return Err(bad(format!("{} is not a blklogwrites log", path.display())));
        }
        let count = le64(&sb, 16);
        let sector = u64::from(u32::from_le_bytes(sb[24..28].try_into().unwrap()));
        let mut entries = Vec::with_capacity(count as usize);
        let mut at = sector;
        let mut header = [0u8; 32];
        for i in 0..count {
            file.read_exact_at(&mut header, at)
                .map_err(|e| bad(format!("entry {i} of {count}: {e}")))?;
            let flags = le64(&header, 16);
            let len = le64(&header, 8) * sector;
            let discard = flags & DISCARD != 0;
            entries.push(Entry {
                data_at: at + sector,
                disk_at: le64(&header, 0) * sector,
                len,
                flush: flags & FLUSH != 0,
                discard,
            });
            at += sector + if discard { 0 } else { len };
        }
        Ok(Log { file, entries })
    }

    /// Applies entries `range` to `disk`, in order. A discarded range
    /// reads back as zeroes, as it may on a real disk.
    pub fn replay(&self, range: std::ops::Range<usize>, disk: &File) -> io::Result<()> {
        let mut buf = Vec::new();
        for e in &self.entries[range] {
            if e.len == 0 {
                continue;
            }
            buf.resize(e.len as usize, 0);
            if e.discard {
                buf.fill(0);
            } else {
                self.file.read_exact_at(&mut buf, e.data_at)?;
            }
            disk.write_all_at(&buf, e.disk_at)?;
        }
        Ok(())
    }

    /// The indexes of the flush entries.
    pub fn flushes(&self) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].flush)
            .collect()
    }
}
