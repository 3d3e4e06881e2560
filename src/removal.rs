//! Deleting a tree under ontop's root without ever deleting through a
//! mount or following a symlink out of it: the root holds base pins (bind
//! mounts of host directories), and upper dirs that containers write to.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::pin;

/// Removes a tree, ignoring that it is already gone.
///
/// It never deletes through a mount. The only mounts under the root are
/// base pins, which show host directories; one met on the way (a crash
/// can leave a pin in `tmp/`) is detached first, and if it will not go,
/// the removal fails and leaves it. Directories are opened relative to
/// their parent with `O_NOFOLLOW`, so a symlink swapped in by a container
/// still writing to its upper cannot lead the removal out of the tree.
pub fn remove_all(path: &Path) -> io::Result<()> {
    let md = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if !md.is_dir() {
        return ignore_missing(fs::remove_file(path));
    }
    let dir = open_subdir(None, path)?;
    let mount = pin::mount_of(Some(dir.as_fd()), Path::new(""))?;
    remove_contents(&dir, path, mount)?;
    ignore_missing(fs::remove_dir(path))
}

/// Empties `dir`, which is on `mount`, without leaving that mount.
fn remove_contents(dir: &OwnedFd, path: &Path, mount: u64) -> io::Result<()> {
    let mut listing = nix::dir::Dir::from_fd(nix::unistd::dup(dir)?)?;
    let mut entries = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            let is_dir = match entry.file_type() {
                Some(t) => t == nix::dir::Type::Directory,
                None => {
                    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)?
                }
            };
            entries.push((OsStr::from_bytes(name.to_bytes()).to_owned(), is_dir));
        }
    }
    drop(listing);
    for (name, is_dir) in entries {
        let name = Path::new(&name);
        if !is_dir {
            unlink_at(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
            continue;
        }
        let child = path.join(name);
        let Some(sub) = open_on_mount(dir, name, mount, &child)? else {
            continue;
        };
        remove_contents(&sub, &child, mount)?;
        drop(sub);
        unlink_at(dir, name, nix::unistd::UnlinkatFlags::RemoveDir)?;
    }
    Ok(())
}

/// Opens the directory `name` in `dir` on `mount`, detaching what is
/// mounted on it first if need be; None if it is gone. The detach goes
/// through the parent we hold open, not by path.
fn open_on_mount(
    dir: &OwnedFd,
    name: &Path,
    mount: u64,
    path: &Path,
) -> io::Result<Option<OwnedFd>> {
    // None: gone; else the directory, and whether it is on `mount`.
    let open = || -> io::Result<Option<(OwnedFd, bool)>> {
        let sub = match open_subdir(Some(dir.as_fd()), name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            other => other?,
        };
        let on_mount = pin::mount_of(Some(sub.as_fd()), Path::new(""))? == mount;
        Ok(Some((sub, on_mount)))
    };
    match open()? {
        None => return Ok(None),
        Some((sub, true)) => return Ok(Some(sub)),
        Some(_) => {}
    }
    let held = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    pin::unpin(&held)?;
    match open()? {
        None => Ok(None),
        Some((sub, true)) => Ok(Some(sub)),
        Some(_) => Err(crosses_mount(path)),
    }
}

fn unlink_at(dir: &OwnedFd, name: &Path, flag: nix::unistd::UnlinkatFlags) -> io::Result<()> {
    ignore_missing(nix::unistd::unlinkat(dir, name, flag).map_err(io::Error::from))
}

fn open_subdir(dir: Option<BorrowedFd<'_>>, name: &Path) -> io::Result<OwnedFd> {
    pin::open_at(
        dir,
        name,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
    )
}

fn crosses_mount(path: &Path) -> io::Error {
    io::Error::other(format!(
        "refusing to delete {}: something is mounted there and would not unmount",
        path.display()
    ))
}

pub(crate) fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_never_deletes_through_a_mount_even_a_writable_one() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host");
        fs::create_dir_all(host.join("precious")).unwrap();
        fs::write(host.join("precious/file"), "keep").unwrap();
        let tree = d.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/f"), "x").unwrap();
        std::os::unix::fs::symlink(&host, tree.join("a/link")).unwrap();
        nix::mount::mount(
            Some(&host),
            &tree.join("a/b"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let removed = remove_all(&tree);
        let _ = pin::unpin(&tree.join("a/b"));
        removed.unwrap();
        assert!(!tree.exists());
        assert_eq!(
            fs::read_to_string(host.join("precious/file")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn a_missing_tree_is_already_removed() {
        let d = tempfile::tempdir().unwrap();
        remove_all(&d.path().join("gone")).unwrap();
    }
}
