//! Power cuts lose nothing acknowledged, checked the way xfstests does it
//! with dm-log-writes: the release `ontop serve` runs in a qemu guest on a
//! disk whose every write and flush qemu's `blklogwrites` records, under a
//! workload that records each answer on the same disk
//! (`ontop_tools::powercut`). The host then replays the log up to sampled
//! flushes, each a moment the power could have gone, and starts ontop on
//! the filesystem as it would have come back:
//! - every acknowledged answer is in effect: rows, trees, labels, and the
//!   bytes of committed layers;
//! - `ontop check` finds rows and directories agree;
//! - nothing the workload never asked for, or that was removed, is listed.
//!
//! To see the test fail: `ONTOP_POWERCUT_ONTOP` runs another `ontop`
//! binary in the guest (an older build), and `ONTOP_POWERCUT_CONFIG` gives
//! the guest's ontop a config.toml (say, `sync_layers = false`).

#[path = "../common/mod.rs"]
mod common;
mod guest;
mod log;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use ontop::containerd_api::snapshots::v1 as api;
use ontop_tools::client::{Namespace, Snapshots};
use ontop_tools::powercut::{self, Marker, Op, Written};

use common::Daemon;

/// Flushes checked per filesystem, spread evenly over the log.
const CHECKPOINTS: usize = 24;
const LABEL: &str = "ontop.test/number";

/// One guest at a time: software emulation wants the whole machine.
static ONE_GUEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn ext4_loses_nothing_acknowledged() {
    power_cuts("ext4").await;
}

#[tokio::test]
async fn xfs_loses_nothing_acknowledged() {
    power_cuts("xfs").await;
}

#[tokio::test]
async fn btrfs_loses_nothing_acknowledged() {
    power_cuts("btrfs").await;
}

async fn power_cuts(fs: &str) {
    common::require_root();
    let _one = ONE_GUEST.lock().await;
    let (ontop, workload) = release_binaries();
    let kernel = guest::Kernel::find();
    let dir = tempfile::Builder::new()
        .prefix(&format!("ontop-powercut-{fs}-"))
        .tempdir()
        .unwrap();
    let (disk, pristine, log) = (
        dir.path().join("disk.img"),
        dir.path().join("pristine.img"),
        dir.path().join("writes.log"),
    );
    guest::make_disk(fs, &disk);
    sparse_copy(&disk, &pristine);
    let init = guest::POWERCUT_INIT
        .replace("@MARKERS@", &guest::MARKERS_AT.to_string())
        .replace("@ARGS@", "--tasks 3 --ops 40");
    let initramfs = guest::initramfs(
        &kernel,
        &init,
        &[(&ontop, "ontop"), (&workload, "ontop-powercut")],
        dir.path(),
    );
    guest::run(
        &kernel,
        &initramfs,
        fs,
        &disk,
        &log,
        "POWERCUT: workload exited 0",
    );

    let log = log::Log::open(&log).unwrap();
    let flushes = log.flushes();
    assert!(!flushes.is_empty(), "the guest never flushed its disk");
    let replayed = dir.path().join("replayed.img");
    sparse_copy(&pristine, &replayed);
    let replayed_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&replayed)
        .unwrap();
    let mut done = 0;
    let mut failures = Vec::new();
    let mut acked_at_end = 0;
    for point in sample(&flushes, CHECKPOINTS) {
        log.replay(done..point + 1, &replayed_file).unwrap();
        done = point + 1;
        let cut = dir.path().join("cut.img");
        sparse_copy(&replayed, &cut);
        let report = check_after_cut(fs, &cut, dir.path()).await;
        acked_at_end = report.acked;
        eprintln!(
            "{fs}: cut after entry {point} of {} ({} flushes): {} answers acknowledged, {} problems",
            log.entries.len(),
            flushes.len(),
            report.acked,
            report.problems.len()
        );
        if !report.problems.is_empty() {
            failures.push(format!(
                "power cut after entry {point} of {} ({} answers acknowledged):\n  {}",
                log.entries.len(),
                report.acked,
                report.problems.join("\n  ")
            ));
        }
        std::fs::remove_file(&cut).unwrap();
    }
    assert!(
        acked_at_end > 60,
        "only {acked_at_end} answers were acknowledged by the last flush checked"
    );
    assert!(
        failures.is_empty(),
        "{fs}: {} of {CHECKPOINTS} power cuts lost acknowledged work:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `count` flushes spread evenly over `flushes`, the last one included.
fn sample(flushes: &[usize], count: usize) -> Vec<usize> {
    let n = flushes.len();
    let mut points: Vec<usize> = (1..=count.min(n))
        .map(|i| flushes[i * n / count.min(n) - 1])
        .collect();
    points.dedup();
    points
}

fn sparse_copy(from: &Path, to: &Path) {
    common::stdout_of(
        Command::new("cp").arg("--sparse=always").arg(from).arg(to),
        "cp",
    );
}

/// The release binaries: `ontop` for the guest (or `ONTOP_POWERCUT_ONTOP`)
/// and the workload, built in the target directory the package test
/// builds in, so the suite compiles them once.
fn release_binaries() -> (PathBuf, PathBuf) {
    let release = guest::release_dir();
    let ontop = std::env::var_os("ONTOP_POWERCUT_ONTOP")
        .map(PathBuf::from)
        .unwrap_or_else(|| release.join("ontop"));
    (ontop, release.join("ontop-powercut"))
}

/// What the acknowledged answers say a key must be.
#[derive(Debug, Clone)]
struct Expected {
    kind: api::Kind,
    /// The files of a committed layer.
    files: Vec<Written>,
    label: Option<String>,
}

struct Report {
    acked: usize,
    problems: Vec<String>,
}

/// The state the acknowledged answers among `markers` promise, and the
/// keys of calls that were sent but not answered, which may or may not
/// have taken effect.
fn promised(markers: &[Marker]) -> (HashMap<String, Expected>, HashSet<String>, usize) {
    let mut state: HashMap<String, Expected> = HashMap::new();
    let mut sent: HashMap<(u32, u32), &Op> = HashMap::new();
    let mut acked = 0;
    for m in markers {
        if !m.ack {
            sent.insert((m.task, m.number), &m.op);
            continue;
        }
        sent.remove(&(m.task, m.number));
        acked += 1;
        let plain = |kind| Expected {
            kind,
            files: Vec::new(),
            label: None,
        };
        match &m.op {
            Op::Prepare { key, .. } => {
                state.insert(key.clone(), plain(api::Kind::Active));
            }
            Op::View { key, .. } => {
                state.insert(key.clone(), plain(api::Kind::View));
            }
            Op::Commit { name, key, files } => {
                state.remove(key);
                let mut e = plain(api::Kind::Committed);
                e.files = files.clone();
                state.insert(name.clone(), e);
            }
            Op::Remove { key } => {
                state.remove(key);
            }
            Op::Update { key, value, .. } => {
                if let Some(e) = state.get_mut(key) {
                    e.label = Some(value.clone());
                }
            }
        }
    }
    let unsure = sent
        .values()
        .flat_map(|op| op.keys())
        .map(str::to_string)
        .collect();
    (state, unsure, acked)
}

/// Mounts the disk as the cut left it, starts ontop on it and compares
/// what it serves with what was acknowledged.
async fn check_after_cut(fs: &str, image: &Path, dir: &Path) -> Report {
    let markers = powercut::read_markers(image, guest::MARKERS_AT).unwrap();
    let (state, unsure, acked) = promised(&markers);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", fs, "-o", "loop"])
        .arg(image)
        .arg(&mnt)
        .output()
        .unwrap();
    if !mounted.status.success() {
        return Report {
            acked,
            problems: vec![format!(
                "the filesystem does not mount: {}",
                String::from_utf8_lossy(&mounted.stderr)
            )],
        };
    }
    let problems = match std::fs::metadata(mnt.join("ontop")) {
        Ok(_) => compare(&mnt.join("ontop"), &state, &unsure).await,
        // The power went before ontop made its root; fine if nothing was
        // acknowledged yet.
        Err(_) if acked == 0 => Vec::new(),
        Err(e) => vec![format!("ontop's root is gone: {e}")],
    };
    common::stdout_of(Command::new("umount").arg(&mnt), "umount");
    if fs == "btrfs" {
        // Each cut is a copy with the same filesystem id: let the kernel
        // forget the last one.
        let _ = Command::new("btrfs")
            .args(["device", "scan", "--forget"])
            .output();
    }
    Report { acked, problems }
}

async fn compare(
    root: &Path,
    state: &HashMap<String, Expected>,
    unsure: &HashSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let daemon = Daemon::start_on_root(root).await;
    let check = Command::new(common::BIN)
        .args(["check", "--address"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    if !check.status.success() {
        problems.push(format!(
            "ontop check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    let channel = ontop_tools::client::connect(&daemon.socket).await.unwrap();
    let mut api = Snapshots::new(channel, "ontop", Namespace::default());
    let mut listed = Vec::new();
    let mut stream = api.list(&[]).await.unwrap();
    while let Some(batch) = stream.message().await.unwrap() {
        listed.extend(batch.info);
    }
    for info in &listed {
        if !state.contains_key(&info.name) && !unsure.contains(&info.name) {
            problems.push(format!("{:?} is listed, and no answer made it", info.name));
        }
    }
    let mut keys: Vec<&String> = state.keys().filter(|k| !unsure.contains(*k)).collect();
    keys.sort();
    for key in keys {
        let want = &state[key];
        let info = match api.stat(key).await {
            Ok(info) => info,
            Err(e) => {
                problems.push(format!(
                    "{key:?} ({:?}) is lost: {}",
                    want.kind,
                    e.message()
                ));
                continue;
            }
        };
        if info.kind != want.kind as i32 {
            problems.push(format!("{key:?} is {:?}, not {:?}", info.kind(), want.kind));
        }
        if let Some(v) = &want.label {
            if info.labels.get(LABEL) != Some(v) {
                problems.push(format!("{key:?} lost its Update to {LABEL}={v}"));
            }
        }
        if want.kind == api::Kind::Committed {
            problems.extend(compare_files(&mut api, key, &want.files).await);
        }
    }
    problems
}

/// The committed layer `key` holds exactly the bytes written before its
/// Commit, read from its own tree through a View.
async fn compare_files(api: &mut Snapshots, key: &str, files: &[Written]) -> Vec<String> {
    let view = format!("verify-{key}");
    let mounts = match api.view(&view, key, HashMap::new()).await {
        Ok(m) => m,
        Err(e) => return vec![format!("View of {key:?}: {}", e.message())],
    };
    let top = powercut::top_layer(&mounts).unwrap();
    files
        .iter()
        .filter_map(|f| {
            let got = std::fs::read(top.join(&f.path));
            match got {
                Ok(bytes) if bytes == powercut::content(f.seed, f.len) => None,
                Ok(bytes) => Some(format!(
                    "{key:?}: {} holds {} bytes, not the {} written before Commit{}",
                    f.path,
                    bytes.len(),
                    f.len,
                    if bytes.len() == f.len {
                        " (same length, other bytes)"
                    } else {
                        ""
                    }
                )),
                Err(e) => Some(format!("{key:?}: {} is unreadable: {e}", f.path)),
            }
        })
        .collect()
}
