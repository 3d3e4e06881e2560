//! The `ontop` command: parses the command line and dispatches. `serve`
//! runs the daemon; `ls`, `info`, `check` and `ping` ask a running one;
//! the work of each lives in the library (`cli`, `check`). `bench` runs
//! `ontop-bench`, which is built apart so this binary carries no bench.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use ontop::admin::v1::{admin_client::AdminClient, InfoRequest, ListRequest};
use ontop::command::{Cli, Command};
use ontop::config::{Config, Overrides};
use ontop::containerd_api::snapshots::v1::{
    snapshots_client::SnapshotsClient, StatSnapshotRequest,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ontop: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve(runtime, args),
        command => runtime.block_on(run(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ontop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `ontop serve`: serves until a signal, or until a successor takes the
/// socket over; then, with `linger`, waits for SIGTERM having let go of
/// everything.
fn serve(runtime: tokio::runtime::Runtime, args: ontop::command::ServeArgs) -> anyhow::Result<()> {
    let flags = Overrides {
        backend: args.backend,
        root: args.root,
        address: args.address,
        log_level: args.log_level,
        log_format: args.log_format,
        metrics_address: args.metrics_address,
        takeover: args.takeover.then_some(true),
        linger: args.linger.then_some(true),
    };
    let config = Config::load(args.config.as_deref(), flags)?;
    ontop::cli::init_logging(&config);
    let linger = config.linger;
    let ended = runtime.block_on(ontop::server::serve(config))?;
    if ended == ontop::server::Ended::HandedOver && linger {
        // The runtime's end takes every task with it (connections a client
        // kept open past the grace included), and with them the database
        // and the root's lock, which the successor waits for.
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        tracing::info!("handed over; lingering until SIGTERM (linger = true)");
        let waiting = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime to wait in")?;
        let reason = waiting.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            anyhow::Ok(tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            })
        })?;
        tracing::info!("{reason}: exiting");
    }
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ContainerdConfig(args) => {
            print!("{}", args.render()?);
            Ok(())
        }
        Command::Bench { args } => Err(exec_bench(args)),
        Command::Serve(_) => unreachable!("main runs serve"),
        Command::Check {
            repair,
            root,
            client,
        } => {
            let findings = match root {
                Some(root) => ontop::check::offline(&root, repair)?
                    .into_iter()
                    .map(Into::into)
                    .collect(),
                None => {
                    let channel = ontop::dial::connect(&client.address()?)
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
            ontop::cli::report_check(&findings)
        }
        Command::Ping { here, client } => {
            // Any answer from the service will do; NotFound is the cheap one.
            let address = client.address()?;
            let channel = ontop::dial::connect(&address).await?;
            let asked = StatSnapshotRequest {
                snapshotter: "ontop".into(),
                key: "ontop ping: no such snapshot".into(),
            };
            match SnapshotsClient::new(channel.clone()).stat(asked).await {
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Ok(_) => {}
                Err(s) => anyhow::bail!("{} answered {s}", address.display()),
            }
            if here {
                let status = AdminClient::new(channel)
                    .status(ontop::admin::v1::StatusRequest {})
                    .await
                    .context("asking which ontop answers")?
                    .into_inner();
                let own = ontop::takeover::pid_namespace()?;
                if status.pid_namespace != own {
                    anyhow::bail!(
                        "the ontop answering on {} (version {}) runs in another pid namespace: \
                         not this one yet",
                        address.display(),
                        status.version
                    );
                }
            }
            println!("ok: ontop answers on {}", address.display());
            Ok(())
        }
        Command::Ls(client) => {
            let channel = ontop::dial::connect(&client.address()?).await?;
            let list = AdminClient::new(channel)
                .list(ListRequest {})
                .await
                .context("listing snapshots")?
                .into_inner();
            ontop::cli::print_ls(&list.snapshots);
            Ok(())
        }
        Command::Info { key, client } => {
            let channel = ontop::dial::connect(&client.address()?).await?;
            let info = AdminClient::new(channel)
                .info(InfoRequest { key: key.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
                .with_context(|| format!("snapshot {key:?}"))?
                .into_inner();
            let s = info.snapshot.unwrap_or_default();
            ontop::cli::print_info(&s, &info.path, &info.chain);
            Ok(())
        }
    }
}

/// Replaces this process with `ontop-bench ARGS`: the one beside this
/// binary (as cargo and the package install them), else the one on PATH.
/// Returns only when neither could be run.
fn exec_bench(args: Vec<OsString>) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("ontop-bench")))
        .filter(|p| p.is_file());
    let program = beside.map_or_else(|| "ontop-bench".into(), OsString::from);
    let err = std::process::Command::new(&program).args(args).exec();
    anyhow::anyhow!(
        "running {}: {err} (ontop-bench is built by `cargo build -p ontop-tools`)",
        program.to_string_lossy()
    )
}
