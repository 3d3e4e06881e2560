//! The workloads, in the order a node meets them: image unpack, lookups as
//! CRI makes them, create bursts, usage, start-up and memory at scale, and
//! teardown as containerd's garbage collector does it.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use futures::future::BoxFuture;

use super::stats::{self, Row, Series};
use super::{Plan, Sizes, Target};
use crate::mounter;

/// What each target holds, so that teardown can remove it children-first.
#[derive(Default)]
struct Held {
    /// Chains, each root first.
    chains: Vec<Vec<String>>,
    /// Committed snapshots with no children.
    committed: Vec<String>,
    /// Active snapshots (the lookup population, the usage snapshot).
    active: Vec<String>,
}

/// A label one population snapshot in ten carries, for filtered List.
const GROUP_LABEL: &str = "bench/group";

/// What `lookups` measures, in the order it returns them. The first is
/// the floor under Stat and Mounts: a health Check on the same socket, an
/// RPC whose handler does next to nothing, timed where a target serves it.
const LOOKUPS: [&str; 5] = [
    "rpc floor (health check)",
    "stat",
    "mounts",
    "list",
    "list filtered",
];

/// The workload groups `--only` can pick; teardown always runs.
pub const GROUPS: &[&str] = &["chain", "lookups", "create", "usage", "image"];

pub async fn run_all(
    targets: &mut [Target],
    plan: &Plan,
    floor_dir: &Path,
) -> anyhow::Result<Vec<Row>> {
    let sizes = &plan.sizes;
    let only = &plan.only;
    let wants = |group: &str| only.is_empty() || only.iter().any(|o| o == group);
    let run = format!("r{}", std::process::id());
    let mut held: Vec<Held> = targets.iter().map(|_| Held::default()).collect();
    let mut rows = Vec::new();
    let names = targets_names(targets);
    let by_target = |series: Vec<Series>| -> Vec<(String, Series)> {
        names.iter().cloned().zip(series).collect()
    };
    let mut report = |workload: &str, unit: &'static str, named: Vec<(String, Series)>| {
        for row in stats::rows(workload, unit, &named) {
            stats::print(&row);
            rows.push(row);
        }
    };

    if wants("chain") {
        // 1. Layer chain, like an image unpack.
        let mut layer = vec![Series::default(); targets.len()];
        let mut prepare = layer.clone();
        let mut commit = layer.clone();
        for rep in 0..sizes.chain_reps {
            for (i, t) in targets.iter_mut().enumerate() {
                let chain = chain(
                    t,
                    &format!("{run}-chain{rep}"),
                    sizes,
                    &mut layer[i],
                    &mut prepare[i],
                    &mut commit[i],
                )
                .await
                .with_context(|| format!("{}: layer chain", t.name))?;
                held[i].chains.push(chain);
            }
        }
        report(
            &format!("chain: layer of {} files", sizes.chain_files),
            "ms",
            by_target(layer),
        );
        report("chain: prepare", "ms", by_target(prepare));
        report("chain: commit", "ms", by_target(commit));
    }

    if wants("lookups") {
        // 2. Lookups at the first scale.
        let n = sizes.scales[0];
        let measured = lookups(targets, &mut held, n, sizes, &run).await?;
        for (what, series) in LOOKUPS.into_iter().zip(measured) {
            report(&format!("{what} at {}", count(n)), "ms", by_target(series));
        }
    }

    if wants("create") {
        // 3. Create throughput. Serially, each Prepare and Commit is also
        //    timed alone, and set against this machine's floor, measured
        //    in the same rounds: the filesystem work of a durable Prepare
        //    with no gRPC and no SQLite (see `floor_op`).
        let mut floor = Series::default();
        let mut prepare = vec![Series::default(); targets.len()];
        let mut commit = prepare.clone();
        for concurrency in [1, sizes.concurrency] {
            let mut pairs = vec![Series::default(); targets.len()];
            let rounds = 10.min(sizes.creates).max(1);
            for round in 0..rounds {
                let per_round = sizes.creates / rounds;
                if concurrency == 1 {
                    let dir = floor_dir.join(format!("{round}"));
                    let measured = tokio::task::spawn_blocking(move || floor_ops(&dir, per_round))
                        .await?
                        .context("measuring the floor")?;
                    for d in measured {
                        floor.add(d);
                    }
                }
                for (i, t) in targets.iter_mut().enumerate() {
                    let prefix = format!("{run}-create-c{concurrency}-{round}");
                    let names = if concurrency == 1 {
                        create_serially(
                            t,
                            &prefix,
                            per_round,
                            [&mut pairs[i], &mut prepare[i], &mut commit[i]],
                        )
                        .await
                    } else {
                        create_pairs(t, &prefix, per_round, concurrency, &mut pairs[i]).await
                    }
                    .with_context(|| {
                        format!("{}: Prepare+Commit at concurrency {concurrency}", t.name)
                    })?;
                    held[i].committed.extend(names);
                }
            }
            report(
                &format!("create c{concurrency}: prepare+commit"),
                "ms",
                by_target(pairs),
            );
            if concurrency == 1 {
                let floor_median = stats::median(&floor.samples);
                report(
                    "floor: 3 mkdir, rename, fdatasync",
                    "ms",
                    vec![("this machine".to_string(), floor.clone())],
                );
                for (what, series) in [("prepare", &prepare), ("commit", &commit)] {
                    report(
                        &format!("create c1: {what}"),
                        "ms",
                        by_target(series.clone()),
                    );
                    let over_floor = series
                        .iter()
                        .map(|s| {
                            let mut x = Series::default();
                            x.add_value(stats::median(&s.samples) / floor_median);
                            x
                        })
                        .collect();
                    report(
                        &format!("create c1: {what} / floor"),
                        "x",
                        by_target(over_floor),
                    );
                }
            }
        }
    }

    if wants("lookups") {
        // 4. Lookups at the larger scale, then memory and start-up there.
        let n = *sizes.scales.last().expect("a scale");
        if sizes.scales.len() > 1 {
            let measured = lookups(targets, &mut held, n, sizes, &run).await?;
            for (what, series) in LOOKUPS.into_iter().zip(measured) {
                report(&format!("{what} at {}", count(n)), "ms", by_target(series));
            }
        }

        let mut rss = vec![Series::default(); targets.len()];
        for (i, t) in targets.iter().enumerate() {
            if let Some(s) = &t.served {
                rss[i].add_value(s.peak_rss()? as f64 / (1 << 20) as f64);
            }
        }
        report(&format!("peak rss at {}", count(n)), "MiB", by_target(rss));
        let mut startup = vec![Series::default(); targets.len()];
        for _ in 0..sizes.startup_reps {
            for (i, t) in targets.iter_mut().enumerate() {
                if t.served.is_some() {
                    let d = t
                        .restart()
                        .await
                        .with_context(|| format!("{}: restart", t.name))?;
                    startup[i].add(d);
                }
            }
        }
        report(
            &format!("start-up at {}", count(n)),
            "ms",
            by_target(startup),
        );
    }

    if wants("usage") {
        // 5. Usage of an upper with many small files.
        let mut usage = vec![Series::default(); targets.len()];
        for (i, t) in targets.iter_mut().enumerate() {
            let key = format!("{run}-usage");
            fill(t, &key, sizes.usage_files)
                .await
                .with_context(|| format!("{}: filling the usage snapshot", t.name))?;
            held[i].active.push(key);
        }
        for _ in 0..sizes.usage_reps {
            for (i, t) in targets.iter_mut().enumerate() {
                let key = format!("{run}-usage");
                let (_, inodes) = timed(&mut usage[i], t.usage(&key))
                    .await
                    .map_err(|s| anyhow!("{}: Usage: {s}", t.name))?;
                if (inodes as usize) < sizes.usage_files {
                    return Err(anyhow!(
                        "{}: Usage counted {inodes} inodes for {} files",
                        t.name,
                        sizes.usage_files
                    ));
                }
            }
        }
        report(
            &format!("usage of {} files", count(sizes.usage_files)),
            "ms",
            by_target(usage),
        );

        // 5b. CRI's stats poll: Usage of every active snapshot, again and
        //     again (kubelet's nodes: every 10 s), with the daemon's CPU
        //     time per round where the bench runs the daemon.
        let keys: Vec<String> = (0..sizes.poll_snapshots)
            .map(|k| format!("{run}-poll-{k}"))
            .collect();
        for (i, t) in targets.iter_mut().enumerate() {
            for key in &keys {
                fill(t, key, sizes.poll_files)
                    .await
                    .with_context(|| format!("{}: filling {key}", t.name))?;
                held[i].active.push(key.clone());
            }
        }
        let mut round = vec![Series::default(); targets.len()];
        let mut cpu = round.clone();
        for _ in 0..sizes.poll_rounds {
            for (i, t) in targets.iter_mut().enumerate() {
                let cpu_before = t.served.as_ref().map(|s| s.cpu_time()).transpose()?;
                let started = Instant::now();
                for key in &keys {
                    t.usage(key)
                        .await
                        .map_err(|s| anyhow!("{}: Usage of {key}: {s}", t.name))?;
                }
                round[i].add(started.elapsed());
                if let (Some(before), Some(s)) = (cpu_before, &t.served) {
                    cpu[i].add(s.cpu_time()?.saturating_sub(before));
                }
            }
        }
        let what = format!(
            "usage poll of {}x{} files",
            sizes.poll_snapshots,
            count(sizes.poll_files)
        );
        report(&format!("{what}: round"), "ms", by_target(round));
        report(&format!("{what}: daemon CPU"), "ms", by_target(cpu));
    }

    // 6. Image import (unpack) and `ctr run`, through containerd only.
    //    The blobs go into the content store first, untimed, so that each
    //    timed import unpacks and does nothing else. Each repetition
    //    imports into a namespace of its own (where another image holds
    //    the layers, an unpack does almost nothing), and nothing is removed
    //    until all have run: on ext4 without a journal, files created soon
    //    after thousands were deleted are slow to allocate (the allocator
    //    skips every recently deleted inode), which charged whoever ran
    //    after a removal 2-4x on a 10,000-file image. The targets take
    //    turns going first.
    let images: Vec<_> = plan.images.iter().filter(|_| wants("image")).collect();
    for (reference, tar) in &images {
        let name = image_name(reference);
        let tar = tar.display().to_string();
        let ns = Namespaces::of(reference, Flow::Import, sizes.image_reps);
        for (_, ctr) in ctr_per_target(targets, &plan.namespace, &ns.untimed, 0) {
            ctr.time(&["images", "import", "--no-unpack", &tar])?;
        }
        let mut unpack = vec![Series::default(); targets.len()];
        let mut start = unpack.clone();
        for (rep, prefix) in ns.timed.iter().enumerate() {
            for (i, ctr) in ctr_per_target(targets, &plan.namespace, prefix, rep) {
                let snapshotter = ctr.snapshotter;
                let d = ctr.time(&["images", "import", "--snapshotter", snapshotter, &tar])?;
                unpack[i].add(d);
                let id = format!("{run}-{name}-{rep}");
                let d = ctr.time(&[
                    "run",
                    "--rm",
                    "--snapshotter",
                    snapshotter,
                    reference,
                    &id,
                    "true",
                ])?;
                start[i].add(d);
            }
        }
        report(
            &format!("image {name}: import (unpack)"),
            "ms",
            by_target(unpack),
        );
        // The floor under an unpack: GNU tar writing the same layers into
        // fresh directories, one after another, in the same filesystem;
        // and the floor under a durable one, each layer synced before the
        // next as Commit syncs it.
        let layers = image_layers(Path::new(&tar), &floor_dir.join(format!("{name}-blobs")))?;
        for (synced, what) in [
            (false, "floor, tar of its layers one after another"),
            (true, "durable floor, tar of each layer then syncfs"),
        ] {
            let mut tar_floor = Series::default();
            for rep in 0..sizes.image_reps {
                let dir = floor_dir.join(format!("{name}-tar-{synced}-{rep}"));
                tar_floor.add(untar_layers(&layers, &dir, synced)?);
            }
            report(
                &format!("image {name}: {what}"),
                "ms",
                vec![("this machine".to_string(), tar_floor)],
            );
        }
        report(
            &format!("image {name}: ctr run --rm"),
            "ms",
            by_target(start),
        );
    }

    // 6b. Images pulled from a registry and unpacked, which containerd 2.2+
    //     can do in parallel (see `Plan::pulls`), where import unpacks one
    //     layer after the other. Pulled once first, untimed, into a
    //     namespace that keeps the image and so its blobs (after `ctr
    //     content fetch`, only ctr's lease would hold them, and it ends
    //     with the command), so each timed pull finds the blobs and only
    //     unpacks, as above.
    let pulls: Vec<_> = plan.pulls.iter().filter(|_| wants("image")).collect();
    for reference in &pulls {
        let name = image_name(reference);
        let ns = Namespaces::of(reference, Flow::Pull, sizes.image_reps);
        let pull_with = |ctr: &Ctr<'_>| {
            let snapshotter = ctr.snapshotter;
            let args = [
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                reference,
            ];
            ctr.time(&args)
        };
        for (_, ctr) in ctr_per_target(targets, &plan.namespace, &ns.untimed, 0) {
            pull_with(&ctr)?;
        }
        let mut pull = vec![Series::default(); targets.len()];
        for (rep, prefix) in ns.timed.iter().enumerate() {
            for (i, ctr) in ctr_per_target(targets, &plan.namespace, prefix, rep) {
                pull[i].add(pull_with(&ctr)?);
            }
        }
        report(
            &format!("image {name}: pull (unpack)"),
            "ms",
            by_target(pull),
        );
    }

    // The images go once all have run, synchronously, so that a containerd
    // the bench did not start keeps nothing of it.
    let made = (images.iter().map(|(r, _)| (r.as_str(), Flow::Import)))
        .chain(pulls.iter().map(|r| (r.as_str(), Flow::Pull)));
    for (reference, flow) in made {
        let ns = Namespaces::of(reference, flow, sizes.image_reps);
        for prefix in std::iter::once(&ns.untimed).chain(&ns.timed) {
            for (_, ctr) in ctr_per_target(targets, &plan.namespace, prefix, 0) {
                ctr.time(&["images", "rm", "--sync", reference])?;
            }
        }
    }

    // 7. Teardown, children first, as containerd's GC does it: one at a
    //    time for a sample and the chains; the bulk, at concurrency, only
    //    where the daemon outlives the bench.
    let mut remove = vec![Series::default(); targets.len()];
    let mut bulk = remove.clone();
    let mut cleanup = remove.clone();
    for (i, t) in targets.iter_mut().enumerate() {
        let h = &mut held[i];
        let mut flat: Vec<String> = h.committed.drain(..).chain(h.active.drain(..)).collect();
        fastrand::shuffle(&mut flat);
        let sample: Vec<String> = flat
            .drain(..sizes.teardown_sample.min(flat.len()))
            .collect();
        for key in sample
            .iter()
            .chain(h.chains.iter().flat_map(|c| c.iter().rev()))
        {
            timed(&mut remove[i], t.remove(key))
                .await
                .map_err(|s| anyhow!("{}: Remove {key}: {s}", t.name))?;
        }
        h.chains.clear();
        // A daemon the bench started goes with its root; anything else
        // keeps running, so what the bench made there must go.
        if t.served.is_none() {
            remove_concurrently(t, flat, sizes.concurrency, &mut bulk[i]).await?;
        }
        timed(&mut cleanup[i], t.cleanup())
            .await
            .map_err(|s| anyhow!("{}: Cleanup: {s}", t.name))?;
    }
    report("teardown: remove", "ms", by_target(remove));
    report(
        &format!("teardown: remove c{}", sizes.concurrency),
        "ms",
        by_target(bulk),
    );
    report("teardown: cleanup", "ms", by_target(cleanup));
    Ok(rows)
}

#[derive(Clone, Copy)]
enum Flow {
    Import,
    Pull,
}

/// The namespace prefixes of one image's flow (see `ctr_per_target`): the
/// one it is ingested into once, untimed, and one per timed repetition.
struct Namespaces {
    untimed: String,
    timed: Vec<String>,
}

impl Namespaces {
    fn of(reference: &str, flow: Flow, reps: usize) -> Namespaces {
        let name = image_name(reference);
        let (untimed, each) = match flow {
            Flow::Import => ("content-", ""),
            Flow::Pull => ("pulled-", "pull-"),
        };
        Namespaces {
            untimed: format!("{untimed}{name}-"),
            timed: (0..reps)
                .map(|rep| format!("{each}{name}-{rep}-"))
                .collect(),
        }
    }
}

/// The layer blobs of the OCI image archive `tar`, bottom first, unpacked
/// into `dir`.
fn image_layers(tar: &Path, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    untar(tar, dir)?;
    let blob = |digest: &str| dir.join("blobs").join(digest.replacen(':', "/", 1));
    let json = |path: PathBuf| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| path.display().to_string())?,
        )?)
    };
    let index = json(dir.join("index.json"))?;
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json names no manifest")?;
    let manifest = json(blob(manifest))?;
    manifest["layers"]
        .as_array()
        .context("the manifest lists no layers")?
        .iter()
        .map(|l| {
            Ok(blob(
                l["digest"].as_str().context("a layer without digest")?,
            ))
        })
        .collect()
}

/// GNU tar extracting `tar` into `dir`, made if missing.
fn untar(tar: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let out = std::process::Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "tar -xf {}: {}",
        tar.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// GNU tar extracting each of `layers` into a directory of its own under
/// `dir`, one after another (it detects compression itself); the time.
fn untar_layers(layers: &[PathBuf], dir: &Path, synced: bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for (i, layer) in layers.iter().enumerate() {
        let into = dir.join(format!("{i}"));
        untar(layer, &into)?;
        if synced {
            nix::unistd::syncfs(&std::fs::File::open(&into)?)?;
        }
    }
    Ok(started.elapsed())
}

/// An image's name without registry, path or tag, for its rows:
/// `127.0.0.1:5099/ontop/deep:latest` is `deep`.
fn image_name(reference: &str) -> &str {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    last.split([':', '@']).next().unwrap_or(last)
}

/// A `ctr` for each target reached through containerd, by index, each in
/// a namespace of its own (`<namespace>-<prefix><snapshotter>`), so one
/// target's images never spare another's unpack; the first `turn` targets
/// go last.
fn ctr_per_target<'a>(
    targets: &'a [Target],
    namespace: &'a str,
    prefix: &str,
    turn: usize,
) -> Vec<(usize, Ctr<'a>)> {
    let mut ctrs: Vec<_> = targets
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let (socket, snapshotter) = t.via_containerd()?;
            Some((
                i,
                Ctr {
                    socket,
                    namespace: format!("{namespace}-{prefix}{snapshotter}"),
                    snapshotter,
                },
            ))
        })
        .collect();
    if !ctrs.is_empty() {
        let n = ctrs.len();
        ctrs.rotate_left(turn % n);
    }
    ctrs
}

/// `ctr` against one containerd namespace.
struct Ctr<'a> {
    socket: &'a Path,
    namespace: String,
    snapshotter: &'a str,
}

impl Ctr<'_> {
    /// Runs `ctr ARGS` and returns how long it took.
    fn time(&self, args: &[&str]) -> anyhow::Result<std::time::Duration> {
        let started = Instant::now();
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(self.socket)
            .args(["--namespace", &self.namespace])
            .args(args)
            .output()
            .context("running ctr (it comes with containerd)")?;
        let took = started.elapsed();
        if !out.status.success() {
            return Err(anyhow!(
                "ctr {} ({}): {}",
                args.join(" "),
                self.snapshotter,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(took)
    }
}

/// "10k" for 10000, "500" for 500.
fn count(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// Brings each target to `n` snapshots (not measured), then times Stat and
/// Mounts on random keys and List with and without a label filter.
async fn lookups(
    targets: &mut [Target],
    held: &mut [Held],
    n: usize,
    sizes: &Sizes,
    run: &str,
) -> anyhow::Result<[Vec<Series>; 5]> {
    for (i, t) in targets.iter_mut().enumerate() {
        let h = &held[i];
        let have =
            h.active.len() + h.committed.len() + h.chains.iter().map(Vec::len).sum::<usize>();
        let more = n.saturating_sub(have);
        let keys = populate(t, &format!("{run}-pop{n}"), more, sizes.concurrency)
            .await
            .with_context(|| format!("{}: adding {more} snapshots", t.name))?;
        held[i].active.extend(keys);
    }
    let mut stat = vec![Series::default(); targets.len()];
    let mut mounts = stat.clone();
    let mut floor = stat.clone();
    let mut health = Vec::new();
    for t in targets.iter() {
        health.push(t.health().await);
    }
    let rounds = 10.min(sizes.lookups).max(1);
    for _ in 0..rounds {
        for (i, t) in targets.iter_mut().enumerate() {
            let keys = &held[i].active;
            for _ in 0..sizes.lookups / rounds {
                if let Some(h) = &mut health[i] {
                    let check = h.check(tonic_health::pb::HealthCheckRequest::default());
                    timed(&mut floor[i], check)
                        .await
                        .map_err(|s| anyhow!("{}: health Check: {s}", t.name))?;
                }
                let key = &keys[fastrand::usize(..keys.len())];
                timed(&mut stat[i], t.stat(key))
                    .await
                    .map_err(|s| anyhow!("{}: Stat: {s}", t.name))?;
                let key = &keys[fastrand::usize(..keys.len())];
                timed(&mut mounts[i], t.mounts(key))
                    .await
                    .map_err(|s| anyhow!("{}: Mounts: {s}", t.name))?;
            }
        }
    }
    let mut list = vec![Series::default(); targets.len()];
    let mut filtered = list.clone();
    let filter = format!("labels.\"{GROUP_LABEL}\"==tagged");
    for _ in 0..sizes.list_reps {
        for (i, t) in targets.iter_mut().enumerate() {
            timed(&mut list[i], t.list(&[]))
                .await
                .map_err(|s| anyhow!("{}: List: {s}", t.name))?;
            timed(&mut filtered[i], t.list(&[&filter]))
                .await
                .map_err(|s| anyhow!("{}: List: {s}", t.name))?;
        }
    }
    Ok([floor, stat, mounts, list, filtered])
}

fn targets_names(targets: &[Target]) -> Vec<String> {
    targets.iter().map(|t| t.name.clone()).collect()
}

async fn timed<T, E>(series: &mut Series, f: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let started = Instant::now();
    let out = f.await?;
    series.add(started.elapsed());
    Ok(out)
}

/// Builds one chain: Prepare on the previous layer, write files through
/// the returned mount, Commit.
async fn chain(
    t: &mut Target,
    prefix: &str,
    sizes: &Sizes,
    layer: &mut Series,
    prepare: &mut Series,
    commit: &mut Series,
) -> anyhow::Result<Vec<String>> {
    let target = t.mountpoint(prefix)?;
    let mut names: Vec<String> = Vec::new();
    for depth in 0..sizes.chain_depth {
        let started = Instant::now();
        let key = format!("{prefix}-{depth}-active");
        let parent = names.last().cloned().unwrap_or_default();
        let mounts = timed(prepare, t.prepare(&key, &parent, HashMap::new())).await?;
        mounter::mount_all(&mounts, &target)?;
        let written = write_files(&target.join(format!("layer-{depth}")), sizes.chain_files);
        mounter::unmount(&target)?;
        written?;
        let name = format!("{prefix}-{depth}");
        timed(commit, t.commit(&name, &key)).await?;
        layer.add(started.elapsed());
        names.push(name);
    }
    Ok(names)
}

fn write_files(dir: &Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for j in 0..n {
        std::fs::write(dir.join(format!("file-{j}")), [b'x'; 100])?;
    }
    Ok(())
}

/// Runs `op` once per item, `concurrency` lanes at a time (item k in
/// lane k mod `concurrency`), each lane on its own client, and returns every
/// op's latency and the wall time of them all.
async fn in_lanes<T, F>(
    t: &Target,
    items: Vec<T>,
    concurrency: usize,
    op: F,
) -> anyhow::Result<(Vec<Duration>, Duration)>
where
    T: Send + 'static,
    F: for<'a> Fn(&'a mut Target, T) -> BoxFuture<'a, anyhow::Result<()>> + Send + Sync + 'static,
{
    let op = Arc::new(op);
    let mut lanes: Vec<Vec<T>> = (0..concurrency).map(|_| Vec::new()).collect();
    for (k, item) in items.into_iter().enumerate() {
        lanes[k % concurrency].push(item);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in lanes {
        let mut t = t.clone_for_task();
        let op = Arc::clone(&op);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(lane.len());
            for item in lane {
                let began = Instant::now();
                op(&mut t, item).await?;
                latencies.push(began.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok((latencies, started.elapsed()))
}

/// Adds `n` active snapshots with no parent, one in ten labelled, at
/// `concurrency`; not measured.
async fn populate(
    t: &mut Target,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let keys: Vec<String> = (0..n).map(|k| format!("{prefix}-{k}")).collect();
    let items: Vec<(usize, String)> = keys.iter().cloned().enumerate().collect();
    in_lanes(t, items, concurrency, |t, (k, key)| {
        Box::pin(async move {
            let labels = if k % 10 == 0 {
                HashMap::from([(GROUP_LABEL.to_string(), "tagged".to_string())])
            } else {
                HashMap::new()
            };
            t.prepare(&key, "", labels)
                .await
                .map_err(|s| anyhow!("Prepare {key}: {s}"))?;
            Ok(())
        })
    })
    .await?;
    Ok(keys)
}

/// `n` Prepare+Commit pairs with no parent, at `concurrency`; each pair's
/// latency and the batch's wall time go into `series`.
/// Prepare+Commit pairs one after the other, each call timed too:
/// `[pairs, prepare, commit]`.
async fn create_serially(
    t: &mut Target,
    prefix: &str,
    n: usize,
    series: [&mut Series; 3],
) -> anyhow::Result<Vec<String>> {
    let [pairs, prepare, commit] = series;
    let mut names = Vec::with_capacity(n);
    for k in 0..n {
        let name = format!("{prefix}-{k}");
        let key = format!("{name}-active");
        let began = Instant::now();
        timed(prepare, t.prepare(&key, "", HashMap::new()))
            .await
            .map_err(|s| anyhow!("Prepare {key}: {s}"))?;
        timed(commit, t.commit(&name, &key))
            .await
            .map_err(|s| anyhow!("Commit {key}: {s}"))?;
        pairs.add(began.elapsed());
        names.push(name);
    }
    Ok(names)
}

/// The floor under a durable Prepare on this machine, `n` times: what any
/// snapshotter must do on disk for one (a snapshot directory with `fs`
/// and `work` made aside, renamed into place, and one fdatasync making a
/// record of it durable), with no RPC, no database and no locking.
fn floor_ops(dir: &Path, n: usize) -> std::io::Result<Vec<Duration>> {
    use std::io::Write;
    let (tmp, done) = (dir.join("tmp"), dir.join("snapshots"));
    std::fs::create_dir_all(&tmp)?;
    std::fs::create_dir_all(&done)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))?;
    let record = [7u8; 256];
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let began = Instant::now();
        let new = tmp.join(k.to_string());
        std::fs::create_dir(&new)?;
        std::fs::create_dir(new.join("fs"))?;
        std::fs::create_dir(new.join("work"))?;
        std::fs::rename(&new, done.join(k.to_string()))?;
        log.write_all(&record)?;
        log.sync_data()?;
        out.push(began.elapsed());
    }
    std::fs::remove_dir_all(dir)?;
    Ok(out)
}

async fn create_pairs(
    t: &mut Target,
    prefix: &str,
    n: usize,
    concurrency: usize,
    series: &mut Series,
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = (0..n).map(|k| format!("{prefix}-{k}")).collect();
    let (latencies, wall) = in_lanes(t, names.clone(), concurrency, |t, name| {
        Box::pin(async move {
            let key = format!("{name}-active");
            t.prepare(&key, "", HashMap::new())
                .await
                .map_err(|s| anyhow!("Prepare {key}: {s}"))?;
            t.commit(&name, &key)
                .await
                .map_err(|s| anyhow!("Commit {key}: {s}"))?;
            Ok(())
        })
    })
    .await?;
    series.add_batch(&latencies, wall);
    Ok(names)
}

/// An active snapshot whose upper holds `files` small files in
/// directories of a thousand.
async fn fill(t: &mut Target, key: &str, files: usize) -> anyhow::Result<()> {
    let mounts = t.prepare(key, "", HashMap::new()).await?;
    let target = t.mountpoint(key)?;
    mounter::mount_all(&mounts, &target)?;
    let written = (|| {
        for k in 0..files {
            let dir = target.join(format!("d{}", k / 1000));
            if k % 1000 == 0 {
                std::fs::create_dir(&dir)?;
            }
            std::fs::write(dir.join(k.to_string()), b"u")?;
        }
        anyhow::Ok(())
    })();
    mounter::unmount(&target)?;
    written
}

async fn remove_concurrently(
    t: &mut Target,
    keys: Vec<String>,
    concurrency: usize,
    series: &mut Series,
) -> anyhow::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let (latencies, wall) = in_lanes(t, keys, concurrency, |t, key| {
        Box::pin(async move {
            t.remove(&key)
                .await
                .map_err(|s| anyhow!("Remove {key}: {s}"))?;
            Ok(())
        })
    })
    .await?;
    series.add_batch(&latencies, wall);
    Ok(())
}
