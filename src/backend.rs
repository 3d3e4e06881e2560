//! The two ways ontop's mounts are performed, and the start-up checks that
//! the chosen one works here before containerd is told so.
//!
//! - `overlayfs`: the kernel's overlay filesystem, as containerd's own
//!   overlay snapshotter uses it.
//! - `fuse-overlayfs`: the same layering in user space, for rootless
//!   containerd, old kernels and nested containers. containerd mounts it
//!   through the `mount.fuse3` helper, because the type starts `fuse3.`.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Deserialize;

/// The program containerd's `mount.fuse3` helper runs for our mounts.
pub const FUSE_OVERLAYFS: &str = "fuse-overlayfs";
/// A trial mount that takes longer than this is as good as broken.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    #[default]
    Overlayfs,
    FuseOverlayfs,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Overlayfs => "overlayfs",
            Backend::FuseOverlayfs => "fuse-overlayfs",
        }
    }

    /// The `type` of the layered mounts containerd performs.
    pub fn mount_type(self) -> &'static str {
        match self {
            Backend::Overlayfs => "overlay",
            Backend::FuseOverlayfs => "fuse3.fuse-overlayfs",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True when this process runs in a user namespace other than the initial
/// one, which maps the whole 32-bit id range onto itself.
pub fn in_user_namespace() -> bool {
    match fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// Root of the initial user namespace, the only user that can mount
/// anything anywhere. Everyone else is "rootless".
pub fn is_real_root() -> bool {
    nix::unistd::Uid::effective().is_root() && !in_user_namespace()
}

/// Refuses to start the fuse backend unless the binary is on PATH,
/// `/dev/fuse` opens, and a real mount of two lower dirs under `scratch`
/// (a directory on the same filesystem as the snapshots) shows both.
pub fn check_fuse(scratch: &Path) -> anyhow::Result<()> {
    let binary = find_on_path(FUSE_OVERLAYFS).with_context(|| {
        format!(
            "backend fuse-overlayfs needs the {FUSE_OVERLAYFS} program on PATH \
             (PATH={}); install it (Debian: apt-get install fuse-overlayfs) or use \
             backend = \"overlayfs\"",
            std::env::var("PATH").unwrap_or_default()
        )
    })?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context(
            "backend fuse-overlayfs cannot open /dev/fuse: load the module (modprobe fuse), \
             and when running rootless give this user read-write access to /dev/fuse",
        )?;
    trial_mount(&binary, scratch).with_context(|| {
        format!(
            "backend fuse-overlayfs: a trial mount of {} with two lower dirs failed",
            binary.display()
        )
    })
}

fn find_on_path(program: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .with_context(|| format!("{program} not found"))
}

/// Mounts `lower1:lower2` with an upper, reads through it, writes through
/// it, and takes it down again.
fn trial_mount(binary: &Path, scratch: &Path) -> anyhow::Result<()> {
    let dir = scratch.join(format!("fuse-check-{}", std::process::id()));
    let _ = crate::removal::remove_all(&dir);
    let [l1, l2, upper, work, merged] =
        ["lower1", "lower2", "upper", "work", "merged"].map(|n| dir.join(n));
    for d in [&l1, &l2, &upper, &work, &merged] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    fs::write(l1.join("top"), "1")?;
    fs::write(l2.join("bottom"), "2")?;
    let options = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        l1.display(),
        l2.display(),
        upper.display(),
        work.display()
    );
    let result = run_with_timeout(
        Command::new(binary).arg("-o").arg(&options).arg(&merged),
        TRIAL_TIMEOUT,
    )
    .and_then(|()| {
        let seen = (
            fs::read_to_string(merged.join("top")).ok(),
            fs::read_to_string(merged.join("bottom")).ok(),
        );
        let wrote = fs::write(merged.join("new"), "3");
        let _ = unmount(&merged);
        if seen != (Some("1".into()), Some("2".into())) {
            bail!("the mount did not show the files of both lower dirs");
        }
        wrote.context("writing through the mount")?;
        if !upper.join("new").exists() {
            bail!("a write through the mount did not reach the upper dir");
        }
        Ok(())
    });
    let _ = crate::removal::remove_all(&dir);
    result
}

pub(crate) fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<()> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting it")?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("it did not finish within {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("it exited with {status}: {}", err.trim());
    }
    Ok(())
}

/// umount(2) works for root in the mount's user namespace; an
/// unprivileged user outside one goes through the setuid helper.
pub(crate) fn unmount(target: &Path) -> anyhow::Result<()> {
    if nix::mount::umount2(target, nix::mount::MntFlags::empty()).is_ok() {
        return Ok(());
    }
    run_with_timeout(
        Command::new("fusermount3").arg("-u").arg(target),
        TRIAL_TIMEOUT,
    )
    .with_context(|| format!("unmounting {}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_config_and_mount_types() {
        let parsed: Backend = toml::from_str::<toml::Value>("b = \"fuse-overlayfs\"")
            .unwrap()
            .get("b")
            .unwrap()
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(parsed, Backend::FuseOverlayfs);
        assert_eq!(Backend::default().mount_type(), "overlay");
        assert_eq!(Backend::FuseOverlayfs.mount_type(), "fuse3.fuse-overlayfs");
    }
}
