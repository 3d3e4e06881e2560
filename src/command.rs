//! The `ontop` command line's definition: what `main` parses, and what the
//! man page and shell completions are generated from (`ontop-gen`, in the
//! tools crate).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cli::ContainerdConfigArgs;
use crate::config::{Config, LogFormat, Overrides};

#[derive(Parser)]
#[command(
    name = "ontop",
    version = crate::VERSION,
    about = "A containerd snapshotter: SQLite metadata, overlay mounts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve containerd's Snapshots API on a unix socket.
    Serve(ServeArgs),
    /// Exit 0 when a daemon answers on its socket: a readiness probe.
    Ping {
        /// Only when the ontop answering runs in this pid namespace (this
        /// container): a successor's readiness after a takeover.
        #[arg(long)]
        here: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List every snapshot of a running daemon, with usage.
    Ls(ClientArgs),
    /// Show one snapshot of a running daemon: chain, usage, labels, path.
    Info {
        /// The snapshot's key or name, as containerd sent it.
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the containerd config that wires this ontop in, for a
    /// containerd 1.x or 2.x.
    ContainerdConfig(ContainerdConfigArgs),
    /// Benchmark snapshotters side by side through the Snapshots API: runs
    /// `ontop-bench` (beside this binary, or on PATH) with ARGS.
    #[command(disable_help_flag = true)]
    Bench {
        /// `ontop-bench`'s arguments; `ontop bench --help` lists them.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Check the database against the disk: through a running daemon, or
    /// offline with --root when none runs. Exits 1 if problems remain.
    Check {
        /// Fix what can be fixed without losing data.
        #[arg(long)]
        repair: bool,
        /// Check this root offline; no daemon may be serving it.
        #[arg(long, conflicts_with = "address")]
        root: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// Config file [default: /etc/ontop/config.toml when it exists; for
    /// users other than root, ~/.config/ontop/config.toml].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How mounts are made: the kernel's overlayfs, or fuse-overlayfs.
    #[arg(long, value_enum)]
    pub backend: Option<crate::backend::Backend>,
    /// Where snapshots and metadata live.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// The unix socket to serve on.
    #[arg(long)]
    pub address: Option<PathBuf>,
    /// A tracing level or filter, such as "debug" or "ontop=debug,info".
    #[arg(long)]
    pub log_level: Option<String>,
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at /metrics on IP:PORT or unix:/path.
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// Take the socket over from the ontop serving the same root, which
    /// then finishes its calls and exits: an upgrade that refuses no call.
    #[arg(long)]
    pub takeover: bool,
    /// Once a successor has taken the socket over, wait for SIGTERM
    /// instead of exiting: in a DaemonSet, an exited container would be
    /// started again.
    #[arg(long)]
    pub linger: bool,
}

#[derive(Args)]
pub struct ClientArgs {
    /// Config file to read the socket address from.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The daemon's socket.
    #[arg(long)]
    pub address: Option<PathBuf>,
}

impl ClientArgs {
    pub fn address(&self) -> anyhow::Result<PathBuf> {
        let flags = Overrides {
            address: self.address.clone(),
            ..Default::default()
        };
        Ok(Config::load(self.config.as_deref(), flags)?.address)
    }
}
