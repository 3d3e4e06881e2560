//! The Diff service's core: which directory an Apply's mounts name, and
//! applying the layer there with ontop's applier. Only ontop's own active
//! snapshots are written: straight into their upper dir with no mount, as
//! containerd's overlay applier does, or, where the mount transforms what
//! is written (fuse-overlayfs mapping ids), through that mount in a
//! namespace of the applying thread's own. Anything else is answered
//! Unimplemented, which makes containerd's diff service try the next
//! applier in its list.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::apply::{self, content::BlobError, Applied, Target, Whiteouts};
use crate::error::{Error, Result};
use crate::mounts::Mount;
use crate::private_mount;
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

/// Where an Apply writes.
struct Destination {
    /// The snapshot's upper dir: synced after, and emptied again when an
    /// apply into an empty one fails.
    upper: PathBuf,
    target: Target,
    /// The mount to write through, at `target.root`; none when the upper
    /// dir is written directly.
    through: Option<Mount>,
}

/// fuse-overlayfs's id-mapping options: what a write through the mount
/// stores differs from what it was given, so the layer goes through it.
const FUSE_MAPPING_OPTIONS: [&str; 2] = ["uidmapping=", "gidmapping="];

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
        let dest = self.destination(&req.mounts)?;
        let blob = apply::content::open(&self.content_store, &req.digest, req.size).map_err(
            |e| match e {
                BlobError::BadDigest(_) | BlobError::WrongSize { .. } => Error::invalid_argument(e),
                BlobError::Missing { .. } => Error::not_found(e),
                BlobError::Io { .. } => Error::Internal(e.into()),
            },
        )?;
        let upper = dest.upper.clone();
        let was_empty = is_empty(&upper)?;
        let result = match dest.through {
            None => apply::apply(blob, compression, dest.target),
            Some(m) => {
                let point = dest.target.root.clone();
                private_mount::with_mount(&m, &point, || apply::apply(blob, compression, dest.target))
                    .map_err(|e| {
                        tracing::warn!(error = %e, "could not mount a snapshot to apply through; leaving the layer to the next applier");
                        Error::unimplemented(format!("ontop's applier could not mount {}: {e}", upper.display()))
                    })?
            }
        };
        let applied = result.map_err(|e| {
            // A fresh upper holds nothing of the layer afterwards: the
            // snapshot is as Prepare made it.
            if was_empty {
                if let Err(clear) = clear(&upper) {
                    tracing::error!(dir = %upper.display(), error = %clear, "could not clear a failed apply's files");
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
            syncfs(&upper)?;
        }
        Ok(applied)
    }

    /// Where the layer goes: the upper dir of one of ontop's active
    /// snapshots, the form its whiteouts take there, and whether it is
    /// written through its mount.
    fn destination(&self, mounts: &[Mount]) -> Result<Destination> {
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
                if m.options
                    .iter()
                    .any(|o| o.starts_with("uidmap=") || o.starts_with("gidmap="))
                {
                    // containerd writes it through an idmapped bind mount,
                    // which needs a user namespace of the mapping's own.
                    return Err(Error::unimplemented(
                        "ontop's applier does not make idmapped bind mounts; containerd's applier does",
                    ));
                }
                // A tree on its own: whiteouts remove, as containerd does
                // through a bind mount.
                (PathBuf::from(&m.source), Whiteouts::Remove, Vec::new())
            }
            // containerd 2's `uidmap=`/`gidmap=` on a kernel overlay map
            // only the lower dirs; containerd's overlay applier writes the
            // upper dir with the layer's own ids whatever they say, and so
            // does ontop's.
            "overlay" | "fuse3.fuse-overlayfs" => {
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
        let maps = m
            .options
            .iter()
            .any(|o| FUSE_MAPPING_OPTIONS.iter().any(|p| o.starts_with(p)));
        if m.fstype.starts_with("fuse") && maps {
            // Through the mount, as containerd's applier goes through
            // every mount but a kernel overlay: the merged view decides
            // what a whiteout removes, and the mapping what is stored.
            return Ok(Destination {
                upper,
                target: Target {
                    root: self.core.private_mount_dir(),
                    whiteouts: Whiteouts::Remove,
                    lowers: Vec::new(),
                    in_userns: self.in_userns,
                },
                through: Some(m.clone()),
            });
        }
        Ok(Destination {
            upper: upper.clone(),
            target: Target {
                root: upper,
                whiteouts,
                lowers,
                in_userns: self.in_userns,
            },
            through: None,
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
