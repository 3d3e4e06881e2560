//! Configuration: `config.toml` and command-line flags, merged once at
//! start-up into one validated [`Config`]. Flags win over the file, the
//! file over the defaults.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Deserialize;

/// containerd 1.6/1.7's CRI looks for image-fs stats under
/// `/var/lib/containerd/io.containerd.snapshotter.v1.<name>`.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.ontop";
pub const DEFAULT_ADDRESS: &str = "/run/ontop/ontop.sock";
/// Read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG: &str = "/etc/ontop/config.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub root: PathBuf,
    pub address: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub async_remove: bool,
    pub mount_options: Vec<String>,
    /// Directories host base directories may come from; empty turns the
    /// feature off.
    pub base_roots: Vec<PathBuf>,
}

/// `config.toml` as written; every key optional. Unknown keys are errors,
/// so a typo does not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub root: Option<PathBuf>,
    pub address: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub async_remove: Option<bool>,
    pub mount_options: Option<Vec<String>>,
    pub base_roots: Option<Vec<PathBuf>>,
}

/// The flags that can override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub root: Option<PathBuf>,
    pub address: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
}

impl Config {
    /// Loads `explicit`, or the default config file when it exists, and
    /// merges the flags over it.
    pub fn load(explicit: Option<&Path>, flags: Overrides) -> anyhow::Result<Config> {
        let file = match explicit {
            Some(p) => FileConfig::load(p)?,
            None if Path::new(DEFAULT_CONFIG).exists() => {
                FileConfig::load(Path::new(DEFAULT_CONFIG))?
            }
            None => FileConfig::default(),
        };
        Config::merge(file, flags)
    }

    pub fn merge(file: FileConfig, flags: Overrides) -> anyhow::Result<Config> {
        let config = Config {
            root: flags
                .root
                .or(file.root)
                .unwrap_or_else(|| DEFAULT_ROOT.into()),
            address: flags
                .address
                .or(file.address)
                .unwrap_or_else(|| DEFAULT_ADDRESS.into()),
            log_level: flags
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format: flags
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            async_remove: file.async_remove.unwrap_or(false),
            mount_options: file.mount_options.unwrap_or_default(),
            base_roots: file.base_roots.unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.root.is_absolute() {
            bail!("root must be an absolute path, got {}", self.root.display());
        }
        if !self.address.is_absolute() {
            bail!(
                "address must be an absolute socket path, got {}",
                self.address.display()
            );
        }
        if self.address.starts_with(&self.root) {
            bail!(
                "address {} must not be inside root {}",
                self.address.display(),
                self.root.display()
            );
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level).with_context(|| {
            format!(
                "log_level {:?} is not a valid level or filter",
                self.log_level
            )
        })?;
        for root in &self.base_roots {
            if !root.is_absolute() {
                bail!(
                    "base_roots entry {} must be an absolute path",
                    root.display()
                );
            }
            // The other direction (ontop's root inside an allowed root) is
            // fine: each base is checked not to overlap the root.
            if root.starts_with(&self.root) {
                bail!(
                    "base_roots entry {} is inside ontop's root {}: bases there would overlay \
                     ontop's own snapshots",
                    root.display(),
                    self.root.display()
                );
            }
        }
        for opt in &self.mount_options {
            let name = opt.split('=').next().unwrap_or_default();
            if matches!(name, "lowerdir" | "upperdir" | "workdir") {
                bail!("mount_options must not set {name}: ontop builds it for each snapshot");
            }
            if opt.is_empty() || opt.contains(',') {
                bail!("mount_options entry {opt:?} must be one non-empty option without commas");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<FileConfig> {
        Ok(toml::from_str(text)?)
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = Config::merge(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.async_remove);
        assert!(c.mount_options.is_empty());
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            r#"root = "/srv/a"
               address = "/run/a.sock"
               log_format = "json"
               async_remove = true
               mount_options = ["metacopy=off"]"#,
        )
        .unwrap();
        let flags = Overrides {
            root: Some("/srv/b".into()),
            ..Default::default()
        };
        let c = Config::merge(file, flags).unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/b"));
        assert_eq!(c.address, PathBuf::from("/run/a.sock"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.async_remove);
        assert_eq!(c.mount_options, ["metacopy=off"]);
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases = [
            ("rooot = \"/x\"", "unknown field"),
            ("root = \"relative\"", "absolute"),
            ("mount_options = [\"lowerdir=/x\"]", "lowerdir"),
            ("mount_options = [\"a,b\"]", "commas"),
            ("log_level = \"[[[\"", "log_level"),
            ("root = \"/r\"\naddress = \"/r/s.sock\"", "inside root"),
            ("base_roots = [\"srv\"]", "absolute"),
            (
                "root = \"/srv\"\nbase_roots = [\"/srv/x\"]",
                "inside ontop's root",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).and_then(|f| Config::merge(f, Overrides::default()));
            let msg = format!("{:#}", err.expect_err(text));
            assert!(msg.contains(want), "{text}: {msg}");
        }
    }

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../config.toml.example");
        let file: FileConfig = toml::from_str(text).unwrap();
        let c = Config::merge(file, Overrides::default()).unwrap();
        assert_eq!(
            c,
            Config::merge(FileConfig::default(), Overrides::default()).unwrap()
        );
    }
}
