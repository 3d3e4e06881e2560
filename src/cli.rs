//! The command line's own work: ontop's config for `containerd-config`,
//! the printing of `ls`, `info` and `check`, and logging set-up.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use crate::admin::v1::{Finding, SnapshotSummary};
use crate::config::{Config, LogFormat, Overrides};

#[derive(Args)]
pub struct ContainerdConfigArgs {
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
    /// Leave layer unpacking to containerd's own applier: no diff plugin
    /// (always so for a rootless ontop).
    #[arg(long)]
    no_applier: bool,
}

impl ContainerdConfigArgs {
    /// containerd's config fragment for the ontop these flags describe.
    pub fn render(self) -> anyhow::Result<String> {
        use crate::containerd_config::{host_platform, render, Fragment, Version};
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
            // A rootless ontop cannot make overlay's whiteouts (devices)
            // and would refuse every layer: leave unpacking to containerd.
            applier: !self.no_applier && crate::backend::is_real_root(),
        }))
    }
}

/// One line per snapshot, as `ontop ls` prints them.
pub fn print_ls(snapshots: &[SnapshotSummary]) {
    println!(
        "{:>6}  {:<9}  {:>10}  {:>10}  {:>7}  {:<40}  PARENT",
        "ID", "KIND", "SIZE", "LIMIT", "INODES", "KEY"
    );
    for s in snapshots {
        println!(
            "{:>6}  {:<9}  {:>10}  {:>10}  {:>7}  {:<40}  {}",
            s.id,
            s.kind,
            human_size(s.size),
            limit_shown(s),
            s.inodes,
            s.key,
            s.parent
        );
    }
}

/// `ontop check`'s report; an error when problems are left.
pub fn report_check(findings: &[Finding]) -> anyhow::Result<()> {
    for f in findings {
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

pub fn print_info(s: &SnapshotSummary, path: &str, chain: &[SnapshotSummary]) {
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
    if s.max_size > 0 {
        println!(
            "Limit:   {} ({} bytes), by {}{}",
            human_size(s.max_size),
            s.max_size,
            s.limit_enforcer,
            if s.kind == "active" {
                ""
            } else {
                "; lifted at Commit"
            }
        );
    }
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

/// The limit column of `ontop ls`: "-" for none, in parentheses once
/// Commit lifted it.
fn limit_shown(s: &SnapshotSummary) -> String {
    match (s.max_size, s.kind.as_str()) {
        (0, _) => "-".into(),
        (n, "active") => human_size(n),
        (n, _) => format!("({})", human_size(n)),
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

pub fn init_logging(config: &Config) {
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
