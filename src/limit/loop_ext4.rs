//! The loop enforcer: an ext4 image, on a loop device, holds a snapshot's
//! upper and work dirs. Works on any filesystem under the root; a write
//! past the limit gets ENOSPC, and `df` in the container shows the limit.
//!
//! ```text
//! snapshots/<id>/limit.img   sparse image; `discard` gives freed blocks back
//! snapshots/<id>/limit/      its mount point; `limit/fs` is the upper,
//!                            `limit/work` overlay's work dir
//! ```
//!
//! The loop device clears itself once the image is unmounted
//! (`LO_FLAGS_AUTOCLEAR`), so detaching the mount is the whole teardown,
//! and a crash leaks no device: a device never mounted clears when its
//! last descriptor closes, as a dead process's do.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// `mkfs.ext4` flags, chosen from measurements (docs/size-limits.md):
/// no blocks reserved for root, which in a container is everyone; 4 KiB
/// blocks whatever the size, where mke2fs would pick 1 KiB for small
/// images and spend more on metadata; a 4 MiB journal rather than up to
/// 1 GiB; no zeroing, since a fresh sparse file reads as zeros anyway.
const MKFS_ARGS: &[&str] = &[
    "-q",
    "-F",
    "-m",
    "0",
    "-b",
    "4096",
    "-i",
    "16384",
    "-I",
    "256",
    "-J",
    "size=4",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
];

/// `discard` hands blocks freed in the image back to the host's
/// filesystem; `noinit_itable` skips the background zeroing of inode
/// tables that would fill the sparse image.
const MOUNT_OPTIONS: &str = "discard,noinit_itable";

/// The image size that leaves at least `limit` bytes free to the
/// container: ext4's journal, inode tables and group descriptors cost 4
/// MiB plus 1.6 to 3.8% of the image (measured from 16 MiB to 100 GiB).
pub fn image_size(limit: u64) -> u64 {
    let size = limit + limit / 25 + (12 << 20);
    size.div_ceil(4096) * 4096
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// linux/capability.h
const CAP_SYS_RESOURCE: u32 = 24;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Creates the image at `image` (0600, sparse) and makes ext4 on it.
pub fn create_image(image: &Path, limit: u64) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .with_context(|| format!("creating {}", image.display()))?;
    file.set_len(image_size(limit))
        .with_context(|| format!("sizing {}", image.display()))?;
    drop(file);
    let out = Command::new(tool("mkfs.ext4"))
        .args(MKFS_ARGS)
        .arg(image)
        .output()
        .context("running mkfs.ext4 (from e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 {} failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // mke2fs flushes its writes; the fsync makes sure of them.
    File::open(image)?.sync_all()?;
    Ok(())
}

/// Attaches `image` to a free loop device and mounts it on `target`. The
/// device goes away by itself when the mount does.
pub fn mount(image: &Path, target: &Path) -> anyhow::Result<()> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let (device, path) = attach(&backing)?;
    nix::mount::mount(
        Some(path.as_path()),
        target,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        Some(MOUNT_OPTIONS),
    )
    .with_context(|| {
        format!(
            "mounting {} ({}) on {}",
            path.display(),
            image.display(),
            target.display()
        )
    })?;
    // The mount now holds the device; closing ours arms the autoclear.
    drop(device);
    Ok(())
}

/// Binds `backing` to a free loop device: the device, open, and its path.
fn attach(backing: &File) -> anyhow::Result<(File, PathBuf)> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .context("opening /dev/loop-control")?;
    // Another process may take the device between GET_FREE and
    // CONFIGURE: then ask again.
    for _ in 0..16 {
        // SAFETY: an ioctl without argument on a descriptor we own.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("finding a free loop device");
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = backing.as_raw_fd() as u32;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: the kernel reads a struct of its own layout.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if rc == 0 {
            return Ok((device, path));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err).with_context(|| format!("configuring {}", path.display()));
        }
    }
    bail!("every free loop device was taken by someone else first, 16 times")
}

/// Whether this process may grow a mounted ext4 (the kernel asks for
/// CAP_SYS_RESOURCE, which some sandboxes take even from root).
pub fn can_grow() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps >> CAP_SYS_RESOURCE & 1 == 1)
}

/// Grows the image mounted on `target` so that `limit` bytes fit, online.
pub fn grow(image: &Path, target: &Path, limit: u64) -> anyhow::Result<()> {
    let size = image_size(limit);
    let file = OpenOptions::new()
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    if file.metadata()?.len() >= size {
        return Ok(());
    }
    file.set_len(size)
        .with_context(|| format!("growing {}", image.display()))?;
    file.sync_all()?;
    let device = device_of(target)?;
    let dev = File::open(&device).with_context(|| format!("opening {}", device.display()))?;
    // SAFETY: an ioctl without argument on a descriptor we own.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("telling {} its new size", device.display()));
    }
    let out = Command::new(tool("resize2fs"))
        .arg(&device)
        .output()
        .context("running resize2fs (from e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "resize2fs {} failed ({}): {}",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The loop device mounted on `target`, from mountinfo.
fn device_of(target: &Path) -> anyhow::Result<PathBuf> {
    let info = fs::read("/proc/self/mountinfo")?;
    let target = target.as_os_str().as_encoded_bytes();
    for line in info.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.get(4) != Some(&target) {
            continue;
        }
        // After the optional fields, "-", the type, then the source.
        if let Some(dash) = fields.iter().position(|f| *f == b"-") {
            if let Some(source) = fields.get(dash + 2) {
                return Ok(PathBuf::from(String::from_utf8_lossy(source).into_owned()));
            }
        }
    }
    bail!("nothing is mounted on {}", String::from_utf8_lossy(target))
}

/// Copies the tree at `from` to `to`, which it replaces, as it is:
/// owners, modes, times, hard links, xattrs (overlay's opaque markers
/// among them) and whiteouts (device 0/0). Commit's way out of an image.
///
/// The copy is made beside `to` and swapped in with one atomic rename
/// (RENAME_EXCHANGE): a crash at any point leaves `to` whole, old or new,
/// never missing, and a staging dir the next attempt starts over.
pub fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    let staging = to.with_file_name(format!(
        "{}.copy",
        to.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    crate::removal::remove_all(&staging)
        .with_context(|| format!("emptying {}", staging.display()))?;
    fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let mut source = from.as_os_str().to_owned();
    source.push("/.");
    let out = Command::new("cp")
        .args(["-a", "--"])
        .arg(&source)
        .arg(&staging)
        .output()
        .context("running cp (from coreutils)")?;
    if !out.status.success() {
        bail!(
            "cp -a {} {} failed ({}): {}",
            from.display(),
            staging.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &staging,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .with_context(|| format!("swapping the copy into {}", to.display()))?;
    // What `to` held before: empty, or a failed attempt's copy.
    crate::removal::remove_all(&staging)
        .with_context(|| format!("removing {}", staging.display()))?;
    Ok(())
}

/// Makes `limit/fs` (0755) and `limit/work` (0711) in the mounted image.
pub fn make_tree(mount: &Path) -> io::Result<()> {
    let fs_dir = mount.join("fs");
    fs::DirBuilder::new().mode(0o755).create(&fs_dir)?;
    fs::set_permissions(&fs_dir, fs::Permissions::from_mode(0o755))?;
    fs::DirBuilder::new()
        .mode(0o711)
        .create(mount.join("work"))?;
    // mkfs's lost+found is ext4's, outside the container's view; the
    // fresh tree is made durable with the image's whole filesystem.
    nix::unistd::syncfs(&File::open(mount)?)?;
    Ok(())
}

/// Checks that limits can work here: loop devices, ext4, and mkfs.ext4.
/// Cheap: nothing is made or mounted (a real one costs about 60 ms).
pub fn probe() -> anyhow::Result<()> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .context("no loop devices (/dev/loop-control)")?;
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("\text4"))
    {
        // The module may load on first mount; make sure it can.
        let loaded = Command::new("modprobe").arg("ext4").status();
        if !matches!(loaded, Ok(s) if s.success()) {
            bail!("the kernel has no ext4 (not in /proc/filesystems, and modprobe ext4 failed)");
        }
    }
    let found = Command::new(tool("mkfs.ext4")).arg("-V").output();
    if !matches!(found, Ok(o) if o.status.success()) {
        bail!("mkfs.ext4 is missing (install e2fsprogs)");
    }
    Ok(())
}

/// A tool from e2fsprogs: on PATH, or in /sbin where a daemon's PATH
/// may not look.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_whole_blocks_with_room_for_ext4s_metadata() {
        for limit in [1 << 20, 16 << 20, 1 << 30, 100 << 30] {
            let size = image_size(limit);
            assert_eq!(size % 4096, 0);
            assert!(size >= limit + (12 << 20), "{limit}: {size}");
            assert!(size <= limit + limit / 20 + (13 << 20), "{limit}: {size}");
        }
    }
}
