//! `ontop containerd-config`: the TOML fragment that wires ontop into a
//! containerd of a given generation. containerd's config is where users go
//! wrong, because what a proxy snapshotter needs differs between
//! generations:
//!
//! - 1.x: `[proxy_plugins.NAME]` with `type` and `address`; CRI's
//!   snapshotter under `[plugins."io.containerd.grpc.v1.cri".containerd]`.
//!   1.7 also reads `capabilities`: its client copies and chowns the image
//!   for a user-namespaced container unless `remap-ids` is declared, and
//!   still sends the mapping labels, so fuse-overlayfs would map twice.
//! - 2.x: the same entry also carries `capabilities` (containerd never asks
//!   the plugin; it believes the config) and `exports.root`, which CRI
//!   reports to kubelet as the image filesystem. Images unpack only into
//!   snapshotters listed in the transfer service's `unpack_config`, and a
//!   list replaces the default, so overlayfs is listed too. CRI's
//!   snapshotter moved to `[plugins."io.containerd.cri.v1.images"]`.
//!
//! The rendering is pure and table-tested; only [`Version::detect`] runs
//! anything. The tests and scripts build every containerd config they use
//! from this output.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

/// A containerd release, as far as its config cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    /// Parses `1`, `2`, `2.1` or `v2.3.4`. A bare major means its first
    /// release, whose config every later one accepts: `2` leaves out what
    /// needs 2.2 or 2.3 (`rebase`, the EROFS unpack entry).
    pub fn parse(s: &str) -> anyhow::Result<Version> {
        let s = s.trim().trim_start_matches('v');
        let mut parts = s.split(['.', '~', '-', '+']);
        let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
        let Some(major) = number(parts.next()) else {
            bail!("{s:?} is not a containerd version such as 1.7 or 2.3");
        };
        let minor = match (major, number(parts.next())) {
            (_, Some(minor)) => minor,
            (1, None) => 6,
            (_, None) => 0,
        };
        if !(1..=2).contains(&major) {
            bail!("containerd {major}.x is not known to ontop; pass --containerd-version 1 or 2");
        }
        Ok(Version { major, minor })
    }

    /// The version `containerd --version` reports, for example
    /// `containerd github.com/containerd/containerd/v2 2.3.4 db88...`.
    pub fn detect(binary: &Path) -> anyhow::Result<Version> {
        let out = Command::new(binary)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "running `{} --version` to learn containerd's version; pass \
                     --containerd-version 1 or 2 instead",
                    binary.display()
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .split_whitespace()
            .nth(2)
            .with_context(|| format!("`{} --version` printed {text:?}", binary.display()))?;
        Version::parse(version)
    }

    fn at_least(self, major: u32, minor: u32) -> bool {
        self >= Version { major, minor }
    }
}

/// What goes into the fragment.
#[derive(Debug, Clone)]
pub struct Fragment<'a> {
    /// The proxy plugin's name, which users select with `--snapshotter`.
    pub name: &'a str,
    pub address: &'a Path,
    pub root: &'a Path,
    pub containerd: Version,
    /// ontop maps ids itself (config `remap_ids`): declare `remap-ids`.
    pub remap_ids: bool,
    /// Also set CRI's default snapshotter.
    pub cri: bool,
    /// containerd's name for this host's platform, e.g. `linux/amd64`.
    pub platform: &'a str,
    /// Unpack layers with ontop's applier (containerd 1.7 and later).
    pub applier: bool,
}

/// The name of the diff proxy plugin serving ontop's applier: a proxy
/// plugin's name is its table's key, so it cannot be the snapshotter's.
pub fn applier_name(name: &str) -> String {
    format!("{name}-applier")
}

/// Whether `containerd` takes a diff proxy plugin: 1.6 does not.
pub fn takes_applier(containerd: Version) -> bool {
    containerd.at_least(1, 7)
}

/// The capabilities ontop has under `containerd`, as containerd names
/// them. containerd 1.6 has none; 1.7 knows `remap-ids`.
pub fn capabilities(containerd: Version, remap_ids: bool) -> Vec<&'static str> {
    let mut caps = Vec::new();
    if containerd.at_least(1, 7) && remap_ids {
        caps.push("remap-ids");
    }
    // Parallel unpack: containerd 2.2 added it, with Commit's parent.
    if containerd.at_least(2, 2) {
        caps.push("rebase");
    }
    caps
}

/// The fragment, ready to append to containerd's `config.toml` (version 2
/// for containerd 1.x, version 3 for 2.x).
pub fn render(f: &Fragment<'_>) -> String {
    let v = f.containerd;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# ontop for containerd {}.{} (`ontop containerd-config`). Add to containerd's\n\
         # config.toml (config version {}), then restart containerd.",
        v.major,
        v.minor,
        if v.major >= 2 { 3 } else { 2 }
    );
    let _ = writeln!(out, "[proxy_plugins.{}]", key(f.name));
    let _ = writeln!(out, "  type = \"snapshot\"");
    let _ = writeln!(
        out,
        "  address = {}",
        string(&f.address.display().to_string())
    );
    let caps: Vec<String> = capabilities(v, f.remap_ids)
        .into_iter()
        .map(|c| format!("\"{c}\""))
        .collect();
    if v.major >= 2 || !caps.is_empty() {
        let _ = writeln!(out, "  capabilities = [{}]", caps.join(", "));
    }
    if v.major >= 2 {
        let _ = writeln!(
            out,
            "  # CRI reports this to kubelet as the image filesystem.\n  exports = {{ root = {} }}",
            string(&f.root.display().to_string())
        );
    }
    if v.major >= 2 || (f.applier && takes_applier(v)) {
        out.push_str(if v.major >= 2 {
            "\n# Images unpack only into the snapshotters listed here, and this list\n\
             # replaces containerd's default, so overlayfs is listed too. Merge it\n\
             # with any unpack_config entries of your own.\n"
        } else {
            "\n# For the transfer service (`ctr images pull --local=false`): an entry\n\
             # that names no differ takes any that matches, which could be ontop's\n\
             # applier for overlayfs, so each entry names its own. This list replaces\n\
             # containerd's default; merge it with any entries of your own.\n"
        });
        let mut entries = vec![("overlayfs", "walking", f.platform.to_string(), false)];
        if v.at_least(2, 3) {
            // containerd 2.3's default list also has EROFS, when available.
            let (os, arch) = f.platform.split_once('/').unwrap_or((f.platform, ""));
            entries.push(("erofs", "erofs", format!("{os}(+erofs)/{arch}"), true));
        }
        let differ = if f.applier {
            applier_name(f.name)
        } else {
            "walking".to_string()
        };
        entries.push((f.name, &differ, f.platform.to_string(), false));
        for (snapshotter, differ, platform, optional) in entries {
            out.push_str("[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n");
            let _ = writeln!(out, "  platform = \"{platform}\"");
            let _ = writeln!(out, "  snapshotter = \"{snapshotter}\"");
            let _ = writeln!(out, "  differ = \"{differ}\"");
            if optional {
                out.push_str("  optional = true\n");
            }
        }
    }
    if f.applier && takes_applier(v) {
        let applier = applier_name(f.name);
        let _ = writeln!(
            out,
            "\n# ontop's layer applier, on the same socket. It writes only into ontop's\n\
             # own snapshots and answers Unimplemented for anything else, so the diff\n\
             # service goes on to containerd's own applier (\"walking\") for other\n\
             # snapshotters and for comparing snapshots. A table may appear once: if\n\
             # your config sets the diff service's order, put {applier:?} first there."
        );
        let _ = writeln!(out, "[proxy_plugins.{}]", key(&applier));
        let _ = writeln!(out, "  type = \"diff\"");
        let _ = writeln!(
            out,
            "  address = {}",
            string(&f.address.display().to_string())
        );
        let _ = writeln!(
            out,
            "[plugins.\"io.containerd.service.v1.diff-service\"]\n  default = [{}, \"walking\"]",
            string(&applier)
        );
    } else if f.applier {
        let _ = writeln!(
            out,
            "\n# containerd {}.{} takes no diff proxy plugin (1.7 and later do): layers\n\
             # unpack with containerd's own applier.",
            v.major, v.minor
        );
    }
    // Last, so that keys written after the fragment land in this table.
    if f.cri {
        let section = if v.major >= 2 {
            "plugins.\"io.containerd.cri.v1.images\""
        } else {
            "plugins.\"io.containerd.grpc.v1.cri\".containerd"
        };
        let _ = writeln!(
            out,
            "\n# CRI (Kubernetes): ontop is the default snapshotter. A table may appear\n\
             # once: if your config has this one, set snapshotter there instead."
        );
        let _ = writeln!(out, "[{section}]\n  snapshotter = \"{}\"", f.name);
    }
    out
}

/// containerd's name for the platform this binary runs on, as its
/// `platforms.DefaultSpec()` formats it.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64/v8",
        "x86" => "386",
        "arm" => "arm/v7",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    };
    format!("linux/{arch}")
}

/// A TOML key: bare when it can be, quoted otherwise.
fn key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        name.to_string()
    } else {
        string(name)
    }
}

/// A TOML basic string.
fn string(text: &str) -> String {
    let mut s = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{:04X}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(containerd: &str, cri: bool) -> String {
        fragment_with(containerd, cri, true)
    }

    fn fragment_with(containerd: &str, cri: bool, applier: bool) -> String {
        render(&Fragment {
            name: "ontop",
            address: Path::new("/run/ontop/ontop.sock"),
            root: Path::new("/var/lib/ontop"),
            containerd: Version::parse(containerd).unwrap(),
            remap_ids: true,
            cri,
            platform: "linux/amd64",
            applier,
        })
    }

    #[test]
    fn versions_parse_as_containerd_prints_them() {
        let v = |major, minor| Version { major, minor };
        assert_eq!(Version::parse("1.6.20~ds1").unwrap(), v(1, 6));
        assert_eq!(Version::parse("2.3.4").unwrap(), v(2, 3));
        assert_eq!(Version::parse("v2.1.0-rc.1").unwrap(), v(2, 1));
        assert_eq!(Version::parse("2").unwrap(), v(2, 0));
        assert_eq!(Version::parse("1").unwrap(), v(1, 6));
        assert!(Version::parse("3.0").is_err());
        assert!(Version::parse("latest").is_err());
    }

    #[test]
    fn capabilities_follow_the_containerd_release() {
        let caps = |v: &str, remap| capabilities(Version::parse(v).unwrap(), remap);
        assert!(caps("1.6", true).is_empty());
        assert_eq!(caps("1.7", true), ["remap-ids"]);
        assert!(caps("1.7", false).is_empty());
        assert_eq!(caps("2.0", true), ["remap-ids"]);
        assert_eq!(caps("2.1", false), Vec::<&str>::new());
        assert_eq!(caps("2.2", true), ["remap-ids", "rebase"]);
        assert_eq!(caps("2.3", false), ["rebase"]);
    }

    #[test]
    fn containerd_1_gets_the_proxy_plugin_and_the_old_cri_section() {
        assert_eq!(
            fragment("1.6", true),
            r#"# ontop for containerd 1.6 (`ontop containerd-config`). Add to containerd's
# config.toml (config version 2), then restart containerd.
[proxy_plugins.ontop]
  type = "snapshot"
  address = "/run/ontop/ontop.sock"

# containerd 1.6 takes no diff proxy plugin (1.7 and later do): layers
# unpack with containerd's own applier.

# CRI (Kubernetes): ontop is the default snapshotter. A table may appear
# once: if your config has this one, set snapshotter there instead.
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "ontop"
"#
        );
    }

    #[test]
    fn containerd_1_7_takes_the_applier_first_in_the_diff_services_order() {
        let out = fragment("1.7", false);
        assert!(
            out.ends_with(
                r#"[proxy_plugins.ontop-applier]
  type = "diff"
  address = "/run/ontop/ontop.sock"
[plugins."io.containerd.service.v1.diff-service"]
  default = ["ontop-applier", "walking"]
"#
            ),
            "{out}"
        );
        // Its transfer service, which names no differ by default, is told
        // which differ is whose.
        assert!(
            out.contains(
                "  snapshotter = \"overlayfs\"\n  differ = \"walking\"\n[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = \"ontop\"\n  differ = \"ontop-applier\"\n"
            ),
            "{out}"
        );
        let without = fragment_with("1.7", false, false);
        assert!(
            !without.contains("diff") && !without.contains("unpack_config"),
            "{without}"
        );
    }

    #[test]
    fn containerd_1_7_declares_remap_ids_so_its_client_does_not_copy_the_image() {
        let out = fragment("1.7", false);
        assert!(
            out.contains(
                "  address = \"/run/ontop/ontop.sock\"\n  capabilities = [\"remap-ids\"]\n"
            ),
            "{out}"
        );
        assert!(!out.contains("exports"), "{out}");
    }

    #[test]
    fn containerd_2_gets_capabilities_exports_unpack_config_and_the_new_cri_section() {
        assert_eq!(
            fragment("2.3", true),
            r#"# ontop for containerd 2.3 (`ontop containerd-config`). Add to containerd's
# config.toml (config version 3), then restart containerd.
[proxy_plugins.ontop]
  type = "snapshot"
  address = "/run/ontop/ontop.sock"
  capabilities = ["remap-ids", "rebase"]
  # CRI reports this to kubelet as the image filesystem.
  exports = { root = "/var/lib/ontop" }

# Images unpack only into the snapshotters listed here, and this list
# replaces containerd's default, so overlayfs is listed too. Merge it
# with any unpack_config entries of your own.
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
  differ = "walking"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux(+erofs)/amd64"
  snapshotter = "erofs"
  differ = "erofs"
  optional = true
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "ontop"
  differ = "ontop-applier"

# ontop's layer applier, on the same socket. It writes only into ontop's
# own snapshots and answers Unimplemented for anything else, so the diff
# service goes on to containerd's own applier ("walking") for other
# snapshotters and for comparing snapshots. A table may appear once: if
# your config sets the diff service's order, put "ontop-applier" first there.
[proxy_plugins.ontop-applier]
  type = "diff"
  address = "/run/ontop/ontop.sock"
[plugins."io.containerd.service.v1.diff-service"]
  default = ["ontop-applier", "walking"]

# CRI (Kubernetes): ontop is the default snapshotter. A table may appear
# once: if your config has this one, set snapshotter there instead.
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "ontop"
"#
        );
        // Before 2.3 the default list had overlayfs alone.
        let v21 = fragment("2.1", false);
        assert!(!v21.contains("erofs") && !v21.contains("rebase"), "{v21}");
        assert!(!v21.contains("cri"), "{v21}");
    }

    #[test]
    fn the_fragment_is_valid_toml_whatever_the_paths() {
        let text = render(&Fragment {
            name: "ontop fuse",
            address: Path::new("/run/a \"quoted\" dir\\/s.sock"),
            root: Path::new("/var/lib/x"),
            containerd: Version::parse("2.3").unwrap(),
            remap_ids: false,
            cri: true,
            platform: "linux/arm64/v8",
            applier: true,
        });
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        let plugin = &parsed["proxy_plugins"]["ontop fuse"];
        assert_eq!(
            plugin["address"].as_str(),
            Some("/run/a \"quoted\" dir\\/s.sock")
        );
        assert_eq!(plugin["exports"]["root"].as_str(), Some("/var/lib/x"));
        let unpack = parsed["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
            .as_array()
            .unwrap();
        assert_eq!(unpack.len(), 3);
        assert_eq!(
            unpack[1]["platform"].as_str(),
            Some("linux(+erofs)/arm64/v8")
        );
    }
}
