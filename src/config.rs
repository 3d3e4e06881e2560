//! Configuration: `config.toml` and command-line flags, merged once at
//! start-up into one validated [`Config`]. Flags win over the file, the
//! file over the defaults.
//!
//! The defaults depend on who runs ontop: real root gets the system paths
//! containerd's CRI expects; anyone else (an unprivileged user, or root of
//! a user namespace, as under rootless containerd) gets per-user XDG paths.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;

use crate::backend::{self, Backend};
use crate::limit::{self, Enforcer};

/// containerd 1.6/1.7's CRI looks for image-fs stats under
/// `/var/lib/containerd/io.containerd.snapshotter.v1.<name>`.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.ontop";
pub const DEFAULT_ADDRESS: &str = "/run/ontop/ontop.sock";
/// Read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG: &str = "/etc/ontop/config.toml";
/// containerd's content store, where ontop's applier reads layer blobs.
pub const DEFAULT_CONTENT_STORE: &str = "/var/lib/containerd/io.containerd.content.v1.content";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub backend: Backend,
    pub root: PathBuf,
    pub address: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub async_remove: bool,
    /// Commit makes the layer's data durable before it answers.
    pub sync_layers: bool,
    pub mount_options: Vec<String>,
    /// Directories host base directories may come from; empty turns the
    /// feature off.
    pub base_roots: Vec<PathBuf>,
    /// Whether ontop maps user-namespace ids when containerd asks with the
    /// mapping labels (containerd 2.x's `remap-ids` capability); false
    /// leaves the mapping to containerd (see `Snapshotter::idmap`).
    pub remap_ids: bool,
    /// Who owns the socket, when not ontop's own user and group.
    pub socket_owner: Option<u32>,
    pub socket_group: Option<u32>,
    /// Where Prometheus scrapes `/metrics`; None serves no metrics.
    pub metrics_address: Option<MetricsAddress>,
    /// A call that takes longer is logged at warn.
    pub slow_call: Duration,
    /// The size limit of a container's snapshot that has no limit label;
    /// None: unlimited.
    pub default_max_size: Option<u64>,
    /// What enforces size limits; None: the first that works here.
    pub limit_enforcer: Option<Enforcer>,
    /// Take the socket over from the ontop serving the same root, rather
    /// than refuse to start (see the takeover module).
    pub takeover: bool,
    /// Once a successor took the socket over, wait for SIGTERM rather
    /// than exit: a DaemonSet's pod, whose container would be restarted.
    pub linger: bool,
    /// containerd's content store, where the applier finds layer blobs.
    pub content_store: PathBuf,
}

/// A TCP address such as `127.0.0.1:9163`, or `unix:/path` for a socket
/// that a local agent scrapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddress {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return if Path::new(path).is_absolute() {
                Ok(MetricsAddress::Unix(path.into()))
            } else {
                Err(format!(
                    "metrics address {s:?}: unix: needs an absolute path"
                ))
            };
        }
        s.parse().map(MetricsAddress::Tcp).map_err(|_| {
            format!(
                "metrics address {s:?} is neither IP:PORT (such as 127.0.0.1:9163) nor unix:/path"
            )
        })
    }
}

impl std::fmt::Display for MetricsAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddress::Tcp(a) => write!(f, "{a}"),
            MetricsAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `config.toml` as written; every key optional. Unknown keys are errors,
/// so a typo does not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub backend: Option<Backend>,
    pub root: Option<PathBuf>,
    pub address: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub async_remove: Option<bool>,
    pub sync_layers: Option<bool>,
    pub mount_options: Option<Vec<String>>,
    pub base_roots: Option<Vec<PathBuf>>,
    pub remap_ids: Option<bool>,
    /// A user name or uid.
    pub socket_owner: Option<String>,
    /// A group name or gid.
    pub socket_group: Option<String>,
    pub metrics_address: Option<String>,
    pub slow_call_seconds: Option<f64>,
    /// A size such as "10GiB"; "0" or absent: unlimited.
    pub default_max_size: Option<String>,
    /// "auto", "project-quota", "btrfs-qgroup" or "loop-ext4".
    pub limit_enforcer: Option<String>,
    pub takeover: Option<bool>,
    pub linger: Option<bool>,
    pub content_store: Option<PathBuf>,
}

/// The flags that can override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub backend: Option<Backend>,
    pub root: Option<PathBuf>,
    pub address: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub metrics_address: Option<String>,
    pub takeover: Option<bool>,
    pub linger: Option<bool>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading config file {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o002 != 0 {
            bail!(
                "config file {} is world-writable (mode {:o}): anyone could choose what ontop \
                 mounts; chmod o-w it",
                path.display(),
                mode & 0o7777
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
}

/// Where things go when neither the file nor a flag says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub root: Result<PathBuf, String>,
    pub address: Result<PathBuf, String>,
    pub config: Option<PathBuf>,
    /// containerd's content store (rootless containerd keeps its root
    /// under `$XDG_DATA_HOME/containerd`).
    pub content_store: Option<PathBuf>,
}

impl Defaults {
    /// The system paths, for real root.
    pub fn system() -> Defaults {
        Defaults {
            root: Ok(DEFAULT_ROOT.into()),
            address: Ok(DEFAULT_ADDRESS.into()),
            config: Some(DEFAULT_CONFIG.into()),
            content_store: Some(DEFAULT_CONTENT_STORE.into()),
        }
    }

    /// Per-user paths: `$XDG_RUNTIME_DIR/ontop/ontop.sock`,
    /// `$XDG_DATA_HOME/ontop` (`~/.local/share/ontop`) and
    /// `$XDG_CONFIG_HOME/ontop/config.toml` (`~/.config/ontop/config.toml`).
    pub fn user(env: impl Fn(&str) -> Option<String>) -> Defaults {
        let env = |name: &str| env(name).filter(|v| Path::new(v).is_absolute());
        let home = env("HOME").map(PathBuf::from);
        let xdg = |var: &str, fallback: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(fallback)))
        };
        let unset = |what: &str, var: &str, flag: &str| {
            format!(
                "not running as root, so the default {what} is under ${var}, which is not set to an absolute path; set it, or pass {flag}"
            )
        };
        Defaults {
            root: xdg("XDG_DATA_HOME", ".local/share")
                .map(|d| d.join("ontop"))
                .ok_or_else(|| unset("root", "HOME", "--root")),
            address: env("XDG_RUNTIME_DIR")
                .map(|d| Path::new(&d).join("ontop/ontop.sock"))
                .ok_or_else(|| unset("socket", "XDG_RUNTIME_DIR", "--address")),
            config: xdg("XDG_CONFIG_HOME", ".config").map(|d| d.join("ontop/config.toml")),
            content_store: xdg("XDG_DATA_HOME", ".local/share")
                .map(|d| d.join("containerd/io.containerd.content.v1.content")),
        }
    }

    /// The defaults for this process.
    pub fn detect() -> Defaults {
        if backend::is_real_root() {
            Defaults::system()
        } else {
            Defaults::user(|name| std::env::var(name).ok())
        }
    }
}

impl Config {
    /// Loads `explicit`, or the default config file when it exists, and
    /// merges the flags over it.
    pub fn load(explicit: Option<&Path>, flags: Overrides) -> anyhow::Result<Config> {
        let defaults = Defaults::detect();
        let file = match (explicit, &defaults.config) {
            (Some(p), _) => FileConfig::load(p)?,
            (None, Some(p)) if p.exists() => FileConfig::load(p)?,
            _ => FileConfig::default(),
        };
        Config::merge(file, flags, defaults)
    }

    pub fn merge(file: FileConfig, flags: Overrides, defaults: Defaults) -> anyhow::Result<Config> {
        let config = Config {
            backend: flags.backend.or(file.backend).unwrap_or_default(),
            root: match flags.root.or(file.root) {
                Some(r) => r,
                None => defaults.root.map_err(|e| anyhow!(e))?,
            },
            address: match flags.address.or(file.address) {
                Some(a) => a,
                None => defaults.address.map_err(|e| anyhow!(e))?,
            },
            log_level: flags
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format: flags
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            async_remove: file.async_remove.unwrap_or(false),
            sync_layers: file.sync_layers.unwrap_or(true),
            mount_options: file.mount_options.unwrap_or_default(),
            base_roots: file.base_roots.unwrap_or_default(),
            remap_ids: file.remap_ids.unwrap_or(true),
            socket_owner: file.socket_owner.as_deref().map(user_id).transpose()?,
            socket_group: file.socket_group.as_deref().map(group_id).transpose()?,
            metrics_address: flags
                .metrics_address
                .or(file.metrics_address)
                .filter(|a| !a.is_empty())
                .map(|a| a.parse().map_err(|e: String| anyhow!(e)))
                .transpose()?,
            slow_call: match file.slow_call_seconds {
                None => Duration::from_secs(1),
                Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
                Some(s) => bail!("slow_call_seconds must be a positive number of seconds, got {s}"),
            },
            default_max_size: match file.default_max_size.as_deref() {
                None => None,
                Some(v) => match limit::parse_size(v).map_err(|e| anyhow!("default_max_size: {e}"))? {
                    0 => None,
                    n if n < limit::MIN_LIMIT => bail!(
                        "default_max_size {v:?} is below the smallest limit, {}",
                        limit::human(limit::MIN_LIMIT)
                    ),
                    n => Some(n),
                },
            },
            takeover: flags.takeover.or(file.takeover).unwrap_or(false),
            linger: flags.linger.or(file.linger).unwrap_or(false),
            content_store: match file.content_store.or(defaults.content_store) {
                Some(p) => p,
                None => bail!(
                    "no default content_store: neither XDG_DATA_HOME nor HOME is set to an absolute path; set content_store"
                ),
            },
            limit_enforcer: match file.limit_enforcer.as_deref() {
                None | Some("auto") => None,
                Some(name) => Some(
                    Enforcer::ALL
                        .into_iter()
                        .find(|e| e.as_str() == name)
                        .ok_or_else(|| {
                            anyhow!(
                                "limit_enforcer {name:?} is not one of \"auto\", \"project-quota\", \"btrfs-qgroup\", \"loop-ext4\""
                            )
                        })?,
                ),
            },
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
        if !self.content_store.is_absolute() {
            bail!(
                "content_store must be an absolute path, got {}",
                self.content_store.display()
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

/// A uid from a user name or number.
fn user_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => bail!("socket_owner {name:?} is not a user on this machine"),
    }
}

/// A gid from a group name or number.
fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => bail!("socket_group {name:?} is not a group on this machine"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<FileConfig> {
        Ok(toml::from_str(text)?)
    }

    fn merged(text: &str) -> anyhow::Result<Config> {
        Config::merge(parse(text)?, Overrides::default(), Defaults::system())
    }

    #[test]
    fn size_limit_settings_are_read_strictly() {
        let c = merged("").unwrap();
        assert_eq!((c.default_max_size, c.limit_enforcer), (None, None));
        let c = merged("default_max_size = \"10GiB\"\nlimit_enforcer = \"loop-ext4\"").unwrap();
        assert_eq!(c.default_max_size, Some(10 << 30));
        assert_eq!(c.limit_enforcer, Some(Enforcer::LoopExt4));
        let c = merged("default_max_size = \"0\"\nlimit_enforcer = \"auto\"").unwrap();
        assert_eq!((c.default_max_size, c.limit_enforcer), (None, None));
        for (bad, says) in [
            ("default_max_size = \"10 gigs\"", "default_max_size"),
            ("default_max_size = \"1KiB\"", "smallest"),
            ("limit_enforcer = \"xfs\"", "limit_enforcer"),
        ] {
            let err = format!("{:#}", merged(bad).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn metrics_address_and_slow_call_threshold_are_read_with_defaults() {
        let c = Config::merge(
            FileConfig::default(),
            Overrides::default(),
            Defaults::system(),
        )
        .unwrap();
        assert_eq!(
            (c.metrics_address, c.slow_call),
            (None, Duration::from_secs(1))
        );
        let file: FileConfig = toml::from_str(
            "metrics_address = \"unix:/run/ontop/metrics.sock\"\nslow_call_seconds = 0.25",
        )
        .unwrap();
        let c = Config::merge(file, Overrides::default(), Defaults::system()).unwrap();
        assert_eq!(
            c.metrics_address,
            Some(MetricsAddress::Unix("/run/ontop/metrics.sock".into()))
        );
        assert_eq!(c.slow_call, Duration::from_millis(250));
        // The flag wins; empty turns metrics off.
        let flags = Overrides {
            metrics_address: Some("127.0.0.1:9163".into()),
            ..Default::default()
        };
        let c = Config::merge(FileConfig::default(), flags, Defaults::system()).unwrap();
        assert_eq!(c.metrics_address.unwrap().to_string(), "127.0.0.1:9163");
        let file: FileConfig = toml::from_str("metrics_address = \"\"").unwrap();
        let c = Config::merge(file, Overrides::default(), Defaults::system()).unwrap();
        assert_eq!(c.metrics_address, None);
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = Config::merge(
            FileConfig::default(),
            Overrides::default(),
            Defaults::system(),
        )
        .unwrap();
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.async_remove);
        assert!(c.sync_layers);
        assert!(c.mount_options.is_empty());
        assert!(c.remap_ids);
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            r#"root = "/srv/a"
               address = "/run/a.sock"
               log_format = "json"
               async_remove = true
               sync_layers = false
               mount_options = ["metacopy=off"]"#,
        )
        .unwrap();
        let flags = Overrides {
            root: Some("/srv/b".into()),
            ..Default::default()
        };
        let c = Config::merge(file, flags, Defaults::system()).unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/b"));
        assert_eq!(c.address, PathBuf::from("/run/a.sock"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.async_remove);
        assert!(!c.sync_layers);
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
            ("metrics_address = \"localhost:9163\"", "IP:PORT"),
            ("metrics_address = \"unix:run/m.sock\"", "absolute path"),
            ("slow_call_seconds = 0.0", "positive"),
            ("slow_call_seconds = -1.0", "positive"),
        ];
        for (text, want) in cases {
            let err = parse(text)
                .and_then(|f| Config::merge(f, Overrides::default(), Defaults::system()));
            let msg = format!("{:#}", err.expect_err(text));
            assert!(msg.contains(want), "{text}: {msg}");
        }
    }

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../config.toml.example");
        let file: FileConfig = toml::from_str(text).unwrap();
        let c = Config::merge(file, Overrides::default(), Defaults::system()).unwrap();
        assert_eq!(
            c,
            Config::merge(
                FileConfig::default(),
                Overrides::default(),
                Defaults::system()
            )
            .unwrap()
        );
    }

    #[test]
    fn the_backend_comes_from_the_flag_then_the_file() {
        let file = parse("backend = \"fuse-overlayfs\"").unwrap();
        let c = Config::merge(file, Overrides::default(), Defaults::system()).unwrap();
        assert_eq!(c.backend, Backend::FuseOverlayfs);
        let file = parse("backend = \"fuse-overlayfs\"").unwrap();
        let flags = Overrides {
            backend: Some(Backend::Overlayfs),
            ..Default::default()
        };
        let c = Config::merge(file, flags, Defaults::system()).unwrap();
        assert_eq!(c.backend, Backend::Overlayfs);
        let err = parse("backend = \"fuse\"").unwrap_err();
        assert!(format!("{err:#}").contains("fuse-overlayfs"), "{err:#}");
    }

    #[test]
    fn rootless_defaults_are_per_user_xdg_paths() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let d = Defaults::user(env(&[
            ("HOME", "/home/u"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]));
        assert_eq!(d.root, Ok("/home/u/.local/share/ontop".into()));
        assert_eq!(d.address, Ok("/run/user/1000/ontop/ontop.sock".into()));
        assert_eq!(d.config, Some("/home/u/.config/ontop/config.toml".into()));
        let d = Defaults::user(env(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "/data"),
            ("XDG_CONFIG_HOME", "/conf"),
        ]));
        assert_eq!(d.root, Ok("/data/ontop".into()));
        assert_eq!(d.config, Some("/conf/ontop/config.toml".into()));
        let err = Config::merge(FileConfig::default(), Overrides::default(), d).unwrap_err();
        assert!(err.to_string().contains("XDG_RUNTIME_DIR"), "{err}");
        let d = Defaults::user(env(&[("HOME", "relative")]));
        assert!(d.root.unwrap_err().contains("--root"));
    }
}
