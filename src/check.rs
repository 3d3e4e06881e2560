//! `ontop check`: the database against the disk.
//!
//! It finds what a crash, a full disk or a hand in the root can leave:
//! directories the database does not know, snapshots whose directories are
//! gone, base pins that hold another directory than the base's path now
//! shows or that should not be there, a host base that can no longer be
//! reached safely, size limits not in force or left behind, broken parent
//! links and a damaged database. With `repair` it
//! fixes what can be fixed without losing or inventing data, and reports
//! the rest as needing a person.
//!
//! It runs under the metadata write lock, so no snapshot is being created
//! or removed meanwhile: online through the daemon, or offline on a root no
//! daemon holds.

use std::fmt;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::base;
use crate::error::Result;
use crate::layout::Layout;
use crate::pin;
use crate::snapshot::{Id, Kind};
use crate::store::{Record, Store};

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// SQLite's integrity or foreign-key check failed.
    Database(String),
    /// A directory under `snapshots/` that no snapshot owns.
    OrphanDir(String),
    /// Left in `tmp/` or `trash/` by a crash.
    Leftover(PathBuf),
    /// A snapshot whose tree (`fs`) is gone: its data is lost. A view's
    /// or an active snapshot's can be made again, empty, over its
    /// parents; a committed one's cannot.
    MissingTree { id: Id, key: String, kind: Kind },
    /// An active snapshot without its overlay work dir.
    MissingWork { id: Id, key: String },
    /// The base pin holds a directory that is no longer at the base's path.
    /// (A missing pin is not a problem: Mounts pins, and a reboot drops
    /// every pin.)
    StaleBasePin { id: Id, key: String },
    /// A base pin, or anything at `snapshots/<id>/base`, on a snapshot
    /// with no mounts on a base: a committed one, or one without a base.
    StrayBasePin { id: Id, key: String },
    /// The host base cannot be reached safely: gone, not a directory, or
    /// behind a symlink.
    MissingBase { id: Id, key: String, why: String },
    /// An active snapshot's size limit is not in force: its loop image is
    /// not mounted, or its project's limit differs from the record.
    LimitNotHeld { id: Id, key: String, what: String },
    /// An active snapshot's loop image is gone, with what was written in it.
    LostImage { id: Id, key: String },
    /// What held a limit Commit lifted is still there: a loop image, or a
    /// project's limit.
    LimitLeftover { id: Id, key: String, what: String },
}

impl Problem {
    /// Whether `ontop check --repair` can fix it without losing more than
    /// is lost already.
    pub fn repairable(&self) -> bool {
        match self {
            Problem::MissingTree { kind, .. } => *kind != Kind::Committed,
            Problem::Database(_) | Problem::MissingBase { .. } | Problem::LostImage { .. } => false,
            Problem::OrphanDir(_)
            | Problem::Leftover(_)
            | Problem::MissingWork { .. }
            | Problem::StaleBasePin { .. }
            | Problem::StrayBasePin { .. }
            | Problem::LimitNotHeld { .. }
            | Problem::LimitLeftover { .. } => true,
        }
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
            Problem::MissingTree { id, key, kind } => match kind {
                Kind::Committed => write!(
                    f,
                    "committed snapshot {key:?} (id {id}) has lost its tree snapshots/{id}/fs, \
                     which cannot be made again: remove it and what is built on it, and pull \
                     or rebuild the image"
                ),
                Kind::Active => write!(
                    f,
                    "active snapshot {key:?} (id {id}) has lost its tree snapshots/{id}/fs, and \
                     what was written in it; --repair makes it again, empty over its parents"
                ),
                Kind::View => write!(
                    f,
                    "view {key:?} (id {id}) has lost its tree snapshots/{id}/fs; --repair \
                     makes it again (a view holds nothing of its own)"
                ),
            },
            Problem::MissingWork { id, key } => {
                write!(f, "active snapshot {key:?} (id {id}) has no work dir")
            }
            Problem::StaleBasePin { id, key } => write!(
                f,
                "snapshot {key:?} (id {id}): snapshots/{id}/base holds a directory that is \
                 no longer at the base's path"
            ),
            Problem::StrayBasePin { id, key } => write!(
                f,
                "snapshot {key:?} (id {id}) has snapshots/{id}/base but no base to mount"
            ),
            Problem::MissingBase { id, key, why } => write!(
                f,
                "snapshot {key:?} (id {id}): {why}; restore it, or remove the snapshot"
            ),
            Problem::LimitNotHeld { id, key, what } => {
                write!(f, "the size limit of snapshot {key:?} (id {id}) is not in force: {what}")
            }
            Problem::LostImage { id, key } => write!(
                f,
                "active snapshot {key:?} (id {id}) has lost its loop image snapshots/{id}/limit.img, \
                 and what was written in it: remove the snapshot"
            ),
            Problem::LimitLeftover { id, key, what } => write!(
                f,
                "snapshot {key:?} (id {id}) is committed, but {what} is still there"
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
                let problem = Problem::MissingTree {
                    id,
                    key: key.clone(),
                    kind: rec.kind,
                };
                let repaired = repair
                    && problem.repairable()
                    && recreate_tree(layout, rec)
                        .inspect_err(|e| {
                            tracing::warn!(id, error = %format!("{e:#}"), "could not make the lost tree again")
                        })
                        .is_ok();
                findings.push(Finding { problem, repaired });
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
            findings.extend(check_base(layout, rec, repair));
            findings.extend(check_limit(layout, rec, repair));
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
        crate::removal::remove_all(&p).map_err(anyhow::Error::from)?;
    }
    if temporaries {
        for p in layout.temporaries().map_err(anyhow::Error::from)? {
            let repaired = repair && crate::removal::remove_all(&p).is_ok();
            findings.push(Finding {
                problem: Problem::Leftover(p),
                repaired,
            });
        }
    }
    Ok(findings)
}

/// The limit of `rec` against what holds it: in force while active, gone
/// once committed. (A btrfs qgroup's limit is not read back: start-up
/// sets every active one again.)
fn check_limit(layout: &Layout, rec: &Record, repair: bool) -> Option<Finding> {
    use crate::limit::{project, Enforcer};
    let limit = rec.limit?;
    let (id, key) = (rec.id, rec.key.clone());
    let image = layout.limit_image(id);
    let mounted = pin::is_mount_point(&layout.limit_dir(id)).unwrap_or(false);
    let dir = layout.snapshot_dir(id);
    let finding = |problem: Problem, fix: &dyn Fn() -> anyhow::Result<()>| {
        let repaired = repair
            && fix()
                .inspect_err(|e| tracing::warn!(id, error = %format!("{e:#}"), "could not repair a size limit"))
                .is_ok();
        Some(Finding { problem, repaired })
    };
    match (rec.enforced_limit(), limit.enforcer) {
        (Some(_), Enforcer::LoopExt4) if !image.exists() => Some(Finding {
            problem: Problem::LostImage { id, key },
            repaired: false,
        }),
        (Some(_), Enforcer::LoopExt4) if !mounted => finding(
            Problem::LimitNotHeld {
                id,
                key,
                what: format!("its loop image is not mounted on snapshots/{id}/limit"),
            },
            &|| layout.mount_limit_image(id),
        ),
        (Some(l), Enforcer::ProjectQuota) => {
            let set = project::limit(&dir, id).ok()?;
            (set != l.bytes).then_some(())?;
            finding(
                Problem::LimitNotHeld {
                    id,
                    key,
                    what: format!(
                        "its project {} has a limit of {set} bytes, not {}",
                        project::project_of(id),
                        l.bytes
                    ),
                },
                &|| {
                    Ok(crate::limit::set_quota(
                        l.enforcer,
                        &dir,
                        id,
                        Some(l.bytes),
                    )?)
                },
            )
        }
        (None, Enforcer::LoopExt4) if mounted || image.exists() => finding(
            Problem::LimitLeftover {
                id,
                key,
                what: format!("its loop image snapshots/{id}/limit.img"),
            },
            &|| Ok(layout.drop_limit_image(id)?),
        ),
        (None, Enforcer::ProjectQuota) if project::limit(&dir, id).ok()? != 0 => finding(
            Problem::LimitLeftover {
                id,
                key,
                what: format!("the limit of its project {}", project::project_of(id)),
            },
            &|| Ok(crate::limit::set_quota(limit.enforcer, &dir, id, None)?),
        ),
        _ => None,
    }
}

/// What start-up found when it set the database against `snapshots/`.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Snapshots whose directory is gone: their data is lost.
    pub missing: Vec<Id>,
    /// Directories no snapshot owns, moved to the trash, to delete.
    pub orphans: Vec<PathBuf>,
}

/// Start-up's reconciliation of rows and directories: one listing of
/// `snapshots/` against the ids in the database. A directory no row owns
/// (a Prepare that crashed before its COMMIT) goes to the trash, as
/// Cleanup would send it. A row without its directory is only reported:
/// nothing can bring its data back, and `ontop check` says what to do.
/// `tmp/` holds nothing acknowledged (Prepare syncs its tree into
/// `snapshots/` before it answers), so emptying it loses nothing.
pub fn at_start(layout: &Layout, store: &Store) -> Result<Reconciled> {
    let mut found = Reconciled::default();
    store.write(|tx| {
        let ids = tx.ids()?;
        let names = layout.snapshot_dir_names().map_err(anyhow::Error::from)?;
        let on_disk: std::collections::HashSet<Id> = names
            .iter()
            .filter_map(|n| n.to_str()?.parse().ok())
            .collect();
        found.missing = ids
            .iter()
            .copied()
            .filter(|id| !on_disk.contains(id))
            .collect();
        found.missing.sort_unstable();
        // Under the write lock, as Cleanup does: nothing is being installed.
        found.orphans = layout
            .discard_unknown_of(&names, |id| ids.contains(&id))
            .map_err(anyhow::Error::from)?;
        Ok(())
    })?;
    Ok(found)
}

/// Makes a lost tree again, empty: the root takes the owner of the
/// parent's root, or of the base's, as Prepare gives it.
fn recreate_tree(layout: &Layout, rec: &Record) -> anyhow::Result<()> {
    layout.recreate_tree(rec.id, rec.kind)?;
    let fs = layout.fs(rec.id);
    if let Some(pid) = rec.parent_id {
        // A parent that lost its tree too has no owner to give.
        if let Ok((uid, gid)) = layout.owner(pid) {
            std::os::unix::fs::chown(&fs, Some(uid), Some(gid))?;
        }
    } else if let Some(b) = &rec.base {
        let dir = base::open_resolved(b)?;
        base::copy_root_attributes(dir.as_fd(), &fs)?;
    }
    Ok(())
}

/// The base of `rec`: reachable, and pinned only where a pin belongs.
fn check_base(layout: &Layout, rec: &Record, repair: bool) -> Option<Finding> {
    let (id, key) = (rec.id, rec.key.clone());
    let pin_dir = layout.base_dir(id);
    let dir = match rec.base.as_deref().map(base::open_resolved) {
        Some(Err(e)) => {
            return Some(Finding {
                problem: Problem::MissingBase {
                    id,
                    key,
                    why: e.to_string(),
                },
                repaired: false,
            })
        }
        Some(Ok(dir)) if rec.kind != Kind::Committed => dir,
        // No mounts on a base: nothing belongs at the pin's place.
        _ => {
            pin_dir.symlink_metadata().ok()?;
            return Some(Finding {
                problem: Problem::StrayBasePin { id, key },
                repaired: repair && layout.unpin_base(id).is_ok(),
            });
        }
    };
    let pinned = pin::is_mount_point(&pin_dir).unwrap_or(false);
    if pinned && pin::identity_at(&pin_dir).ok() != pin::identity(dir.as_fd()).ok() {
        return Some(Finding {
            problem: Problem::StaleBasePin { id, key },
            repaired: repair && layout.pin_base(id, dir.as_fd()).is_ok(),
        });
    }
    None
}

/// `ontop check --root`: the root's lock keeps a daemon from starting
/// meanwhile, and refuses a root a daemon serves.
pub fn offline(root: &std::path::Path, repair: bool) -> anyhow::Result<Vec<Finding>> {
    let layout = crate::layout::Layout::new(root);
    anyhow::ensure!(
        layout.db_path().exists(),
        "{} holds no ontop database",
        root.display()
    );
    let _lock = layout.lock().with_context(|| {
        format!(
            "{} is in use; check it through its daemon with --address",
            root.display()
        )
    })?;
    let store = crate::store::Store::open(&layout.db_path())?;
    Ok(run(&layout, &store, repair, true)?)
}

impl From<Finding> for crate::admin::v1::Finding {
    fn from(f: Finding) -> Self {
        crate::admin::v1::Finding {
            needs_person: !f.repaired && !f.problem.repairable(),
            problem: f.problem.to_string(),
            repaired: f.repaired,
        }
    }
}
