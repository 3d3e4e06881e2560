//! Performs mount specs the way containerd's mount package does, for the
//! benchmark and the tests: ontop itself never mounts a snapshot.
//!
//! - `bind`: mount(2) with MS_BIND|MS_REC, then a read-only remount for `ro`;
//! - `overlay`: from the lower dirs' longest common parent with relative
//!   paths, containerd's `compactLowerdirOption`, so that long lowerdir
//!   lists stay under a page;
//! - `fuse3.X`: the `mount.fuse3` helper, each option its own `-o`, the
//!   subtype as `-t`, exactly as containerd's `mountWithHelper`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use nix::mount::{MntFlags, MsFlags};

use ontop::containerd_api::types::Mount;

pub fn mount_all(mounts: &[Mount], target: &Path) -> anyhow::Result<()> {
    for m in mounts {
        mount(m, target).with_context(|| format!("mounting {m:?} on {}", target.display()))?;
    }
    Ok(())
}

pub fn unmount(target: &Path) -> anyhow::Result<()> {
    // A busy mount is sometimes only busy for a moment: CI once saw EBUSY
    // unmounting a fuse mount while dozens of tests started containers.
    // The cause was not pinned down (a mount namespace being set up holds
    // copies of every mount while it is made); wait up to two seconds.
    for _ in 0..20 {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            other => return other.with_context(|| format!("unmounting {}", target.display())),
        }
    }
    nix::mount::umount2(target, MntFlags::empty())
        .with_context(|| format!("unmounting {}", target.display()))
}

fn mount(m: &Mount, target: &Path) -> anyhow::Result<()> {
    match m.r#type.as_str() {
        "bind" => {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            nix::mount::mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                flags,
                None::<&str>,
            )?;
            if m.options.iter().any(|o| o == "ro") {
                nix::mount::mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )?;
            }
            Ok(())
        }
        "overlay" => {
            let (cwd, options) = compact_lowerdir(&m.options);
            let mut cmd = Command::new("mount");
            cmd.current_dir(&cwd)
                .args(["-t", "overlay", &m.source, "-o", &options.join(",")])
                .arg(target);
            run(&mut cmd)
        }
        fuse if fuse.starts_with("fuse3.") => {
            let mut cmd = Command::new("mount.fuse3");
            cmd.arg(&m.source).arg(target);
            for o in &m.options {
                cmd.args(["-o", o]);
            }
            cmd.args(["-t", &fuse["fuse3.".len()..]]);
            run(&mut cmd)
        }
        other => bail!("unknown mount type {other:?}"),
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// containerd's `compactLowerdirOption`: the longest common parent of the
/// lower dirs, and the options rewritten relative to it.
pub fn compact_lowerdir(options: &[String]) -> (PathBuf, Vec<String>) {
    let Some(i) = options.iter().position(|o| o.starts_with("lowerdir=")) else {
        return ("/".into(), options.to_vec());
    };
    let lowers: Vec<&str> = options[i]["lowerdir=".len()..].split(':').collect();
    if lowers.len() < 2 {
        return ("/".into(), options.to_vec());
    }
    let mut common = PathBuf::from(lowers[0]);
    while !lowers.iter().all(|l| Path::new(l).starts_with(&common)) {
        match common.parent() {
            Some(p) => common = p.to_path_buf(),
            None => return ("/".into(), options.to_vec()),
        }
    }
    let rel: Vec<String> = lowers
        .iter()
        .map(|l| {
            Path::new(l)
                .strip_prefix(&common)
                .map(|r| r.display().to_string())
                .unwrap_or_else(|_| l.to_string())
        })
        .collect();
    let mut out = options.to_vec();
    out[i] = format!("lowerdir={}", rel.join(":"));
    (common, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdirs_are_made_relative_to_their_common_parent() {
        let opts = |s: &[&str]| s.iter().map(|o| o.to_string()).collect::<Vec<_>>();
        let (cwd, out) = compact_lowerdir(&opts(&[
            "workdir=/r/snapshots/3/work",
            "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
        ]));
        assert_eq!(cwd, PathBuf::from("/r/snapshots"));
        assert_eq!(out[1], "lowerdir=2/fs:1/fs");
        let (cwd, out) = compact_lowerdir(&opts(&["lowerdir=/r/1/fs"]));
        assert_eq!(
            (cwd, out[0].as_str()),
            (PathBuf::from("/"), "lowerdir=/r/1/fs")
        );
    }
}
