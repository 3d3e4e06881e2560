//! Base pins: a host base directory held by a read-only bind mount inside
//! ontop's root, so that containerd mounts the directory ontop checked.
//!
//! A base passes the allowlist by its path, and a mount spec names a path
//! that the kernel resolves again when containerd mounts, later. Anyone who
//! can write inside an allowed root could swap a directory on that path for
//! a symlink in between and get any host directory mounted. A pin closes
//! the gap: the base is opened once, following no symlink, and the open
//! directory itself (not its path) is bind-mounted onto
//! `snapshots/<id>/base`, in the 0700 root that only ontop writes. Mount
//! specs name that mount point.
//!
//! Pins are mounts in ontop's mount namespace: containerd must share it,
//! as it does when both run as system services or inside one rootless
//! namespace.

use std::ffi::CString;
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::sys::statvfs::FsFlags;

/// Why a base path cannot be opened safely.
#[derive(Debug)]
pub enum OpenError {
    /// The path, or a directory on it, does not exist.
    Missing,
    /// `at`, on the path, is not a directory.
    NotADirectory(PathBuf),
    /// `at`, on the path, is a symlink, which a resolved base never follows.
    Symlink(PathBuf),
    Io(io::Error),
}

/// Opens the directory at `path` (absolute, no `.` or `..`) without
/// following any symlink on the way, as `openat2(RESOLVE_NO_SYMLINKS)`
/// would. One `openat(O_NOFOLLOW)` per component works on every kernel,
/// including the old ones that fuse-overlayfs users run.
pub fn open_dir(path: &Path) -> Result<OwnedFd, OpenError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut dir = open_at(None, Path::new("/"), flags).map_err(OpenError::Io)?;
    let mut walked = PathBuf::from("/");
    for component in path.components() {
        let name = match component {
            Component::RootDir => continue,
            Component::Normal(name) => name,
            other => {
                return Err(OpenError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has a {other:?} component", path.display()),
                )))
            }
        };
        walked.push(name);
        dir = match open_at(
            Some(dir.as_fd()),
            Path::new(name),
            flags | OFlag::O_NOFOLLOW,
        ) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpenError::Missing),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                // O_NOFOLLOW with O_DIRECTORY refuses a symlink and a file
                // alike; say which it was.
                let is_link = fs::symlink_metadata(&walked).is_ok_and(|m| m.is_symlink());
                return Err(if is_link {
                    OpenError::Symlink(walked)
                } else {
                    OpenError::NotADirectory(walked)
                });
            }
            Err(e) => return Err(OpenError::Io(e)),
        };
    }
    Ok(dir)
}

pub fn open_at(dir: Option<BorrowedFd<'_>>, name: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let dir = dir.unwrap_or(nix::fcntl::AT_FDCWD);
    Ok(nix::fcntl::openat(dir, name, flags, Mode::empty())?)
}

/// What makes a directory itself, whatever path leads to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
}

pub fn identity(dir: BorrowedFd<'_>) -> io::Result<Identity> {
    let st = nix::sys::stat::fstat(dir)?;
    Ok(Identity {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// The identity of what `path` shows, not following a final symlink.
pub fn identity_at(path: &Path) -> io::Result<Identity> {
    let md = fs::symlink_metadata(path)?;
    Ok(Identity {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// Binds `dir` read-only onto `target`, an existing empty directory.
/// Not recursive: overlay never shows a lower layer's submounts either.
pub fn pin(dir: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    // The magic link resolves to the open directory, whatever its path
    // has become since it was opened.
    let source = format!("/proc/self/fd/{}", dir.as_raw_fd());
    nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    let remounted = nix::sys::statvfs::statvfs(target).and_then(|st| {
        // In a user namespace the source mount's flags are locked: a
        // remount that dropped one would be refused, so keep them all.
        let kept = [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ]
        .into_iter()
        .filter(|(st_flag, _)| st.flags().contains(*st_flag))
        .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms);
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | kept,
            None::<&str>,
        )
    });
    if let Err(e) = remounted {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    Ok(())
}

/// Detaches every mount on `target`; a plain directory, or none, is fine.
/// Running overlays keep their own hold on a detached pin.
pub fn unpin(target: &Path) -> io::Result<()> {
    loop {
        match nix::mount::umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The mount `name` (in `dir`, or the current directory) lives on. Kernels
/// before 5.8 report no mount id; there the device number stands in, which
/// tells filesystems apart but not binds within one.
pub fn mount_of(dir: Option<BorrowedFd<'_>>, name: &Path) -> io::Result<u64> {
    let name = CString::new(name.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | libc::AT_NO_AUTOMOUNT
        | if name.as_bytes().is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: a valid C string, a descriptor we borrow (or AT_FDCWD), and a
    // buffer statx fills.
    let rc = unsafe {
        libc::statx(
            dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd()),
            name.as_ptr(),
            flags,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx succeeded, so it wrote the buffer.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        Ok(stx.stx_mnt_id)
    } else {
        Ok((1 << 63) | (u64::from(stx.stx_dev_major) << 32) | u64::from(stx.stx_dev_minor))
    }
}

/// Whether something is mounted on `path`.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    Ok(mount_of(None, path)? != mount_of(None, parent)?)
}

/// The mount points at or below `dir` in this mount namespace.
pub fn mount_points_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = fs::read("/proc/self/mountinfo")?;
    Ok(info
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(std::ffi::OsString::from_vec(unescape(field))))
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|o| field[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(o) => {
                out.push(
                    o.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8) + (c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// Whether this process shares the mount namespace of PID 1, where a
/// system containerd runs, or, where PID 1's cannot be read (in some
/// sandboxes), of the process that started it. None when neither shows.
pub fn shares_mount_namespace() -> Option<bool> {
    let own = fs::read_link("/proc/self/ns/mnt").ok()?;
    let reference = fs::read_link("/proc/1/ns/mnt")
        .or_else(|_| fs::read_link(format!("/proc/{}/ns/mnt", nix::unistd::getppid().as_raw())))
        .ok()?;
    Some(own == reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host/tree");
        fs::create_dir_all(host.join("sub")).unwrap();
        fs::write(host.join("a.txt"), "original").unwrap();
        let target = d.path().join("pin");
        fs::create_dir(&target).unwrap();
        (d, host, target)
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(br"/a\040b\011c\134d"), b"/a b\tc\\d");
        assert_eq!(unescape(br"/plain\0"), b"/plain\\0");
    }

    #[test]
    fn open_dir_follows_no_symlink_and_says_where_it_stopped() {
        let (d, host, _) = fixture();
        let id = identity(open_dir(&host).unwrap().as_fd()).unwrap();
        assert_eq!(id, identity_at(&host).unwrap());

        std::os::unix::fs::symlink(&host, d.path().join("link")).unwrap();
        match open_dir(&d.path().join("link/sub")) {
            Err(OpenError::Symlink(at)) => assert_eq!(at, d.path().join("link")),
            other => panic!("{other:?}"),
        }
        match open_dir(&host.join("a.txt")) {
            Err(OpenError::NotADirectory(at)) => assert_eq!(at, host.join("a.txt")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            open_dir(&host.join("missing")),
            Err(OpenError::Missing)
        ));
    }

    #[test]
    fn a_pin_holds_the_directory_it_opened_read_only_whatever_its_path_becomes() {
        let (d, host, target) = fixture();
        let dir = open_dir(&host).unwrap();
        // The swap the pin defends against: the path now leads elsewhere.
        let decoy = d.path().join("decoy");
        fs::create_dir(&decoy).unwrap();
        fs::write(decoy.join("a.txt"), "decoy").unwrap();
        fs::rename(&host, d.path().join("host/moved")).unwrap();
        std::os::unix::fs::symlink(&decoy, &host).unwrap();

        pin(dir.as_fd(), &target).unwrap();
        let listed = mount_points_under(d.path()).unwrap();
        let shown = fs::read_to_string(target.join("a.txt"));
        let write = fs::write(target.join("new"), "x");
        let was_mount = is_mount_point(&target).unwrap();
        unpin(&target).unwrap();
        assert_eq!(listed, std::slice::from_ref(&target));
        assert_eq!(shown.unwrap(), "original");
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert!(was_mount);
        assert!(mount_points_under(d.path()).unwrap().is_empty());
        assert!(!is_mount_point(&target).unwrap());
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
        unpin(&target).unwrap();
    }
}
