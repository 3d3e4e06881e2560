//! `ontop-bench`: compares snapshotters side by side through the Snapshots
//! API. `ontop bench ARGS` runs this binary too.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use ontop_tools::bench::Cli;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let run = async {
        let plan = cli.args.plan(&matches)?;
        ontop_tools::bench::run(plan).await.map(|_| ())
    };
    let ran = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run));
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ontop-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
