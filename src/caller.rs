//! Who is calling: a containerd 1.x, or anything else.
//!
//! One rule needs it. On the kernel backend, ontop answers a request for
//! user-namespace id mapping with `uidmap=`/`gidmap=` mount options, which
//! only containerd 2.0+ turns into idmapped mounts. containerd 1.x passes
//! them to mount(2), which fails with a bare EINVAL, so ontop refuses such
//! a request from containerd 1.x with the reason and the way out instead.
//! Nothing in a request tells the generations apart (both send the same
//! fields and metadata), but the caller's binary does: every Go binary
//! carries its main package path in its build info, and containerd 2's is
//! `github.com/containerd/containerd/v2/cmd/containerd`.
//!
//! The peer's pid comes from the unix socket (SO_PEERCRED). A caller whose
//! binary cannot be read (another pid namespace, a non-Go client) is
//! `Other`, and gets containerd 2's answer.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// containerd 1.x and 2.x binaries both carry this, followed by the main
/// package's path, in their Go build info.
const BUILD_INFO_PATH: &[u8] = b"path\tgithub.com/containerd/containerd/";

/// The process on the other end of a request's connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caller {
    pid: Option<i32>,
}

/// What the caller's binary says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// containerd of this major version.
    Containerd(u32),
    Other,
}

impl Caller {
    pub fn from_pid(pid: Option<i32>) -> Caller {
        Caller {
            pid: pid.filter(|&p| p > 0),
        }
    }

    /// Reads the caller's binary, once per binary (blocking: a containerd
    /// binary is tens of MiB, streamed through a 1 MiB buffer the first
    /// time).
    pub fn kind(&self) -> Kind {
        let Some(pid) = self.pid else {
            return Kind::Other;
        };
        let exe = format!("/proc/{pid}/exe");
        let Ok(md) = std::fs::metadata(&exe) else {
            return Kind::Other;
        };
        // By device, inode and mtime: an upgraded binary is read again.
        type Seen = Mutex<HashMap<(u64, u64, i64), Kind>>;
        static SEEN: OnceLock<Seen> = OnceLock::new();
        let seen = SEEN.get_or_init(Default::default);
        let id = (md.dev(), md.ino(), md.mtime());
        if let Some(kind) = seen.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return *kind;
        }
        let kind = kind_of_binary(Path::new(&exe)).unwrap_or(Kind::Other);
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, kind);
        kind
    }

    pub fn is_containerd_1(&self) -> bool {
        self.kind() == Kind::Containerd(1)
    }
}

fn kind_of_binary(path: &Path) -> std::io::Result<Kind> {
    kind_of_stream(std::fs::File::open(path)?, 1 << 20)
}

/// Looks for the build info in `chunk`-sized reads, keeping only the end
/// of the last one, so memory stays bounded whatever the binary's size.
fn kind_of_stream(mut reader: impl Read, chunk: usize) -> std::io::Result<Kind> {
    // The marker, and room for the main package's path after it.
    const TAIL: usize = 512;
    let mut buf = vec![0u8; chunk + TAIL];
    let mut kept = 0;
    loop {
        let mut end = kept;
        while end < kept + chunk {
            match reader.read(&mut buf[end..kept + chunk]) {
                Ok(0) => break,
                Ok(n) => end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let eof = end < kept + chunk;
        if let Some(at) = memchr::memmem::find(&buf[..end], BUILD_INFO_PATH) {
            // Judge it once its line is surely in the buffer; else the
            // kept tail carries it into the next round.
            if eof || at + TAIL <= end {
                return Ok(kind_of_build_info(&buf[at..end]));
            }
        }
        if eof {
            return Ok(Kind::Other);
        }
        let from = end.saturating_sub(TAIL);
        buf.copy_within(from..end, 0);
        kept = end - from;
    }
}

/// The kind a binary's build info names: `.../containerd/cmd/containerd`
/// is containerd 1.x, `.../containerd/vN/cmd/containerd` containerd N.
fn kind_of_build_info(bytes: &[u8]) -> Kind {
    let Some(at) = memchr::memmem::find(bytes, BUILD_INFO_PATH) else {
        return Kind::Other;
    };
    let rest = &bytes[at + BUILD_INFO_PATH.len()..];
    let line = &rest[..rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())];
    let Ok(line) = std::str::from_utf8(line) else {
        return Kind::Other;
    };
    if line == "cmd/containerd" {
        return Kind::Containerd(1);
    }
    line.strip_suffix("/cmd/containerd")
        .and_then(|v| v.strip_prefix('v'))
        .and_then(|v| v.parse().ok())
        .map_or(Kind::Other, Kind::Containerd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_info_names_the_containerd_generation() {
        let info = |path: &str| format!("\u{ff}junk\0path\t{path}\nmod\tx\t(devel)\t\n");
        let kind = |path: &str| kind_of_build_info(info(path).as_bytes());
        assert_eq!(
            kind("github.com/containerd/containerd/cmd/containerd"),
            Kind::Containerd(1)
        );
        assert_eq!(
            kind("github.com/containerd/containerd/v2/cmd/containerd"),
            Kind::Containerd(2)
        );
        assert_eq!(
            kind("github.com/containerd/containerd/cmd/ctr"),
            Kind::Other
        );
        assert_eq!(kind("github.com/example/client"), Kind::Other);
        assert_eq!(kind_of_build_info(b""), Kind::Other);
    }

    #[test]
    fn the_build_info_is_found_across_read_boundaries_with_bounded_memory() {
        let info = b"path\tgithub.com/containerd/containerd/v2/cmd/containerd\nmod\tx\n";
        // The marker at every offset around the boundaries of small reads.
        for pad in 0..1500 {
            let mut bytes = vec![b'x'; pad];
            bytes.extend_from_slice(info);
            bytes.extend(std::iter::repeat_n(b'y', 300));
            let kind = kind_of_stream(&bytes[..], 64).unwrap();
            assert_eq!(kind, Kind::Containerd(2), "marker at {pad}");
        }
        let none = vec![b'z'; 10_000];
        assert_eq!(kind_of_stream(&none[..], 64).unwrap(), Kind::Other);
        // A truncated line at the very end still gives an answer.
        assert_eq!(
            kind_of_stream(
                &b"path\tgithub.com/containerd/containerd/cmd/containerd"[..],
                64
            )
            .unwrap(),
            Kind::Containerd(1)
        );
    }

    #[test]
    fn a_caller_that_cannot_be_read_is_other() {
        assert_eq!(Caller::from_pid(None).kind(), Kind::Other);
        assert_eq!(Caller::from_pid(Some(0)).kind(), Kind::Other);
        // Not this test binary: the tests above hold containerd's build
        // info lines as literals, which a scan can find first.
        let mut sleep = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let other = Caller::from_pid(Some(sleep.id() as i32));
        let kind = other.kind();
        let _ = sleep.kill();
        let _ = sleep.wait();
        assert_eq!(kind, Kind::Other);
        assert!(!other.is_containerd_1());
    }
}
