//! User-namespace id mappings, as containerd asks for them in labels
//! (`WithRemapperLabels`): `containerd.io/snapshot/uidmapping` and
//! `.../gidmapping`, each `ctrID:hostID:size[,ctrID:hostID:size...]`.
//!
//! fuse-overlayfs applies them on the fly, so a layer stored with the
//! container's ids shows the host's ids through the mount, and writes go
//! back to disk with the container's ids. Its option takes the same
//! triples, but colon-separated throughout, since a comma ends a mount
//! option.
//!
//! On the kernel backend, containerd 2.x does the mapping: its mount code
//! takes `uidmap=`/`gidmap=` options in the label's own form, idmap-mounts
//! the lower layers read-only, and leaves the upper as it is, so the
//! upper's root belongs to the host ids of the container's root.

use crate::backend::Backend;
use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::snapshot::Labels;

pub const UID_LABEL: &str = "containerd.io/snapshot/uidmapping";
pub const GID_LABEL: &str = "containerd.io/snapshot/gidmapping";

/// One contiguous range: `size` ids from `container` map onto `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

/// The mappings of one snapshot; either list may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMapping {
    pub uids: Vec<Range>,
    pub gids: Vec<Range>,
}

impl IdMapping {
    /// Reads and checks the mapping labels, if any.
    pub fn from_labels(labels: &Labels) -> Result<IdMapping> {
        let parse = |label: &str| {
            labels
                .get(label)
                .map_or(Ok(Vec::new()), |v| parse(label, v))
        };
        Ok(IdMapping {
            uids: parse(UID_LABEL)?,
            gids: parse(GID_LABEL)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// containerd 2.x's `uidmap=`/`gidmap=` options, which its mount code
    /// turns into idmapped mounts of the lower layers.
    pub fn kernel_options(&self) -> Vec<String> {
        let option = |name: &str, ranges: &[Range]| {
            let triples: Vec<String> = ranges
                .iter()
                .map(|r| format!("{}:{}:{}", r.container, r.host, r.size))
                .collect();
            format!("{name}={}", triples.join(","))
        };
        vec![option("uidmap", &self.uids), option("gidmap", &self.gids)]
    }

    /// The host uid and gid of the container's root, which own a mapped
    /// snapshot's upper root, as containerd's overlay snapshotter does it.
    pub fn root(&self) -> Result<(u32, u32)> {
        let root_of = |label: &str, ranges: &[Range]| {
            ranges
                .iter()
                .find(|r| r.container == 0)
                .map(|r| r.host)
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "label {label} maps no range from the container's root (id 0); \
                         containerd requires one"
                    ))
                })
        };
        Ok((
            root_of(UID_LABEL, &self.uids)?,
            root_of(GID_LABEL, &self.gids)?,
        ))
    }

    /// fuse-overlayfs's `uidmapping=`/`gidmapping=` options.
    pub fn fuse_options(&self) -> Vec<String> {
        let option = |name: &str, ranges: &[Range]| {
            (!ranges.is_empty()).then(|| {
                let triples: Vec<String> = ranges
                    .iter()
                    .map(|r| format!("{}:{}:{}", r.container, r.host, r.size))
                    .collect();
                format!("{name}={}", triples.join(":"))
            })
        };
        option("uidmapping", &self.uids)
            .into_iter()
            .chain(option("gidmapping", &self.gids))
            .collect()
    }
}

/// Who maps ids for a snapshot, given the backend and `remap_ids`.
#[derive(Debug, Clone, Copy)]
pub struct IdMapPolicy {
    pub backend: Backend,
    pub remap_ids: bool,
}

impl IdMapPolicy {
    /// Who applies the id mapping a snapshot's labels ask for, as the
    /// mapping ontop puts in its mounts (empty: nobody, or containerd).
    ///
    /// With `remap_ids` (containerd 2.x's `remap-ids` capability), ontop
    /// maps: fuse-overlayfs on the fly, the kernel backend through
    /// containerd 2's idmapped mounts. Without it, containerd 2.x has
    /// already copied the image into a snapshot it chowned, and the labels
    /// only say who owns the new root. containerd 1.x has no capabilities:
    /// its labels always mean "map", which only fuse-overlayfs can do for
    /// it, since it cannot idmap-mount.
    pub fn apply(&self, asked: &IdMapping, caller: Caller) -> Result<IdMapping> {
        if asked.is_empty() {
            return Ok(IdMapping::default());
        }
        let containerd1 = || caller.is_containerd_1();
        match self.backend {
            Backend::FuseOverlayfs if self.remap_ids || containerd1() => Ok(asked.clone()),
            Backend::FuseOverlayfs => Ok(IdMapping::default()),
            Backend::Overlayfs if containerd1() => Err(Error::failed_precondition(format!(
                "user-namespace id mapping ({}, {}) on the kernel backend needs containerd \
                 2.0 or later, which idmap-mounts the layers; containerd 1.x cannot. Use \
                 backend fuse-overlayfs, which maps ids itself, or containerd 2",
                UID_LABEL, GID_LABEL,
            ))),
            Backend::Overlayfs if !self.remap_ids => Ok(IdMapping::default()),
            Backend::Overlayfs if asked.uids.is_empty() || asked.gids.is_empty() => {
                Err(Error::invalid_argument(format!(
                    "the kernel backend maps ids only with both {} and {}: containerd \
                     idmap-mounts only when it has both",
                    UID_LABEL, GID_LABEL,
                )))
            }
            Backend::Overlayfs => {
                asked.root()?;
                Ok(asked.clone())
            }
        }
    }

    /// Whether `idmap` is applied on the fly by the mount itself, so the
    /// files keep the container's ids on disk.
    pub fn maps_itself(&self, idmap: &IdMapping) -> bool {
        self.backend == Backend::FuseOverlayfs && !idmap.is_empty()
    }
}

fn parse(label: &str, value: &str) -> Result<Vec<Range>> {
    let bad = |why: String| {
        Error::invalid_argument(format!(
            "label {label}={value:?}: {why}; the format is ctrID:hostID:size[,ctrID:hostID:size...]"
        ))
    };
    value
        .split(',')
        .map(|entry| {
            let fields: Vec<&str> = entry.split(':').collect();
            let [c, h, s] = fields[..] else {
                return Err(bad(format!("{entry:?} is not three numbers")));
            };
            let num = |f: &str| {
                f.parse::<u32>()
                    .map_err(|_| bad(format!("{f:?} is not an id (0 to 4294967295)")))
            };
            let r = Range {
                container: num(c)?,
                host: num(h)?,
                size: num(s)?,
            };
            if r.size == 0 {
                return Err(bad(format!("{entry:?} maps no ids")));
            }
            let end = |start: u32| u64::from(start) + u64::from(r.size) > 1 << 32;
            if end(r.container) || end(r.host) {
                return Err(bad(format!("{entry:?} runs past the largest id")));
            }
            Ok(r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::snapshot::labels_of as labels;

    #[test]
    fn containerd_labels_become_colon_separated_fuse_options() {
        let m = IdMapping::from_labels(&labels(&[
            (UID_LABEL, "0:100000:65536"),
            (GID_LABEL, "0:1000:1,1:110000:65535"),
        ]))
        .unwrap();
        assert_eq!(
            m.fuse_options(),
            [
                "uidmapping=0:100000:65536",
                "gidmapping=0:1000:1:1:110000:65535"
            ]
        );
        let only_gid = IdMapping::from_labels(&labels(&[(GID_LABEL, "0:5:1")])).unwrap();
        assert_eq!(only_gid.fuse_options(), ["gidmapping=0:5:1"]);
        assert!(IdMapping::from_labels(&Labels::new()).unwrap().is_empty());
    }

    #[test]
    fn the_kernel_backend_hands_containerd_its_own_option_form_and_root() {
        let m = IdMapping::from_labels(&labels(&[
            (UID_LABEL, "0:100000:65536"),
            (GID_LABEL, "0:1000:1,1:110000:65535"),
        ]))
        .unwrap();
        assert_eq!(
            m.kernel_options(),
            ["uidmap=0:100000:65536", "gidmap=0:1000:1,1:110000:65535"]
        );
        assert_eq!(m.root().unwrap(), (100000, 1000));
        let rootless = IdMapping::from_labels(&labels(&[
            (UID_LABEL, "1:100000:10"),
            (GID_LABEL, "0:1000:1"),
        ]))
        .unwrap();
        let err = rootless.root().unwrap_err();
        assert!(
            err.to_string().contains("uidmapping maps no range"),
            "{err}"
        );
    }

    #[test]
    fn malformed_mappings_are_invalid_arguments_that_say_why() {
        for (value, why) in [
            ("", "not three numbers"),
            ("0:1", "not three numbers"),
            ("0:1:2:3", "not three numbers"),
            ("0:1:2,", "not three numbers"),
            ("a:1:2", "not an id"),
            ("-1:1:2", "not an id"),
            ("0:1:4294967296", "not an id"),
            ("0:1:0", "maps no ids"),
            ("0:4294967295:2", "past the largest id"),
        ] {
            let err = IdMapping::from_labels(&labels(&[(UID_LABEL, value)])).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{value}: {err}");
            assert!(err.to_string().contains(why), "{value}: {err}");
        }
        assert!(IdMapping::from_labels(&labels(&[(UID_LABEL, "0:4294967295:1")])).is_ok());
    }
}
