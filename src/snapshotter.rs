//! The snapshotter core: containerd's contract, and the order of metadata
//! transactions against filesystem steps.
//!
//! Every method is blocking (SQLite and file I/O); the gRPC layer runs them
//! off the async reactor. Ordering follows containerd's overlay snapshotter:
//! build a new directory in `tmp/`, then inside one write transaction insert
//! the row and rename the directory into place. If the transaction fails the
//! directory is moved back out, so a crash at any point leaves either a
//! committed snapshot with its directory, or an orphan directory that
//! start-up or Cleanup removes.

use std::cell::Cell;
use std::collections::HashMap;
use std::os::unix::fs::chown;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::error::{Error, Result};
use crate::filter::{Fields, Filter};
use crate::labels;
use crate::layout::{self, Layout};
use crate::mounts::{self, Layers, Mount, OverlayOptions};
use crate::snapshot::{Id, Kind, Labels, Snapshot, Timestamp, Usage};
use crate::store::{Record, Store, Tx};

/// What the core needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    /// Leave directories of removed snapshots for Cleanup to reclaim.
    pub async_remove: bool,
    pub overlay: OverlayOptions,
}

/// What `ontop info` shows of one snapshot.
#[derive(Debug, Clone)]
pub struct Info {
    pub record: Record,
    pub labels: Labels,
    pub chain: Vec<Record>,
    pub path: PathBuf,
}

pub struct Snapshotter {
    layout: Layout,
    store: Store,
    overlay: OverlayOptions,
    async_remove: bool,
    _lock: layout::RootLock,
}

impl Snapshotter {
    /// Opens the root: locks it, repairs what a crash left, and checks that
    /// the filesystem and database are fit to serve.
    pub fn open(opts: Options) -> anyhow::Result<Snapshotter> {
        let layout = Layout::new(&opts.root);
        layout.create()?;
        let lock = layout.lock()?;
        let stale = layout.remove_stale_temporaries()?;
        if stale > 0 {
            tracing::info!(count = stale, "removed directories left by an earlier run");
        }
        layout.check_d_type()?;
        let store = Store::open(&layout.db_path())?;
        store.quick_check()?;
        Ok(Snapshotter {
            layout,
            store,
            overlay: opts.overlay,
            async_remove: opts.async_remove,
            _lock: lock,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        require_key("key", key)?;
        let labels = labels::validate(labels)?;
        let dir = self
            .layout
            .new_snapshot_dir(kind)
            .context("creating snapshot directory")?;
        let installed: Cell<Option<Id>> = Cell::new(None);
        let result = self.store.write(|tx| {
            // containerd checks the parent before the key.
            let parent_rec = match parent {
                "" => None,
                p => Some(committed_parent(tx, p)?),
            };
            if tx.record(key)?.is_some() {
                return Err(Error::already_exists(format!(
                    "snapshot {key:?} already exists"
                )));
            }
            let parent_id = parent_rec.as_ref().map(|p| p.id);
            let id = tx.insert(kind, key, parent_id, &labels, Timestamp::now())?;
            let mut lowers = Vec::new();
            if let Some(pid) = parent_id {
                lowers.push(pid);
                lowers.extend(tx.ancestors(pid)?);
                let (uid, gid) = self
                    .layout
                    .owner(pid)
                    .with_context(|| format!("reading the owner of parent {parent:?}"))?;
                chown(dir.fs(), Some(uid), Some(gid)).context("copying the parent's root owner")?;
            }
            let record_layers = self.layers(kind, id, &lowers);
            self.layout
                .install(dir, id)
                .with_context(|| format!("moving snapshot {id} into place"))?;
            installed.set(Some(id));
            Ok(record_layers)
        });
        match result {
            Ok(layers) => Ok(mounts::build(&layers, &self.overlay)),
            Err(e) => {
                // The transaction rolled back, so nothing refers to the
                // directory we renamed into place: take it back out.
                if let Some(id) = installed.get() {
                    self.reclaim(id);
                }
                Err(e)
            }
        }
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let layers = self.store.read(|tx| {
            let rec = tx.require(key)?;
            if rec.kind == Kind::Committed {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} is committed; only active snapshots and views have mounts"
                )));
            }
            Ok(self.layers(rec.kind, rec.id, &tx.ancestors(rec.id)?))
        })?;
        Ok(mounts::build(&layers, &self.overlay))
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        require_key("name", name)?;
        require_key("key", key)?;
        let labels = labels::validate(labels)?;
        // Measure the upper before taking the write lock: the walk can be
        // long, and containerd holds its own write transaction meanwhile.
        let rec = self.store.read(|tx| check_commit(tx, name, key))?;
        let measured = self.upper_usage(rec.id)?;
        self.store.write(|tx| {
            // Checked again: another request may have won in between.
            let now = check_commit(tx, name, key)?;
            let usage = if now.id == rec.id {
                measured
            } else {
                self.upper_usage(now.id)?
            };
            tx.commit(now.id, name, &labels, usage, Timestamp::now())
        })
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let id = self.store.write(|tx| {
            let rec = tx.require(key)?;
            if tx.has_children(rec.id)? {
                return Err(Error::failed_precondition(format!(
                    "cannot remove snapshot {key:?}: other snapshots depend on it; remove them first"
                )));
            }
            tx.delete(rec.id)?;
            Ok(rec.id)
        })?;
        if !self.async_remove {
            // The id is never reused, so the directory can go after commit.
            // A failure is not the client's: the key is gone, and Cleanup
            // reclaims whatever is left.
            self.reclaim(id);
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        self.store.read(|tx| tx.snapshot(key))
    }

    /// Updates labels, the only mutable field. `fieldpaths` empty or
    /// `labels` replaces them all; `labels.KEY` sets or, when the request
    /// has no value for KEY, deletes that one label.
    pub fn update(
        &self,
        key: &str,
        requested: HashMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Snapshot> {
        for path in fieldpaths {
            if path != "labels" && !path.starts_with("labels.") {
                return Err(Error::invalid_argument(format!(
                    "cannot update field {path:?} of snapshot {key:?}: only \"labels\" and \"labels.<key>\" can be updated"
                )));
            }
        }
        for (k, v) in &requested {
            labels::check_size(k, v)?;
        }
        self.store.write(|tx| {
            let mut snap = tx.snapshot(key)?;
            if fieldpaths.is_empty() {
                snap.labels = requested.clone().into_iter().collect();
            }
            for path in fieldpaths {
                match path.strip_prefix("labels.") {
                    None => snap.labels = requested.clone().into_iter().collect(),
                    Some(k) => match requested.get(k) {
                        Some(v) => {
                            snap.labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            snap.labels.remove(k);
                        }
                    },
                }
            }
            snap.labels.retain(|_, v| !v.is_empty());
            snap.updated = Timestamp::now();
            tx.update_labels(snap.id, &snap.labels, snap.updated)?;
            Ok(snap)
        })
    }

    /// Every snapshot matching containerd `filters` (ORed strings of ANDed
    /// selectors).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Snapshot>> {
        let filter = Filter::parse_all(filters).map_err(Error::InvalidArgument)?;
        let all = self.store.read(|tx| tx.all())?;
        Ok(all
            .into_iter()
            .map(|(rec, labels)| rec.into_snapshot(labels))
            .filter(|s| filter.matches(s))
            .collect())
    }

    /// An active snapshot's upper as it is now; a committed one's frozen at
    /// Commit; a view's is zero, since it never writes.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.store.read(|tx| tx.require(key))?;
        match rec.kind {
            Kind::Active => self.upper_usage(rec.id).map_err(|e| match e {
                // Removed while we were about to walk it.
                Error::Internal(_) if !self.layout.fs(rec.id).exists() => {
                    Error::not_found(format!("snapshot {key:?} does not exist"))
                }
                e => e,
            }),
            Kind::Committed => Ok(rec.usage),
            Kind::View => Ok(Usage::default()),
        }
    }

    /// Reclaims every directory under `snapshots/` the database does not
    /// know: those of snapshots removed with `async_remove`, and orphans of
    /// a crash.
    pub fn cleanup(&self) -> Result<()> {
        let trashed = self.store.write(|tx| {
            let ids = tx.ids()?;
            Ok(self
                .layout
                .discard_unknown(|id| ids.contains(&id))
                .context("moving unknown snapshot directories to the trash")?)
        })?;
        for path in trashed {
            layout::remove_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    /// One snapshot with its current usage, its ancestors (nearest first)
    /// and its directory, for `ontop info`.
    pub fn info(&self, key: &str) -> Result<Info> {
        let (mut record, labels, chain) = self.store.read(|tx| {
            let rec = tx.require(key)?;
            let labels = tx.labels(rec.id)?;
            let mut chain = Vec::new();
            for id in tx.ancestors(rec.id)? {
                chain.extend(tx.record_by_id(id)?);
            }
            Ok((rec, labels, chain))
        })?;
        if record.kind == Kind::Active {
            record.usage = self.upper_usage(record.id)?;
        }
        let path = self.layout.snapshot_dir(record.id);
        Ok(Info {
            record,
            labels,
            chain,
            path,
        })
    }

    /// Every record with its labels and current usage, for `ontop ls`.
    pub fn records(&self) -> Result<Vec<(Record, Labels)>> {
        let mut all = self.store.read(|tx| tx.all())?;
        for (r, _) in &mut all {
            if r.kind == Kind::Active {
                r.usage = self.upper_usage(r.id).unwrap_or_default();
            }
        }
        Ok(all)
    }

    fn layers(&self, kind: Kind, id: Id, ancestors: &[Id]) -> Layers {
        Layers {
            kind,
            upper: self.layout.fs(id),
            work: self.layout.work(id),
            lowers: ancestors.iter().map(|&p| self.layout.fs(p)).collect(),
        }
    }

    fn upper_usage(&self, id: Id) -> Result<Usage> {
        let fs = self.layout.fs(id);
        Ok(crate::usage::disk_usage(&fs)
            .with_context(|| format!("measuring disk usage of {}", fs.display()))?)
    }

    /// Deletes a snapshot directory the database no longer refers to.
    fn reclaim(&self, id: Id) {
        let result = self
            .layout
            .discard(id)
            .and_then(|p| p.map_or(Ok(()), |p| layout::remove_all(&p)));
        if let Err(e) = result {
            tracing::warn!(id, error = %e, "could not remove snapshot directory; Cleanup will retry");
        }
    }
}

fn require_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument(format!("{what} must not be empty")));
    }
    Ok(())
}

fn committed_parent(tx: &Tx<'_>, parent: &str) -> Result<Record> {
    let rec = tx
        .record(parent)?
        .ok_or_else(|| Error::not_found(format!("parent snapshot {parent:?} does not exist")))?;
    if rec.kind != Kind::Committed {
        return Err(Error::invalid_argument(format!(
            "parent snapshot {parent:?} is {}, not committed; only committed snapshots can be parents",
            rec.kind.as_str()
        )));
    }
    Ok(rec)
}

/// Commit's checks, in containerd's order: the name is free, the key
/// exists, the key is active.
fn check_commit(tx: &Tx<'_>, name: &str, key: &str) -> Result<Record> {
    if tx.record(name)?.is_some() {
        return Err(Error::already_exists(format!(
            "cannot commit to {name:?}: a snapshot with that name already exists"
        )));
    }
    let rec = tx.require(key)?;
    if rec.kind != Kind::Active {
        return Err(Error::failed_precondition(format!(
            "snapshot {key:?} is {}, not active; only active snapshots can be committed",
            rec.kind.as_str()
        )));
    }
    Ok(rec)
}

/// The fields containerd's filter language can see on a snapshot.
impl Fields for Snapshot {
    fn field(&self, path: &[String]) -> Option<&str> {
        match path.first()?.as_str() {
            "kind" => Some(self.kind.as_str()),
            "name" => Some(&self.key),
            "parent" => Some(&self.parent),
            "labels" => self.labels.get(&path[1..].join(".")).map(String::as_str),
            _ => None,
        }
    }
}
