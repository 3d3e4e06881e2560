//! `ontop bench`: drives any snapshotter through the Snapshots gRPC API and
//! compares targets side by side, in one run, as ratios.
//!
//! Targets are proxy snapshotter sockets (`--address`), daemons the bench
//! starts itself on a fresh root (`--serve`, which adds start-up time and
//! peak memory), or snapshotters behind containerd's own Snapshots service
//! (`--containerd` with `--snapshotter`). Within each workload the targets
//! take turns repetition by repetition, so the machine's noise falls on all
//! of them alike. The first target is the baseline of every ratio.

mod args;
mod stats;
mod target;
mod workloads;

use std::path::PathBuf;

use anyhow::{bail, Context as _};

pub use args::{BenchArgs, Cli};
pub use stats::{Row, Series};
pub use target::{Spec, Target};
pub use workloads::GROUPS;

/// How big each workload is.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub chain_depth: usize,
    pub chain_files: usize,
    pub chain_reps: usize,
    pub creates: usize,
    pub concurrency: usize,
    pub scales: Vec<usize>,
    pub lookups: usize,
    pub list_reps: usize,
    pub startup_reps: usize,
    pub image_reps: usize,
    pub usage_files: usize,
    pub usage_reps: usize,
    /// CRI's stats poll: this many active snapshots of `poll_files`
    /// files each, Usage on all of them per round.
    pub poll_snapshots: usize,
    pub poll_files: usize,
    pub poll_rounds: usize,
    pub teardown_sample: usize,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            chain_depth: 64,
            chain_files: 100,
            chain_reps: 3,
            creates: 10_000,
            concurrency: 16,
            scales: vec![10_000, 100_000],
            lookups: 2_000,
            list_reps: 3,
            startup_reps: 3,
            image_reps: 9,
            usage_files: 100_000,
            usage_reps: 5,
            poll_snapshots: 50,
            poll_files: 2_000,
            poll_rounds: 5,
            teardown_sample: 1_000,
        }
    }

    /// Seconds, for CI: every workload runs, on small numbers.
    pub fn quick() -> Sizes {
        Sizes {
            chain_depth: 4,
            chain_files: 10,
            chain_reps: 1,
            creates: 100,
            concurrency: 16,
            scales: vec![200, 500],
            lookups: 50,
            list_reps: 1,
            startup_reps: 1,
            image_reps: 1,
            usage_files: 500,
            usage_reps: 2,
            poll_snapshots: 3,
            poll_files: 50,
            poll_rounds: 2,
            teardown_sample: 50,
        }
    }
}

/// What `ontop bench` was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// In command-line order; the first is the baseline.
    pub targets: Vec<Spec>,
    pub containerd: Option<PathBuf>,
    pub namespace: String,
    pub sizes: Sizes,
    pub json: Option<PathBuf>,
    pub scratch: Option<PathBuf>,
    /// Workload groups to run (see [`GROUPS`]); empty runs them all.
    pub only: Vec<String>,
    /// Image archives, as `REF=TAR`, to import and run through each
    /// containerd target with `ctr`: a small one and one with many files
    /// and layers tell per-call costs from per-file ones.
    pub images: Vec<(String, PathBuf)>,
    /// Images in a registry (plain http), to pull through each containerd
    /// target: containerd 2.2+ unpacks their layers in parallel when its
    /// transfer service has `max_concurrent_unpacks > 1` and the
    /// snapshotter declares `rebase`.
    pub pulls: Vec<String>,
}

pub async fn run(plan: Plan) -> anyhow::Result<Vec<Row>> {
    if let Some(bad) = plan.only.iter().find(|o| !GROUPS.contains(&o.as_str())) {
        bail!(
            "--only {bad:?}: the workload groups are {}",
            GROUPS.join(", ")
        );
    }
    if plan.targets.is_empty() {
        bail!("no targets: give --address SOCKET, --serve NAME=COMMAND or --containerd SOCKET --snapshotter NAME");
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("ontop bench mounts snapshots to write into them (layer chain, usage) and must run as root");
    }
    let scratch = match &plan.scratch {
        Some(p) => tempfile::Builder::new()
            .prefix("ontop-bench-")
            .tempdir_in(p),
        None => tempfile::Builder::new().prefix("ontop-bench-").tempdir(),
    }
    .context("creating the bench's scratch dir")?;
    let mut targets = Vec::new();
    for (i, spec) in plan.targets.iter().enumerate() {
        let dir = scratch.path().join(format!("t{i}"));
        targets.push(Target::open(spec, plan.containerd.as_deref(), &plan.namespace, dir).await?);
    }
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    println!("targets (first is the baseline): {}", names.join(", "));
    stats::print_header();
    let rows = workloads::run_all(&mut targets, &plan, &scratch.path().join("floor")).await;
    // Stop served daemons before their roots go, whatever happened.
    drop(targets);
    let rows = rows?;
    if let Some(path) = &plan.json {
        let json = serde_json::json!({
            "targets": names,
            "quick": plan.sizes.creates < Sizes::full().creates,
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(rows)
}
