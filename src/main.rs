//! The `ontop` command: `serve` runs the daemon; `ls` and `info` ask a
//! running one through the admin API.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ontop::admin::v1::{admin_client::AdminClient, InfoRequest, ListRequest, SnapshotSummary};
use ontop::config::{Config, LogFormat, Overrides};

#[derive(Parser)]
#[command(
    name = "ontop",
    version,
    about = "A containerd snapshotter: SQLite metadata, overlay mounts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve containerd's Snapshots API on a unix socket.
    Serve(ServeArgs),
    /// Exit 0 when a daemon answers on its socket: a readiness probe.
    Ping(ClientArgs),
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
    /// Benchmark snapshotters side by side through the Snapshots API.
    Bench(BenchArgs),
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

/// Targets are compared in the order given; the first is the baseline.
#[derive(Args)]
struct BenchArgs {
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
    #[arg(long, value_name = "REF=TAR")]
    image: Option<String>,
    /// The same image in a registry, pulled over plain http through each
    /// --snapshotter target. On containerd 2.2+ with the transfer service's
    /// max_concurrent_unpacks > 1, layers unpack in parallel.
    #[arg(long, value_name = "REF")]
    pull: Option<String>,
}

impl BenchArgs {
    /// The plan, with targets in command-line order.
    fn plan(self, matches: &ArgMatches) -> anyhow::Result<ontop::bench::Plan> {
        use ontop::bench::Spec;
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
        Ok(ontop::bench::Plan {
            targets: targets.into_iter().map(|(_, s)| s).collect(),
            containerd: self.containerd,
            namespace: self.namespace,
            sizes: {
                let mut sizes = if self.quick {
                    ontop::bench::Sizes::quick()
                } else {
                    ontop::bench::Sizes::full()
                };
                if !self.scales.is_empty() {
                    sizes.scales = self.scales;
                }
                if let Some(n) = self.creates {
                    sizes.creates = n;
                }
                sizes
            },
            pull: self.pull,
            json: self.json,
            scratch: self.scratch,
            only: self.only,
            image: match self.image {
                None => None,
                Some(arg) => {
                    let (reference, tar) = arg
                        .split_once('=')
                        .with_context(|| format!("--image takes REF=TAR, got {arg:?}"))?;
                    Some((reference.to_string(), PathBuf::from(tar)))
                }
            },
        })
    }
}

#[derive(Args)]
struct ContainerdConfigArgs {
    /// The containerd to configure: auto (ask `containerd --version` on
    /// PATH), a release such as 2.3, or 1 or 2 for any of that generation
    /// (2 leaves out what needs 2.2 or later, such as parallel unpack).
    #[arg(long, default_value = "auto", value_name = "auto|1|2|X.Y")]
    containerd_version: String,
    /// Also make ontop CRI's (Kubernetes') default snapshotter.
    #[arg(long)]
    cri: bool,
    /// The proxy plugin's name, which `--snapshotter` selects.
    #[arg(long, default_value = "ontop")]
    name: String,
    /// ontop's config file, for the socket, the root and remap_ids.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The socket, as `ontop serve --address`.
    #[arg(long)]
    address: Option<PathBuf>,
    /// The root, as `ontop serve --root`.
    #[arg(long)]
    root: Option<PathBuf>,
}

impl ContainerdConfigArgs {
    fn render(self) -> anyhow::Result<String> {
        use ontop::containerd_config::{host_platform, render, Fragment, Version};
        let flags = Overrides {
            address: self.address,
            root: self.root,
            ..Default::default()
        };
        let config = Config::load(self.config.as_deref(), flags)?;
        let containerd = match self.containerd_version.as_str() {
            "auto" => Version::detect(std::path::Path::new("containerd"))?,
            v => Version::parse(v)?,
        };
        Ok(render(&Fragment {
            name: &self.name,
            address: &config.address,
            root: &config.root,
            containerd,
            remap_ids: config.remap_ids,
            cri: self.cri,
            platform: &host_platform(),
        }))
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Config file [default: /etc/ontop/config.toml when it exists; for
    /// users other than root, ~/.config/ontop/config.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// How mounts are made: the kernel's overlayfs, or fuse-overlayfs.
    #[arg(long, value_enum)]
    backend: Option<ontop::backend::Backend>,
    /// Where snapshots and metadata live.
    #[arg(long)]
    root: Option<PathBuf>,
    /// The unix socket to serve on.
    #[arg(long)]
    address: Option<PathBuf>,
    /// A tracing level or filter, such as "debug" or "ontop=debug,info".
    #[arg(long)]
    log_level: Option<String>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at /metrics on HOST:PORT or unix:/path.
    #[arg(long)]
    metrics_address: Option<String>,
}

#[derive(Args)]
struct ClientArgs {
    /// Config file to read the socket address from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The daemon's socket.
    #[arg(long)]
    address: Option<PathBuf>,
}

impl ClientArgs {
    fn address(&self) -> anyhow::Result<PathBuf> {
        let flags = Overrides {
            address: self.address.clone(),
            ..Default::default()
        };
        Ok(Config::load(self.config.as_deref(), flags)?.address)
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ontop: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, &matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ontop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::ContainerdConfig(args) => {
            print!("{}", args.render()?);
            Ok(())
        }
        Command::Bench(args) => {
            let sub = matches
                .subcommand_matches("bench")
                .expect("bench arguments");
            ontop::bench::run(args.plan(sub)?).await.map(|_| ())
        }
        Command::Serve(args) => {
            let flags = Overrides {
                backend: args.backend,
                root: args.root,
                address: args.address,
                log_level: args.log_level,
                log_format: args.log_format,
                metrics_address: args.metrics_address,
            };
            let config = Config::load(args.config.as_deref(), flags)?;
            init_logging(&config);
            ontop::server::serve(config).await
        }
        Command::Check {
            repair,
            root,
            client,
        } => {
            let findings = match root {
                Some(root) => check_offline(&root, repair)?,
                None => {
                    let channel = ontop::client::connect(&client.address()?)
                        .await
                        .context("no daemon answers; to check a root offline, pass --root")?;
                    AdminClient::new(channel)
                        .check(ontop::admin::v1::CheckRequest { repair })
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                        .into_inner()
                        .findings
                }
            };
            for f in &findings {
                let status = match (f.repaired, f.needs_person) {
                    (true, _) => "repaired",
                    (false, true) => "needs a person",
                    (false, false) => "repairable with --repair",
                };
                println!("{status}: {}", f.problem);
            }
            let left = findings.iter().filter(|f| !f.repaired).count();
            if left > 0 {
                anyhow::bail!("{left} problem(s) left of {} found", findings.len());
            }
            println!("ok: the database and the disk agree");
            Ok(())
        }
        Command::Ping(client) => {
            // Any answer from the service will do; NotFound is the cheap one.
            let address = client.address()?;
            let channel = ontop::client::connect(&address).await?;
            let mut api = ontop::client::Snapshots::new(channel, "ontop", Default::default());
            match api.stat("ontop ping: no such snapshot").await {
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Ok(_) => {}
                Err(s) => anyhow::bail!("{} answered {s}", address.display()),
            }
            println!("ok: ontop answers on {}", address.display());
            Ok(())
        }
        Command::Ls(client) => {
            let channel = ontop::client::connect(&client.address()?).await?;
            let list = AdminClient::new(channel)
                .list(ListRequest {})
                .await
                .context("listing snapshots")?
                .into_inner();
            println!(
                "{:>6}  {:<9}  {:>10}  {:>7}  {:<40}  PARENT",
                "ID", "KIND", "SIZE", "INODES", "KEY"
            );
            for s in list.snapshots {
                println!(
                    "{:>6}  {:<9}  {:>10}  {:>7}  {:<40}  {}",
                    s.id,
                    s.kind,
                    human_size(s.size),
                    s.inodes,
                    s.key,
                    s.parent
                );
            }
            Ok(())
        }
        Command::Info { key, client } => {
            let channel = ontop::client::connect(&client.address()?).await?;
            let info = AdminClient::new(channel)
                .info(InfoRequest { key: key.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
                .with_context(|| format!("snapshot {key:?}"))?
                .into_inner();
            let s = info.snapshot.unwrap_or_default();
            print_info(&s, &info.path, &info.chain);
            Ok(())
        }
    }
}

/// `ontop check --root`: the root's lock keeps a daemon from starting
/// meanwhile, and refuses a root a daemon serves.
fn check_offline(
    root: &std::path::Path,
    repair: bool,
) -> anyhow::Result<Vec<ontop::admin::v1::Finding>> {
    let layout = ontop::layout::Layout::new(root);
    anyhow::ensure!(
        layout.db_path().exists(),
        "{} holds no ontop database",
        root.display()
    );
    let _lock = layout.lock().with_context(|| {
        format!(
            "{} is in use; check it through its daemon with --address",
            root.display()
        )
    })?;
    let store = ontop::store::Store::open(&layout.db_path())?;
    let findings = ontop::check::run(&layout, &store, repair, true)?;
    Ok(findings.into_iter().map(ontop::grpc::finding).collect())
}

fn print_info(s: &SnapshotSummary, path: &str, chain: &[SnapshotSummary]) {
    println!("Key:     {}", s.key);
    println!("Id:      {}", s.id);
    println!("Kind:    {}", s.kind);
    println!("Parent:  {}", s.parent);
    println!("Path:    {path}");
    println!("Created: {}", rfc3339(s.created_ns));
    println!("Updated: {}", rfc3339(s.updated_ns));
    println!(
        "Usage:   {} ({} bytes), {} inodes",
        human_size(s.size),
        s.size,
        s.inodes
    );
    println!("Labels:");
    let mut labels: Vec<_> = s.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        println!("  {k}={v}");
    }
    println!("Chain ({} ancestors, nearest first):", chain.len());
    for a in chain {
        println!("  {:>6}  {:>10}  {}", a.id, human_size(a.size), a.key);
    }
}

fn human_size(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// UTC RFC 3339 from Unix nanoseconds, without a date-time dependency.
fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn sizes_read_like_du() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }
}
