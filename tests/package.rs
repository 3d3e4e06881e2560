//! The Debian package, as a user meets it: `scripts/package.sh` builds it,
//! `apt-get install ./ontop_*.deb` installs it, its systemd units pass
//! `systemd-analyze verify` and are enabled, the installed binary serves
//! with the installed config under `systemd-socket-activate` and answers
//! `ontop ping`, and `apt-get purge` leaves nothing behind but the data
//! root.
//!
//! It installs a package on this machine, so it refuses to run where
//! ontop's package is installed already.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::stdout_of;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the installed config puts the root and the socket.
const DATA_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.ontop";
const SOCKET: &str = "/run/ontop/ontop.sock";

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "ontop"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

fn apt_get(args: &[&str]) {
    stdout_of(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-y", "-q"])
            .args(args),
        &format!("apt-get {}", args.join(" ")),
    );
}

/// Purges the package and stops the daemon when the test ends, however it
/// ends, and removes the data root and socket directory if the test made
/// them.
struct Installed {
    daemon: Option<Child>,
    made: Vec<PathBuf>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if installed() {
            let _ = Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["-y", "-q", "purge", "ontop"])
                .output();
        }
        for dir in &self.made {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Builds the package into a target directory of its own: the suite's
/// cargo holds the usual one while tests run.
fn build_package() -> PathBuf {
    let target = Path::new(ROOT).join("target/package");
    stdout_of(
        Command::new("bash")
            .arg(Path::new(ROOT).join("scripts/package.sh"))
            .env("CARGO_TARGET_DIR", &target),
        "scripts/package.sh",
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(target.join("debian"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ontop_"))
        })
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "one ontop package in target/package/debian: {debs:?}"
    );
    debs.into_iter().next().unwrap()
}

#[test]
fn the_package_installs_serves_and_purges_cleanly() {
    common::require_root();
    assert!(
        !installed(),
        "ontop's Debian package is installed on this machine; this test installs and \
         purges it: run `apt-get purge ontop` first"
    );
    let deb = build_package();
    let mut guard = Installed {
        daemon: None,
        made: [DATA_ROOT, "/run/ontop"]
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect(),
    };

    apt_get(&["install", deb.to_str().unwrap()]);
    let listed = stdout_of(Command::new("dpkg").args(["-L", "ontop"]), "dpkg -L ontop");
    let files: Vec<&Path> = listed
        .lines()
        .map(Path::new)
        .filter(|p| p.is_file())
        .collect();
    for wanted in [
        "/usr/bin/ontop",
        "/usr/bin/ontop-bench",
        "/etc/ontop/config.toml",
        "/usr/lib/systemd/system/ontop.service",
        "/usr/lib/systemd/system/ontop.socket",
        "/usr/share/man/man1/ontop.1",
        "/usr/share/man/man1/ontop-serve.1",
        "/usr/share/man/man1/ontop-bench.1",
        "/usr/share/bash-completion/completions/ontop",
        "/usr/share/zsh/vendor-completions/_ontop",
        "/usr/share/fish/vendor_completions.d/ontop.fish",
    ] {
        assert!(
            files.contains(&Path::new(wanted)),
            "the package installs {wanted}"
        );
    }
    let conffiles =
        std::fs::read_to_string("/var/lib/dpkg/info/ontop.conffiles").unwrap_or_default();
    assert_eq!(
        conffiles.trim(),
        "/etc/ontop/config.toml",
        "the config is a conffile"
    );
    let status = stdout_of(Command::new("dpkg").args(["-s", "ontop"]), "dpkg -s ontop");
    assert!(status.contains("Recommends: containerd"), "{status}");

    // The units, as installed: valid, and enabled the Debian way.
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "/usr/lib/systemd/system/ontop.socket",
            "/usr/lib/systemd/system/ontop.service",
        ])
        .output()
        .expect("systemd-analyze (package systemd)");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
    for link in [
        "/etc/systemd/system/sockets.target.wants/ontop.socket",
        "/etc/systemd/system/multi-user.target.wants/ontop.service",
    ] {
        assert!(Path::new(link).is_symlink(), "{link} enables the unit");
    }

    // The installed binary with the installed config, on a socket held by
    // systemd-socket-activate as ontop.socket would hold it.
    std::fs::create_dir_all("/run/ontop").unwrap();
    let daemon = Command::new("systemd-socket-activate")
        .arg(format!("--listen={SOCKET}"))
        .args(["/usr/bin/ontop", "serve"])
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    guard.daemon = Some(daemon);
    let asked = Instant::now();
    let ping = loop {
        let out = Command::new("/usr/bin/ontop").arg("ping").output().unwrap();
        if out.status.success() || asked.elapsed() > Duration::from_secs(20) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        ping.status.success(),
        "the installed ontop answers on {SOCKET}: {}",
        String::from_utf8_lossy(&ping.stderr)
    );
    assert!(Path::new(DATA_ROOT).join("metadata.db").is_file());
    let help = stdout_of(
        Command::new("/usr/bin/ontop").args(["bench", "--help"]),
        "ontop bench --help",
    );
    assert!(help.contains("ontop-bench"));
    let mut daemon = guard.daemon.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        daemon.wait().unwrap().success(),
        "ontop stops cleanly at SIGTERM"
    );

    // Purge: every file the package installed goes, with its config and
    // the units' enablement; the data root stays.
    apt_get(&["purge", "ontop"]);
    assert!(!installed());
    let left: Vec<&&Path> = files.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!Path::new("/etc/ontop").exists(), "/etc/ontop is gone");
    let enabled = std::fs::read_dir("/var/lib/systemd/deb-systemd-helper-enabled")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("ontop"))
        .collect::<Vec<_>>();
    assert!(enabled.is_empty(), "enablement state left: {enabled:?}");
    for link in [
        "/etc/systemd/system/sockets.target.wants/ontop.socket",
        "/etc/systemd/system/multi-user.target.wants/ontop.service",
    ] {
        assert!(!Path::new(link).is_symlink(), "{link} is gone");
    }
    assert!(
        Path::new(DATA_ROOT).join("metadata.db").is_file(),
        "the data root stays: snapshots are the user's"
    );
}
