//! ontop's layer applier under a real containerd: every test image
//! unpacked through it gives, file for file, the root filesystem that
//! containerd's own applier gives on its own overlayfs snapshotter; on
//! containerd 1.6, which takes no diff plugin, containerd's applier does
//! the work and nothing changes.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::containerd::{
    deep_image_archive, image_archive, many_image_archive, pause_image_archive, Containerd,
};
use common::Daemon;
use sha2::{Digest, Sha256};

/// Every file of the tree at `root`: path, type, mode, owner, times, link
/// target, device, xattrs (but overlay's own) and content hash.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let t = md.file_type();
            let mut line = format!(
                "{:o} {}:{} mtime={}.{:09}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.mtime(),
                md.mtime_nsec()
            );
            if t.is_symlink() {
                line += &format!(" -> {}", std::fs::read_link(&path).unwrap().display());
            } else if t.is_file() {
                let hash = Sha256::digest(std::fs::read(&path).unwrap());
                line += &format!(" nlink={} sha256={hash:x?}", md.nlink());
            } else if t.is_char_device() || t.is_block_device() {
                line += &format!(" rdev={:x}", md.rdev());
            }
            for (k, v) in xattrs(&path) {
                line += &format!(" {k}={v}");
            }
            if t.is_dir() {
                stack.push(path.clone());
            }
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, line);
        }
    }
    out
}

fn xattrs(path: &Path) -> Vec<(String, String)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let name_s = String::from_utf8_lossy(name).into_owned();
        if name_s.starts_with("trusted.overlay.") || name_s.starts_with("user.fuseoverlayfs.") {
            continue;
        }
        let name_c = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name_c.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        let value = if len < 0 {
            Vec::new()
        } else {
            value[..len as usize].to_vec()
        };
        out.push((name_s, format!("{value:x?}")));
    }
    out.sort();
    out
}

/// Imports `tar` with `snapshotter` in namespace `ns`, mounts a view of
/// the image's top layer at `target` the way `ctr snapshots mounts`
/// prints it, and returns its manifest.
fn unpacked(
    ctd: &Containerd,
    ns: &str,
    snapshotter: &str,
    tar: &Path,
    target: &Path,
) -> BTreeMap<String, String> {
    let ns = ctd.namespace(ns);
    let tar = tar.display().to_string();
    ctd.ctr_ok_in(
        &ns,
        &["images", "import", "--snapshotter", snapshotter, &tar],
    );
    let ls = ctd.ctr_ok_in(&ns, &["snapshots", "--snapshotter", snapshotter, "ls"]);
    let rows: Vec<Vec<&str>> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // The top layer: the one committed snapshot no other names as parent.
    let top = rows
        .iter()
        .map(|r| r[0])
        .find(|k| !rows.iter().any(|r| r.len() == 3 && r[1] == *k))
        .unwrap_or_else(|| panic!("no top layer in {ls}"));
    // The view's mount is printed as it is made: the garbage collector
    // may remove a view that nothing references before a second call
    // could ask for it, but not the layers the mount names.
    let cmd = ctd.ctr_ok_in(
        &ns,
        &[
            "snapshots",
            "--snapshotter",
            snapshotter,
            "view",
            "--target",
            target.to_str().unwrap(),
            "check",
            top,
        ],
    );
    // mount(8) resolves `fuse.X`, not containerd's `fuse3.X`.
    let cmd = cmd.replacen("-t fuse3.", "-t fuse.", 1);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = manifest(target);
    common::unmount(target);
    tree
}

fn assert_same(what: &str, ours: &BTreeMap<String, String>, theirs: &BTreeMap<String, String>) {
    let mut differences = Vec::new();
    for (path, line) in theirs {
        match ours.get(path) {
            Some(l) if l == line => {}
            Some(l) => {
                differences.push(format!("  {path}: ontop {l}\n  {path}: containerd {line}"))
            }
            None => differences.push(format!("  {path}: only containerd's ({line})")),
        }
    }
    for (path, line) in ours {
        if !theirs.contains_key(path) {
            differences.push(format!("  {path}: only ontop's ({line})"));
        }
    }
    assert!(
        differences.is_empty(),
        "{what}: ontop's rootfs differs from containerd's in {} paths:\n{}",
        differences.len(),
        differences
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

async fn every_test_image_unpacks_to_the_rootfs_containerds_own_applier_gives() {
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    let release = common::containerd::release();
    let images: [(&str, &Path, usize); 4] = [
        ("e2e", image_archive(), 3),
        ("deep", deep_image_archive(), 7),
        ("many", many_image_archive(), 7),
        ("pause", pause_image_archive(), 1),
    ];
    let target = d.mountpoint("check");
    let mut layers = 0;
    for (name, tar, n) in images {
        let ours = unpacked(&ctd, &format!("{name}-ontop"), "ontop", tar, &target);
        let theirs = unpacked(&ctd, &format!("{name}-ovl"), "overlayfs", tar, &target);
        assert_same(name, &ours, &theirs);
        layers += n;
    }
    let applied = d
        .log()
        .lines()
        .filter(|l| l.contains("method=\"Apply\"") && l.contains("code=\"OK\""))
        .count();
    let expected = if release.at_least(1, 7) { layers } else { 0 };
    assert_eq!(
        applied,
        expected,
        "containerd {release:?} applies {expected} layers through ontop's applier:\n{}",
        common::containerd::tail(&d.log(), 20)
    );
}

on_every_containerd!(every_test_image_unpacks_to_the_rootfs_containerds_own_applier_gives);
