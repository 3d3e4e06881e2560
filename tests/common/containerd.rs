//! A real, isolated containerd, wired to a test's ontop through
//! `[proxy_plugins]`, with the config `ontop containerd-config` prints for
//! it. It has its own root, state, sockets and config, so it runs beside
//! any containerd already on the machine.
//!
//! Suites run each containerd test on every release the suite carries with
//! `on_every_containerd!`: containerd 1.6 installed from Debian 12, and 1.7
//! and 2.1 from Debian's trixie and sid, unpacked into
//! `target/containerd/<series>` by `scripts/test.sh`. A containerd of the
//! user's own joins as `containerd_extra` when `ONTOP_CONTAINERD_EXTRA_BIN`
//! names its directory.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Daemon;

/// The prefix of the namespace tests work in; containerd prefixes every
/// key with the namespace. runc keeps containers by namespace and id in
/// one place for every containerd, so each test's namespace is its own
/// (see `Containerd::ns`).
pub const NS: &str = "ontop-test";
pub const IMAGE: &str = "docker.io/ontop/e2e:latest";

/// The variable naming a directory with a containerd of the user's own
/// (containerd, ctr, containerd-shim-runc-v2), such as a release newer
/// than Debian carries.
pub const EXTRA_BIN: &str = "ONTOP_CONTAINERD_EXTRA_BIN";

/// A containerd release the suite runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// containerd 1.6, installed from Debian 12.
    V1_6,
    /// containerd 1.7, Debian trixie's, unpacked into target/containerd/1.7.
    V1_7,
    /// containerd 2.1, Debian sid's, unpacked into target/containerd/2.1.
    V2_1,
    /// The containerd in `ONTOP_CONTAINERD_EXTRA_BIN`.
    Extra,
}

impl Release {
    /// (major, minor): the series' for Debian's, and what `containerd
    /// --version` says for the extra one.
    pub fn version(self) -> (u32, u32) {
        match self {
            Release::V1_6 => (1, 6),
            Release::V1_7 => (1, 7),
            Release::V2_1 => (2, 1),
            Release::Extra => {
                static EXTRA: OnceLock<(u32, u32)> = OnceLock::new();
                *EXTRA.get_or_init(|| parse_version(&containerd_version(&bin_dir_of(self))))
            }
        }
    }

    pub fn major(self) -> u32 {
        self.version().0
    }

    /// Whether this containerd is `major.minor` or later.
    pub fn at_least(self, major: u32, minor: u32) -> bool {
        self.version() >= (major, minor)
    }

    /// A short name for directories: `1.6`, `extra`.
    fn name(self) -> &'static str {
        match self {
            Release::V1_6 => "1.6",
            Release::V1_7 => "1.7",
            Release::V2_1 => "2.1",
            Release::Extra => "extra",
        }
    }
}

/// The first `major.minor` in `containerd --version`'s output, such as
/// `containerd github.com/containerd/containerd/v2 2.1.9+unknown`.
fn parse_version(text: &str) -> (u32, u32) {
    text.split_whitespace()
        .filter_map(|word| {
            let mut parts = word.trim_start_matches('v').split(['.', '~', '+', '-']);
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .next()
        .unwrap_or_else(|| panic!("no version in `containerd --version`: {text}"))
}

/// `containerd --version` of the containerd in `dir`.
pub fn containerd_version(dir: &Path) -> String {
    let out = Command::new(dir.join("containerd"))
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{}/containerd --version: {e}", dir.display()));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

tokio::task_local! {
    static RELEASE: Release;
}

/// Runs `test` with containerds of release `r`.
pub async fn on_containerd<F: Future>(r: Release, test: F) -> F::Output {
    RELEASE.scope(r, test).await
}

/// The release of the running test: 1.6 unless it runs under
/// `on_every_containerd!`.
pub fn release() -> Release {
    RELEASE.try_with(|r| *r).unwrap_or(Release::V1_6)
}

/// Where this release's containerd, ctr and shim are. runc comes from
/// Debian 12 for all. Fails the test saying how to provide what is
/// missing: these tests must run, never skip.
pub fn bin_dir() -> PathBuf {
    bin_dir_of(release())
}

fn bin_dir_of(release: Release) -> PathBuf {
    let found = |tool: &str| {
        std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).find(|d| d.join(tool).is_file()))
    };
    for tool in ["runc", "busybox"] {
        assert!(
            found(tool).is_some(),
            "{tool} is not installed: the containerd suite needs Debian's runc and \
             busybox-static (scripts/test.sh installs them)"
        );
    }
    let dir = match release {
        Release::V1_6 => found("containerd").expect(
            "containerd is not installed: the containerd suite needs Debian's containerd \
             (scripts/test.sh installs it)",
        ),
        Release::V1_7 | Release::V2_1 => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/containerd")
            .join(release.name())
            .join("usr/bin"),
        Release::Extra => std::env::var_os(EXTRA_BIN).map(PathBuf::from).expect(
            "ONTOP_CONTAINERD_EXTRA_BIN is not set: the containerd_extra tests run a \
             containerd of your own; set it to a directory holding its containerd, ctr and \
             containerd-shim-runc-v2 (scripts/test.sh then runs them)",
        ),
    };
    for tool in ["containerd", "ctr", "containerd-shim-runc-v2"] {
        assert!(
            dir.join(tool).is_file(),
            "{} has no {tool}: containerd {} is missing; scripts/test.sh unpacks Debian's \
             packages there (or see {EXTRA_BIN})",
            dir.display(),
            release.name()
        );
    }
    std::fs::canonicalize(dir).unwrap()
}

/// PATH with this release's binaries first, for containerd (which
/// finds its shim there) and for `ontop containerd-config`.
pub fn path_env() -> std::ffi::OsString {
    let mut dirs = vec![bin_dir()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).unwrap()
}

/// The three-layer test image, built once per test binary by
/// `scripts/mkimage.sh` into cargo's scratch dir for tests.
pub fn image_archive() -> &'static Path {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    IMAGE_TAR.get_or_init(|| build_image("e2e-image.tar", IMAGE, ""))
}

/// What a container sees of the test image (see scripts/mkimage.sh):
/// layer 2's whiteout, opaque dir, mode and owner changes, and layer 3's
/// links, over layer 1.
pub const ROOTFS_CHECK: &str = r#"set -e
cat /data/keep.txt
ls /data
ls /olddir
stat -c '%a %u:%g %n' /modes/file /owner/file
stat -c '%h %n' /links/hard
[ "$(stat -c %i /links/hard)" = "$(stat -c %i /links/target)" ] && echo same-inode
readlink /links/sym
readlink /links/abs
cat /links/sym /links/abs /added/new.txt
test ! -e /data/delete-me.txt && echo deleted-is-absent
echo written > /written && cat /written
"#;

pub const ROOTFS_EXPECTED: &str = "keep
keep.txt
c
600 0:0 /modes/file
644 1000:1000 /owner/file
2 /links/hard
same-inode
target
/data/keep.txt
linked content
keep
new in layer 2
deleted-is-absent
written
";

pub const DEEP_IMAGE: &str = "docker.io/ontop/deep:latest";

/// A one-layer image that sleeps (`mkimage.sh ... pause`): CRI's sandbox.
pub fn pause_image_archive() -> &'static Path {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    IMAGE_TAR
        .get_or_init(|| build_image("pause-image.tar", "docker.io/ontop/pause:latest", "pause"))
}

/// The seven-layer image (`mkimage.sh ... deep`), for parallel unpack.
pub fn deep_image_archive() -> &'static Path {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    IMAGE_TAR.get_or_init(|| build_image("deep-image.tar", DEEP_IMAGE, "deep"))
}

pub const MANY_IMAGE: &str = "docker.io/ontop/many:latest";

/// The seven-layer image of 10,000 small files (`mkimage.sh ... many`).
pub fn many_image_archive() -> &'static Path {
    static IMAGE_TAR: OnceLock<PathBuf> = OnceLock::new();
    IMAGE_TAR.get_or_init(|| build_image("many-image.tar", MANY_IMAGE, "many"))
}

fn build_image(file: &str, name: &str, variant: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mkimage.sh");
    super::stdout_of(
        Command::new("bash")
            .arg(&script)
            .arg(&out)
            .arg(name)
            .arg(variant),
        "mkimage.sh",
    );
    out
}

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// `ontop-test-<test dir>`: concurrent tests must not meet in runc.
    pub ns: String,
    pub release: Release,
    ctr: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd with ontop as proxy snapshotter `ontop`, and a
    /// garbage collector that runs right after every deletion.
    pub async fn start(ontop: &Daemon) -> Containerd {
        Containerd::start_with(ontop, "").await
    }

    /// As `start`, with `extra` TOML (in this release's config version)
    /// before the fragment `ontop containerd-config` prints.
    pub async fn start_with(ontop: &Daemon, extra: &str) -> Containerd {
        Containerd::launch(ontop, None, extra, "auto").await
    }

    /// As `start`, with ontop's fragment rendered for containerd
    /// `version` instead of this one's.
    pub async fn start_rendered_for(ontop: &Daemon, version: &str) -> Containerd {
        Containerd::launch(ontop, None, "", version).await
    }

    /// containerd with CRI on and ontop its default snapshotter (the
    /// fragment of `ontop containerd-config --cri`), pulling from the
    /// plain-http `registry`, with `sandbox_image` for pods and a stats
    /// poll (Usage of every active snapshot) every second.
    pub async fn start_cri(ontop: &Daemon, registry: &str, sandbox_image: &str) -> Containerd {
        let cri = Cri {
            registry,
            sandbox_image,
        };
        Containerd::launch(ontop, Some(&cri), "", "auto").await
    }

    async fn launch(
        ontop: &Daemon,
        cri: Option<&Cri<'_>>,
        extra: &str,
        version: &str,
    ) -> Containerd {
        let release = release();
        let bin = bin_dir();
        let dir = ontop.dir.path().join(format!("ctd-{}", release.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("containerd.sock");
        // ontop's content_store (see `Daemon::prepared`) is this
        // containerd's.
        let content = ontop.dir.path().join("content");
        let _ = std::fs::remove_file(&content);
        std::os::unix::fs::symlink(dir.join("root/io.containerd.content.v1.content"), &content)
            .unwrap();
        let (cri_before, cri_after) = match cri {
            Some(cri) => cri.config(release, &dir, ontop),
            None => Default::default(),
        };
        let flags: &[&str] = if cri.is_some() { &["--cri"] } else { &[] };
        let config = format!(
            "{}\n{extra}\n{cri_before}\n{}{cri_after}",
            head(release, &dir, cri.is_some()),
            ontop.containerd_config_for(version, flags)
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new(bin.join("containerd"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path_env())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting containerd");
        let unique = ontop.dir.path().file_name().unwrap().to_string_lossy();
        let mut c = Containerd {
            ns: format!("{NS}-{}", unique.trim_start_matches("ontop-test-")),
            dir,
            socket,
            release,
            ctr: bin.join("ctr"),
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited with {status}:\n{}", c.log());
            }
            if c.ctr(&["version"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer in 20s:\n{}",
                c.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `ctr` against this containerd in the test namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in(&self.ns, args)
    }

    /// A namespace of this test's own: `<ns>-<name>`.
    pub fn namespace(&self, name: &str) -> String {
        format!("{}-{name}", self.ns)
    }

    /// Runs `ctr` against this containerd in namespace `ns`.
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> Output {
        self.ctr_command(ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    /// This release's `ctr`, on this containerd, in namespace `ns`.
    pub fn ctr_command(&self, ns: &str) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", ns]);
        cmd
    }

    /// Runs `ctr run --rm IMAGE NAME-i COMMAND...` with `snapshotter`,
    /// one container after another, until [`ContainerRuns::finish`]. Each
    /// runs under `timeout 60`: a hung container counts as failed.
    pub fn run_containers(&self, snapshotter: &str, name: &str, command: &[&str]) -> ContainerRuns {
        let probe = self.ctr_command(&self.ns);
        let ctr: PathBuf = probe.get_program().into();
        let args: Vec<std::ffi::OsString> = probe.get_args().map(Into::into).collect();
        let (snapshotter, name) = (snapshotter.to_string(), name.to_string());
        let command: Vec<String> = command.iter().map(|c| c.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut runs = RunCounts::default();
            for i in 0.. {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let out = Command::new("timeout")
                    .arg("60")
                    .arg(&ctr)
                    .args(&args)
                    .args(["run", "--rm", "--snapshotter", &snapshotter, IMAGE])
                    .arg(format!("{name}-{i}"))
                    .args(&command)
                    .output()
                    .expect("starting ctr run");
                if out.status.success() {
                    runs.ran += 1;
                } else {
                    runs.failed += 1;
                    runs.first_failure
                        .get_or_insert_with(|| String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            runs
        });
        ContainerRuns { stop, thread }
    }

    /// The stdout of a command that must have succeeded; the test fails
    /// with its output and containerd's log otherwise.
    fn stdout_of(&self, what: &str, out: Output) -> String {
        assert!(
            out.status.success(),
            "{what} failed: {}{}\n--- containerd log tail:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ctr`, fails the test unless it succeeds, returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        self.ctr_ok_in(&self.ns, args)
    }

    /// The stderr of a `ctr` that must have failed.
    pub fn ctr_err(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "ctr {args:?} succeeded: {err}");
        err
    }

    /// `ctr_ok` in namespace `ns`.
    pub fn ctr_ok_in(&self, ns: &str, args: &[&str]) -> String {
        self.stdout_of(&format!("ctr {args:?}"), self.ctr_in(ns, args))
    }

    /// `ctr snapshots --snapshotter ontop ARGS`.
    pub fn snapshots(&self, args: &[&str]) -> String {
        let mut all = vec!["snapshots", "--snapshotter", "ontop"];
        all.extend_from_slice(args);
        self.ctr_ok(&all)
    }

    /// The top layer of the one image in namespace `ns` on `snapshotter`:
    /// the snapshot `ctr snapshots ls` shows that no other names as its
    /// parent.
    pub fn top_layer(&self, ns: &str, snapshotter: &str) -> String {
        let ls = self.ctr_ok_in(ns, &["snapshots", "--snapshotter", snapshotter, "ls"]);
        let rows: Vec<Vec<&str>> = ls
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        rows.iter()
            .map(|r| r[0])
            .find(|k| !rows.iter().any(|r| r.len() == 3 && r[1] == *k))
            .unwrap_or_else(|| panic!("no top layer in {ls}"))
            .to_string()
    }

    /// Keys `ctr snapshots ls` shows for ontop.
    pub fn snapshot_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .snapshots(&["ls"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        keys.sort();
        keys
    }

    pub fn import_image(&self) {
        let tar = image_archive().display().to_string();
        self.ctr_ok(&["images", "import", "--snapshotter", "ontop", &tar]);
    }

    /// `ctr run --rm` through ontop; returns the container's stdout.
    pub fn run(&self, id: &str, script: &str) -> String {
        self.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "ontop",
            IMAGE,
            id,
            "sh",
            "-c",
            script,
        ])
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd by design; a failed test may leave one.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.socket.display().to_string())
            .status();
    }
}

/// What a test's containerd config holds besides ontop's fragment: its
/// own paths, CRI off unless asked for, and a garbage collector that runs
/// at once.
fn head(release: Release, dir: &Path, cri: bool) -> String {
    let d = dir.display();
    let (version, disabled) = match (release.major(), cri) {
        (1, true) => (2, ""),
        (_, true) => (3, ""),
        (1, false) => (2, r#""io.containerd.grpc.v1.cri""#),
        (_, false) => (
            3,
            r#""io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime""#,
        ),
    };
    format!(
        r#"version = {version}
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.02
  deletion_threshold = 0
  mutation_threshold = 100
  schedule_delay = "0s"
  startup_delay = "100ms"
"#
    )
}

/// What CRI needs to run pods here.
struct Cri<'a> {
    registry: &'a str,
    sandbox_image: &'a str,
}

impl Cri<'_> {
    /// The CRI settings: TOML to put before ontop's fragment, and keys
    /// to put after it, which land in the fragment's last table, CRI's
    /// (see `containerd_config::render`).
    fn config(&self, release: Release, dir: &Path, ontop: &Daemon) -> (String, String) {
        // The registry speaks plain http.
        let hosts = dir.join("certs.d").join(self.registry);
        std::fs::create_dir_all(&hosts).unwrap();
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"http://{r}\"\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                r = self.registry
            ),
        )
        .unwrap();
        let restrict = !has_cap_sys_resource();
        if restrict {
            println!(
                "no CAP_SYS_RESOURCE here: runc cannot lower a pod's oom_score_adj, so CRI runs \
                 with restrict_oom_score_adj = true"
            );
        }
        let (d, sandbox) = (dir.display(), self.sandbox_image);
        // NRI (1.7+, on by default in 2.x) listens on one socket per
        // machine, /var/run/nri/nri.sock, which the CRI tests of other
        // releases running at the same time already hold: each containerd
        // gets its own, or the second to start exits.
        let nri = if release.at_least(1, 7) {
            format!("[plugins.\"io.containerd.nri.v1.nri\"]\n  socket_path = \"{d}/nri.sock\"\n")
        } else {
            String::new()
        };
        let (before, after) = match release.major() {
            1 => {
                // CRI 1.x reports image-fs stats for
                // <containerd root>/io.containerd.snapshotter.v1.<name>,
                // where ontop's default root sits; here, a link to it.
                std::fs::create_dir_all(dir.join("root")).unwrap();
                std::os::unix::fs::symlink(
                    &ontop.root,
                    dir.join("root/io.containerd.snapshotter.v1.ontop"),
                )
                .unwrap();
                (
                    format!(
                        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  stats_collect_period = 1
  restrict_oom_score_adj = {restrict}
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{d}/certs.d"
"#
                    ),
                    String::new(),
                )
            }
            _ => (
                format!(
                    r#"[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = {restrict}
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{sandbox}"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "{d}/certs.d"
"#
                ),
                "  stats_collect_period = 1\n".to_string(),
            ),
        };
        (nri + &before, after)
    }
}

/// Whether this process may raise resource limits, which runc needs to
/// set a pod's oom_score_adj below its own.
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Containerd {
    /// Waits until `check` holds after containerd's garbage collection,
    /// for at most `secs` seconds. containerd 1.6's GC scheduler drops a
    /// deletion that lands while a collection runs (`gc/scheduler`: events
    /// older than the last collection's end are skipped), so on a quiet
    /// node the last removal may wait for the next one. Each round here is
    /// that next one: a throwaway snapshot made and removed, as a busy node
    /// does all the time, collected by the time of the next check. Failures
    /// are fine: containerd may be redialling.
    pub async fn after_gc(&self, secs: u64, what: &str, mut check: impl FnMut() -> bool) {
        eventually(secs, what, || {
            if check() {
                return true;
            }
            self.ctr(&["snapshots", "--snapshotter", "ontop", "prepare", "gc-nudge"]);
            self.ctr(&["snapshots", "--snapshotter", "ontop", "rm", "gc-nudge"]);
            false
        })
        .await
    }
}

/// Waits until `check` holds, for at most `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a mount command as `ctr snapshots mounts` prints it. ctr prints
/// containerd's type, `fuse3.fuse-overlayfs`; containerd itself runs
/// `mount.fuse3 ... -t fuse-overlayfs`, but mount(8) hands `fuse3.X` to
/// mount.fuse3 as a program name, while `fuse.X` it resolves.
pub fn run_printed_mount(cmd: &str) {
    let cmd = cmd.replacen("-t fuse3.", "-t fuse.", 1);
    let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Containers run one after another (see [`Containerd::run_containers`]).
pub struct ContainerRuns {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<RunCounts>,
}

#[derive(Debug, Default)]
pub struct RunCounts {
    pub ran: usize,
    pub failed: usize,
    /// ctr's stderr, the first time a run failed.
    pub first_failure: Option<String>,
}

impl ContainerRuns {
    /// Stops after the container running now, and counts.
    pub async fn finish(self) -> RunCounts {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap()
    }
}
