//! Size limits on a snapshot's writable layer: which limit a Prepare
//! asks for, and which enforcer holds it.
//!
//! A limit comes from a label (ontop's own first, then containerd's
//! generic hint), or from the daemon's default for containers. Three
//! enforcers hold it, each where it works:
//!
//! - [`project`]: XFS project quotas; writes past it get ENOSPC. Paths
//!   stay as for any snapshot.
//! - [`btrfs`]: the snapshot's directory is a subvolume with a qgroup
//!   limit; writes past it get EDQUOT. Paths stay as for any snapshot.
//! - [`loop_ext4`]: an ext4 image on a loop device, mounted at
//!   `snapshots/<id>/limit`, holds the upper and work dirs; writes past it
//!   get ENOSPC, on any filesystem under the root.
//!
//! Both are lifted at Commit: a committed layer is an ordinary one.

use std::fmt;

use crate::error::{Error, Result};
use crate::snapshot::{Kind, Labels};

pub mod btrfs;
pub mod loop_ext4;
pub mod project;

/// containerd's generic hint (2.4+): decimal bytes.
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";
/// ontop's own, which wins over containerd's: units allowed, `0` unlimited.
pub const ONTOP_MAX_SIZE_LABEL: &str = "containerd.io/snapshot/ontop.max-size";

/// Below this no filesystem can hold a container's first writes anyway,
/// and an ext4 image would be mostly its own metadata.
pub const MIN_LIMIT: u64 = 1 << 20;

/// What holds a snapshot's limit. The numbers are what the metadata
/// store persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Enforcer {
    LoopExt4 = 1,
    BtrfsQgroup = 2,
    ProjectQuota = 3,
}

impl Enforcer {
    pub fn from_i64(v: i64) -> Option<Enforcer> {
        match v {
            1 => Some(Enforcer::LoopExt4),
            2 => Some(Enforcer::BtrfsQgroup),
            3 => Some(Enforcer::ProjectQuota),
            _ => None,
        }
    }

    /// The name the configuration, the CLI and the metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcer::LoopExt4 => "loop-ext4",
            Enforcer::BtrfsQgroup => "btrfs-qgroup",
            Enforcer::ProjectQuota => "project-quota",
        }
    }

    /// In order of preference: a quota needs no mount of its own; a loop
    /// image works anywhere.
    pub const ALL: [Enforcer; 3] = [
        Enforcer::ProjectQuota,
        Enforcer::BtrfsQgroup,
        Enforcer::LoopExt4,
    ];
}

impl fmt::Display for Enforcer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot's size limit and what enforces it. On a committed snapshot
/// it records what was lifted at Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes: u64,
    pub enforcer: Enforcer,
}

/// Parses a size: decimal bytes, or a whole number with a unit: `k`,
/// `M`, `G`, `T` (also `KB`.., powers of 1000) or `Ki`, `Mi`, `Gi`, `Ti`
/// (also `KiB`.., powers of 1024), as Kubernetes and `df` write them.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "{s:?} is not a size: a whole number of bytes, optionally with a unit such as MiB or G"
        ));
    }
    let factor: u64 = match unit {
        "" | "B" => 1,
        "k" | "K" | "KB" => 1000,
        "M" | "MB" => 1000_u64.pow(2),
        "G" | "GB" => 1000_u64.pow(3),
        "T" | "TB" => 1000_u64.pow(4),
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?}; use one of B, K/KB, M/MB, G/GB, T/TB \
                 (powers of 1000) or Ki/KiB, Mi/MiB, Gi/GiB, Ti/TiB (powers of 1024)"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| format!("{s:?} is too large a size"))
}

/// A size the way people read it: `16 MiB`, `1.5 GiB`, `1000 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The limit the labels ask for: None without a label, Some(0) for an
/// explicit "unlimited". ontop's label wins; either, when malformed, is
/// InvalidArgument, so that a typo never runs a container unlimited.
pub fn requested(labels: &Labels) -> Result<Option<u64>> {
    let parse = |label: &str, strict_bytes: bool| -> Result<Option<u64>> {
        let Some(v) = labels.get(label) else {
            return Ok(None);
        };
        let parsed = if strict_bytes {
            v.parse::<u64>()
                .ok()
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| format!("{v:?} is not a decimal number of bytes"))
        } else {
            parse_size(v)
        };
        let bytes = parsed.map_err(|e| Error::invalid_argument(format!("label {label}: {e}")))?;
        if bytes != 0 && bytes < MIN_LIMIT {
            return Err(Error::invalid_argument(format!(
                "label {label}: {v:?} is below the smallest limit, {}",
                human(MIN_LIMIT)
            )));
        }
        Ok(Some(bytes))
    };
    match parse(ONTOP_MAX_SIZE_LABEL, false)? {
        Some(n) => Ok(Some(n)),
        None => parse(MAX_SIZE_LABEL, true),
    }
}

/// Whether an Update with these field paths names a limit label.
pub fn update_names(
    requested: &std::collections::HashMap<String, String>,
    fieldpaths: &[String],
) -> bool {
    [MAX_SIZE_LABEL, ONTOP_MAX_SIZE_LABEL]
        .iter()
        .any(|l| crate::labels::update_names(requested, fieldpaths, l))
}

/// Whether `key` is one containerd's unpack prepares a layer under:
/// `extract-<unique> <chain id>` (`snapshots.UnpackKeyFormat`), after
/// the `<namespace>/<seq>/` containerd's metadata store puts first. Not
/// every unpack labels its Prepares (`ctr images import` on 1.6 does not),
/// so the key says it too.
pub fn unpack_key(key: &str) -> bool {
    let own = key.splitn(3, '/').nth(2).unwrap_or(key);
    own.starts_with("extract-") && own.contains(' ')
}

/// The limit a new snapshot gets: a label's always applies to an active
/// snapshot; the default only to a container's, never to the Prepare
/// that unpacks an image layer. A view writes nothing and gets none.
pub fn wanted(
    kind: Kind,
    labels: &Labels,
    unpacks: bool,
    default: Option<u64>,
) -> Result<Option<u64>> {
    let asked = requested(labels)?;
    if kind != Kind::Active {
        return Ok(None);
    }
    Ok(match asked {
        Some(0) => None,
        Some(n) => Some(n),
        None if unpacks => None,
        None => default,
    })
}

/// Sets, or lifts (None), the limit of snapshot `id` that a quota holds;
/// `dir` is its directory, `snapshots/<id>`, which a project's limit
/// outlives. A loop image is not a quota: nothing to do.
pub fn set_quota(
    enforcer: Enforcer,
    dir: &std::path::Path,
    id: crate::snapshot::Id,
    bytes: Option<u64>,
) -> std::io::Result<()> {
    match enforcer {
        Enforcer::BtrfsQgroup => btrfs::set_limit(dir, bytes),
        Enforcer::ProjectQuota => project::set_limit(dir.parent().unwrap_or(dir), id, bytes),
        Enforcer::LoopExt4 => Ok(()),
    }
}

/// Which enforcers work under the root, found once at start-up, and
/// which one new limits use.
#[derive(Debug, Clone)]
pub struct LimitPolicy {
    /// Applies to containers' snapshots without a label.
    pub default: Option<u64>,
    /// The enforcer for new limits, or why none works, naming each tried.
    pub chosen: std::result::Result<Enforcer, String>,
}

impl LimitPolicy {
    /// Tries `forced`, or each enforcer in order of preference
    /// ([`Enforcer::ALL`]), on the root's
    /// filesystem. With a default limit and nothing that can hold it,
    /// the daemon must not start: every container would run unlimited.
    pub fn probe(
        root: &std::path::Path,
        scratch: &std::path::Path,
        default: Option<u64>,
        forced: Option<Enforcer>,
    ) -> anyhow::Result<LimitPolicy> {
        let candidates: Vec<Enforcer> = match forced {
            // Quotas and mounts are real root's: rootless, none can work,
            // and a probe's subvolume might not even be deletable.
            _ if !crate::backend::is_real_root() => Vec::new(),
            Some(e) => vec![e],
            None => Enforcer::ALL.to_vec(),
        };
        let mut tried = Vec::new();
        let mut chosen = None;
        for &e in &candidates {
            let works = match e {
                Enforcer::ProjectQuota => project::probe(scratch),
                Enforcer::BtrfsQgroup => btrfs::probe(scratch),
                Enforcer::LoopExt4 => loop_ext4::probe(),
            };
            match works {
                Ok(()) => {
                    chosen = Some(e);
                    break;
                }
                Err(why) => tried.push(format!("{e}: {why:#}")),
            }
        }
        if candidates.is_empty() {
            tried.push("every enforcer needs real root, and ontop runs rootless".into());
        }
        let chosen = chosen.ok_or_else(|| {
            format!(
                "no way to enforce a size limit under {}: {}",
                root.display(),
                tried.join("; ")
            )
        });
        if let (Some(bytes), Err(why)) = (default, &chosen) {
            anyhow::bail!("default_max_size is {}, but {why}", human(bytes));
        }
        match &chosen {
            Ok(e) => {
                tracing::info!(enforcer = %e, default = ?default.map(human), "size limits: enforced")
            }
            Err(why) => tracing::info!("size limits: none can be enforced here ({why})"),
        }
        Ok(LimitPolicy { default, chosen })
    }

    /// The enforcer for a new limit, or FailedPrecondition saying why
    /// none can hold it.
    pub fn enforcer(&self, bytes: u64) -> Result<Enforcer> {
        self.chosen.clone().map_err(|why| {
            crate::metrics::limit_refused();
            Error::failed_precondition(format!(
                "a size limit of {} cannot be enforced: {why}",
                human(bytes)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::labels_of;

    #[test]
    fn sizes_take_whole_numbers_with_decimal_or_binary_units() {
        for (s, n) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("16MiB", 16 << 20),
            ("16Mi", 16 << 20),
            ("10GiB", 10 << 30),
            ("2G", 2_000_000_000),
            ("2GB", 2_000_000_000),
            ("5k", 5000),
            ("1TiB", 1 << 40),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in [
            "",
            "MiB",
            "1.5GiB",
            "-1",
            "10 GiB",
            "10gib",
            "10X",
            "99999999999TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ontops_label_wins_and_both_are_strict() {
        let both = labels_of(&[
            (MAX_SIZE_LABEL, "1073741824"),
            (ONTOP_MAX_SIZE_LABEL, "16MiB"),
        ]);
        assert_eq!(requested(&both).unwrap(), Some(16 << 20));
        let containerds = labels_of(&[(MAX_SIZE_LABEL, "33554432")]);
        assert_eq!(requested(&containerds).unwrap(), Some(32 << 20));
        // containerd's label is decimal bytes only.
        let err = requested(&labels_of(&[(MAX_SIZE_LABEL, "32MiB")])).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains(MAX_SIZE_LABEL), "{err}");
        let err = requested(&labels_of(&[(ONTOP_MAX_SIZE_LABEL, "lots")])).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = requested(&labels_of(&[(ONTOP_MAX_SIZE_LABEL, "4KiB")])).unwrap_err();
        assert!(err.to_string().contains("smallest"), "{err}");
        assert_eq!(
            requested(&labels_of(&[(ONTOP_MAX_SIZE_LABEL, "0")])).unwrap(),
            Some(0)
        );
        assert_eq!(requested(&Labels::new()).unwrap(), None);
    }

    #[test]
    fn the_default_limits_containers_not_unpacking_nor_views() {
        let none = Labels::new();
        let d = Some(1 << 30);
        assert_eq!(wanted(Kind::Active, &none, false, d).unwrap(), d);
        assert_eq!(wanted(Kind::Active, &none, true, d).unwrap(), None);
        assert_eq!(wanted(Kind::View, &none, false, d).unwrap(), None);
        let asked = labels_of(&[(ONTOP_MAX_SIZE_LABEL, "16MiB")]);
        assert_eq!(
            wanted(Kind::Active, &asked, true, d).unwrap(),
            Some(16 << 20)
        );
        assert_eq!(wanted(Kind::View, &asked, false, d).unwrap(), None);
        let unlimited = labels_of(&[(ONTOP_MAX_SIZE_LABEL, "0")]);
        assert_eq!(wanted(Kind::Active, &unlimited, false, d).unwrap(), None);
        // A bad label fails even where it would not apply.
        let bad = labels_of(&[(ONTOP_MAX_SIZE_LABEL, "x")]);
        assert!(wanted(Kind::View, &bad, false, d).is_err());
    }

    #[test]
    fn containerds_unpack_keys_are_known_with_or_without_a_namespace() {
        assert!(unpack_key("default/12/extract-12345-AbCd sha256:0123"));
        assert!(unpack_key("extract-1 sha256:abc"));
        assert!(!unpack_key("default/13/my-container"));
        assert!(!unpack_key("default/14/extract-without-chain"));
        assert!(!unpack_key("k8s.io/15/0a1b2c"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(16 << 20), "16 MiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(1000), "1000 B");
    }
}
