//! The guest side of the power-cut test (`tests/powercut`): a workload of
//! Snapshots calls whose every answer is recorded on the disk under test.
//!
//! Before each call, a task writes an *intent* marker; after an OK answer,
//! an *ack* marker. Markers go to a region of the same disk as ontop's
//! filesystem, with O_DIRECT|O_SYNC, so the disk's write log orders them
//! with ontop's own writes: replayed up to any flush, the disk holds the
//! acks of exactly the answers given by then, and the intents of the calls
//! that may or may not have taken effect.
//!
//! A marker is one [`MARKER_SIZE`] block: `ONTOPMRK`, its sequence number
//! and the length of its text (little-endian u64 and u32), then the text,
//! one line such as `ack 2 17 commit t2-c17 t2-a9 d/f0:4096:77`.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};

use crate::client::{Namespace, Snapshots};
use ontop::containerd_api::types::Mount;

pub const MARKER_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"ONTOPMRK";

/// A file a task wrote into an upper before its Commit: its content is
/// [`content`]`(seed, len)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: String,
    pub len: usize,
    pub seed: u64,
}

/// One Snapshots call of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Prepare {
        key: String,
        parent: String,
    },
    View {
        key: String,
        parent: String,
    },
    Commit {
        name: String,
        key: String,
        files: Vec<Written>,
    },
    Remove {
        key: String,
    },
    Update {
        key: String,
        label: String,
        value: String,
    },
}

impl Op {
    /// The keys whose state the call may change.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Op::Prepare { key, .. }
            | Op::View { key, .. }
            | Op::Remove { key }
            | Op::Update { key, .. } => vec![key],
            Op::Commit { name, key, .. } => vec![name, key],
        }
    }

    fn text(&self) -> String {
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        match self {
            Op::Prepare { key, parent } => format!("prepare {key} {}", or_dash(parent)),
            Op::View { key, parent } => format!("view {key} {}", or_dash(parent)),
            Op::Commit { name, key, files } => {
                let files: Vec<String> = files
                    .iter()
                    .map(|f| format!("{}:{}:{}", f.path, f.len, f.seed))
                    .collect();
                format!("commit {name} {key} {}", or_dash(&files.join(",")))
            }
            Op::Remove { key } => format!("remove {key}"),
            Op::Update { key, label, value } => format!("update {key} {label} {value}"),
        }
    }

    fn parse(words: &[&str]) -> Option<Op> {
        let undash = |s: &str| {
            if s == "-" {
                String::new()
            } else {
                s.to_string()
            }
        };
        Some(match *words {
            ["prepare", key, parent] => Op::Prepare {
                key: key.into(),
                parent: undash(parent),
            },
            ["view", key, parent] => Op::View {
                key: key.into(),
                parent: undash(parent),
            },
            ["commit", name, key, files] => Op::Commit {
                name: name.into(),
                key: key.into(),
                files: match files {
                    "-" => Vec::new(),
                    _ => files
                        .split(',')
                        .map(|f| {
                            let mut p = f.split(':');
                            Some(Written {
                                path: p.next()?.into(),
                                len: p.next()?.parse().ok()?,
                                seed: p.next()?.parse().ok()?,
                            })
                        })
                        .collect::<Option<_>>()?,
                },
            },
            ["remove", key] => Op::Remove { key: key.into() },
            ["update", key, label, value] => Op::Update {
                key: key.into(),
                label: label.into(),
                value: value.into(),
            },
            _ => return None,
        })
    }
}

/// A marker as read back from a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub ack: bool,
    pub task: u32,
    pub number: u32,
    pub op: Op,
}

impl Marker {
    fn encode(&self, seq: u64) -> Vec<u8> {
        let text = format!(
            "{} {} {} {}",
            if self.ack { "ack" } else { "intent" },
            self.task,
            self.number,
            self.op.text()
        );
        let mut block = vec![0u8; MARKER_SIZE];
        block[..8].copy_from_slice(MAGIC);
        block[8..16].copy_from_slice(&seq.to_le_bytes());
        block[16..20].copy_from_slice(&(text.len() as u32).to_le_bytes());
        block[20..20 + text.len()].copy_from_slice(text.as_bytes());
        block
    }

    fn decode(block: &[u8], seq: u64) -> Option<Marker> {
        if &block[..8] != MAGIC || block[8..16] != seq.to_le_bytes() {
            return None;
        }
        let len = u32::from_le_bytes(block[16..20].try_into().ok()?) as usize;
        let text = std::str::from_utf8(block.get(20..20 + len)?).ok()?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let [phase, task, number, op @ ..] = words.as_slice() else {
            return None;
        };
        Some(Marker {
            ack: match *phase {
                "ack" => true,
                "intent" => false,
                _ => return None,
            },
            task: task.parse().ok()?,
            number: number.parse().ok()?,
            op: Op::parse(op)?,
        })
    }
}

/// The markers on `disk` from byte `offset` on, up to the first block that
/// is not the next one in sequence.
pub fn read_markers(disk: &Path, offset: u64) -> io::Result<Vec<Marker>> {
    let f = File::open(disk)?;
    let mut markers = Vec::new();
    let mut block = vec![0u8; MARKER_SIZE];
    loop {
        let seq = markers.len() as u64;
        if f.read_at(&mut block, offset + seq * MARKER_SIZE as u64)? < MARKER_SIZE {
            return Ok(markers);
        }
        match Marker::decode(&block, seq) {
            Some(m) => markers.push(m),
            None => return Ok(markers),
        }
    }
}

/// The bytes of a written file: a xorshift stream from `seed`.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Where markers are written: an O_DIRECT|O_SYNC block device, shared by
/// the tasks, which take turns so that sequence numbers stay dense.
struct Recorder {
    disk: File,
    offset: u64,
    next: u64,
    /// One aligned block, as O_DIRECT requires.
    buf: AlignedBlock,
}

struct AlignedBlock(Box<[u8]>, usize);

impl AlignedBlock {
    fn new() -> AlignedBlock {
        // Over-allocate and start at the first aligned byte: no unsafe.
        let raw = vec![0u8; 2 * MARKER_SIZE].into_boxed_slice();
        let start = raw.as_ptr().align_offset(MARKER_SIZE);
        AlignedBlock(raw, start)
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.0[self.1..self.1 + MARKER_SIZE]
    }
}

impl Recorder {
    fn record(&mut self, marker: &Marker) -> io::Result<()> {
        let block = marker.encode(self.next);
        self.buf.get().copy_from_slice(&block);
        let at = self.offset + self.next * MARKER_SIZE as u64;
        self.disk.write_all_at(self.buf.get(), at)?;
        self.next += 1;
        Ok(())
    }
}

/// What a task knows of its own snapshots, to pick calls that should
/// succeed.
#[derive(Default)]
struct Tracked {
    /// Active snapshots and the files written into each.
    active: Vec<(String, Vec<Written>)>,
    committed: Vec<String>,
    views: Vec<String>,
    /// Each key's parent.
    parents: HashMap<String, String>,
}

impl Tracked {
    fn has_children(&self, key: &str) -> bool {
        self.parents.values().any(|p| p == key)
    }
}

/// Runs `tasks` tasks of `ops` calls each against the snapshotter at
/// `socket`, recording markers on `disk` from byte `offset`.
pub async fn workload(
    socket: &Path,
    disk: &Path,
    offset: u64,
    tasks: u32,
    ops: u32,
    seed: u64,
) -> anyhow::Result<()> {
    let channel = crate::client::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let api = Snapshots::new(channel, "ontop", Namespace::default());
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc_flags())
        .open(disk)
        .with_context(|| format!("opening {} for markers", disk.display()))?;
    let recorder = Arc::new(Mutex::new(Recorder {
        disk,
        offset,
        next: 0,
        buf: AlignedBlock::new(),
    }));
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (api, recorder) = (api.clone(), recorder.clone());
        let rng = fastrand::Rng::with_seed(seed.wrapping_add(u64::from(task)));
        handles.push(tokio::spawn(run_task(api, recorder, task, ops, rng)));
    }
    for h in handles {
        h.await.context("a workload task panicked")??;
    }
    Ok(())
}

fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_DIRECT | nix::fcntl::OFlag::O_SYNC).bits()
}

async fn run_task(
    mut api: Snapshots,
    recorder: Arc<Mutex<Recorder>>,
    task: u32,
    ops: u32,
    mut rng: fastrand::Rng,
) -> anyhow::Result<()> {
    let mut t = Tracked::default();
    for number in 0..ops {
        let op = pick(&mut t, &mut rng, task, number);
        let mut marker = Marker {
            ack: false,
            task,
            number,
            op: op.clone(),
        };
        record(&recorder, &marker).await?;
        let mounts = call(&mut api, &op)
            .await
            .with_context(|| format!("task {task} call {number}: {}", op.text()))?;
        marker.ack = true;
        record(&recorder, &marker).await?;
        apply(&mut t, &op);
        if matches!(op, Op::Prepare { .. }) {
            let upper = upper_dir(&mounts).context("finding the upper dir")?;
            let files = write_files(&upper, &mut rng)?;
            t.active.last_mut().expect("just prepared").1 = files;
        }
    }
    Ok(())
}

async fn record(recorder: &Arc<Mutex<Recorder>>, marker: &Marker) -> anyhow::Result<()> {
    let (recorder, marker) = (recorder.clone(), marker.clone());
    tokio::task::spawn_blocking(move || recorder.lock().expect("recorder").record(&marker))
        .await?
        .context("writing a marker")
}

fn pick(t: &mut Tracked, rng: &mut fastrand::Rng, task: u32, number: u32) -> Op {
    let new = |kind: &str| format!("t{task}-{kind}{number}");
    let roll = if t.active.len() < 2 {
        0
    } else {
        rng.u32(0..100)
    };
    let removable: Vec<String> = t
        .active
        .iter()
        .map(|(k, _)| k.clone())
        .chain(t.views.iter().cloned())
        .chain(t.committed.iter().cloned())
        .filter(|k| !t.has_children(k))
        .collect();
    match roll {
        0..=29 => Op::Prepare {
            key: new("a"),
            parent: if rng.bool() && !t.committed.is_empty() {
                t.committed[rng.usize(..t.committed.len())].clone()
            } else {
                String::new()
            },
        },
        30..=59 => {
            let (key, files) = t.active[rng.usize(..t.active.len())].clone();
            Op::Commit {
                name: new("c"),
                key,
                files,
            }
        }
        60..=69 if !t.committed.is_empty() => Op::View {
            key: new("v"),
            parent: t.committed[rng.usize(..t.committed.len())].clone(),
        },
        70..=84 if !removable.is_empty() => Op::Remove {
            key: removable[rng.usize(..removable.len())].clone(),
        },
        _ => {
            let all: Vec<&String> = t
                .active
                .iter()
                .map(|(k, _)| k)
                .chain(&t.views)
                .chain(&t.committed)
                .collect();
            Op::Update {
                key: all[rng.usize(..all.len())].clone(),
                label: "ontop.test/number".into(),
                value: number.to_string(),
            }
        }
    }
}

fn apply(t: &mut Tracked, op: &Op) {
    match op {
        Op::Prepare { key, parent } => {
            t.active.push((key.clone(), Vec::new()));
            t.parents.insert(key.clone(), parent.clone());
        }
        Op::View { key, parent } => {
            t.views.push(key.clone());
            t.parents.insert(key.clone(), parent.clone());
        }
        Op::Commit { name, key, .. } => {
            t.active.retain(|(k, _)| k != key);
            t.committed.push(name.clone());
            let parent = t.parents.remove(key).unwrap_or_default();
            t.parents.insert(name.clone(), parent);
        }
        Op::Remove { key } => {
            t.active.retain(|(k, _)| k != key);
            t.views.retain(|k| k != key);
            t.committed.retain(|k| k != key);
            t.parents.remove(key);
        }
        Op::Update { .. } => {}
    }
}

async fn call(api: &mut Snapshots, op: &Op) -> anyhow::Result<Vec<Mount>> {
    Ok(match op {
        Op::Prepare { key, parent } => api.prepare(key, parent, HashMap::new()).await?,
        Op::View { key, parent } => api.view(key, parent, HashMap::new()).await?,
        Op::Commit { name, key, .. } => {
            api.commit(name, key, HashMap::new()).await?;
            Vec::new()
        }
        Op::Remove { key } => {
            api.remove(key).await?;
            Vec::new()
        }
        Op::Update { key, label, value } => {
            let mut info = api.stat(key).await?;
            info.labels.insert(label.clone(), value.clone());
            let path = format!("labels.{label}");
            api.update(info, &[&path]).await?;
            Vec::new()
        }
    })
}

/// The directory a snapshot's writes land in: a bind mount's source, or
/// overlay's upperdir.
pub fn upper_dir(mounts: &[Mount]) -> anyhow::Result<PathBuf> {
    dir_of(mounts, "upperdir=")
}

/// The newest layer of a view's mounts: a bind mount's source, or the
/// first of overlay's lowerdirs.
pub fn top_layer(mounts: &[Mount]) -> anyhow::Result<PathBuf> {
    dir_of(mounts, "lowerdir=")
}

/// A bind mount's source, or the first directory of an overlay option.
fn dir_of(mounts: &[Mount], option: &str) -> anyhow::Result<PathBuf> {
    let [m] = mounts else {
        bail!("expected one mount, got {mounts:?}");
    };
    if m.r#type == "bind" {
        return Ok(PathBuf::from(&m.source));
    }
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(option))
        .and_then(|dirs| dirs.split(':').next())
        .map(PathBuf::from)
        .with_context(|| format!("no {option} in {m:?}"))
}

/// One to three files of up to 64 KiB, one in a subdirectory; not synced
/// (Commit's job).
fn write_files(upper: &Path, rng: &mut fastrand::Rng) -> anyhow::Result<Vec<Written>> {
    std::fs::create_dir_all(upper.join("d"))?;
    (0..rng.usize(1..=3))
        .map(|i| {
            let w = Written {
                path: if i == 0 {
                    format!("d/f{i}")
                } else {
                    format!("f{i}")
                },
                len: rng.usize(1..=64 << 10),
                seed: rng.u64(..),
            };
            std::fs::write(upper.join(&w.path), content(w.seed, w.len))
                .with_context(|| format!("writing {}", w.path))?;
            Ok(w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip() {
        let m = Marker {
            ack: true,
            task: 2,
            number: 17,
            op: Op::Commit {
                name: "t2-c17".into(),
                key: "t2-a9".into(),
                files: vec![Written {
                    path: "d/f0".into(),
                    len: 4096,
                    seed: 77,
                }],
            },
        };
        let block = m.encode(5);
        assert_eq!(Marker::decode(&block, 5), Some(m));
        assert_eq!(Marker::decode(&block, 6), None, "out of sequence");
        let prepare = Marker {
            ack: false,
            task: 0,
            number: 0,
            op: Op::Prepare {
                key: "t0-a0".into(),
                parent: String::new(),
            },
        };
        assert_eq!(Marker::decode(&prepare.encode(0), 0), Some(prepare));
    }
}
