//! Unix socket files that are never reachable with the wrong mode.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context as _;

/// Binds a unix socket at `path` with `mode`, replacing what is there.
/// Bound in a private (0700) directory beside it, given its mode there,
/// then renamed into place: the socket is never reachable with the mode
/// bind gives it (0777 less the umask). The staged path is no longer than
/// `DIR/ontop.sock`, within sun_path's 108 bytes wherever the default
/// name fits.
pub fn bind_private(path: &Path, mode: u32) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".o")
        .rand_bytes(6)
        .tempdir_in(dir)
        .with_context(|| format!("creating a private directory in {}", dir.display()))?;
    let staged = staging.path().join("s");
    let listener = std::os::unix::net::UnixListener::bind(&staged)
        .with_context(|| format!("binding socket {}", path.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    std::fs::rename(&staged, path)
        .with_context(|| format!("moving the socket into place at {}", path.display()))?;
    Ok(listener)
}
