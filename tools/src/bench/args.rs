//! `ontop bench`'s command line, turned into a [`Plan`].

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{ArgMatches, Args, Parser};

use super::{Plan, Sizes, Spec};

/// `ontop-bench`'s command line, which `ontop bench` hands on.
#[derive(Parser)]
#[command(
    name = "ontop-bench",
    version,
    about = "Benchmark snapshotters side by side through the Snapshots API"
)]
pub struct Cli {
    #[command(flatten)]
    pub args: BenchArgs,
}

/// Targets are compared in the order given; the first is the baseline.
#[derive(Args)]
pub struct BenchArgs {
    /// A proxy snapshotter's socket, as [NAME=]SOCKET. Repeatable.
    #[arg(long = "address", value_name = "[NAME=]SOCKET")]
    addresses: Vec<String>,
    /// A daemon the bench starts on a fresh root, as NAME=COMMAND with
    /// {root} and {address} in COMMAND; adds start-up and memory.
    /// Repeatable.
    #[arg(long = "serve", value_name = "NAME=COMMAND")]
    serves: Vec<String>,
    /// containerd's socket, for --snapshotter targets.
    #[arg(long, value_name = "SOCKET")]
    containerd: Option<PathBuf>,
    /// A snapshotter behind --containerd, reached through containerd's own
    /// Snapshots service. Repeatable.
    #[arg(long = "snapshotter", value_name = "NAME")]
    snapshotters: Vec<String>,
    /// The containerd namespace for --snapshotter targets.
    #[arg(long, default_value = "ontop-bench")]
    namespace: String,
    /// Every workload on small numbers, in seconds: for CI.
    #[arg(long)]
    quick: bool,
    /// Also write the results here as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where mountpoints and served roots go [default: the temp dir].
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
    /// Only these workload groups: chain, lookups, create, usage, image
    /// (teardown always runs).
    #[arg(long, value_delimiter = ',', value_name = "GROUP,...")]
    only: Vec<String>,
    /// Snapshot counts for the lookup workloads, instead of the default
    /// 10000,100000 (quick: 200,500); memory and start-up use the last.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    scales: Vec<usize>,
    /// Prepare+Commit pairs per concurrency level, instead of 10000
    /// (quick: 100).
    #[arg(long, value_name = "N")]
    creates: Option<usize>,
    /// An image archive to import and run with ctr through each
    /// --snapshotter target, as REF=TAR (REF is the name in the archive).
    /// Repeatable
    #[arg(long, value_name = "REF=TAR")]
    image: Vec<String>,
    /// An image in a registry, pulled over plain http through each
    /// --snapshotter target. On containerd 2.2+ with the transfer service's
    /// max_concurrent_unpacks > 1, layers unpack in parallel. Repeatable
    #[arg(long, value_name = "REF")]
    pull: Vec<String>,
}

impl BenchArgs {
    /// The plan, with targets in command-line order.
    pub fn plan(self, matches: &ArgMatches) -> anyhow::Result<Plan> {
        let indices = |id: &str| -> Vec<usize> {
            matches
                .indices_of(id)
                .map(|i| i.collect())
                .unwrap_or_default()
        };
        let mut targets: Vec<(usize, Spec)> = Vec::new();
        for (i, a) in indices("addresses").into_iter().zip(&self.addresses) {
            targets.push((i, Spec::address(a)));
        }
        for (i, s) in indices("serves").into_iter().zip(&self.serves) {
            targets.push((i, Spec::serve(s)?));
        }
        for (i, s) in indices("snapshotters").into_iter().zip(&self.snapshotters) {
            targets.push((
                i,
                Spec::Containerd {
                    snapshotter: s.clone(),
                },
            ));
        }
        targets.sort_by_key(|(i, _)| *i);
        Ok(Plan {
            targets: targets.into_iter().map(|(_, s)| s).collect(),
            containerd: self.containerd,
            namespace: self.namespace,
            sizes: {
                let mut sizes = if self.quick {
                    Sizes::quick()
                } else {
                    Sizes::full()
                };
                if !self.scales.is_empty() {
                    sizes.scales = self.scales;
                }
                if let Some(n) = self.creates {
                    sizes.creates = n;
                }
                sizes
            },
            pulls: self.pull,
            json: self.json,
            scratch: self.scratch,
            only: self.only,
            images: self
                .image
                .iter()
                .map(|arg| {
                    let (reference, tar) = arg
                        .split_once('=')
                        .with_context(|| format!("--image takes REF=TAR, got {arg:?}"))?;
                    Ok((reference.to_string(), PathBuf::from(tar)))
                })
                .collect::<anyhow::Result<_>>()?,
        })
    }
}
