//! The Diff service's core: which directory an Apply's mounts name, and
//! applying the layer there with ontop's applier. Only ontop's own active
//! snapshots are written, straight into their upper dir with no mount;
//! anything else is answered Unimplemented, which makes containerd's diff
//! service try the next applier in its list.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::apply::{self, content::BlobError, Applied, Target, Whiteouts};
use crate::error::{Error, Result};
use crate::mounts::Mount;
use crate::snapshotter::Snapshotter;

/// An Apply, as the wire carried it.
#[derive(Debug, Clone)]
pub(crate) struct ApplyRequest {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    pub mounts: Vec<Mount>,
    /// Stream processor payloads (decryption keys, say) were given.
    pub has_payloads: bool,
    pub sync_fs: bool,
}

pub(crate) struct Differ {
    core: Arc<Snapshotter>,
    content_store: PathBuf,
    in_userns: bool,
}

/// The overlay options ontop's applier cannot honour by writing the upper
/// dir itself: ids that a mount would map.
const MAPPING_OPTIONS: [&str; 4] = ["uidmap=", "gidmap=", "uidmapping=", "gidmapping="];

impl Differ {
    pub fn new(core: Arc<Snapshotter>, content_store: PathBuf) -> Differ {
        Differ {
            core,
            content_store,
            in_userns: !crate::backend::is_real_root(),
        }
    }

    /// Applies the layer the request names to the snapshot its mounts name.
    pub fn apply(&self, req: &ApplyRequest) -> Result<Applied> {
        if req.has_payloads {
            return Err(Error::unimplemented(
                "ontop's applier runs no stream processors (the request carries payloads, as for an encrypted layer)",
            ));
        }
        let compression = apply::compression(&req.media_type).map_err(Error::unimplemented)?;
        let target = self.target(&req.mounts)?;
        let blob = apply::content::open(&self.content_store, &req.digest, req.size).map_err(
            |e| match e {
                BlobError::BadDigest(_) | BlobError::WrongSize { .. } => Error::invalid_argument(e),
                BlobError::Missing { .. } => Error::not_found(e),
                BlobError::Io { .. } => Error::Internal(e.into()),
            },
        )?;
        let root = target.root.clone();
        let was_empty = is_empty(&root)?;
        let applied = apply::apply(blob, compression, target).map_err(|e| {
            // A fresh upper holds nothing of the layer afterwards: the
            // snapshot is as Prepare made it.
            if was_empty {
                if let Err(clear) = clear(&root) {
                    tracing::error!(dir = %root.display(), error = %clear, "could not clear a failed apply's files");
                }
            }
            let what = format!("applying layer {}: {e}", req.digest);
            if apply::is_malformed(&e) {
                Error::invalid_argument(what)
            } else {
                Error::Internal(anyhow::Error::new(e).context(format!("applying layer {}", req.digest)))
            }
        })?;
        if req.sync_fs {
            syncfs(&root)?;
        }
        Ok(applied)
    }

    /// Where the layer goes: the upper dir of one of ontop's active
    /// snapshots, and the form its whiteouts take there.
    fn target(&self, mounts: &[Mount]) -> Result<Target> {
        let [m] = mounts else {
            return Err(Error::unimplemented(format!(
                "ontop's applier writes only into one of ontop's own snapshots (one mount); the request has {} mounts",
                mounts.len()
            )));
        };
        let option = |prefix: &str| {
            m.options
                .iter()
                .find_map(|o| o.strip_prefix(prefix).map(str::to_string))
        };
        let (upper, whiteouts, lowers) = match m.fstype.as_str() {
            "bind" | "rbind" => {
                if m.options.iter().any(|o| o == "ro") {
                    return Err(Error::invalid_argument(
                        "a layer cannot be applied to a read-only mount",
                    ));
                }
                // A tree on its own: whiteouts remove, as containerd does
                // through a bind mount.
                (PathBuf::from(&m.source), Whiteouts::Remove, Vec::new())
            }
            "overlay" | "fuse3.fuse-overlayfs" => {
                if m.options
                    .iter()
                    .any(|o| MAPPING_OPTIONS.iter().any(|p| o.starts_with(p)))
                {
                    return Err(Error::unimplemented(
                        "ontop's applier does not write through id mappings",
                    ));
                }
                if self.in_userns {
                    // Overlay's whiteouts are devices, which a user
                    // namespace cannot make.
                    return Err(Error::unimplemented(
                        "ontop's applier does not write overlay whiteouts in a user namespace",
                    ));
                }
                let Some(upper) = option("upperdir=") else {
                    return Err(Error::invalid_argument(
                        "a layer cannot be applied to an overlay without an upperdir",
                    ));
                };
                let opaque_xattr = if m.options.iter().any(|o| o == "userxattr") {
                    "user.overlay.opaque"
                } else {
                    "trusted.overlay.opaque"
                };
                let lowers = option("lowerdir=")
                    .map(|l| l.split(':').map(PathBuf::from).collect())
                    .unwrap_or_default();
                (
                    PathBuf::from(upper),
                    Whiteouts::Overlay { opaque_xattr },
                    lowers,
                )
            }
            other => {
                return Err(Error::unimplemented(format!(
                    "ontop's applier writes only into ontop's own snapshots, not a {other:?} mount"
                )))
            }
        };
        if self.core.active_upper(&upper)?.is_none() {
            return Err(Error::unimplemented(format!(
                "{} is not one of ontop's snapshots: ontop's applier writes only into its own",
                upper.display()
            )));
        }
        Ok(Target {
            root: upper,
            whiteouts,
            lowers,
            in_userns: self.in_userns,
        })
    }
}

fn is_empty(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| {
            Error::Internal(anyhow::Error::new(e).context(format!("reading {}", dir.display())))
        })?
        .next()
        .is_none())
}

/// Removes everything in `dir`, leaving `dir`.
fn clear(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        crate::removal::remove_all(&entry?.path())?;
    }
    Ok(())
}

fn syncfs(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir)?;
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) } != 0 {
        return Err(Error::Internal(
            anyhow::Error::new(std::io::Error::last_os_error())
                .context(format!("syncing the filesystem of {}", dir.display())),
        ));
    }
    Ok(())
}
