//! Host base directories: a snapshot can sit copy-on-write on top of an
//! existing host directory, which is never modified.
//!
//! Users ask for one with the label `containerd.io/snapshot/ontop.base`
//! (containerd forwards only labels under `containerd.io/snapshot/`). Any
//! containerd client can set labels, so the label is untrusted input: a
//! base must resolve, after symlinks and `..`, to a directory inside one of
//! the configured `base_roots`, and never overlap ontop's own root.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::snapshot::Labels;

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
        let inside_allowed = self.allowed_roots.iter().any(|root| {
            root.canonicalize()
                .map(|r| resolved.starts_with(r))
                .unwrap_or(false)
        });
        if !inside_allowed {
            let roots: Vec<String> = self
                .allowed_roots
                .iter()
                .map(|r| r.display().to_string())
                .collect();
            return reject(format!(
                "resolves to {}, which is outside the allowed base_roots [{}]",
                resolved.display(),
                roots.join(", ")
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
/// should see the base's root mode and owner.
pub fn copy_root_attributes(base: &Path, upper: &Path) -> io::Result<()> {
    let md = std::fs::metadata(base)?;
    std::os::unix::fs::chown(upper, Some(md.uid()), Some(md.gid()))?;
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(md.mode() & 0o7777))
}

/// Checks, at Mounts, that the base is still a directory.
pub fn check_present(base: &Path) -> Result<()> {
    match std::fs::metadata(base) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(Error::failed_precondition(format!(
            "base directory {} is no longer a directory",
            base.display()
        ))),
        Err(e) => Err(Error::failed_precondition(format!(
            "base directory {} is gone: {e}",
            base.display()
        ))),
    }
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
