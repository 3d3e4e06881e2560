//! Which snapshots' upper dirs changed, so that Usage walks only those.
//!
//! containerd's CRI calls Usage on every active snapshot every 10 s, and a
//! Usage is a walk of the whole upper dir. Here fanotify reports every
//! change on the filesystem under ontop's root (`FAN_MARK_FILESYSTEM`),
//! with the directory it happened in (`FAN_REPORT_DFID_NAME`). Writes made
//! through overlayfs and fuse-overlayfs mounts reach it as changes to the
//! upper dir's files. A change in `<root>/snapshots/<id>/fs` bumps that
//! snapshot's version; a Usage whose cached answer is of the current
//! version returns it without walking.
//!
//! **Exactness.** fsnotify queues an event before the syscall that made the
//! change returns, so [`Watch::usage`] first reads every queued event: no
//! change completed before a Usage can be missed. Lost events (an overflow,
//! or more than one read takes) forget every cached answer. An event in a
//! directory already gone is skipped: its removal is an event in its
//! parent. What fanotify does not report, and so a cached answer can
//! miss: blocks that writes through a shared memory map allocate (in a
//! sparse region), and extent-tree blocks the filesystem allocates at
//! writeback. Both are rare; the next change to that snapshot corrects
//! them.
//!
//! **Where.** fanotify with directory names needs Linux 5.9 and
//! CAP_SYS_ADMIN in the initial user namespace. Elsewhere (rootless) there
//! is no watch, and every Usage walks, as containerd's own overlayfs does.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::snapshot::{Id, Usage};

/// The events that can change an upper dir's bytes or inodes.
const MASK: u64 = libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ONDIR;

/// Directories placed so far, at most this many; then they are placed again.
const PLACED_MAX: usize = 100_000;

/// Tracks changes under one root.
pub struct Watch {
    inner: Arc<Inner>,
}

struct Inner {
    fanotify: OwnedFd,
    /// Any directory on the watched filesystem, for `open_by_handle_at`.
    mount: OwnedFd,
    /// `<root>/snapshots`, and `<root>`, as the kernel names them.
    snapshots: PathBuf,
    root: PathBuf,
    /// Handles of ontop's own directories, which never move and are never
    /// in an upper: the database's writes and every Prepare's and Remove's
    /// renames are events in them, and placing each by path cost an
    /// `open_by_handle_at` and a `readlink`.
    still: HashSet<Vec<u8>>,
    state: Mutex<State>,
    stop: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Bumped by every change in the snapshot's upper dir, for the
    /// snapshots Usage was asked about (until they are forgotten).
    versions: HashMap<Id, u64>,
    /// Bumped when changes may have been lost: every answer is stale.
    epoch: u64,
    /// The last answer per snapshot, with the version and epoch it is of.
    answers: HashMap<Id, (Usage, u64, u64)>,
    /// Directory handles already placed: in a snapshot's upper, or not.
    placed: HashMap<Vec<u8>, Option<Id>>,
    /// Directories under the root placed by path so far (the rest of the
    /// filesystem is other processes').
    #[cfg(test)]
    lookups: u64,
    buf: Vec<u8>,
}

impl Watch {
    /// Starts watching the filesystem that holds `root`, or says why it
    /// cannot (then Usage walks every time). `still` are directories under
    /// `root` that are never moved or removed while it runs.
    pub fn start(root: &Path, still: &[PathBuf]) -> io::Result<Watch> {
        // With the name: without it, the kernel does not report the parent
        // of a file whose data changed (FAN_MODIFY), and sizes were missed.
        // The kernel merges repeated events on one name while they queue.
        // Unlimited: events are read in batches (see
        // `drain_until_stopped`), and a Usage reads the rest.
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_UNLIMITED_QUEUE
            | libc::FAN_REPORT_DFID_NAME;
        // SAFETY: fanotify_init takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_CLOEXEC) as u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fanotify_init just returned this descriptor; nothing else owns it.
        let fanotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let snapshots = std::fs::canonicalize(root.join("snapshots"))?;
        let path = CString::new(snapshots.as_os_str().as_bytes())?;
        // SAFETY: a live fanotify fd, and a NUL-terminated path that
        // outlives the call.
        let marked = unsafe {
            libc::fanotify_mark(
                fanotify.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                MASK,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if marked < 0 {
            return Err(io::Error::last_os_error());
        }
        let mount: OwnedFd = std::fs::File::open(&snapshots)?.into();
        let still = still.iter().filter_map(|d| handle_of(d)).collect();
        let inner = Arc::new(Inner {
            fanotify,
            mount,
            still,
            root: snapshots.parent().unwrap_or(&snapshots).to_path_buf(),
            snapshots,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        // Keeps the kernel's queue short between Usage calls: every change
        // on the filesystem is an event, ontop's or not.
        let drainer = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("ontop-watch".into())
            .spawn(move || drainer.drain_until_stopped())?;
        Ok(Watch { inner })
    }

    /// Usage of active snapshot `id`: the last answer if its upper has not
    /// changed since, else `walk`'s.
    pub fn usage<E>(&self, id: Id, walk: impl FnOnce() -> Result<Usage, E>) -> Result<Usage, E> {
        let (version, epoch) = {
            let mut state = self.inner.drained();
            // From here on, changes to this upper count.
            let version = *state.versions.entry(id).or_default();
            if let Some((usage, v, e)) = state.answers.get(&id) {
                if (*v, *e) == (version, state.epoch) {
                    return Ok(*usage);
                }
            }
            (version, state.epoch)
        };
        // Outside the lock: a change during the walk bumps the version, so
        // this answer is stored as of the version before it, and the next
        // Usage walks again.
        let usage = walk()?;
        let mut state = self.inner.state();
        state.answers.insert(id, (usage, version, epoch));
        Ok(usage)
    }

    /// Forgets a snapshot that is gone.
    pub fn forget(&self, id: Id) {
        let mut state = self.inner.state();
        state.answers.remove(&id);
        state.versions.remove(&id);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, after every queued event is accounted for.
    fn drained(&self) -> MutexGuard<'_, State> {
        let mut state = self.state();
        if let Err(e) = self.drain(&mut state) {
            tracing::warn!(error = %e, "reading fanotify events; forgetting cached usage");
            state.epoch += 1;
        }
        state
    }

    /// Reads events every 100 ms, not at each one: waking per event cost
    /// more CPU than everything else here (measured: 12 s of CPU for 100k
    /// writes elsewhere on the filesystem, against none).
    fn drain_until_stopped(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            drop(self.drained());
        }
    }

    fn drain(&self, state: &mut State) -> io::Result<()> {
        // One buffer for the life of the watch, lent out while reading.
        let mut buf = std::mem::take(&mut state.buf);
        buf.resize(64 * 1024, 0);
        let result = self.drain_into(state, &mut buf);
        state.buf = buf;
        result
    }

    fn drain_into(&self, state: &mut State, buf: &mut [u8]) -> io::Result<()> {
        // The filesystem may change faster than this reads (ontop's own log
        // and database may well be on it): after this many buffers, stop
        // and count it as an overflow, which walks again but stays exact.
        for _ in 0..64 {
            // SAFETY: reads at most buf.len() bytes into buf, which is ours.
            let n = unsafe {
                libc::read(
                    self.fanotify.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            for event in events(&buf[..n as usize]) {
                let Event::In(handle) = event else {
                    state.epoch += 1;
                    continue;
                };
                // Only snapshots asked about are counted, so removed ones
                // leave nothing behind. A directory gone before its event
                // was read is skipped: its removal is an event in its
                // parent, which is placed.
                if let Some(Some(id)) = self.place(state, handle) {
                    if let Some(version) = state.versions.get_mut(&id) {
                        *version += 1;
                    }
                }
            }
        }
        state.epoch += 1;
        Ok(())
    }

    /// The snapshot whose upper dir holds the directory `handle` names:
    /// `Some(None)` for a directory elsewhere, `None` when it is gone.
    fn place(&self, state: &mut State, handle: &[u8]) -> Option<Option<Id>> {
        if self.still.contains(handle) {
            return Some(None);
        }
        if let Some(placed) = state.placed.get(handle) {
            return Some(*placed);
        }
        let path = self.path_of(handle)?;
        #[cfg(test)]
        if path.starts_with(&self.root) {
            state.lookups += 1;
        }
        let id = path.strip_prefix(&self.snapshots).ok().and_then(|rest| {
            let mut parts = rest.components();
            let id = parts.next()?.as_os_str().to_str()?.parse::<Id>().ok()?;
            (parts.next()?.as_os_str() == "fs").then_some(id)
        });
        // Directories move: overlay copies a directory up by building it
        // in its work dir and renaming it into the upper, and ontop builds
        // snapshots in `tmp/`. So a place under ontop's root is kept only
        // when it is an upper; elsewhere on the filesystem, nothing moves
        // into ontop's root.
        if id.is_some() || !path.starts_with(&self.root) {
            if state.placed.len() >= PLACED_MAX {
                state.placed.clear();
            }
            state.placed.insert(handle.to_vec(), id);
        }
        Some(id)
    }

    /// The path of the directory a file handle (`handle_type` then the
    /// handle's bytes, as fanotify reports it) names now.
    fn path_of(&self, handle: &[u8]) -> Option<PathBuf> {
        let (handle_type, bytes) = handle.split_at_checked(4)?;
        // struct file_handle: handle_bytes, handle_type, f_handle[].
        let mut raw = Vec::with_capacity(8 + bytes.len());
        raw.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
        raw.extend_from_slice(handle_type);
        raw.extend_from_slice(bytes);
        // SAFETY: raw is a struct file_handle whose handle_bytes matches the
        // bytes after it, and it outlives the call.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount.as_raw_fd(),
                raw.as_mut_ptr().cast(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: open_by_handle_at just returned this descriptor; nothing
        // else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
    }
}

/// A directory's handle as fanotify reports it (`handle_type`, then the
/// handle's bytes), or None if the filesystem cannot say. A handle that
/// does not match fanotify's only costs the lookup it was meant to save.
fn handle_of(dir: &Path) -> Option<Vec<u8>> {
    const MAX_HANDLE_SZ: usize = 128;
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // struct file_handle: handle_bytes, handle_type, f_handle[].
    let mut raw = vec![0u8; 8 + MAX_HANDLE_SZ];
    // AT_HANDLE_FID (Linux 6.5) asks for the kind fanotify reports; before
    // it, the plain handle is the same on the filesystems that have both.
    for flags in [libc::AT_HANDLE_FID, 0] {
        raw[0..4].copy_from_slice(&(MAX_HANDLE_SZ as u32).to_ne_bytes());
        let mut mount_id = 0;
        // SAFETY: a C string, and a buffer as large as handle_bytes says.
        let rc = unsafe {
            libc::name_to_handle_at(
                libc::AT_FDCWD,
                path.as_ptr(),
                raw.as_mut_ptr().cast(),
                &mut mount_id,
                flags,
            )
        };
        if rc == 0 {
            let bytes = u32::from_ne_bytes(raw[0..4].try_into().ok()?) as usize;
            return raw.get(4..8 + bytes).map(<[u8]>::to_vec);
        }
    }
    None
}

/// What one fanotify event says.
#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    /// The queue overflowed: events were lost.
    Overflow,
    /// Something changed in the directory with this handle (`handle_type`
    /// bytes, then the handle).
    In(&'a [u8]),
}

/// The events in a buffer read from a fanotify group that reports
/// directory handles and names.
fn events(mut buf: &[u8]) -> impl Iterator<Item = Event<'_>> {
    std::iter::from_fn(move || {
        const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
        loop {
            if buf.len() < META {
                return None;
            }
            let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
            let meta_len = u16::from_ne_bytes(buf[6..8].try_into().ok()?) as usize;
            let mask = u64::from_ne_bytes(buf[8..16].try_into().ok()?);
            if len < META || len > buf.len() {
                return None;
            }
            let (event, rest) = buf.split_at(len);
            buf = rest;
            if mask & libc::FAN_Q_OVERFLOW != 0 {
                return Some(Event::Overflow);
            }
            // Info records: a header (type, pad, length), then for a
            // directory id the fsid (8 bytes), handle_bytes (4), and
            // handle_type (4) with the handle's bytes, then the name.
            let mut info = event.get(meta_len..).unwrap_or_default();
            while info.len() >= 4 {
                let kind = info[0];
                let info_len = u16::from_ne_bytes([info[2], info[3]]) as usize;
                if info_len < 4 || info_len > info.len() {
                    break;
                }
                if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                    || kind == libc::FAN_EVENT_INFO_TYPE_DFID
                {
                    let record = &info[4..info_len];
                    let bytes = record
                        .get(8..12)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_ne_bytes)
                        .unwrap_or(0) as usize;
                    if let Some(handle) = record.get(12..16 + bytes) {
                        return Some(Event::In(handle));
                    }
                }
                info = &info[info_len..];
            }
            // An event with no directory: nothing to place; read on.
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel lays it out, with a DFID_NAME record.
    fn event(mask: u64, handle_type: i32, handle: &[u8], name: &str) -> Vec<u8> {
        let mut record = vec![0u8; 8]; // fsid
        record.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        record.extend_from_slice(&handle_type.to_ne_bytes());
        record.extend_from_slice(handle);
        record.extend_from_slice(name.as_bytes());
        record.push(0);
        let mut info = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0];
        info.extend_from_slice(&((record.len() + 4) as u16).to_ne_bytes());
        info.extend_from_slice(&record);
        let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
        let mut out = Vec::new();
        out.extend_from_slice(&((meta_len + info.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&[3, 0]);
        out.extend_from_slice(&(meta_len as u16).to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&(-1i32).to_ne_bytes());
        out.extend_from_slice(&0i32.to_ne_bytes());
        out.extend_from_slice(&info);
        out
    }

    #[test]
    fn events_yield_the_directory_handle_and_overflows() {
        let mut buf = event(libc::FAN_CREATE, 1, &[9, 8, 7, 6, 5, 4, 3, 2], "new");
        // An overflow event has no info records.
        let mut overflow = event(libc::FAN_Q_OVERFLOW, 0, &[], "")[..24].to_vec();
        overflow[0..4].copy_from_slice(&24u32.to_ne_bytes());
        buf.extend_from_slice(&overflow);
        buf.extend(event(libc::FAN_MODIFY, 2, &[1, 2, 3, 4], "f"));
        let got: Vec<Event<'_>> = events(&buf).collect();
        let handle = |t: i32, b: &[u8]| [t.to_ne_bytes().to_vec(), b.to_vec()].concat();
        assert_eq!(
            got,
            [
                Event::In(&handle(1, &[9, 8, 7, 6, 5, 4, 3, 2])),
                Event::Overflow,
                Event::In(&handle(2, &[1, 2, 3, 4])),
            ]
        );
        // A truncated buffer yields what is whole and stops.
        assert_eq!(events(&buf[..30]).count(), 0);
    }

    #[test]
    fn changes_in_the_still_directories_are_placed_without_a_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let (snapshots, tmp) = (dir.path().join("snapshots"), dir.path().join("tmp"));
        std::fs::create_dir_all(snapshots.join("7/fs")).unwrap();
        std::fs::create_dir(&tmp).unwrap();
        let still = [dir.path().to_path_buf(), snapshots.clone(), tmp.clone()];
        let watch = Watch::start(dir.path(), &still)
            .expect("fanotify needs CAP_SYS_ADMIN: the test suite runs as root");
        assert_eq!(
            watch.inner.still.len(),
            3,
            "a handle for each still directory"
        );
        let lookups = || watch.inner.drained().lookups;
        let before = lookups();
        // What a Prepare, a Commit and a Remove do in them.
        std::fs::write(dir.path().join("metadata.db-wal"), "x").unwrap();
        std::fs::create_dir(tmp.join("new-1")).unwrap();
        std::fs::rename(tmp.join("new-1"), snapshots.join("8")).unwrap();
        std::fs::rename(snapshots.join("8"), tmp.join("gone")).unwrap();
        assert_eq!(lookups(), before);
        // Anywhere else under the root is looked up: it may move into an upper.
        std::fs::write(tmp.join("gone/f"), "x").unwrap();
        assert_eq!(lookups(), before + 1);
    }

    #[test]
    fn an_unchanged_upper_is_not_walked_again_and_a_change_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let fs = dir.path().join("snapshots/7/fs");
        std::fs::create_dir_all(&fs).unwrap();
        let watch = Watch::start(dir.path(), &[])
            .expect("fanotify needs CAP_SYS_ADMIN: the test suite runs as root");
        let walks = std::cell::Cell::new(0);
        let usage = || {
            watch
                .usage(7, || {
                    walks.set(walks.get() + 1);
                    crate::usage::disk_usage(&fs)
                })
                .unwrap()
        };
        let first = usage();
        assert_eq!(usage(), first);
        assert_eq!(walks.get(), 1, "unchanged: no second walk");
        std::fs::write(fs.join("f"), vec![1u8; 8192]).unwrap();
        let second = usage();
        assert_eq!(walks.get(), 2);
        assert_eq!(second, crate::usage::disk_usage(&fs).unwrap());
        assert!(second.size > first.size);
        // A change elsewhere on the filesystem walks nothing.
        std::fs::write(dir.path().join("elsewhere"), "x").unwrap();
        usage();
        assert_eq!(walks.get(), 2);
    }
}
