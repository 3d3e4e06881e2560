//! `ontop check`: the database against the disk.
//!
//! It finds what a crash, a full disk or a hand in the root can leave:
//! directories the database does not know, snapshots whose directories are
//! gone, base links that disagree with the database, a host base that has
//! vanished, broken parent links and a damaged database. With `repair` it
//! fixes what can be fixed without losing or inventing data, and reports
//! the rest as needing a person.
//!
//! It runs under the metadata write lock, so no snapshot is being created
//! or removed meanwhile: online through the daemon, or offline on a root no
//! daemon holds.

use std::fmt;
use std::path::PathBuf;

use crate::error::Result;
use crate::layout::{self, Layout};
use crate::snapshot::{Id, Kind};
use crate::store::Store;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// SQLite's integrity or foreign-key check failed.
    Database(String),
    /// A directory under `snapshots/` that no snapshot owns.
    OrphanDir(String),
    /// Left in `tmp/` or `trash/` by a crash.
    Leftover(PathBuf),
    /// A snapshot whose tree (`fs`) is gone: its data is lost.
    MissingTree { id: Id, key: String },
    /// An active snapshot without its overlay work dir.
    MissingWork { id: Id, key: String },
    /// The base link is missing or points elsewhere than the database.
    BaseLink { id: Id, key: String },
    /// A base link where the database has no base.
    StrayBaseLink { id: Id, key: String },
    /// The host base directory itself is gone.
    MissingBase { id: Id, key: String, base: PathBuf },
}

impl Problem {
    /// Whether `ontop check --repair` can fix it without losing data.
    pub fn repairable(&self) -> bool {
        matches!(
            self,
            Problem::OrphanDir(_)
                | Problem::Leftover(_)
                | Problem::MissingWork { .. }
                | Problem::BaseLink { .. }
                | Problem::StrayBaseLink { .. }
        )
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Database(e) => write!(f, "the database is damaged: {e}"),
            Problem::OrphanDir(name) => {
                write!(f, "snapshots/{name} belongs to no snapshot")
            }
            Problem::Leftover(p) => write!(f, "{} was left by a crash", p.display()),
            Problem::MissingTree { id, key } => write!(
                f,
                "snapshot {key:?} (id {id}) has lost its tree snapshots/{id}/fs; \
                 remove the snapshot and pull or rebuild what used it"
            ),
            Problem::MissingWork { id, key } => {
                write!(f, "active snapshot {key:?} (id {id}) has no work dir")
            }
            Problem::BaseLink { id, key } => write!(
                f,
                "snapshot {key:?} (id {id}): snapshots/{id}/base does not point at its base"
            ),
            Problem::StrayBaseLink { id, key } => {
                write!(f, "snapshot {key:?} (id {id}) has a base link but no base")
            }
            Problem::MissingBase { id, key, base } => write!(
                f,
                "snapshot {key:?} (id {id}) sits on {}, which is no longer a directory; \
                 restore it, or remove the snapshot",
                base.display()
            ),
        }
    }
}

/// A problem, and whether it was repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub problem: Problem,
    pub repaired: bool,
}

/// Checks `layout` against `store`, repairing what is safe when `repair`.
/// `temporaries` says whether `tmp/` and `trash/` count: a running daemon
/// uses them, so only an offline check looks there.
pub fn run(
    layout: &Layout,
    store: &Store,
    repair: bool,
    temporaries: bool,
) -> Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let mut trashed = Vec::new();
    store.write(|tx| {
        for e in tx.database_problems()? {
            findings.push(Finding {
                problem: Problem::Database(e),
                repaired: false,
            });
        }
        let all = tx.all()?;
        let ids: std::collections::HashSet<Id> = all.iter().map(|(r, _)| r.id).collect();
        for name in layout.snapshot_dir_names().map_err(anyhow::Error::from)? {
            let name = name.to_string_lossy().into_owned();
            if name.parse::<Id>().is_ok_and(|id| ids.contains(&id)) {
                continue;
            }
            findings.push(Finding {
                problem: Problem::OrphanDir(name),
                repaired: false,
            });
        }
        for (rec, _) in &all {
            let (id, key) = (rec.id, rec.key.clone());
            if !layout.fs(id).is_dir() {
                findings.push(Finding {
                    problem: Problem::MissingTree {
                        id,
                        key: key.clone(),
                    },
                    repaired: false,
                });
                continue;
            }
            if rec.kind == Kind::Active && !layout.work(id).is_dir() {
                let repaired = repair && layout.recreate_work(id).is_ok();
                findings.push(Finding {
                    problem: Problem::MissingWork {
                        id,
                        key: key.clone(),
                    },
                    repaired,
                });
            }
            let link = std::fs::read_link(layout.base_link(id)).ok();
            match (&rec.base, link) {
                (Some(base), link) => {
                    if !base.is_dir() {
                        findings.push(Finding {
                            problem: Problem::MissingBase {
                                id,
                                key: key.clone(),
                                base: base.clone(),
                            },
                            repaired: false,
                        });
                    }
                    if link.as_deref() != Some(base.as_path()) {
                        let repaired = repair && layout.set_base_link(id, Some(base)).is_ok();
                        findings.push(Finding {
                            problem: Problem::BaseLink { id, key },
                            repaired,
                        });
                    }
                }
                (None, Some(_)) => {
                    let repaired = repair && layout.set_base_link(id, None).is_ok();
                    findings.push(Finding {
                        problem: Problem::StrayBaseLink { id, key },
                        repaired,
                    });
                }
                (None, None) => {}
            }
        }
        if repair {
            // Under the write lock, as Cleanup does: nothing is being
            // installed, so every unknown directory is an orphan.
            trashed = layout
                .discard_unknown(|id| ids.contains(&id))
                .map_err(anyhow::Error::from)?;
            for f in &mut findings {
                if matches!(f.problem, Problem::OrphanDir(_)) {
                    f.repaired = true;
                }
            }
        }
        Ok(())
    })?;
    for p in trashed {
        layout::remove_all(&p).map_err(anyhow::Error::from)?;
    }
    if temporaries {
        for p in layout.temporaries().map_err(anyhow::Error::from)? {
            let repaired = repair && layout::remove_all(&p).is_ok();
            findings.push(Finding {
                problem: Problem::Leftover(p),
                repaired,
            });
        }
    }
    Ok(findings)
}
