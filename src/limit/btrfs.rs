//! The btrfs enforcer: a snapshot's directory is a subvolume of its own,
//! and its qgroup's limit on referenced bytes holds the writes. Quotas
//! must be on (`btrfs quota enable`); ontop never turns them on itself:
//! that is the filesystem owner's call, with a cost to every write.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context as _};

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
/// The inode number of every subvolume's root directory.
const SUBVOLUME_ROOT_INODE: u64 = 256;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
#[derive(Default)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

#[repr(C)]
#[derive(Default)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

const LIMIT_MAX_RFER: u64 = 1;
/// Asks the kernel to clear a limit rather than set one.
const CLEAR_VALUE: u64 = u64::MAX;

nix::ioctl_write_ptr!(subvol_create, 0x94, 14, VolArgs);
// The kernel declares it _IOR although it reads the argument.
nix::ioctl_read!(qgroup_limit, 0x94, 43, QgroupLimitArgs);

/// Whether `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path)?;
    Ok(st.filesystem_type().0 as i64 == BTRFS_SUPER_MAGIC)
}

/// Whether `path` is the root of a subvolume.
pub fn is_subvolume(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    Ok(is_btrfs(path)? && std::fs::symlink_metadata(path)?.ino() == SUBVOLUME_ROOT_INODE)
}

/// Creates `path` as an empty subvolume (mode 0755, root's).
pub fn create_subvolume(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no parent"));
    };
    let bytes = name.as_bytes();
    let mut args = VolArgs {
        fd: 0,
        name: [0; 4088],
    };
    if bytes.len() >= args.name.len() || CString::new(bytes).is_err() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad name"));
    }
    args.name[..bytes.len()].copy_from_slice(bytes);
    let dir = File::open(parent)?;
    // SAFETY: a directory we hold open and an argument of the kernel's
    // layout, NUL-terminated.
    unsafe { subvol_create(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// Sets the limit on the referenced bytes of the subvolume at `path`, or
/// lifts it (None).
pub fn set_limit(path: &Path, bytes: Option<u64>) -> io::Result<()> {
    let subvolume = File::open(path)?;
    let mut args = QgroupLimitArgs {
        // 0: the qgroup of the subvolume the descriptor is in.
        qgroupid: 0,
        lim: QgroupLimit {
            flags: LIMIT_MAX_RFER,
            max_rfer: bytes.unwrap_or(CLEAR_VALUE),
            ..Default::default()
        },
    };
    // SAFETY: a descriptor we hold open and an argument of the kernel's
    // layout, which it only reads.
    unsafe { qgroup_limit(subvolume.as_raw_fd(), &mut args) }?;
    Ok(())
}

/// Checks that limits work in `scratch` (under the root): btrfs, with
/// quotas on. Makes and deletes a subvolume.
pub fn probe(scratch: &Path) -> anyhow::Result<()> {
    if !is_btrfs(scratch)? {
        bail!("the root is not on btrfs");
    }
    let probe = scratch.join(format!("limit-probe-{}", std::process::id()));
    create_subvolume(&probe).context("creating a subvolume")?;
    let limited = set_limit(&probe, Some(super::MIN_LIMIT));
    std::fs::remove_dir(&probe).context("deleting the probe subvolume")?;
    match limited {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let mount = mount_point_of(scratch).unwrap_or_else(|| scratch.display().to_string());
            bail!("quotas are off on this btrfs (turn them on with `btrfs quota enable {mount}`)")
        }
        other => other.context("setting a qgroup limit"),
    }
}

/// The mount point `path` is under, from mountinfo, for messages.
fn mount_point_of(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.len())
        .map(str::to_string)
}
