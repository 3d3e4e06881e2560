//! What the calls containerd makes most cost the kernel, counted by strace
//! on the running daemon. A few microseconds each hide in any timing on a
//! noisy machine; a count does not.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Daemon;

/// `strace -f -c` attached to every thread of `pid`.
struct Counter {
    strace: Child,
    out: tempfile::NamedTempFile,
}

impl Counter {
    async fn attach(pid: u32) -> Counter {
        common::require_program("strace", "apt-get install strace");
        let out = tempfile::NamedTempFile::new().unwrap();
        let strace = Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(out.path())
            .args(["-p", &pid.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .expect("running strace");
        // Counting starts once every thread has a tracer.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !traced(pid) {
            assert!(Instant::now() < deadline, "strace did not attach to {pid}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Counter { strace, out }
    }

    /// Detaches and returns the calls per syscall name.
    fn finish(mut self) -> HashMap<String, u64> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.strace.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        self.strace.wait().unwrap();
        let table = std::fs::read_to_string(self.out.path()).unwrap();
        // % time, seconds, usecs/call, calls, [errors,] syscall
        table
            .lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let name = *cols.last()?;
                let calls = cols.get(3)?.parse().ok()?;
                (name != "total").then(|| (name.to_string(), calls))
            })
            .collect()
    }
}

/// This process's umask, which the daemon inherits.
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("Umask in /proc/self/status");
    u32::from_str_radix(value.trim(), 8).unwrap()
}

fn traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .is_some_and(|p| p.trim() != "0")
        })
    })
}

#[tokio::test]
async fn prepare_commit_and_remove_of_plain_snapshots_make_no_pointless_syscalls() {
    common::require_root();
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    client.prepare("warm", "").await.unwrap();
    const N: u64 = 50;
    let counter = Counter::attach(daemon.pid()).await;
    for i in 0..N {
        let (key, name) = (format!("active-{i}"), format!("layer-{i}"));
        client.prepare(&key, "").await.unwrap();
        client.commit(&name, &key).await.unwrap();
        client.remove(&name).await.unwrap();
    }
    let calls = counter.finish();
    let count = |name: &str| calls.get(name).copied().unwrap_or(0);

    // The count saw the work: each Prepare makes its directory, fs and work.
    assert_eq!(count("mkdir"), 3 * N, "{calls:?}");
    // Each Prepare renames into place once, refusing to replace, with no
    // lookup of the target first; each Remove renames to the trash once.
    assert_eq!(count("renameat2"), N, "{calls:?}");
    assert_eq!(count("rename"), N, "{calls:?}");
    // A snapshot that never sat on a base has no pin to take down.
    assert_eq!(count("umount2"), 0, "{calls:?}");
    // Temporary names do not ask the kernel for the pid every time.
    assert_eq!(count("getpid"), 0, "{calls:?}");
    // Each Prepare makes its tree durable before its row: the snapshot's
    // directory before the write lock (and fs/, where the umask made a
    // chmod necessary), snapshots/ in the batch (serial calls: one batch
    // each); and each of the three calls' COMMITs syncs SQLite's WAL once.
    let chmod = u64::from(umask() & 0o755 != 0);
    assert_eq!(count("fsync"), (2 + chmod) * N + 3 * N, "{calls:?}");
    // Each Commit writes its layer's data back with one syncfs, outside
    // the write lock (docs/guarantees.md).
    assert_eq!(count("syncfs"), N, "{calls:?}");
}

/// Commits that skip the layer sync: the config's switch turns it off for
/// all, the volatile label for one snapshot.
async fn syncfs_calls_for(config: &str, labels: &[(&str, &str)]) -> u64 {
    let daemon = Daemon::start_with_config(config).await;
    let mut client = daemon.client().await;
    client.prepare("warm", "").await.unwrap();
    let labels: HashMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let counter = Counter::attach(daemon.pid()).await;
    for i in 0..5 {
        let (key, name) = (format!("active-{i}"), format!("layer-{i}"));
        client.prepare_with(&key, "", labels.clone()).await.unwrap();
        client.commit(&name, &key).await.unwrap();
    }
    counter.finish().get("syncfs").copied().unwrap_or(0)
}

#[tokio::test]
async fn commit_skips_the_layer_sync_when_configured_off_or_volatile() {
    common::require_root();
    assert_eq!(syncfs_calls_for("sync_layers = false", &[]).await, 0);
    let volatile = [("containerd.io/snapshot/ontop.volatile", "true")];
    assert_eq!(syncfs_calls_for("", &volatile).await, 0);
}
