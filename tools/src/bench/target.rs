//! What the benchmark drives: a proxy snapshotter's socket, a daemon it
//! starts itself, or a snapshotter behind containerd's own Snapshots
//! service. All three speak the same API, so one client serves them all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tonic::{Code, Status};

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::client::{Namespace, Snapshots};
use ontop::containerd_api::types::Mount;

/// How one target was asked for on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// `--address [NAME=]SOCKET`
    Address { name: String, socket: PathBuf },
    /// `--serve NAME=COMMAND`, with `{root}` and `{address}` filled in.
    Serve { name: String, command: String },
    /// `--snapshotter NAME`, behind `--containerd SOCKET`.
    Containerd { snapshotter: String },
}

impl Spec {
    pub fn address(arg: &str) -> Spec {
        let (name, socket) = split_name(arg);
        Spec::Address {
            name: name.unwrap_or(socket).to_string(),
            socket: socket.into(),
        }
    }

    pub fn serve(arg: &str) -> anyhow::Result<Spec> {
        let (Some(name), command) = split_name(arg) else {
            bail!("--serve takes NAME=COMMAND, got {arg:?}");
        };
        if !command.contains("{root}") || !command.contains("{address}") {
            bail!("--serve {name}: the command must contain {{root}} and {{address}}");
        }
        Ok(Spec::Serve {
            name: name.into(),
            command: command.into(),
        })
    }
}

/// `NAME=VALUE` or a bare value; a `/` before the `=` means no name.
fn split_name(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() && !name.contains('/') => (Some(name), value),
        _ => (None, arg),
    }
}

/// A daemon the benchmark started, so it can time start-up and read its
/// peak memory.
pub struct Served {
    command: String,
    pub root: PathBuf,
    pub socket: PathBuf,
    child: Child,
}

impl Served {
    fn spawn(command: &str, root: &Path, socket: &Path) -> anyhow::Result<Served> {
        let line = command
            .replace("{root}", &root.display().to_string())
            .replace("{address}", &socket.display().to_string());
        // exec: the child's pid is the daemon's, for /proc/<pid>/status.
        let child = Command::new("sh")
            .args(["-c", &format!("exec {line}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {line}"))?;
        Ok(Served {
            command: command.into(),
            root: root.into(),
            socket: socket.into(),
            child,
        })
    }

    /// Peak resident memory (VmHWM) in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("no VmHWM in /proc/<pid>/status")?;
        Ok(kb * 1024)
    }

    /// CPU time the daemon has used, user and system, all threads (those
    /// that exited included), at the kernel's tick (usually 10 ms).
    pub fn cpu_time(&self) -> anyhow::Result<std::time::Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command name, which may hold spaces.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("no command name in /proc/<pid>/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| -> anyhow::Result<u64> {
            Ok(fields.get(i).context("short /proc/<pid>/stat")?.parse()?)
        };
        // utime and stime are fields 14 and 15, that is 11 and 12 here.
        let ticks = tick(11)? + tick(12)?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
        Ok(std::time::Duration::from_micros(ticks * 1_000_000 / hz))
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("{} ignored SIGTERM for 30s", self.command);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}

pub struct Target {
    pub name: String,
    pub api: Snapshots,
    /// The snapshotter behind containerd; empty for a proxy's own socket.
    snapshotter: String,
    pub served: Option<Served>,
    /// The socket the client dials.
    socket: PathBuf,
    namespace: Namespace,
    /// Scratch space for mountpoints and a served daemon's root.
    pub scratch: PathBuf,
}

impl Target {
    pub async fn open(
        spec: &Spec,
        containerd: Option<&Path>,
        namespace: &str,
        scratch: PathBuf,
    ) -> anyhow::Result<Target> {
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let (name, socket, snapshotter, ns, served) = match spec {
            Spec::Address { name, socket } => (
                name.clone(),
                socket.clone(),
                String::new(),
                Namespace::default(),
                None,
            ),
            Spec::Serve { name, command } => {
                let root = scratch.join("root");
                let socket = scratch.join("bench.sock");
                let served = Served::spawn(command, &root, &socket)?;
                (
                    name.clone(),
                    socket,
                    String::new(),
                    Namespace::default(),
                    Some(served),
                )
            }
            Spec::Containerd { snapshotter } => {
                let socket = containerd
                    .context("--snapshotter needs --containerd SOCKET")?
                    .to_path_buf();
                (
                    format!("{snapshotter} via containerd"),
                    socket,
                    snapshotter.clone(),
                    Namespace::new(namespace)?,
                    None,
                )
            }
        };
        let api = connect(&socket, &snapshotter, &ns, Duration::from_secs(30))
            .await
            .with_context(|| format!("target {name}: connecting to {}", socket.display()))?
            .0;
        Ok(Target {
            name,
            api,
            snapshotter,
            served,
            socket,
            namespace: ns,
            scratch,
        })
    }

    /// Restarts a served daemon on the same root and returns the time from
    /// process start to its first answered RPC.
    pub async fn restart(&mut self) -> anyhow::Result<Duration> {
        let served = self.served.as_mut().context("not started by the bench")?;
        served.stop()?;
        let fresh = Served::spawn(&served.command, &served.root, &served.socket)?;
        let started = Instant::now();
        *served = fresh;
        let (api, answered) = connect(
            &self.socket,
            &self.snapshotter,
            &self.namespace,
            Duration::from_secs(120),
        )
        .await?;
        self.api = api;
        Ok(answered - started)
    }

    /// A client of the gRPC health service on the target's own socket,
    /// when it serves one (ontop does): a Check is an RPC whose handler
    /// does next to nothing, so it times the floor under Stat and Mounts.
    pub async fn health(&self) -> Option<HealthClient<tonic::transport::Channel>> {
        if !self.snapshotter.is_empty() {
            return None;
        }
        let channel = crate::client::connect(&self.socket).await.ok()?;
        let mut health = HealthClient::new(channel);
        health.check(HealthCheckRequest::default()).await.ok()?;
        Some(health)
    }

    pub fn mountpoint(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.scratch.join("mnt").join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// containerd garbage-collects snapshots nothing refers to; through
    /// containerd, the bench's own are GC roots until it removes them.
    fn keep(&self, mut labels: HashMap<String, String>) -> HashMap<String, String> {
        if !self.snapshotter.is_empty() {
            labels.insert("containerd.io/gc.root".into(), "ontop-bench".into());
        }
        labels
    }

    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let labels = self.keep(labels);
        self.api.prepare(key, parent, labels).await
    }

    pub async fn commit(&mut self, name: &str, key: &str) -> Result<(), Status> {
        let labels = self.keep(HashMap::new());
        self.api.commit(name, key, labels).await
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, Status> {
        self.api.mounts(key).await
    }

    pub async fn stat(&mut self, key: &str) -> Result<(), Status> {
        self.api.stat(key).await.map(drop)
    }

    /// The number of snapshots matching `filters`, counted as they stream.
    pub async fn list(&mut self, filters: &[&str]) -> Result<usize, Status> {
        let mut stream = self.api.list(filters).await?;
        let mut n = 0;
        while let Some(batch) = stream.message().await? {
            n += batch.info.len();
        }
        Ok(n)
    }

    pub async fn usage(&mut self, key: &str) -> Result<(i64, i64), Status> {
        self.api.usage(key).await
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), Status> {
        self.api.remove(key).await
    }

    pub async fn cleanup(&mut self) -> Result<(), Status> {
        match self.api.cleanup().await {
            // containerd's own service answers Cleanup only for
            // snapshotters that implement it.
            Err(s) if s.code() == Code::Unimplemented => Ok(()),
            other => other,
        }
    }

    /// containerd's socket and this target's snapshotter name, when the
    /// target is reached through containerd.
    pub fn via_containerd(&self) -> Option<(&Path, &str)> {
        (!self.snapshotter.is_empty()).then_some((self.socket.as_path(), self.snapshotter.as_str()))
    }

    /// A second client on the same connection settings, for concurrency.
    pub fn clone_for_task(&self) -> Target {
        Target {
            name: self.name.clone(),
            api: self.api.clone(),
            snapshotter: self.snapshotter.clone(),
            served: None,
            socket: self.socket.clone(),
            namespace: self.namespace.clone(),
            scratch: self.scratch.clone(),
        }
    }
}

/// Dials until the server answers an RPC (a Stat of a key that does not
/// exist: NotFound is an answer), and says when it did.
async fn connect(
    socket: &Path,
    snapshotter: &str,
    namespace: &Namespace,
    patience: Duration,
) -> anyhow::Result<(Snapshots, Instant)> {
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(channel) = crate::client::connect(socket).await {
            let mut api = Snapshots::new(channel, snapshotter, namespace.clone());
            match api.stat("ontop-bench-probe").await {
                Ok(_) => return Ok((api, Instant::now())),
                Err(s) if s.code() != Code::Unavailable && s.code() != Code::Unknown => {
                    return Ok((api, Instant::now()))
                }
                Err(_) => {}
            }
        }
        if Instant::now() > deadline {
            bail!("no answer within {}s", patience.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_names() {
        assert_eq!(
            Spec::address("/run/a.sock"),
            Spec::Address {
                name: "/run/a.sock".into(),
                socket: "/run/a.sock".into()
            }
        );
        assert_eq!(
            Spec::address("ref=/run/a.sock"),
            Spec::Address {
                name: "ref".into(),
                socket: "/run/a.sock".into()
            }
        );
        assert!(Spec::serve("ontop serve").is_err());
        assert!(Spec::serve("o=ontop serve --root {root}").is_err());
        assert!(Spec::serve("o=ontop serve --root {root} --address {address}").is_ok());
    }
}
