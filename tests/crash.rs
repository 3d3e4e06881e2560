//! Crash safety: a randomised workload of Prepare, View, Commit, Remove and
//! Update, with real files written into uppers, is killed with SIGKILL at
//! random moments, again and again. After every restart:
//!
//! - every acknowledged operation is still in effect, and committed layers
//!   hold exactly the bytes written before their Commit;
//! - nothing half-created is visible;
//! - `ontop check` finds the database sound and in agreement with the disk,
//!   once Cleanup has run, base pins included;
//! - the host directory that a third of the chains sit on is never written.
//!
//! An operation cut off by the kill may or may not have happened; it is
//! resolved by asking the restarted daemon, and then held to that answer.
//!
//! `ONTOP_SOAK=N` runs N times as many operations and kills.
//!
//! Kills also land in group-commit batches of several clients, in a
//! Cleanup reclaiming async removals, and in `ontop check --repair`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::{labels, Client, Daemon};
use ontop::containerd_api::types::Mount;
use tonic::Code;

use ontop::base::BASE_LABEL;

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Active,
    View,
    Committed,
}

#[derive(Debug, Clone)]
struct Snap {
    kind: Kind,
    parent: String,
    /// A file written into the upper, and its bytes.
    content: Option<(String, Vec<u8>)>,
    labels: HashMap<String, String>,
    /// Sits on the host base, asked for or inherited.
    on_base: bool,
}

#[derive(Default)]
struct Model {
    snaps: BTreeMap<String, Snap>,
    next: u64,
    /// The host base directory's label value.
    base: String,
}

impl Model {
    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{}", self.next)
    }

    fn pick(&self, f: impl Fn(&Snap) -> bool) -> Option<String> {
        let keys: Vec<&String> = self
            .snaps
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(k, _)| k)
            .collect();
        (!keys.is_empty()).then(|| keys[fastrand::usize(..keys.len())].clone())
    }

    fn has_children(&self, key: &str) -> bool {
        self.snaps.values().any(|s| s.parent == key)
    }
}

/// An operation that the kill may have cut off.
#[derive(Debug)]
enum InDoubt {
    Create(String, Snap),
    Commit { name: String, key: String },
    Remove(String),
    Update(String),
}

/// The request died with the daemon: its connection broke.
fn killed(s: &tonic::Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => true,
        Code::Internal => s.message().contains("h2") || s.message().contains("transport"),
        _ => false,
    }
}

/// The snapshot's own upper (or bind source), where containerd's applier
/// writes a layer.
fn upper(mounts: &[Mount]) -> std::path::PathBuf {
    let m = &mounts[0];
    match m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
        Some(u) => u.into(),
        None => m.source.clone().into(),
    }
}

/// Runs random operations until one is cut off (returned) or `budget` is
/// spent (None). Every acknowledged one is applied to the model.
async fn drive(c: &mut Client, m: &mut Model, budget: &mut usize) -> Option<InDoubt> {
    while *budget > 0 {
        *budget -= 1;
        let roll = fastrand::u32(..100);
        if roll < 30 {
            let parent = if fastrand::bool() {
                m.pick(|s| s.kind == Kind::Committed).unwrap_or_default()
            } else {
                String::new()
            };
            let key = m.fresh("a");
            let asks_base = parent.is_empty() && fastrand::u32(..3) == 0;
            let snap = Snap {
                kind: Kind::Active,
                parent: parent.clone(),
                content: None,
                labels: HashMap::new(),
                on_base: asks_base || m.snaps.get(&parent).is_some_and(|p| p.on_base),
            };
            let created = if asks_base {
                c.prepare_with(&key, "", labels(&[(BASE_LABEL, &m.base)]))
                    .await
            } else {
                c.prepare(&key, &parent).await
            };
            match created {
                Ok(mounts) => {
                    let bytes: Vec<u8> = (0..fastrand::usize(1..4096))
                        .map(|_| fastrand::u8(..))
                        .collect();
                    let file = format!("file-{key}");
                    std::fs::write(upper(&mounts).join(&file), &bytes).unwrap();
                    m.snaps.insert(
                        key,
                        Snap {
                            content: Some((file, bytes)),
                            ..snap
                        },
                    );
                }
                Err(s) if killed(&s) => return Some(InDoubt::Create(key, snap)),
                Err(s) => panic!("Prepare {key} on {parent:?}: {s}"),
            }
        } else if roll < 38 {
            let Some(parent) = m.pick(|s| s.kind == Kind::Committed) else {
                continue;
            };
            let key = m.fresh("v");
            let snap = Snap {
                kind: Kind::View,
                parent: parent.clone(),
                content: None,
                labels: HashMap::new(),
                on_base: m.snaps[&parent].on_base,
            };
            match c.view(&key, &parent).await {
                Ok(_) => {
                    m.snaps.insert(key, snap);
                }
                Err(s) if killed(&s) => return Some(InDoubt::Create(key, snap)),
                Err(s) => panic!("View {key}: {s}"),
            }
        } else if roll < 60 {
            let Some(key) = m.pick(|s| s.kind == Kind::Active) else {
                continue;
            };
            let name = m.fresh("c");
            match c.commit(&name, &key).await {
                Ok(()) => commit_in_model(m, &name, &key),
                Err(s) if killed(&s) => return Some(InDoubt::Commit { name, key }),
                Err(s) => panic!("Commit {key} as {name}: {s}"),
            }
        } else if roll < 92 {
            let Some(key) = m.pick(|_| true).filter(|k| !m.has_children(k)) else {
                continue;
            };
            match c.remove(&key).await {
                Ok(()) => {
                    m.snaps.remove(&key);
                }
                Err(s) if killed(&s) => return Some(InDoubt::Remove(key)),
                Err(s) => panic!("Remove {key}: {s}"),
            }
        } else {
            let Some(key) = m.pick(|_| true) else {
                continue;
            };
            let mut info = c.stat(&key).await.ok()?;
            let value = fastrand::u32(..).to_string();
            info.labels = labels(&[("crash/test", &value)]);
            match c.update(info, &["labels.crash/test"]).await {
                Ok(_) => {
                    m.snaps.get_mut(&key).unwrap().labels = labels(&[("crash/test", &value)]);
                }
                Err(s) if killed(&s) => return Some(InDoubt::Update(key)),
                Err(s) => panic!("Update {key}: {s}"),
            }
        }
    }
    None
}

fn commit_in_model(m: &mut Model, name: &str, key: &str) {
    let mut s = m.snaps.remove(key).unwrap();
    s.kind = Kind::Committed;
    s.labels.clear(); // Commit replaces labels; it was given none.
    m.snaps.insert(name.to_string(), s);
}

/// Asks the restarted daemon what became of the cut-off operation.
async fn resolve(c: &mut Client, m: &mut Model, doubt: InDoubt) {
    match doubt {
        InDoubt::Create(key, snap) => {
            if c.stat(&key).await.is_ok() {
                m.snaps.insert(key, snap);
            }
        }
        InDoubt::Commit { name, key } => {
            if c.stat(&name).await.is_ok() {
                commit_in_model(m, &name, &key);
            }
        }
        InDoubt::Remove(key) => {
            if c.stat(&key).await.is_err() {
                m.snaps.remove(&key);
            }
        }
        InDoubt::Update(key) => {
            let info = c.stat(&key).await.unwrap();
            m.snaps.get_mut(&key).unwrap().labels = info.labels;
        }
    }
}

/// Everything acknowledged is there, as acknowledged, and nothing else.
async fn verify(d: &Daemon, c: &mut Client, m: &Model) {
    let mut listed = c.list(&[]).await.unwrap();
    listed.sort();
    let expected: Vec<String> = m.snaps.keys().cloned().collect();
    assert_eq!(listed, expected, "the daemon's snapshots against the model");
    let mut admin = d.admin().await;
    for (key, s) in &m.snaps {
        let info = c.stat(key).await.unwrap();
        let kind = match info.kind {
            1 => Kind::View,
            2 => Kind::Active,
            3 => Kind::Committed,
            k => panic!("{key}: kind {k}"),
        };
        assert_eq!((&kind, &info.parent), (&s.kind, &s.parent), "{key}");
        let mut expected = s.labels.clone();
        if s.on_base {
            expected.insert(BASE_LABEL.to_string(), m.base.clone());
        }
        assert_eq!(info.labels, expected, "{key}");
        if let (Kind::Committed, Some((file, bytes))) = (&s.kind, &s.content) {
            let path = admin
                .info(ontop::admin::v1::InfoRequest { key: key.clone() })
                .await
                .unwrap()
                .into_inner()
                .path;
            let found = std::fs::read(std::path::Path::new(&path).join("fs").join(file))
                .unwrap_or_else(|e| panic!("{key}: {file}: {e}"));
            assert!(found == *bytes, "{key}: {file} changed");
        }
    }
    c.cleanup().await.unwrap();
    d.assert_consistent();
    let pins = common::mounts_under(&d.root).len();
    let expected = m
        .snaps
        .values()
        .filter(|s| s.on_base && s.kind != Kind::Committed)
        .count();
    assert_eq!(
        pins, expected,
        "one pin per active snapshot or view on the base"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill_at_random_moments() {
    let soak: usize = std::env::var("ONTOP_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut d = Daemon::start_with_bases("").await;
    let host = d.hosts().join("base");
    std::fs::create_dir_all(host.join("dir")).unwrap();
    std::fs::write(host.join("dir/host.txt"), "host").unwrap();
    let host_before = common::tree_state(&host);
    let mut m = Model {
        base: host.display().to_string(),
        ..Model::default()
    };
    let mut budget = 5000 * soak;
    let mut kills = 0;
    while budget > 0 {
        let mut c = d.client().await;
        let pid = nix::unistd::Pid::from_raw(d.pid() as i32);
        let delay = Duration::from_millis(fastrand::u64(20..400));
        let killer = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        });
        let doubt = drive(&mut c, &mut m, &mut budget).await;
        killer.await.unwrap();
        d.reap();
        kills += 1;
        d.spawn().await;
        let mut c = d.client().await;
        if let Some(doubt) = doubt {
            resolve(&mut c, &mut m, doubt).await;
        }
        verify(&d, &mut c, &m).await;
    }
    eprintln!(
        "{kills} kills, {} snapshots at the end, {} of them on the base",
        m.snaps.len(),
        m.snaps.values().filter(|s| s.on_base).count()
    );
    assert_eq!(common::tree_state(&host), host_before);
    assert!(kills >= 10 * soak, "only {kills} kills");
}

/// A committed layer holding one file of its own bytes.
async fn committed_layer(c: &mut Client, name: &str) -> Result<(), tonic::Status> {
    let key = format!("{name}-active");
    let mounts = c.prepare(&key, "").await?;
    std::fs::write(upper(&mounts).join("file"), name.as_bytes()).unwrap();
    c.commit(name, &key).await
}

/// Every layer in `names` is there with its bytes, and after Cleanup
/// `ontop check` finds the root whole.
async fn verify_layers<'a>(d: &Daemon, names: impl IntoIterator<Item = &'a String>) {
    let mut c = d.client().await;
    let mut admin = d.admin().await;
    for name in names {
        let path = admin
            .info(ontop::admin::v1::InfoRequest { key: name.clone() })
            .await
            .unwrap_or_else(|e| panic!("{name} is lost: {e}"))
            .into_inner()
            .path;
        let bytes = std::fs::read(std::path::Path::new(&path).join("fs/file")).unwrap();
        assert_eq!(bytes, name.as_bytes(), "{name}");
    }
    c.cleanup().await.unwrap();
    d.assert_consistent();
}

/// Twenty committed layers that must outlive every kill.
async fn kept_layers(c: &mut Client) -> Vec<String> {
    let kept: Vec<String> = (0..20).map(|i| format!("kept-{i}")).collect();
    for name in &kept {
        committed_layer(c, name).await.unwrap();
    }
    kept
}

/// After a restart: exactly `kept` is listed, with its bytes, and after
/// Cleanup `snapshots/` holds their directories and nothing else (what
/// was removed, or orphaned, is reclaimed).
async fn assert_only(d: &Daemon, c: &mut Client, kept: &[String]) {
    let mut listed = c.list(&[]).await.unwrap();
    listed.sort();
    let mut want = kept.to_vec();
    want.sort();
    assert_eq!(listed, want, "removed stays removed, kept stays");
    verify_layers(d, kept).await;
    assert_eq!(
        std::fs::read_dir(d.root.join("snapshots")).unwrap().count(),
        kept.len(),
        "no directory is left but the kept layers'"
    );
}

fn sigkill_after(pid: u32, delay: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_lose_nothing_acknowledged_when_a_batch_is_killed() {
    // Eight connections at once fill group-commit batches of several
    // calls: a kill lands in a batch, whose calls are all or nothing.
    let mut d = Daemon::start().await;
    let mut acked: Vec<String> = Vec::new();
    for round in 0..6 {
        let killer = sigkill_after(d.pid(), Duration::from_millis(fastrand::u64(50..300)));
        let mut clients = Vec::new();
        for client in 0..8 {
            let mut c = d.client().await;
            clients.push(tokio::spawn(async move {
                let mut done = Vec::new();
                for n in 0.. {
                    let name = format!("r{round}-c{client}-{n}");
                    match committed_layer(&mut c, &name).await {
                        Ok(()) => done.push(name),
                        Err(s) if killed(&s) => return done,
                        Err(s) => panic!("{name}: {s}"),
                    }
                }
                unreachable!()
            }));
        }
        for c in clients {
            acked.extend(c.await.unwrap());
        }
        eprintln!("round {round}: {} layers acknowledged so far", acked.len());
        killer.await.unwrap();
        d.reap();
        d.spawn().await;
        verify_layers(&d, &acked).await;
    }
    assert!(acked.len() > 48, "only {} layers committed", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_cleanup_after_async_removes_loses_nothing() {
    let mut d = Daemon::start_with_config("async_remove = true").await;
    let mut c = d.client().await;
    let kept = kept_layers(&mut c).await;
    for round in 0..4 {
        // Removed rows whose directories wait for Cleanup.
        for i in 0..150 {
            let name = format!("gone-{round}-{i}");
            committed_layer(&mut c, &name).await.unwrap();
            c.remove(&name).await.unwrap();
        }
        let killer = sigkill_after(d.pid(), Duration::from_millis(fastrand::u64(0..30)));
        let cut = c.cleanup().await;
        assert!(cut.as_ref().map_or_else(killed, |_| true), "{cut:?}");
        eprintln!(
            "round {round}: Cleanup {}",
            if cut.is_ok() {
                "finished before the kill"
            } else {
                "cut off"
            }
        );
        killer.await.unwrap();
        d.reap();
        d.spawn().await;
        c = d.client().await;
        assert_only(&d, &mut c, &kept).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_check_repair_loses_nothing() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    let kept = kept_layers(&mut c).await;
    for round in 0..4 {
        // Orphans for the repair to delete, each with files in it.
        for i in 0..200 {
            let orphan = d
                .root
                .join(format!("snapshots/{}/fs/d", 10_000 + round * 1000 + i));
            std::fs::create_dir_all(&orphan).unwrap();
            for f in 0..5 {
                std::fs::write(orphan.join(f.to_string()), "orphan").unwrap();
            }
        }
        let repair = std::process::Command::new(common::BIN)
            .args(["check", "--repair", "--address"])
            .arg(&d.socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..40)));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Whatever it says: its daemon died under it.
        let out = repair.wait_with_output().unwrap();
        let left = std::fs::read_dir(d.root.join("snapshots")).unwrap().count() - kept.len();
        eprintln!(
            "round {round}: check --repair exited {}, {left} orphans left",
            out.status
        );
        d.reap();
        d.spawn().await;
        c = d.client().await;
        assert_only(&d, &mut c, &kept).await;
    }
}
