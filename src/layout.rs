//! The on-disk layout under the root, and the filesystem steps on it.
//!
//! ```text
//! <root>/lock              flock: one daemon per root
//! <root>/metadata.db       SQLite (plus -wal, -shm)
//! <root>/snapshots/<id>/fs    the snapshot's upper dir (its whole tree if it has no parent)
//! <root>/snapshots/<id>/work  overlay's work dir (active snapshots only)
//! <root>/snapshots/<id>/base  symlink to the host base directory, if any
//! <root>/tmp/              snapshots being built, before they get an id
//! <root>/empty/            always empty: the lower dir of a mapped snapshot with no parent
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
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context as _};

use crate::snapshot::{Id, Kind};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
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

    /// The short path that stands for a host base directory in `lowerdir`:
    /// host paths may hold `,` or `:`, which overlay options cannot carry,
    /// and a path under the root keeps containerd's lowerdir compaction
    /// working for deep images on a base.
    pub fn base_link(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("base")
    }

    /// Points `snapshots/<id>/base` at `target`, or removes it for None.
    /// Replacing is atomic (a rename over the old link), and a link that
    /// already points there is left alone.
    pub fn set_base_link(&self, id: Id, target: Option<&Path>) -> io::Result<()> {
        let link = self.base_link(id);
        let Some(target) = target else {
            return match fs::remove_file(&link) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            };
        };
        if fs::read_link(&link).ok().as_deref() == Some(target) {
            return Ok(());
        }
        let tmp = self.snapshot_dir(id).join(".base-new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        fs::rename(&tmp, &link)
    }

    /// Scratch space on the snapshots' filesystem, emptied at start-up.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A directory that stays empty, for a layered mount with no layers.
    pub fn empty_dir(&self) -> PathBuf {
        self.root.join("empty")
    }

    fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// Creates the directory skeleton. The root is 0700, like containerd's
    /// own snapshotters: upper dirs hold container data.
    pub fn create(&self) -> anyhow::Result<()> {
        for dir in [
            self.root.clone(),
            self.snapshots_dir(),
            self.tmp_dir(),
            self.trash_dir(),
            self.empty_dir(),
        ] {
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
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another ontop is already serving root {} (it holds {})",
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
    /// active snapshot, `work`. Dropped without `install`, it is removed.
    pub fn new_snapshot_dir(&self, kind: Kind) -> io::Result<NewSnapshotDir> {
        let path = self.tmp_dir().join(unique_name("new"));
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        let dir = NewSnapshotDir { path: Some(path) };
        let fs_dir = dir.fs();
        fs::create_dir(&fs_dir)?;
        // Explicit chmod: the umask must not decide the container's root mode.
        fs::set_permissions(&fs_dir, fs::Permissions::from_mode(0o755))?;
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
    /// and commit; it goes to the trash first.
    pub fn install(&self, mut dir: NewSnapshotDir, id: Id) -> io::Result<()> {
        let target = self.snapshot_dir(id);
        if target.symlink_metadata().is_ok() {
            self.discard_path(&target)?;
        }
        let src = dir.path.take().expect("installed once");
        if let Err(e) = fs::rename(&src, &target) {
            dir.path = Some(src);
            return Err(e);
        }
        Ok(())
    }

    /// Removes `work/work/incompat/volatile`, which a volatile overlay
    /// mount leaves behind.
    pub fn clear_volatile_marker(&self, id: Id) -> io::Result<()> {
        remove_all(&self.work(id).join("work/incompat/volatile"))
    }

    /// Moves `snapshots/<id>` to the trash. A missing directory is fine: it
    /// may already have been reclaimed.
    pub fn discard(&self, id: Id) -> io::Result<Option<PathBuf>> {
        self.discard_path(&self.snapshot_dir(id))
    }

    fn discard_path(&self, path: &Path) -> io::Result<Option<PathBuf>> {
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
        let mut trashed = Vec::new();
        for name in self.snapshot_dir_names()? {
            let id = name.to_str().and_then(|s| s.parse::<Id>().ok());
            if id.is_some_and(&known) {
                continue;
            }
            if let Some(p) = self.discard_path(&self.snapshots_dir().join(&name))? {
                trashed.push(p);
            }
        }
        Ok(trashed)
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

/// Removes a tree, ignoring that it is already gone.
pub fn remove_all(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => fs::remove_file(path),
        other => other,
    }
}

/// Held for the daemon's lifetime; the kernel drops the lock with the fd.
pub struct RootLock {
    _file: File,
}

/// A snapshot directory under construction in `tmp/`.
pub struct NewSnapshotDir {
    path: Option<PathBuf>,
}

impl NewSnapshotDir {
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("not yet installed")
    }

    pub fn fs(&self) -> PathBuf {
        self.path().join("fs")
    }

    /// Links the host base directory in, before the directory is installed.
    pub fn link_base(&self, target: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, self.path().join("base"))
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

    fn layout() -> (tempfile::TempDir, Layout) {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path().join("root"));
        l.create().unwrap();
        (d, l)
    }

    #[test]
    fn a_new_active_dir_has_fs_0755_and_work() {
        let (_d, l) = layout();
        let dir = l.new_snapshot_dir(Kind::Active).unwrap();
        let md = fs::metadata(dir.fs()).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o755);
        assert!(dir.path().join("work").is_dir());
        let view = l.new_snapshot_dir(Kind::View).unwrap();
        assert!(!view.path().join("work").exists());
    }

    #[test]
    fn a_dropped_new_dir_is_removed_and_an_installed_one_is_kept() {
        let (_d, l) = layout();
        let dropped = l.new_snapshot_dir(Kind::Active).unwrap();
        let path = dropped.path().to_path_buf();
        drop(dropped);
        assert!(!path.exists());
        let dir = l.new_snapshot_dir(Kind::Active).unwrap();
        l.install(dir, 7).unwrap();
        assert!(l.fs(7).is_dir());
        assert!(l.work(7).is_dir());
    }

    #[test]
    fn install_over_an_orphan_replaces_it() {
        let (_d, l) = layout();
        fs::create_dir_all(l.fs(3).join("stale")).unwrap();
        l.install(l.new_snapshot_dir(Kind::Active).unwrap(), 3)
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

    #[test]
    fn the_base_link_is_replaced_atomically_and_removal_never_follows_it() {
        let (d, l) = layout();
        let host = d.path().join("host");
        fs::create_dir_all(host.join("precious")).unwrap();
        l.install(l.new_snapshot_dir(Kind::Active).unwrap(), 1)
            .unwrap();
        l.set_base_link(1, Some(&host)).unwrap();
        assert_eq!(fs::read_link(l.base_link(1)).unwrap(), host);
        l.set_base_link(1, Some(&d.path().join("other"))).unwrap();
        l.set_base_link(1, Some(&host)).unwrap();
        assert_eq!(fs::read_link(l.base_link(1)).unwrap(), host);
        let trashed = l.discard(1).unwrap().unwrap();
        remove_all(&trashed).unwrap();
        assert!(
            host.join("precious").is_dir(),
            "deleting a snapshot never follows its base link"
        );
        l.set_base_link(2, None).unwrap();
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
