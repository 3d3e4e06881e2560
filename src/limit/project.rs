//! The project-quota enforcer (XFS mounted with `prjquota`): a snapshot's
//! `fs` and `work` get a project id of their own, inherited by everything
//! made in them, and the project's hard limit on blocks holds the writes.
//! No extra mount; `df` in the container shows the limit.
//!
//! Not ext4, though it has project quotas: its hard limits do not hold
//! for a writer with CAP_SYS_RESOURCE, and overlayfs writes to the upper
//! dir with the credentials of whoever mounted it, which is containerd,
//! as root. In the guest of tests/limits_guest.rs, writes through an
//! overlay under a 32 MiB project limit on ext4 went on until the disk
//! was full. XFS holds the limit.
//!
//! Project ids are [`PROJECT_BASE`] plus the snapshot's id: ids are never
//! reused, and the range stays clear of the small ids people give their
//! own projects by hand.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::bail;

use crate::snapshot::Id;

/// The first project id ontop uses.
pub const PROJECT_BASE: u32 = 0x4000_0000;

const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
const EXT4_SUPER_MAGIC: i64 = 0xEF53;

const PRJQUOTA: u32 = 2;
const Q_SETQUOTA: u32 = 0x80_0008;
const Q_GETQUOTA: u32 = 0x80_0007;
const Q_XGETQSTATV: u32 = (b'X' as u32) << 8 | 8;
/// Project quota enforcement is on (`fs_quota_statv.qs_flags`).
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
const QIF_BLIMITS: u32 = 1;
const FS_XFLAG_PROJINHERIT: u32 = 0x200;
/// quotactl_fd(2), Linux 5.14.
const SYS_QUOTACTL_FD: libc::c_long = 443;

#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

#[repr(C)]
#[derive(Default, Debug)]
struct DqBlk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

nix::ioctl_read!(fs_get_xattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_set_xattr, b'X', 32, FsXattr);

/// The project id of snapshot `id`.
pub fn project_of(id: Id) -> u32 {
    PROJECT_BASE.wrapping_add(id as u32)
}

fn quotactl(on: &File, cmd: u32, id: u32, addr: *mut libc::c_void) -> io::Result<()> {
    // QCMD(cmd, type) of linux/quota.h.
    let qcmd = (cmd << 8) | PRJQUOTA;
    // SAFETY: the kernel reads or writes a struct of its layout at addr,
    // which the caller owns for the call.
    let rc = unsafe {
        libc::syscall(
            SYS_QUOTACTL_FD,
            on.as_raw_fd(),
            qcmd as libc::c_uint,
            id as libc::c_uint,
            addr,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives `dir` (empty, just made) the project of snapshot `id`, inherited
/// by what is made in it.
pub fn assign(dir: &Path, id: Id) -> io::Result<()> {
    let f = File::open(dir)?;
    let mut attr = FsXattr::default();
    // SAFETY: a descriptor we hold and a struct of the kernel's layout.
    unsafe { fs_get_xattr(f.as_raw_fd(), &mut attr) }?;
    attr.projid = project_of(id);
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: as above; the kernel only reads.
    unsafe { fs_set_xattr(f.as_raw_fd(), &attr) }?;
    Ok(())
}

/// Sets the hard limit of snapshot `id`'s project, on the filesystem
/// `on` is in; None lifts it.
pub fn set_limit(on: &Path, id: Id, bytes: Option<u64>) -> io::Result<()> {
    let f = File::open(on)?;
    let mut q = DqBlk {
        // In 1 KiB blocks, rounded up.
        bhardlimit: bytes.map_or(0, |b| b.div_ceil(1024)),
        valid: QIF_BLIMITS,
        ..Default::default()
    };
    quotactl(
        &f,
        Q_SETQUOTA,
        project_of(id),
        (&mut q as *mut DqBlk).cast(),
    )
}

/// The hard limit, in bytes, on snapshot `id`'s project; 0 for none.
pub fn limit(on: &Path, id: Id) -> io::Result<u64> {
    let f = File::open(on)?;
    let mut q = DqBlk::default();
    match quotactl(
        &f,
        Q_GETQUOTA,
        project_of(id),
        (&mut q as *mut DqBlk).cast(),
    ) {
        Ok(()) => Ok(q.bhardlimit * 1024),
        // No record of the project at all.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Checks that project quotas are enforced on the filesystem of
/// `scratch` (under the root).
pub fn probe(scratch: &Path) -> anyhow::Result<()> {
    let st = nix::sys::statfs::statfs(scratch)?;
    let fs = st.filesystem_type().0 as i64;
    if fs == EXT4_SUPER_MAGIC {
        bail!(
            "ext4's project quotas let root with CAP_SYS_RESOURCE past their limit, and \
             overlay writes with the credentials of the root that mounted it"
        );
    }
    if fs != XFS_SUPER_MAGIC {
        bail!("the root is not on XFS");
    }
    let f = File::open(scratch)?;
    // fs_quota_statv: qs_version (1) first, qs_flags at byte 2.
    let mut statv = [0_u8; 256];
    statv[0] = 1;
    match quotactl(&f, Q_XGETQSTATV, 0, statv.as_mut_ptr().cast()) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::ENOTSUP | libc::EINVAL)
            ) =>
        {
            bail!("the kernel has no quota support for this filesystem ({e})")
        }
        Err(e) => bail!("reading the quota state: {e}"),
    }
    let flags = u16::from_ne_bytes([statv[2], statv[3]]);
    if flags & FS_QUOTA_PDQ_ENFD == 0 {
        bail!("project quotas are not enforced here (mount the XFS with prjquota)");
    }
    Ok(())
}
