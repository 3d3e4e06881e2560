//! The domain model: what a snapshot is, independent of wire and storage.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// The three kinds containerd knows. The numbers are the wire values of
/// containerd's `Kind` enum and are also what the metadata store persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    View = 1,
    Active = 2,
    Committed = 3,
}

impl Kind {
    pub fn from_i64(v: i64) -> Option<Kind> {
        match v {
            1 => Some(Kind::View),
            2 => Some(Kind::Active),
            3 => Some(Kind::Committed),
            _ => None,
        }
    }

    /// The name containerd's filter language and `ctr` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Internal snapshot id: the name of the snapshot's directory on disk.
/// Allocated by SQLite AUTOINCREMENT, so never reused even after Remove.
pub type Id = i64;

pub type Labels = BTreeMap<String, String>;

/// A snapshot as containerd sees it, plus the internal id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: Id,
    pub kind: Kind,
    /// The key (active, view) or name (committed): one key space.
    pub key: String,
    /// The parent's name, or "" for none.
    pub parent: String,
    pub labels: Labels,
    pub created: Timestamp,
    pub updated: Timestamp,
}

/// Disk usage of one snapshot's own upper dir, never its parents'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Nanoseconds since the Unix epoch: exact round trips through SQLite and
/// protobuf timestamps, so `created == updated` holds after a fresh create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

/// Labels from pairs, for unit tests.
#[cfg(test)]
pub fn labels_of(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
