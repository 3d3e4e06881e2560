//! The on-disk layout under the root, and the filesystem steps on it.
//!
//! ```text
//! <root>/lock              flock: one daemon per root
//! <root>/metadata.db       SQLite (plus -wal, -shm)
//! <root>/snapshots/<id>/fs    the snapshot's upper dir (its whole tree if it has no parent)
//! <root>/snapshots/<id>/work  overlay's work dir (active snapshots only)
//! <root>/snapshots/<id>/base  mount point: the host base, pinned read-only (active and views)
//! <root>/snapshots/<id>/limit      mount point of limit.img, which holds `fs` and `work`
//!                                  of an active snapshot with a loop-ext4 limit
//! <root>/snapshots/<id>/limit.img  that ext4 image (see `crate::limit::loop_ext4`)
//! <root>/tmp/              snapshots being built, before they get an id
//! <root>/empty/            always empty: the lower dir of a mapped snapshot with no parent
//! <root>/mnt/              empty but inside one thread's own mount namespace, where the
//!                          applier mounts what it writes through (src/private_mount.rs)
//! <root>/trash/            directories waiting to be deleted
//! ```
//!
//! Keys never become file names: a directory is named by the snapshot's
//! numeric id. The short `snapshots/<id>/fs` also keeps overlay's lowerdir
//! option small enough for deep chains once containerd strips the common
//! `<root>/snapshots/` prefix.
//!
//! Deletion always goes through `trash/`: a rename is atomic, so whoever
//! renames a directory owns its deletion, and nothing can be half-deleted at
//! a path the database might point to.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context as _};

use crate::pin;
use crate::removal::{ignore_missing, remove_all};
use crate::snapshot::{Id, Kind};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    /// Orders pinning against discarding, so that a Mounts racing a
    /// Remove never pins into a directory on its way to the trash. Per
    /// root, shared by clones; one process serves a root once (the root
    /// lock), so no other `Layout` of the same root discards meanwhile.
    pins: Arc<Mutex<()>>,
}

/// How long start-up waits for a held root lock before it says another
/// ontop serves the root.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Process-wide, not per root: it only makes temporary names unique
/// among this process's threads (the pid covers other processes).
static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// The pid, read once: `std::process::id` is a syscall, and Prepare names
/// a temporary directory on every call. ontop never forks without exec.
static PID: OnceLock<u32> = OnceLock::new();

fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        PID.get_or_init(std::process::id),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout {
            root: root.into(),
            pins: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join("metadata.db")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn snapshot_dir(&self, id: Id) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The snapshot's own tree: the overlay upper dir, or the bind source.
    pub fn fs(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    pub fn work(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Where a loop-ext4 limit's image is mounted.
    pub fn limit_dir(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("limit")
    }

    pub fn limit_image(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("limit.img")
    }

    /// The upper dir: in the loop image while one holds it, else `fs`.
    pub fn upper(&self, id: Id, in_image: bool) -> PathBuf {
        match in_image {
            true => self.limit_dir(id).join("fs"),
            false => self.fs(id),
        }
    }

    /// Overlay's work dir, beside the upper.
    pub fn upper_work(&self, id: Id, in_image: bool) -> PathBuf {
        match in_image {
            true => self.limit_dir(id).join("work"),
            false => self.work(id),
        }
    }

    /// Mounts a snapshot's loop image again, unless it is mounted: after
    /// a reboot nothing is. NotFound means the snapshot's directory is
    /// gone: it was removed meanwhile.
    pub fn mount_limit_image(&self, id: Id) -> anyhow::Result<()> {
        let _pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        fs::symlink_metadata(self.snapshot_dir(id))?;
        let target = self.limit_dir(id);
        if pin::is_mount_point(&target)? {
            return Ok(());
        }
        crate::limit::loop_ext4::mount(&self.limit_image(id), &target)
    }

    /// Unmounts and deletes a snapshot's loop image, if it has one: what
    /// Commit leaves once the tree is copied out. The loop device clears
    /// itself with the mount.
    pub fn drop_limit_image(&self, id: Id) -> io::Result<()> {
        let target = self.limit_dir(id);
        pin::unpin(&target)?;
        remove_all(&target)?;
        ignore_missing(fs::remove_file(self.limit_image(id)))
    }

    /// Where the snapshot's host base is pinned (see [`crate::pin`]). Mount
    /// specs name this path, never the host's: host paths may hold `,` or
    /// `:`, which overlay options cannot carry; a path under the root keeps
    /// containerd's lowerdir compaction working for deep images on a base;
    /// and only ontop can change what it shows.
    pub fn base_dir(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("base")
    }

    /// Pins `base`, a directory opened with [`pin::open_dir`], at the
    /// snapshot's base dir, unless it is pinned there already. NotFound
    /// means the snapshot's directory is gone: it was removed meanwhile.
    pub fn pin_base(&self, id: Id, base: BorrowedFd<'_>) -> io::Result<()> {
        let _pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock, a directory still here is not being discarded.
        fs::symlink_metadata(self.snapshot_dir(id))?;
        let target = self.base_dir(id);
        match fs::symlink_metadata(&target) {
            Ok(md) if md.is_dir() => {
                if pin::identity_at(&target)? == pin::identity(base)? {
                    return Ok(());
                }
                pin::unpin(&target)?;
            }
            // Before pins, the base dir was a symlink to the host path.
            Ok(_) => {
                fs::remove_file(&target)?;
                create_mount_point(&target)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_mount_point(&target)?,
            Err(e) => return Err(e),
        }
        pin::pin(base, &target)
    }

    /// The snapshots whose base dir has something mounted on it.
    pub fn pinned(&self) -> io::Result<Vec<Id>> {
        let snapshots = self.snapshots_dir();
        Ok(pin::mount_points_under(&snapshots)?
            .iter()
            .filter_map(|p| {
                let rel = p.strip_prefix(&snapshots).ok()?;
                match rel.iter().collect::<Vec<_>>()[..] {
                    [id, base] if base == "base" => id.to_str()?.parse().ok(),
                    _ => None,
                }
            })
            .collect())
    }

    /// Unpins the snapshot's base and removes its base dir, if any.
    pub fn unpin_base(&self, id: Id) -> io::Result<()> {
        let _pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        remove_base_dir(&self.base_dir(id))
    }

    /// Scratch space on the snapshots' filesystem, emptied at start-up.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A directory that stays empty, for a layered mount with no layers.
    pub fn empty_dir(&self) -> PathBuf {
        self.root.join("empty")
    }

    /// Where the applier mounts a snapshot it writes through: only ever a
    /// mount point inside a private mount namespace, so empty to everyone
    /// else.
    pub fn private_mount_dir(&self) -> PathBuf {
        self.root.join("mnt")
    }

    fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// The root and its own directories: made at start-up, never moved or
    /// removed while serving.
    pub fn own_dirs(&self) -> [PathBuf; 6] {
        [
            self.root.clone(),
            self.snapshots_dir(),
            self.tmp_dir(),
            self.trash_dir(),
            self.empty_dir(),
            self.private_mount_dir(),
        ]
    }

    /// Creates the directory skeleton. The root is 0700, like containerd's
    /// own snapshotters: upper dirs hold container data.
    pub fn create(&self) -> anyhow::Result<()> {
        for dir in self.own_dirs() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// Takes the root's exclusive lock, so a second daemon fails fast.
    pub fn lock(&self) -> anyhow::Result<RootLock> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // A crashed ontop's lock can outlive it for a moment: a child it
        // was starting (mkfs.ext4, cp) holds a copy of its descriptors
        // until its exec. So a held lock is asked again for a while.
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        let rc = loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            let busy =
                rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK);
            if !busy || std::time::Instant::now() > deadline {
                break rc;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another ontop is already serving root {} (it holds {}); to replace it \
                     without refusing a call, start this one with --takeover",
                    self.root.display(),
                    path.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        Ok(RootLock { _file: file })
    }

    /// Start-up repair: removes every directory left in `tmp/` and `trash/`
    /// by a crash. Must run under the root lock, before serving.
    pub fn remove_stale_temporaries(&self) -> anyhow::Result<usize> {
        let mut removed = 0;
        for dir in [self.tmp_dir(), self.trash_dir()] {
            for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let path = entry?.path();
                remove_all(&path).with_context(|| format!("removing {}", path.display()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Fails unless the filesystem under the root reports file types in
    /// directory entries: overlayfs needs d_type to find whiteouts.
    pub fn check_d_type(&self) -> anyhow::Result<()> {
        let probe = self.tmp_dir().join(unique_name("dtype"));
        fs::create_dir(&probe)?;
        let result = (|| {
            File::create(probe.join("f"))?;
            let mut dir = nix::dir::Dir::open(
                &probe,
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )?;
            let typed = dir
                .iter()
                .filter_map(|e| e.ok())
                .find(|e| e.file_name().to_bytes() == b"f")
                .and_then(|e| e.file_type())
                .is_some();
            anyhow::Ok(typed)
        })();
        let _ = remove_all(&probe);
        if !result.context("probing d_type support")? {
            bail!(
                "the filesystem under {} does not support d_type, which overlayfs needs \
                 (on XFS, reformat with ftype=1)",
                self.root.display()
            );
        }
        Ok(())
    }

    /// Builds a new snapshot directory in `tmp/`: `fs` (0755) and, for an
    /// active snapshot, `work`; a btrfs subvolume of its own when a qgroup
    /// is to limit it. Dropped without `install`, it is removed.
    pub fn new_snapshot_dir(&self, kind: Kind, subvolume: bool) -> io::Result<NewSnapshotDir> {
        let path = self.tmp_dir().join(unique_name("new"));
        if subvolume {
            crate::limit::btrfs::create_subvolume(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
        } else {
            fs::DirBuilder::new().mode(0o700).create(&path)?;
        }
        let mut dir = NewSnapshotDir {
            path: Some(path),
            fs_chmodded: false,
            in_image: false,
        };
        let fs_dir = dir.fs();
        fs::DirBuilder::new().mode(0o755).create(&fs_dir)?;
        // The umask must not decide the container's root mode. Most
        // umasks leave 0755 whole, and then the mode needs no chmod, and
        // no fsync of its own (see `NewSnapshotDir::sync`).
        if fs::metadata(&fs_dir)?.permissions().mode() & 0o7777 != 0o755 {
            fs::set_permissions(&fs_dir, fs::Permissions::from_mode(0o755))?;
            dir.fs_chmodded = true;
        }
        if kind == Kind::Active {
            fs::DirBuilder::new()
                .mode(0o711)
                .create(dir.path().join("work"))?;
        }
        Ok(dir)
    }

    /// Renames a new snapshot directory into place as `snapshots/<id>`.
    /// An existing directory there is an orphan (the id is fresh from the
    /// database, so nothing refers to it), left by a crash between rename
    /// and commit; it goes to the trash first. The rename refuses to
    /// replace, so the common case costs no lookup of the target.
    pub fn install(&self, mut dir: NewSnapshotDir, id: Id) -> io::Result<()> {
        let target = self.snapshot_dir(id);
        let src = dir.path.take().expect("installed once");
        let mut result = rename_noreplace(&src, &target);
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) {
            result = self
                .discard_path(&target, Pins::Unknown)
                .and_then(|_| rename_noreplace(&src, &target));
        }
        if result.is_err() {
            dir.path = Some(src);
        }
        result
    }

    /// Removes `work/work/incompat/volatile`, which a volatile overlay
    /// mount leaves behind.
    pub fn clear_volatile_marker(&self, id: Id, in_image: bool) -> io::Result<()> {
        remove_all(&self.upper_work(id, in_image).join("work/incompat/volatile"))
    }

    /// Moves `snapshots/<id>` to the trash. A missing directory is fine: it
    /// may already have been reclaimed.
    pub fn discard(&self, id: Id, pins: Pins) -> io::Result<Option<PathBuf>> {
        self.discard_path(&self.snapshot_dir(id), pins)
    }

    /// Unpins a base first, where there may be one: a pin is a mount, and
    /// the trash should hold nothing but ontop's own files. A pin missed
    /// here (a failed unpin after the base was dropped) is still safe:
    /// `remove_all` detaches every mount it meets rather than delete through
    /// it.
    fn discard_path(&self, path: &Path, pins: Pins) -> io::Result<Option<PathBuf>> {
        let _pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if pins == Pins::Unknown {
            pin::unpin(&path.join("base"))?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = self.trash_dir().join(unique_name(&name));
        match fs::rename(path, &dest) {
            Ok(()) => Ok(Some(dest)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Entries under `snapshots/`, by name.
    pub fn snapshot_dir_names(&self) -> io::Result<Vec<OsString>> {
        fs::read_dir(self.snapshots_dir())?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    /// Moves every entry under `snapshots/` that `known` rejects to the
    /// trash and returns the trash paths to delete. Run it under the
    /// metadata write lock, so no snapshot is being installed meanwhile.
    pub fn discard_unknown(&self, known: impl Fn(Id) -> bool) -> io::Result<Vec<PathBuf>> {
        self.discard_unknown_of(&self.snapshot_dir_names()?, known)
    }

    /// [`Layout::discard_unknown`] over a listing of `snapshots/` already
    /// made under the same lock.
    pub fn discard_unknown_of(
        &self,
        names: &[OsString],
        known: impl Fn(Id) -> bool,
    ) -> io::Result<Vec<PathBuf>> {
        let mut trashed = Vec::new();
        for name in names {
            let id = name.to_str().and_then(|s| s.parse::<Id>().ok());
            if id.is_some_and(&known) {
                continue;
            }
            if let Some(p) = self.discard_path(&self.snapshots_dir().join(name), Pins::Unknown)? {
                trashed.push(p);
            }
        }
        Ok(trashed)
    }

    /// Makes `snapshots/<id>/fs` (and `work`, for an active snapshot)
    /// again, empty, for `ontop check --repair`.
    pub fn recreate_tree(&self, id: Id, kind: Kind) -> io::Result<()> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(self.snapshot_dir(id))
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })?;
        fs::create_dir(self.fs(id))?;
        fs::set_permissions(self.fs(id), fs::Permissions::from_mode(0o755))?;
        if kind == Kind::Active && !self.work(id).is_dir() {
            self.recreate_work(id)?;
        }
        Ok(())
    }

    /// Creates an active snapshot's overlay work dir again (it holds no
    /// data between mounts).
    pub fn recreate_work(&self, id: Id) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o711).create(self.work(id))
    }

    /// Everything in `tmp/` and `trash/`: a running daemon's work in
    /// progress, or a crash's leftovers when none runs.
    pub fn temporaries(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for dir in [self.tmp_dir(), self.trash_dir()] {
            for e in fs::read_dir(&dir)? {
                out.push(e?.path());
            }
        }
        Ok(out)
    }

    /// The owner of a snapshot's root, which a child's new root copies.
    pub fn owner(&self, id: Id) -> io::Result<(u32, u32)> {
        let md = fs::metadata(self.fs(id))?;
        Ok((md.uid(), md.gid()))
    }
}

/// Held for the daemon's lifetime; the kernel drops the lock with the fd.
pub struct RootLock {
    _file: File,
}

/// A snapshot directory under construction in `tmp/`.
pub struct NewSnapshotDir {
    path: Option<PathBuf>,
    /// `fs/` got its mode from a chmod after its mkdir.
    fs_chmodded: bool,
    /// The upper and work dirs are in a loop image.
    in_image: bool,
}

impl NewSnapshotDir {
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("not yet installed")
    }

    pub fn fs(&self) -> PathBuf {
        self.path().join("fs")
    }

    /// The upper dir: `fs`, or the one in the loop image.
    pub fn upper(&self) -> PathBuf {
        match self.in_image {
            true => self.path().join("limit/fs"),
            false => self.fs(),
        }
    }

    /// Makes a loop image that holds at most `limit` bytes, mounts it at
    /// `limit/`, and moves the upper and work dirs into it (see
    /// `crate::limit::loop_ext4`). Durable once it returns, but for the
    /// directory's own entries, which [`NewSnapshotDir::sync`] keeps.
    pub fn enclose_in_image(&mut self, limit: u64) -> anyhow::Result<()> {
        use crate::limit::loop_ext4;
        let mount = self.path().join("limit");
        create_mount_point(&mount)?;
        let image = self.path().join("limit.img");
        loop_ext4::create_image(&image, limit)?;
        loop_ext4::mount(&image, &mount)?;
        loop_ext4::make_tree(&mount)?;
        self.in_image = true;
        Ok(())
    }

    /// Makes the new tree durable before it is renamed into place: the
    /// directory holding the entries of `fs/` and `work/`, and `fs/` first
    /// if a chmod changed it after its mkdir. Both are empty and made with
    /// their mode: the entry is what must last, and its parent's fsync
    /// keeps it, with the inode it names.
    pub fn sync(&self) -> io::Result<()> {
        if self.fs_chmodded {
            File::open(self.fs())?.sync_all()?;
        }
        File::open(self.path())?.sync_all()
    }

    /// Pins the host base, opened with [`pin::open_dir`], before the
    /// directory is installed.
    pub fn pin_base(&self, base: BorrowedFd<'_>) -> io::Result<()> {
        let target = self.path().join("base");
        create_mount_point(&target)?;
        pin::pin(base, &target)
    }
}

/// What the caller of [`Layout::discard`] knows about base pins under the
/// directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pins {
    /// The snapshot never sat on a base: no unmount to try (one `umount2`
    /// per Remove otherwise, each failing with ENOENT).
    None,
    /// It sits on a base, or nobody knows: detach whatever is there.
    Unknown,
}

/// Renames, failing with AlreadyExists rather than replace `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let flags = nix::fcntl::RenameFlags::RENAME_NOREPLACE;
    match nix::fcntl::renameat2(nix::fcntl::AT_FDCWD, from, nix::fcntl::AT_FDCWD, to, flags) {
        // A filesystem without the flag (ZFS before 2.2, some FUSE ones):
        // look first, as before. Only ontop renames into `snapshots/`, one
        // id at a time, so nothing appears in between.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
            rename_looking_first(from, to)
        }
        other => other.map_err(io::Error::from),
    }
}

fn rename_looking_first(from: &Path, to: &Path) -> io::Result<()> {
    if to.symlink_metadata().is_ok() {
        return Err(io::ErrorKind::AlreadyExists.into());
    }
    fs::rename(from, to)
}

fn create_mount_point(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)
}

fn remove_base_dir(path: &Path) -> io::Result<()> {
    pin::unpin(path)?;
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => ignore_missing(fs::remove_dir(path)),
        Ok(_) => ignore_missing(fs::remove_file(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Drop for NewSnapshotDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            if let Err(e) = remove_all(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove temporary snapshot dir");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn layout() -> (tempfile::TempDir, Layout) {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path().join("root"));
        l.create().unwrap();
        (d, l)
    }

    #[test]
    fn a_new_active_dir_has_fs_0755_and_work() {
        let (_d, l) = layout();
        let dir = l.new_snapshot_dir(Kind::Active, false).unwrap();
        let md = fs::metadata(dir.fs()).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o755);
        assert!(dir.path().join("work").is_dir());
        let view = l.new_snapshot_dir(Kind::View, false).unwrap();
        assert!(!view.path().join("work").exists());
    }

    #[test]
    fn a_dropped_new_dir_is_removed_and_an_installed_one_is_kept() {
        let (_d, l) = layout();
        let dropped = l.new_snapshot_dir(Kind::Active, false).unwrap();
        let path = dropped.path().to_path_buf();
        drop(dropped);
        assert!(!path.exists());
        let dir = l.new_snapshot_dir(Kind::Active, false).unwrap();
        l.install(dir, 7).unwrap();
        assert!(l.fs(7).is_dir());
        assert!(l.work(7).is_dir());
    }

    #[test]
    fn install_over_an_orphan_replaces_it() {
        let (_d, l) = layout();
        fs::create_dir_all(l.fs(3).join("stale")).unwrap();
        l.install(l.new_snapshot_dir(Kind::Active, false).unwrap(), 3)
            .unwrap();
        assert!(!l.fs(3).join("stale").exists());
        assert_eq!(
            l.remove_stale_temporaries().unwrap(),
            1,
            "orphan went to trash"
        );
    }

    #[test]
    fn discard_unknown_keeps_known_ids_only() {
        let (_d, l) = layout();
        for name in ["1", "2", "junk"] {
            fs::create_dir_all(l.snapshots_dir().join(name)).unwrap();
        }
        let trashed = l.discard_unknown(|id| id == 1).unwrap();
        assert_eq!(trashed.len(), 2);
        assert_eq!(l.snapshot_dir_names().unwrap(), vec![OsString::from("1")]);
    }

    fn host(d: &tempfile::TempDir) -> PathBuf {
        let host = d.path().join("host");
        fs::create_dir_all(host.join("precious")).unwrap();
        fs::write(host.join("precious/file"), "keep").unwrap();
        host
    }

    /// Installs active snapshot `id` with `host` pinned as its base.
    fn pinned_snapshot(l: &Layout, id: Id, host: &Path) {
        l.install(l.new_snapshot_dir(Kind::Active, false).unwrap(), id)
            .unwrap();
        l.pin_base(id, pin::open_dir(host).unwrap().as_fd())
            .unwrap();
    }

    fn assert_host_kept(host: &Path) {
        assert_eq!(
            fs::read_to_string(host.join("precious/file")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn a_base_is_pinned_once_and_unpinned_before_its_snapshot_is_discarded() {
        let (d, l) = layout();
        let host = host(&d);
        let base = pin::open_dir(&host).unwrap();
        l.install(l.new_snapshot_dir(Kind::Active, false).unwrap(), 1)
            .unwrap();
        l.pin_base(1, base.as_fd()).unwrap();
        l.pin_base(1, base.as_fd()).unwrap();
        assert!(pin::is_mount_point(&l.base_dir(1)).unwrap());
        assert!(l.base_dir(1).join("precious/file").exists());

        let trashed = l.discard(1, Pins::Unknown).unwrap().unwrap();
        assert!(!pin::is_mount_point(&trashed.join("base")).unwrap());
        remove_all(&trashed).unwrap();
        assert_host_kept(&host);
        assert!(matches!(
            l.pin_base(1, base.as_fd()).unwrap_err().kind(),
            io::ErrorKind::NotFound
        ));
    }

    #[test]
    fn a_stray_pin_under_a_snapshot_discarded_as_unpinned_is_detached_not_deleted_through() {
        let (d, l) = layout();
        let host = host(&d);
        pinned_snapshot(&l, 1, &host);

        let trashed = l.discard(1, Pins::None).unwrap().unwrap();
        assert!(pin::is_mount_point(&trashed.join("base")).unwrap());
        remove_all(&trashed).unwrap();
        assert!(!trashed.exists());
        assert_host_kept(&host);
    }

    #[test]
    fn install_over_an_orphan_with_a_pin_detaches_the_pin_first() {
        let (d, l) = layout();
        let host = host(&d);
        pinned_snapshot(&l, 5, &host);
        let fresh = l.new_snapshot_dir(Kind::View, false).unwrap();
        l.install(fresh, 5).unwrap();
        assert!(!l.work(5).exists(), "the new (view) directory is in place");
        assert!(!l.base_dir(5).exists());
        for t in l.temporaries().unwrap() {
            assert!(!pin::is_mount_point(&t.join("base")).unwrap());
            remove_all(&t).unwrap();
        }
        assert_host_kept(&host);
    }

    #[test]
    fn both_renames_refuse_to_replace_and_otherwise_rename() {
        let (_d, l) = layout();
        for rename in [rename_noreplace, rename_looking_first] {
            let (a, b) = (l.tmp_dir().join("a"), l.tmp_dir().join("b"));
            fs::create_dir(&a).unwrap();
            fs::create_dir_all(b.join("kept")).unwrap();
            let refused = rename(&a, &b).unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
            assert!(a.exists() && b.join("kept").exists());
            fs::remove_dir_all(&b).unwrap();
            rename(&a, &b).unwrap();
            assert!(!a.exists() && b.exists());
            fs::remove_dir(&b).unwrap();
        }
    }

    #[test]
    fn a_pin_left_in_tmp_by_a_crash_is_detached_at_start_up() {
        let (d, l) = layout();
        let host = host(&d);
        let dir = l.new_snapshot_dir(Kind::Active, false).unwrap();
        dir.pin_base(pin::open_dir(&host).unwrap().as_fd()).unwrap();
        std::mem::forget(dir);
        assert_eq!(l.remove_stale_temporaries().unwrap(), 1);
        assert_eq!(fs::read_dir(l.tmp_dir()).unwrap().count(), 0);
        assert_host_kept(&host);
    }

    #[test]
    fn unpinning_also_removes_an_old_base_symlink() {
        let (d, l) = layout();
        let host = host(&d);
        l.install(l.new_snapshot_dir(Kind::Active, false).unwrap(), 1)
            .unwrap();
        std::os::unix::fs::symlink(&host, l.base_dir(1)).unwrap();
        l.unpin_base(1).unwrap();
        assert!(l.base_dir(1).symlink_metadata().is_err());
        l.unpin_base(1).unwrap();
        assert_host_kept(&host);
    }

    #[test]
    fn a_second_lock_on_the_same_root_fails_clearly() {
        let (_d, l) = layout();
        let _held = l.lock().unwrap();
        let err = l.lock().err().unwrap();
        assert!(err.to_string().contains("already serving"), "{err}");
    }

    #[test]
    fn the_test_filesystem_supports_d_type() {
        let (_d, l) = layout();
        l.check_d_type().unwrap();
    }
}
