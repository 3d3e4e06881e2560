//! A mount that only one thread sees, for applying a layer through a mount
//! as containerd's applier does when it cannot write an upper dir itself.
//!
//! containerd mounts on a temporary directory in the host's mount namespace
//! and unmounts afterwards, so a crash in between leaves the mount for all
//! to see. Here the mount is made in a mount namespace of one thread's own
//! (`unshare(CLONE_NEWNS)` works per thread), on a directory that is only
//! ever a mount point inside such namespaces: nothing of it reaches the
//! host, concurrent applies share the directory without seeing each other,
//! and the namespace ends with the thread.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;

use crate::mounts::Mount;

/// fuse-overlayfs starts within this long, or it is as good as broken.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a mount could not be made: the caller may leave the request to
/// another applier.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct NotMounted(anyhow::Error);

/// Runs `f` on a thread of its own that sees `m` mounted at `point` (an
/// empty directory), and nobody else does. Only FUSE mounts are made, the
/// way containerd makes them: through the `mount.fuse3` helper.
pub fn with_mount<T: Send>(
    m: &Mount,
    point: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NotMounted> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_private_namespace().map_err(NotMounted)?;
            mount_fuse(m, point).map_err(NotMounted)?;
            let result = f();
            // Unmounting ends the FUSE daemon, which would otherwise keep
            // the namespace alive after this thread. A busy mount is
            // detached: it goes once nothing holds it.
            if let Err(e) = crate::backend::unmount(point) {
                let detached = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
                tracing::warn!(point = %point.display(), error = %format!("{e:#}"), detached = detached.is_ok(), "could not unmount a private mount");
            }
            Ok(result)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A mount namespace for this thread alone, from which no mount
/// propagates back to the host's.
fn enter_private_namespace() -> anyhow::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).context("unsharing the mount namespace")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .context("making the private mount namespace a slave of the host's")
}

/// As containerd's `mountWithHelper` does it: `mount.fuse3 SOURCE TARGET
/// -o OPTION... -t SUBTYPE`.
fn mount_fuse(m: &Mount, point: &Path) -> anyhow::Result<()> {
    let Some((helper, subtype)) = [("fuse3.", "mount.fuse3"), ("fuse.", "mount.fuse")]
        .into_iter()
        .find_map(|(prefix, helper)| m.fstype.strip_prefix(prefix).map(|sub| (helper, sub)))
    else {
        anyhow::bail!(
            "ontop mounts only FUSE filesystems to apply through, not {:?}",
            m.fstype
        );
    };
    let mut cmd = Command::new(helper);
    cmd.arg(&m.source).arg(point);
    for o in &m.options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg("-t").arg(subtype);
    crate::backend::run_with_timeout(&mut cmd, MOUNT_TIMEOUT).with_context(|| {
        format!(
            "mounting {} at {} with {helper} -t {subtype}",
            m.source,
            point.display()
        )
    })
}
