//! Host base directories: a snapshot can sit copy-on-write on top of an
//! existing host directory, which is never modified.
//!
//! Users ask for one with the label `containerd.io/snapshot/ontop.base`
//! (containerd forwards only labels under `containerd.io/snapshot/`). Any
//! containerd client can set labels, so the label is untrusted input: a
//! base must resolve, after symlinks and `..`, to a directory inside one of
//! the configured `base_roots`, and never overlap ontop's own root. The
//! directory it resolved to is then pinned (see [`crate::pin`]), so that
//! what containerd mounts is what was checked, and the pins a crash left
//! behind are taken down at start-up.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::pin::{self, OpenError};
use crate::snapshot::{Kind, Labels};
use crate::store::{Record, Store};

pub const BASE_LABEL: &str = "containerd.io/snapshot/ontop.base";
pub const VOLATILE_LABEL: &str = "containerd.io/snapshot/ontop.volatile";

/// Where bases may come from. Empty: the feature is off.
#[derive(Debug, Clone, Default)]
pub struct BasePolicy {
    pub allowed_roots: Vec<PathBuf>,
    /// ontop's own root, which a base may neither sit in nor contain.
    pub own_root: PathBuf,
}

impl BasePolicy {
    /// Resolves a requested base to the canonical directory it names, or
    /// says which rule it breaks.
    pub fn resolve(&self, requested: &str) -> Result<PathBuf> {
        let reject = |why: String| {
            Err(Error::invalid_argument(format!(
                "base {requested:?}: {why}"
            )))
        };
        if self.allowed_roots.is_empty() {
            return reject(format!(
                "host base directories are disabled; to enable them, list the directories \
                 bases may come from in ontop's config.toml, e.g. base_roots = [\"/srv\"] \
                 (label {BASE_LABEL})"
            ));
        }
        let path = Path::new(requested);
        if !path.is_absolute() {
            return reject("must be an absolute path".into());
        }
        let resolved = match path.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return reject("does not exist".into())
            }
            Err(e) => return reject(format!("cannot be resolved: {e}")),
        };
        if !resolved.is_dir() {
            return reject(format!("{} is not a directory", resolved.display()));
        }
        if !self.allows(&resolved) {
            return reject(format!(
                "resolves to {}, which is outside the allowed base_roots [{}]",
                resolved.display(),
                self.roots()
            ));
        }
        let own = self
            .own_root
            .canonicalize()
            .unwrap_or_else(|_| self.own_root.clone());
        if resolved.starts_with(&own) || own.starts_with(&resolved) {
            return reject(format!(
                "resolves to {}, which overlaps ontop's own root {}",
                resolved.display(),
                own.display()
            ));
        }
        Ok(resolved)
    }

    /// Opens a base the database holds, to pin it: it must still be inside
    /// `base_roots` (the config may have changed) and be reached without
    /// following a symlink, since a swapped-in symlink is how a path
    /// escapes after it was checked.
    pub fn open(&self, base: &Path) -> Result<OwnedFd> {
        let shown = base.display();
        if !self.allows(base) {
            return Err(Error::failed_precondition(format!(
                "base directory {shown} is no longer inside the allowed base_roots [{}]",
                self.roots()
            )));
        }
        open_resolved(base)
    }

    /// Pins `base` for a mount of `rec`, reached as its path shows it now.
    pub fn pin(&self, layout: &Layout, rec: &Record, base: &Path) -> Result<()> {
        let dir = self.open(base)?;
        match layout.pin_base(rec.id, dir.as_fd()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::not_found(format!(
                "snapshot {:?} does not exist",
                rec.key
            ))),
            other => Ok(other.context("pinning the base directory")?),
        }
    }

    fn allows(&self, resolved: &Path) -> bool {
        self.allowed_roots.iter().any(|root| {
            root.canonicalize()
                .map(|r| resolved.starts_with(r))
                .unwrap_or(false)
        })
    }

    fn roots(&self) -> String {
        let roots: Vec<String> = self
            .allowed_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        roots.join(", ")
    }
}

/// Start-up repair: takes down the pins of snapshots with no mounts on a
/// base, which a crash leaves between the transaction of a Commit (or of an
/// Update that drops the base) and the unpin after it. A pin of a snapshot
/// the database does not know goes with its directory, at Cleanup.
pub fn unpin_strays(layout: &Layout, store: &Store) -> anyhow::Result<()> {
    for id in layout.pinned().context("listing base pins")? {
        let stray = store.read(|tx| {
            Ok(tx
                .record_by_id(id)?
                .is_some_and(|r| r.kind == Kind::Committed || r.base.is_none()))
        })?;
        if stray {
            layout
                .unpin_base(id)
                .with_context(|| format!("unpinning snapshot {id}, which mounts no base"))?;
            tracing::info!(id, "unpinned a base left by a crash");
        }
    }
    // Commit unpins a based snapshot's base and then removes its mount
    // point: a crash between the two leaves an empty directory, which no
    // mount table shows. Only committed snapshots on a base can have one.
    let committed_on_bases = store.read(|tx| tx.committed_on_bases())?;
    for id in committed_on_bases {
        if std::fs::symlink_metadata(layout.base_dir(id)).is_ok() {
            layout
                .unpin_base(id)
                .with_context(|| format!("removing the base mount point of snapshot {id}"))?;
            tracing::info!(id, "removed a base mount point left by a crash");
        }
    }
    Ok(())
}

/// Opens a resolved base (a canonical path) without following a symlink,
/// or says, as a FailedPrecondition, why it cannot be pinned.
pub fn open_resolved(base: &Path) -> Result<OwnedFd> {
    let shown = base.display();
    pin::open_dir(base).map_err(|e| {
        Error::failed_precondition(match e {
            OpenError::Missing => format!("base directory {shown} is gone"),
            OpenError::NotADirectory(at) if at == base => {
                format!("base directory {shown} is no longer a directory")
            }
            OpenError::NotADirectory(at) => format!(
                "base directory {shown} is gone: {} on its path is not a directory",
                at.display()
            ),
            OpenError::Symlink(at) => format!(
                "base directory {shown}: {} on its path is now a symlink, and a resolved \
                     base is never reached through one",
                at.display()
            ),
            OpenError::Io(e) => format!("base directory {shown} cannot be opened: {e}"),
        })
    })
}

/// The base a request names, if any: a non-empty base label.
pub fn requested(labels: &Labels) -> Option<&str> {
    labels
        .get(BASE_LABEL)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Parses the volatile label: absent or "false" is off, "true" is on.
pub fn volatile(labels: &Labels) -> Result<bool> {
    match labels.get(VOLATILE_LABEL).map(String::as_str) {
        None | Some("") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Error::invalid_argument(format!(
            "label {VOLATILE_LABEL} must be \"true\" or \"false\", not {other:?}"
        ))),
    }
}

/// Makes `upper`'s root look like the base's root: the merged tree's root
/// takes its attributes from the upper dir, and a container on a base
/// should see the base's root mode and owner. `base` is the opened base,
/// not its path, which may lead elsewhere by now.
///
/// In a user namespace, an owner from outside it has no number inside and
/// cannot be given to the upper; then the upper keeps its owner.
pub fn copy_root_attributes(base: BorrowedFd<'_>, upper: &Path) -> io::Result<()> {
    let st = nix::sys::stat::fstat(base)?;
    match std::os::unix::fs::chown(upper, Some(st.st_uid), Some(st.st_gid)) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        other => other?,
    }
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(st.st_mode & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        allowed: PathBuf,
        outside: PathBuf,
        policy: BasePolicy,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("srv");
        let outside = dir.path().join("etc");
        let own = dir.path().join("srv/ontop-root");
        for d in [&allowed, &outside, &own] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(allowed.join("tree/sub")).unwrap();
        std::fs::write(allowed.join("file"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("escape")).unwrap();
        std::os::unix::fs::symlink(allowed.join("tree"), allowed.join("inside-link")).unwrap();
        Fixture {
            policy: BasePolicy {
                allowed_roots: vec![allowed.clone()],
                own_root: own,
            },
            _dir: dir,
            allowed,
            outside,
        }
    }

    #[test]
    fn a_directory_inside_the_allowlist_resolves_to_its_canonical_path() {
        let f = fixture();
        let tree = f.allowed.join("tree");
        let s = |p: &Path| p.display().to_string();
        assert_eq!(
            f.policy.resolve(&s(&tree)).unwrap(),
            tree.canonicalize().unwrap()
        );
        assert_eq!(
            f.policy
                .resolve(&s(&f.allowed.join("inside-link")))
                .unwrap(),
            tree.canonicalize().unwrap()
        );
        assert_eq!(
            f.policy.resolve(&format!("{}/sub/..", s(&tree))).unwrap(),
            tree.canonicalize().unwrap()
        );
    }

    #[test]
    fn every_broken_rule_is_an_invalid_argument_naming_it() {
        let f = fixture();
        let a = f.allowed.display();
        let cases = [
            ("relative/dir".to_string(), "absolute"),
            (format!("{a}/missing"), "does not exist"),
            (format!("{a}/file"), "not a directory"),
            (
                f.outside.display().to_string(),
                "outside the allowed base_roots",
            ),
            (format!("{a}/escape"), "outside the allowed base_roots"),
            (
                format!("{a}/tree/../../etc"),
                "outside the allowed base_roots",
            ),
            (format!("{a}/ontop-root"), "overlaps ontop's own root"),
            (a.to_string(), "overlaps ontop's own root"),
        ];
        for (path, why) in cases {
            let err = f.policy.resolve(&path).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{path}: {err}");
            assert!(err.to_string().contains(why), "{path}: {err}");
        }
        let off = BasePolicy::default().resolve("/srv").unwrap_err();
        assert!(off.to_string().contains("base_roots = ["), "{off}");
    }

    #[test]
    fn volatile_takes_true_or_false_only() {
        let l = |v: &str| Labels::from([(VOLATILE_LABEL.to_string(), v.to_string())]);
        assert!(volatile(&l("true")).unwrap());
        assert!(!volatile(&l("false")).unwrap());
        assert!(!volatile(&Labels::new()).unwrap());
        assert!(volatile(&l("yes")).is_err());
    }
}
