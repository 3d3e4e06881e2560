//! `ontop-powercut`: the workload the power-cut test runs inside its
//! guest (see `ontop_tools::powercut`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;

/// Snapshots calls against ontop, each recorded on the disk under test.
#[derive(Parser)]
struct Args {
    /// ontop's socket; waited for up to --wait seconds.
    #[arg(long)]
    socket: PathBuf,
    /// The block device that holds ontop's filesystem and the markers.
    #[arg(long)]
    disk: PathBuf,
    /// Where the markers start on it, in bytes.
    #[arg(long)]
    offset: u64,
    #[arg(long, default_value_t = 3)]
    tasks: u32,
    #[arg(long, default_value_t = 40)]
    ops: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 120)]
    wait: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    while !args.socket.exists() {
        if Instant::now() > deadline {
            bail!(
                "{} did not appear within {}s",
                args.socket.display(),
                args.wait
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ontop_tools::powercut::workload(
        &args.socket,
        &args.disk,
        args.offset,
        args.tasks,
        args.ops,
        args.seed,
    )
    .await
}
