//! `ontop-gen DIR`: writes the man pages and shell completions of `ontop`
//! and `ontop-bench`, generated from their clap definitions, for the
//! Debian package (scripts/package.sh):
//! - DIR/man/ontop.1, ontop-SUBCOMMAND.1 for each subcommand, ontop-bench.1;
//! - DIR/completions/{ontop,ontop-bench}.bash, _ontop, _ontop-bench,
//!   ontop.fish and ontop-bench.fish.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: ontop-gen DIR")?
        .into();
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    for cmd in [
        ontop::command::Cli::command(),
        ontop_tools::bench::Cli::command(),
    ] {
        man_pages(cmd.clone(), &man)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let name = cmd.get_name().to_string();
            clap_complete::generate_to(shell, &mut cmd.clone(), name, &completions)
                .with_context(|| format!("writing {shell} completions"))?;
        }
    }
    println!("man pages and completions written to {}", dir.display());
    Ok(())
}

/// The command's page, and one per subcommand (`ontop-serve.1`), as git
/// and cargo ship them. `ontop bench` runs `ontop-bench`, whose own page
/// is `ontop-bench.1`.
fn man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let cmd = cmd.version(env!("CARGO_PKG_VERSION"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let name = cmd.get_name().to_string();
    std::fs::write(dir.join(format!("{name}.1")), page)?;
    let own_page = |s: &&clap::Command| !matches!(s.get_name(), "help" | "bench");
    for sub in cmd.get_subcommands().filter(own_page) {
        let full = format!("{name}-{}", sub.get_name());
        let sub = sub
            .clone()
            .name(full.clone())
            .version(env!("CARGO_PKG_VERSION"));
        let mut page = Vec::new();
        clap_mangen::Man::new(sub).render(&mut page)?;
        std::fs::write(dir.join(format!("{full}.1")), page)?;
    }
    Ok(())
}
