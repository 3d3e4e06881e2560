//! Size limits where this machine's own kernel cannot show them: project
//! quotas (the host's kernel has no XFS or ext4 quota), and a loop image
//! growing online (the host's root lacks CAP_SYS_RESOURCE). The release
//! `ontop` runs in a qemu guest with Debian's kernel on a quota-mounted
//! disk, driven by `ontop-limits-guest` through real overlay mounts:
//! - on XFS, project limits stop writes, `df` shows them, Update raises
//!   and lowers them, Commit and Remove lift them;
//! - on ext4 with project quotas, whose limits do not hold for overlay,
//!   auto picks a loop image, and a forced project quota is refused;
//! - on both, a loop-ext4 limit grows online.

mod common;
// The power-cut test's markers and its init are not used here.
#[allow(dead_code)]
#[path = "powercut/guest.rs"]
mod guest;

use std::path::Path;

/// One guest at a time: software emulation wants the whole machine.
static ONE_GUEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
fs=$(sed -n 's/.*ontop\.fs=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
mkdir -p /mnt /run/ontop /tmp
mount -t tmpfs tmpfs /tmp
mount -t "$fs" -o prjquota /dev/vda /mnt || { echo "LIMITS: mount failed"; poweroff -f; }
/usr/bin/ontop serve --root /mnt/ontop --address /run/ontop/ontop.sock --log-level warn &
# XFS holds project quotas; ext4's do not bind overlay (src/limit/project.rs).
case "$fs" in xfs) expect=project-quota ;; *) expect=loop-ext4 ;; esac
/usr/bin/ontop-limits-guest --socket /run/ontop/ontop.sock --root /mnt/ontop --more-roots /mnt/more \
  --expect "$expect"
echo "LIMITS: workload exited $?"
poweroff -f
"#;

#[tokio::test]
async fn xfs_project_quotas_hold_limits() {
    in_guest("xfs", &[]).await;
}

#[tokio::test]
async fn ext4_project_quotas_hold_limits() {
    in_guest("ext4", &["-O", "quota,project"]).await;
}

async fn in_guest(fs: &str, mkfs_options: &[&str]) {
    common::require_root();
    let _one = ONE_GUEST.lock().await;
    let release = guest::release_dir();
    let kernel = guest::Kernel::find();
    let dir = tempfile::Builder::new()
        .prefix(&format!("ontop-limits-{fs}-"))
        .tempdir()
        .unwrap();
    let disk = dir.path().join("disk.img");
    guest::make_disk_with(fs, &disk, mkfs_options);
    // The loop enforcer's tools, found first on the guest's PATH (busybox's
    // cp keeps no xattrs).
    common::require_program("mkfs.ext4", "apt-get install e2fsprogs");
    let (ontop, workload) = (release.join("ontop"), release.join("ontop-limits-guest"));
    let tools = [
        Path::new("/usr/sbin/mkfs.ext4"),
        Path::new("/usr/sbin/resize2fs"),
        Path::new("/usr/bin/cp"),
    ];
    let mut binaries = vec![
        (ontop.as_path(), "ontop"),
        (workload.as_path(), "ontop-limits-guest"),
    ];
    for t in &tools {
        binaries.push((t, t.file_name().unwrap().to_str().unwrap()));
    }
    let initramfs = guest::initramfs(&kernel, INIT, &binaries, dir.path());
    let console = guest::run(
        &kernel,
        &initramfs,
        fs,
        &disk,
        &dir.path().join("writes.log"),
        "LIMITS: ok",
    );
    for line in console.lines().filter(|l| l.starts_with("LIMITS:")) {
        println!("{fs}: {line}");
    }
}
