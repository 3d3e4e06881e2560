//! The shared harness: starts the real `ontop serve` binary on a temporary
//! root and socket, hands out gRPC clients, mounts what the daemon returns
//! the way containerd does, and unmounts everything even when a test fails.
//!
//! Suites that hold for both backends list their tests in
//! `on_every_backend!`, which runs each one as `overlayfs::NAME` and
//! `fuse_overlayfs::NAME`; daemons started inside get that backend.

#![allow(dead_code)]

pub mod containerd;
pub mod cri;
pub mod load;
pub mod registry;

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ontop::admin::v1::admin_client::AdminClient;
pub use ontop::backend::Backend;
use ontop::containerd_api::snapshots::v1 as api;
use ontop::containerd_api::types::Mount;
use ontop_tools::client::{Namespace, Snapshots};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_ontop");

tokio::task_local! {
    static BACKEND: Backend;
}

/// Runs `test` with daemons on `backend`.
pub async fn on_backend<F: Future>(backend: Backend, test: F) -> F::Output {
    BACKEND.scope(backend, test).await
}

/// The backend of the running test: the kernel's unless it runs under
/// `on_every_backend!`.
pub fn backend() -> Backend {
    BACKEND.try_with(|b| *b).unwrap_or_default()
}

/// The `type` of layered (non-bind) mounts on the running test's backend.
pub fn layered() -> &'static str {
    backend().mount_type()
}

/// Runs each named `async fn` once per backend, as `overlayfs::NAME` and
/// `fuse_overlayfs::NAME`.
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($($test:ident),+ $(,)?) => {
        mod overlayfs {
            $(
                #[tokio::test]
                async fn $test() {
                    crate::common::on_backend(crate::common::Backend::Overlayfs, super::$test()).await
                }
            )+
        }
        mod fuse_overlayfs {
            $(
                #[tokio::test]
                async fn $test() {
                    crate::common::on_backend(crate::common::Backend::FuseOverlayfs, super::$test()).await
                }
            )+
        }
    };
}

/// Runs each named `async fn` on every containerd release of the suite
/// and both backends, as `containerd_1_6::overlayfs::NAME`,
/// `containerd_2_1::fuse_overlayfs::NAME` and so on; with `kernel_only:`
/// first, on the kernel backend only, as `containerd_1_7::NAME`. The
/// `containerd_extra` tests run a containerd of the user's own
/// (`ONTOP_CONTAINERD_EXTRA_BIN`); they are ignored unless asked for, as
/// `scripts/test.sh` does when that variable is set.
#[allow(unused_macros)]
macro_rules! on_every_containerd {
    (kernel_only: $($test:ident),+ $(,)?) => {
        on_every_containerd!(@releases kernel, $($test),+);
    };
    ($($test:ident),+ $(,)?) => {
        on_every_containerd!(@releases both, $($test),+);
    };
    // `#[cfg(all())]` is an attribute that changes nothing: the releases
    // Debian carries run by default.
    (@releases $backends:ident, $($test:ident),+) => {
        on_every_containerd!(@release containerd_1_6, V1_6, #[cfg(all())], $backends, $($test),+);
        on_every_containerd!(@release containerd_1_7, V1_7, #[cfg(all())], $backends, $($test),+);
        on_every_containerd!(@release containerd_2_1, V2_1, #[cfg(all())], $backends, $($test),+);
        on_every_containerd!(@release containerd_extra, Extra,
            #[ignore = "needs ONTOP_CONTAINERD_EXTRA_BIN, a containerd of your own"],
            $backends, $($test),+);
    };
    (@release $module:ident, $release:ident, #[$attr:meta], both, $($test:ident),+) => {
        mod $module {
            on_every_containerd!(@backend overlayfs, Overlayfs, $release, #[$attr], $($test),+);
            on_every_containerd!(@backend fuse_overlayfs, FuseOverlayfs, $release, #[$attr], $($test),+);
        }
    };
    (@release $module:ident, $release:ident, #[$attr:meta], kernel, $($test:ident),+) => {
        mod $module {
            $(
                #[tokio::test]
                #[$attr]
                async fn $test() {
                    crate::common::containerd::on_containerd(
                        crate::common::containerd::Release::$release,
                        super::$test(),
                    )
                    .await
                }
            )+
        }
    };
    (@backend $module:ident, $backend:ident, $release:ident, #[$attr:meta], $($test:ident),+) => {
        mod $module {
            $(
                #[tokio::test]
                #[$attr]
                async fn $test() {
                    crate::common::containerd::on_containerd(
                        crate::common::containerd::Release::$release,
                        crate::common::on_backend(
                            crate::common::Backend::$backend,
                            super::super::$test(),
                        ),
                    )
                    .await
                }
            )+
        }
    };
}

/// Sends SIGTERM to `pid`: ontop's graceful stop.
pub fn terminate(pid: u32) -> nix::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails the test, saying how to get it, unless `program` is on PATH.
pub fn require_program(program: &str, install: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{program} is not installed: {install}");
}

/// Fails the test with a clear reason when it is not run as root: mount
/// tests must run, never skip.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests mount overlay and bind filesystems and must run as root"
    );
}

pub struct Daemon {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Set for a daemon run rootless (see `start_rootless`).
    rootless: Option<Rootless>,
    /// Set for a socket-activated daemon (see `start_activated`): the
    /// directory where its supervisor keeps state.
    activation: Option<PathBuf>,
    /// Set for a daemon served from the test's own process (see
    /// `start_in_process`).
    in_process: Option<InProcess>,
}

/// `ontop::server::serve_on` running in this process, on a runtime and
/// thread of its own: a test that blocks its own runtime (running `ontop
/// check`, say) must not stop the server from answering.
struct InProcess {
    /// A graceful stop, as SIGTERM.
    stop: tokio::sync::oneshot::Sender<()>,
    /// Ends serving at once, as SIGKILL would: for Drop, when the test's
    /// clients may still hold connections that nobody will close.
    kill: tokio::sync::oneshot::Sender<()>,
    served: std::thread::JoinHandle<anyhow::Result<()>>,
}

/// What systemd does for a service with a `.socket` unit and
/// `Restart=always`, for a test: `systemd-socket-activate` binds the
/// socket and, at the first connection, execs this supervisor, which
/// keeps the socket (fd 3) and starts ontop on it again each time it
/// exits, with `LISTEN_PID` set to the new process, until `$state/stop`
/// exists. `$state/pid` is the running ontop's pid, `$state/exits` the
/// exit statuses.
const SUPERVISOR: &str = r#"
state=$1; shift
while :; do
  sh -c 'echo $$ > "$0/pid.new"; mv "$0/pid.new" "$0/pid"; export LISTEN_PID=$$; exec "$@"' "$state" "$@"
  status=$?
  echo "$status" >> "$state/exits"
  [ -e "$state/stop" ] && exit "$status"
  [ "$status" -eq 0 ] || sleep 0.2
done
"#;

/// An unprivileged user, and the per-user directories ontop defaults to.
#[derive(Debug, Clone)]
pub struct Rootless {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
    /// A copy of the binary the user can reach: the build tree may be
    /// under a directory only root can enter.
    pub bin: PathBuf,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::start_with_config("").await
    }

    /// Starts a daemon whose config file holds `config` (TOML).
    pub async fn start_with_config(config: &str) -> Daemon {
        Daemon::start_with(|_| config.to_string()).await
    }

    /// Starts a daemon that allows host base directories under
    /// [`Daemon::hosts`], with `extra` config appended.
    pub async fn start_with_bases(extra: &str) -> Daemon {
        Daemon::start_with(|dir| {
            let hosts = dir.join("hosts");
            std::fs::create_dir_all(&hosts).unwrap();
            format!("base_roots = [{:?}]\n{extra}", hosts.display().to_string())
        })
        .await
    }

    /// Starts a daemon whose config is made from its test directory.
    pub async fn start_with(config: impl FnOnce(&Path) -> String) -> Daemon {
        let mut d = Daemon::prepared(config);
        d.spawn().await;
        d
    }

    /// Starts a daemon on an existing root, such as one a test restored
    /// from a disk image.
    pub async fn start_on_root(root: &Path) -> Daemon {
        let mut d = Daemon::prepared(|_| String::new());
        d.root = root.to_path_buf();
        d.spawn().await;
        d
    }

    /// Starts a daemon whose root is a btrfs of its own (a sparse file on
    /// a loop device, made here) with quotas on, and `config`.
    pub async fn start_on_btrfs(config: &str) -> Daemon {
        require_program("mkfs.btrfs", "btrfs-progs");
        let mut d = Daemon::prepared(|_| config.to_string());
        let image = d.dir.path().join("btrfs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        stdout_of(
            Command::new("mkfs.btrfs").arg("-q").arg(&image),
            "mkfs.btrfs",
        );
        std::fs::create_dir_all(&d.root).unwrap();
        stdout_of(
            Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&image)
                .arg(&d.root),
            "mounting the test's btrfs",
        );
        stdout_of(
            Command::new("btrfs").args(["quota", "enable"]).arg(&d.root),
            "btrfs quota enable",
        );
        d.spawn().await;
        d
    }

    /// A daemon with `config`, not started: for
    /// [`Daemon::start_expecting_failure`].
    pub fn unstarted(config: &str) -> Daemon {
        Daemon::prepared(|_| config.to_string())
    }

    /// A daemon's test directory, with its config file written from
    /// `config`, and nothing started yet.
    fn prepared(config: impl FnOnce(&Path) -> String) -> Daemon {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("ontop-test-")
            .tempdir()
            .expect("creating test dir");
        let mut config = config(dir.path());
        if !config.contains("content_store") {
            // ontop's applier reads blobs here: the content store of the
            // containerd a test starts, linked in when it starts (see
            // `Containerd::launch`).
            config = format!(
                "content_store = {:?}\n{config}",
                dir.path().join("content").display().to_string()
            );
        }
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Daemon {
            backend: backend(),
            log: dir.path().join("daemon.log"),
            root: dir.path().join("root"),
            socket: dir.path().join("run/ontop.sock"),
            dir,
            child: None,
            rootless: None,
            activation: None,
            in_process: None,
        }
    }

    /// Serves a fresh root from this test's own process through
    /// `ontop::server::serve_on`, on a socket as the binary would: for
    /// contract tests, which then need no process and show their panics
    /// and backtraces in one place. It has no log and no pid.
    pub async fn start_in_process() -> Daemon {
        let mut d = Daemon::prepared(|_| String::new());
        let config = ontop::config::Config::merge(
            Default::default(),
            ontop::config::Overrides {
                backend: Some(d.backend),
                root: Some(d.root.clone()),
                address: Some(d.socket.clone()),
                ..Default::default()
            },
            ontop::config::Defaults::system(),
        )
        .expect("a valid config");
        let socket = d.socket.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let served = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new()?;
            let result = runtime.block_on(async move {
                let core = ontop::server::Core::open(&config).await?;
                let socket = ontop::server::Socket::bind(&socket)?;
                let _ = ready_tx.send(());
                let shutdown = async {
                    let _ = stopped.await;
                    "the test's stop"
                };
                tokio::select! {
                    served = ontop::server::serve_on(socket, core, &config, shutdown) => served.map(|_| ()),
                    _ = killed => Ok(()),
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(5));
            result
        });
        if ready.recv().is_err() {
            let failed = served.join().expect("the server thread");
            panic!(
                "the in-process server did not start: {:#}",
                failed.unwrap_err()
            );
        }
        d.in_process = Some(InProcess { stop, kill, served });
        d
    }

    /// Starts a daemon with the given config, socket-activated the way
    /// `contrib/ontop.socket` runs it (see [`SUPERVISOR`]): the socket
    /// outlives each ontop process, and `restart` starts a new one on it.
    pub async fn start_activated(config: &str) -> Daemon {
        let mut d = Daemon::prepared(|_| config.to_string());
        let state = d.dir.path().join("activation");
        std::fs::create_dir_all(&state).unwrap();
        d.activation = Some(state);
        d.spawn().await;
        d
    }

    /// Starts `ontop serve` as the unprivileged `uid`:`gid` inside a new
    /// user and mount namespace, the way rootless containerd runs it
    /// (`unshare --user --map-root-user --mount`), with no root, socket
    /// or config given: it must pick its per-user defaults under the
    /// HOME and XDG_RUNTIME_DIR made here.
    pub async fn start_rootless(uid: u32, gid: u32) -> Daemon {
        let mut d = Daemon::rootless(uid, gid);
        d.spawn().await;
        d
    }

    /// Starts the daemon expecting it to refuse to run; returns its log.
    pub fn start_expecting_failure(&mut self) -> String {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting ontop serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ontop serve kept running:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "ontop serve exited 0:\n{}", self.log());
        self.log()
    }

    /// A rootless daemon, set up but not started.
    pub fn rootless(uid: u32, gid: u32) -> Daemon {
        require_root();
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("ontop-rootless-")
            .tempdir()
            .expect("creating test dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("home");
        let runtime_dir = dir.path().join("run");
        let mnt = dir.path().join("mnt");
        for d in [&home, &runtime_dir, &mnt] {
            std::fs::create_dir(d).unwrap();
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        }
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let bin = dir.path().join("ontop");
        std::fs::copy(BIN, &bin).unwrap();
        Daemon {
            backend: backend(),
            log: dir.path().join("daemon.log"),
            root: home.join(".local/share/ontop"),
            socket: runtime_dir.join("ontop/ontop.sock"),
            dir,
            child: None,
            activation: None,
            in_process: None,
            rootless: Some(Rootless {
                uid,
                gid,
                home,
                runtime_dir,
                bin,
            }),
        }
    }

    /// The pid of the running daemon, which is in its own namespaces when
    /// rootless.
    pub fn pid(&self) -> u32 {
        if let Some(state) = &self.activation {
            let pid = std::fs::read_to_string(state.join("pid")).expect("supervisor's pid file");
            return pid.trim().parse().expect("a pid");
        }
        self.child.as_ref().expect("daemon running").id()
    }

    /// The command that starts the daemon: the binary itself, or for a
    /// rootless daemon setpriv and unshare, which exec into it, so the
    /// child's pid is the daemon's.
    fn command(&self) -> Command {
        if let Some(state) = &self.activation {
            let mut cmd = Command::new("systemd-socket-activate");
            cmd.arg(format!("--listen={}", self.socket.display()))
                .args(["/bin/sh", "-c", SUPERVISOR, "supervise"])
                .arg(state)
                .arg(BIN)
                .args(self.args());
            return cmd;
        }
        let Some(r) = &self.rootless else {
            let mut cmd = Command::new(BIN);
            cmd.args(self.args());
            return cmd;
        };
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", r.uid))
            .arg(format!("--regid={}", r.gid))
            .arg("--clear-groups")
            .args(["unshare", "--user", "--map-root-user", "--mount"])
            .arg(&r.bin)
            .args([
                "serve",
                "--backend",
                self.backend.as_str(),
                "--log-level",
                "debug",
            ])
            .env_clear()
            .env("HOME", &r.home)
            .env("XDG_RUNTIME_DIR", &r.runtime_dir)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin");
        cmd
    }

    fn args(&self) -> Vec<String> {
        vec![
            "serve".into(),
            "--backend".into(),
            self.backend.as_str().into(),
            "--config".into(),
            self.dir.path().join("config.toml").display().to_string(),
            "--root".into(),
            self.root.display().to_string(),
            "--address".into(),
            self.socket.display().to_string(),
            "--log-level".into(),
            "debug".into(),
        ]
    }

    /// Starts the binary and waits until the socket answers gRPC.
    pub async fn spawn(&mut self) {
        if let Some(state) = &self.activation {
            let _ = std::fs::remove_file(state.join("stop"));
            let _ = std::fs::remove_file(state.join("pid"));
            let _ = std::fs::remove_file(&self.socket);
            std::fs::create_dir_all(self.socket.parent().unwrap()).unwrap();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting ontop serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ontop serve exited with {status}:\n{}\nholding {}: {:?}",
                    containerd::tail(&self.log(), 5),
                    self.root.join("lock").display(),
                    holders(&self.root.join("lock"))
                );
            }
            if self.socket.exists() && self.answers().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ontop serve did not answer within 10s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a successor with `--takeover` beside the running daemon,
    /// waits for the old process to hand over and exit, and for the new
    /// one to answer; the daemon is the new process from then on.
    pub async fn take_over(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        let new = self
            .command()
            .arg("--takeover")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the successor");
        let mut old = self.child.replace(new).expect("a daemon running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let _ = old.kill();
                panic!("the successor exited with {status}:\n{}", self.log());
            }
            if let Some(status) = old.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the old ontop exited with {status}:\n{}",
                    self.log()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the old ontop did not hand over and exit within 30s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while !self.answers().await {
            assert!(
                Instant::now() < deadline,
                "the successor does not answer:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a gRPC call gets an answer. A socket-activated daemon's
    /// socket accepts connections before ontop runs, so connecting alone
    /// proves nothing.
    async fn answers(&self) -> bool {
        let Ok(channel) = ontop_tools::client::connect(&self.socket).await else {
            return false;
        };
        let mut admin = AdminClient::new(channel);
        let list = admin.list(ontop::admin::v1::ListRequest::default());
        matches!(
            tokio::time::timeout(Duration::from_millis(500), list).await,
            Ok(Ok(_))
        )
    }

    /// Sends SIGTERM and waits for a clean exit, keeping the test's own
    /// runtime running so its client connections answer the server's
    /// goodbye as a real client would. A socket-activated daemon's
    /// supervisor is told not to start it again, and exits with its
    /// status.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        if let Some(served) = self.in_process.take() {
            use std::os::unix::process::ExitStatusExt;
            let _ = served.stop.send(());
            let result = tokio::task::spawn_blocking(move || served.served.join())
                .await
                .unwrap()
                .expect("the server thread");
            result.unwrap_or_else(|e| panic!("serve_on failed: {e:#}"));
            return std::process::ExitStatus::from_raw(0);
        }
        let pid = self.pid();
        if let Some(state) = &self.activation {
            std::fs::write(state.join("stop"), "").unwrap();
        }
        let mut child = self.child.take().expect("daemon running");
        let _ = terminate(pid);
        // Past the daemon's own 10 s grace for clients that never hang up.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ontop serve ignored SIGTERM:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The daemon's process, for a test that watches it itself; the
    /// daemon no longer kills it when dropped.
    pub fn take_child(&mut self) -> Child {
        self.child.take().expect("daemon running")
    }

    /// Tells a socket-activated daemon's supervisor not to start ontop
    /// again once it exits.
    pub fn stop_restarting(&self) {
        let state = self.activation.as_ref().expect("a socket-activated daemon");
        std::fs::write(state.join("stop"), "").unwrap();
    }

    /// SIGKILL: a crash, with no chance to clean up.
    pub fn kill(&mut self) {
        assert!(
            self.activation.is_none(),
            "kill a socket-activated daemon through pid(): its supervisor restarts it"
        );
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Collects a daemon that was killed from outside (see `pid`).
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Stops the daemon and starts it again. A socket-activated daemon's
    /// socket stays up meanwhile: only the ontop process changes.
    pub async fn restart(&mut self) {
        if self.activation.is_none() {
            self.stop().await;
            self.spawn().await;
            return;
        }
        let old = self.pid();
        let _ = terminate(old);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.pid() == old || !self.answers().await {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the supervisor exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "ontop was not back within 20s of SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub async fn client(&self) -> Client {
        let channel = ontop_tools::client::connect(&self.socket).await.unwrap();
        Client {
            api: Snapshots::new(channel, "ontop", Namespace::default()),
        }
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(ontop_tools::client::connect(&self.socket).await.unwrap())
    }

    /// A fresh directory to mount on.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Runs `ontop check` through the daemon and fails the test with its
    /// report unless the database and the disk agree.
    pub fn assert_consistent(&self) {
        let out = Command::new(BIN)
            .args(["check", "--address"])
            .arg(&self.socket)
            .output()
            .expect("running ontop check");
        assert!(
            out.status.success(),
            "ontop check:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ontop containerd-config` for this daemon and the running test's
    /// containerd generation, found as a user would (`auto`: the first
    /// `containerd` on PATH), with `flags` added.
    pub fn containerd_config(&self, flags: &[&str]) -> String {
        self.containerd_config_for("auto", flags)
    }

    /// `containerd_config` rendered for containerd `version` (`1.7`,
    /// `2.0`, or `auto`: the one on this test's PATH).
    pub fn containerd_config_for(&self, version: &str, flags: &[&str]) -> String {
        stdout_of(
            Command::new(BIN)
                .args(["containerd-config", "--containerd-version", version])
                .arg("--config")
                .arg(self.dir.path().join("config.toml"))
                .arg("--address")
                .arg(&self.socket)
                .arg("--root")
                .arg(&self.root)
                .args(flags)
                .env("PATH", containerd::path_env()),
            "ontop containerd-config",
        )
    }

    /// Where host base directories may live (see `start_with_bases`).
    pub fn hosts(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Directories under `snapshots/` on disk.
    pub fn snapshot_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(served) = self.in_process.take() {
            let _ = served.kill.send(());
            let _ = served.served.join();
        }
        if let Some(state) = &self.activation {
            let _ = std::fs::write(state.join("stop"), "");
            if let Some(pid) = std::fs::read_to_string(state.join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        unmount_under(self.dir.path());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Everything observable about a tree except access times: type, mode,
/// owner, size, modification time, content and link targets, per path.
/// Two equal states mean nothing under the tree was written.
pub fn tree_state(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let what = if ft.is_symlink() {
            format!("link {}", std::fs::read_link(&p).unwrap().display())
        } else if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            "dir".to_string()
        } else if ft.is_file() {
            format!("file {:?}", std::fs::read(&p).unwrap())
        } else {
            // Overlay's whiteouts are character devices 0:0.
            format!("special rdev={}", md.rdev())
        };
        out.insert(
            p.strip_prefix(root).unwrap().to_path_buf(),
            format!(
                "{what} mode={:o} owner={}:{} nlink={} size={} mtime={}.{} ctime={}.{}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.nlink(),
                md.size(),
                md.mtime(),
                md.mtime_nsec(),
                md.ctime(),
                md.ctime_nsec()
            ),
        );
    }
    out
}

/// The mount points below `dir`, in this mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|t| t.starts_with(dir))
        .collect()
}

/// Lazily unmounts every mount below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mut targets = mounts_under(dir);
    targets.sort_by_key(|t| std::cmp::Reverse(t.as_os_str().len()));
    for t in targets {
        let _ = nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The Snapshots API as tests call it: [`ontop_tools::client::Snapshots`], with
/// labels left out where a test has none, and answers shaped for asserts.
#[derive(Clone)]
pub struct Client {
    pub api: Snapshots,
}

pub type Rpc<T> = Result<T, tonic::Status>;

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Client {
    pub async fn prepare(&mut self, key: &str, parent: &str) -> Rpc<Vec<Mount>> {
        self.api.prepare(key, parent, HashMap::new()).await
    }

    pub async fn prepare_with(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Rpc<Vec<Mount>> {
        self.api.prepare(key, parent, labels).await
    }

    pub async fn view(&mut self, key: &str, parent: &str) -> Rpc<Vec<Mount>> {
        self.api.view(key, parent, HashMap::new()).await
    }

    pub async fn mounts(&mut self, key: &str) -> Rpc<Vec<Mount>> {
        self.api.mounts(key).await
    }

    pub async fn commit(&mut self, name: &str, key: &str) -> Rpc<()> {
        self.api.commit(name, key, HashMap::new()).await
    }

    pub async fn commit_with(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Rpc<()> {
        self.api.commit(name, key, labels).await
    }

    /// Commit with a parent, as containerd 2.2+'s parallel unpack does.
    pub async fn commit_onto(&mut self, name: &str, key: &str, parent: &str) -> Rpc<()> {
        self.api
            .commit_onto(name, key, parent, HashMap::new())
            .await
    }

    pub async fn remove(&mut self, key: &str) -> Rpc<()> {
        self.api.remove(key).await
    }

    pub async fn stat(&mut self, key: &str) -> Rpc<api::Info> {
        self.api.stat(key).await
    }

    pub async fn update(&mut self, info: api::Info, paths: &[&str]) -> Rpc<api::Info> {
        self.api.update(info, paths).await
    }

    /// What matches `filters`, plus the sizes of the streamed batches.
    pub async fn list_batches(&mut self, filters: &[&str]) -> Rpc<(Vec<api::Info>, Vec<usize>)> {
        let mut stream = self.api.list(filters).await?;
        let mut infos = Vec::new();
        let mut batches = Vec::new();
        while let Some(msg) = stream.message().await? {
            batches.push(msg.info.len());
            infos.extend(msg.info);
        }
        Ok((infos, batches))
    }

    /// Names matching `filters`, sorted.
    pub async fn list(&mut self, filters: &[&str]) -> Rpc<Vec<String>> {
        let (infos, _) = self.list_batches(filters).await?;
        let mut names: Vec<String> = infos.into_iter().map(|i| i.name).collect();
        names.sort();
        Ok(names)
    }

    pub async fn usage(&mut self, key: &str) -> Rpc<(i64, i64)> {
        self.api.usage(key).await
    }

    pub async fn cleanup(&mut self) -> Rpc<()> {
        self.api.cleanup().await
    }

    /// Prepares `key` on `parent`, writes `files` (path, content) into it
    /// through a real mount, unmounts and commits it as `name`.
    pub async fn layer(&mut self, d: &Daemon, name: &str, parent: &str, apply: impl FnOnce(&Path)) {
        let key = format!("{name}-active");
        let mounts = self.prepare(&key, parent).await.unwrap();
        let target = d.mountpoint(&key);
        mount_all(&mounts, &target);
        apply(&target);
        unmount(&target);
        self.commit(name, &key).await.unwrap();
    }
}

/// Runs `cmd`, failing the test with `what` and its stderr unless it
/// succeeds; returns its stdout.
pub fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The gRPC code of a result, for error-table assertions.
pub fn code<T: std::fmt::Debug>(r: Rpc<T>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(s) => s.code(),
    }
}

/// Performs mounts as containerd's mount package does (see
/// `ontop_tools::mounter`), failing the test with the reason.
pub fn mount_all(mounts: &[Mount], target: &Path) {
    ontop_tools::mounter::mount_all(mounts, target).unwrap_or_else(|e| panic!("{e:#}"));
}

pub fn unmount(target: &Path) {
    ontop_tools::mounter::unmount(target).unwrap_or_else(|e| panic!("{e:#}"));
}

/// A plain HTTP/1.0 GET on 127.0.0.1: the status and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The processes with `path` open (pid, command line), from /proc.
pub fn holders(path: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc_dir.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let fds = proc_dir.path().join("fd");
        let holds = std::fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path));
        if holds {
            let cmd = std::fs::read(proc_dir.path().join("cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}
