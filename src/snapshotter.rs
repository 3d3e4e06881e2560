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
use std::os::fd::AsFd;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::backend::{self as backends, Backend};
use crate::base::{self, BasePolicy, BASE_LABEL};
use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::filter::{Fields, Filter};
use crate::idmap::{IdMapPolicy, IdMapping};
use crate::labels;
use crate::layout::{self, Layout, NewSnapshotDir, Pins};
use crate::limit::{self, Enforcer, Limit, LimitPolicy};
use crate::mounts::{self, Layers, Mount, OverlayOptions};
use crate::snapshot::{Id, Kind, Labels, Snapshot, Timestamp, Usage};
use crate::store::{NewSnapshot, Record, Store, Tx};
use crate::syncfs::SyncGroup;
use crate::watch::Watch;

/// What the core needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    /// Leave directories of removed snapshots for Cleanup to reclaim.
    pub async_remove: bool,
    pub overlay: OverlayOptions,
    /// Where host base directories may come from.
    pub base_roots: Vec<PathBuf>,
    /// Map ids when the labels ask (config `remap_ids`).
    pub remap_ids: bool,
    /// Make a layer's data durable before Commit answers (config
    /// `sync_layers`).
    pub sync_layers: bool,
    /// The size limit of containers' snapshots without a label (config
    /// `default_max_size`).
    pub default_max_size: Option<u64>,
    /// What enforces limits, when not the first that works here (config
    /// `limit_enforcer`).
    pub limit_enforcer: Option<Enforcer>,
}

/// What a snapshot's labels ask of its mounts.
#[derive(Debug, Clone, Default)]
pub struct MountAsks {
    volatile: bool,
    /// The id mapping the labels carry, before [`Snapshotter::idmap`]
    /// decides who applies it.
    mapping: IdMapping,
    /// An image layer being unpacked (see [`Layers::unpack`]).
    unpack: bool,
    /// The Prepare carries the labels of containerd's unpacker, with or
    /// without a parent: no default size limit applies.
    unpacker: bool,
}

/// The labels containerd's unpacker puts on the Prepare of every image
/// layer: `snapshot.ref` in every release, `parent-chain-id` from 2.3 on
/// layers that are unpacked without their parent.
const UNPACK_LABELS: [&str; 2] = [
    "containerd.io/snapshot.ref",
    "containerd.io/snapshot/parent-chain-id",
];

impl MountAsks {
    fn of(labels: &Labels) -> Result<MountAsks> {
        let unpacker = UNPACK_LABELS.iter().any(|l| labels.contains_key(*l));
        Ok(MountAsks {
            volatile: base::volatile(labels)?,
            mapping: IdMapping::from_labels(labels)?,
            unpack: unpacker,
            unpacker,
        })
    }
}

/// What Mounts read from the database, before any filesystem work.
#[derive(Debug, Clone)]
pub struct MountPlan {
    rec: Record,
    ancestors: Vec<Id>,
    asks: MountAsks,
}

impl MountPlan {
    /// Whether [`Snapshotter::mounts_for`] touches the filesystem (a host
    /// base to check and link, a volatile marker to clear, a caller's
    /// binary to read for an id mapping), which must not run on an async
    /// worker. Everything else is pure.
    pub fn touches_filesystem(&self) -> bool {
        self.rec.base.is_some()
            || self.asks.volatile
            || !self.asks.mapping.is_empty()
            || self.rec.in_loop_image()
    }
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
    sync_layers: bool,
    /// Commits share their syncfs calls (see `crate::syncfs`).
    layer_syncs: SyncGroup,
    /// Size limits: the default, and what enforces them here.
    limits: LimitPolicy,
    idmaps: IdMapPolicy,
    bases: BasePolicy,
    /// Which uppers changed, so Usage walks only those; none where
    /// fanotify is not allowed (see `crate::watch`).
    watch: Option<Watch>,
    /// Snapshots start-up found without their directory (see
    /// `crate::check::at_start`), for the metric.
    missing_trees: usize,
    _lock: layout::RootLock,
}

impl Snapshotter {
    /// Opens the root: locks it, repairs what a crash left, and checks that
    /// the filesystem is fit to serve. The database's full integrity check
    /// is [`Snapshotter::check_database`], which the server runs once it
    /// serves: at 100k snapshots it takes longer than everything else here.
    pub fn open(opts: Options) -> anyhow::Result<Snapshotter> {
        let layout = Layout::new(&opts.root);
        layout.create()?;
        let lock = layout.lock()?;
        let stale = layout.remove_stale_temporaries()?;
        if stale > 0 {
            tracing::info!(count = stale, "removed directories left by an earlier run");
        }
        layout.check_d_type()?;
        if opts.overlay.backend == Backend::FuseOverlayfs {
            backends::check_fuse(&layout.tmp_dir())?;
        }
        let limits = LimitPolicy::probe(
            layout.root(),
            &layout.tmp_dir(),
            opts.default_max_size,
            opts.limit_enforcer,
        )?;
        let store = Store::open(&layout.db_path())?;
        base::unpin_strays(&layout, &store)?;
        let reconciled = crate::check::at_start(&layout, &store)?;
        report_reconciled(&reconciled);
        hold_limits(&layout, &store)?;
        let watch = match Watch::start(layout.root(), &layout.own_dirs()) {
            Ok(watch) => {
                tracing::info!(
                    "usage: tracking changes with fanotify; Usage of an unchanged snapshot does not walk"
                );
                Some(watch)
            }
            Err(e) => {
                tracing::info!(error = %e, "usage: no fanotify here; every Usage walks the upper dir");
                None
            }
        };
        let layer_syncs = SyncGroup::new(layout.snapshots_dir());
        Ok(Snapshotter {
            bases: BasePolicy {
                allowed_roots: opts.base_roots,
                own_root: layout.root().to_path_buf(),
            },
            layout,
            store,
            idmaps: IdMapPolicy {
                backend: opts.overlay.backend,
                remap_ids: opts.remap_ids,
            },
            overlay: opts.overlay,
            async_remove: opts.async_remove,
            sync_layers: opts.sync_layers,
            layer_syncs,
            limits,
            watch,
            missing_trees: reconciled.missing.len(),
            _lock: lock,
        })
    }

    /// `ontop check` on the served root (see [`crate::check`]). `tmp/`
    /// and `trash/` are the daemon's own while it runs, so they are left out.
    pub fn check(&self, repair: bool) -> Result<Vec<crate::check::Finding>> {
        crate::check::run(&self.layout, &self.store, repair, false)
    }

    /// SQLite's `quick_check` of the whole database.
    pub fn check_database(&self) -> anyhow::Result<()> {
        self.store.quick_check()
    }

    pub fn backend(&self) -> Backend {
        self.overlay.backend
    }

    /// How many snapshots of each kind the database holds.
    pub fn counts_by_kind(&self) -> Result<Vec<(Kind, i64)>> {
        self.store.read(|tx| tx.counts_by_kind())
    }

    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        caller: Caller,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels, caller)
    }

    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        caller: Caller,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels, caller)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        caller: Caller,
    ) -> Result<Vec<Mount>> {
        require_key("key", key)?;
        let mut labels = labels::validate(labels)?;
        let mut asks = MountAsks::of(&labels)?;
        let unpacks = asks.unpacker || limit::unpack_key(key);
        let limit = limit::wanted(kind, &labels, unpacks, self.limits.default)?
            .map(|bytes| {
                Ok::<_, Error>(Limit {
                    bytes,
                    enforcer: self.limits.enforcer(bytes)?,
                })
            })
            .transpose()?;
        let idmap = self.idmaps.apply(&asks.mapping, caller)?;
        // The upper's root belongs to the container's root, unless
        // fuse-overlayfs maps it on the fly (see `crate::idmap`).
        let mapped_root = match (asks.mapping.is_empty(), self.idmaps.maps_itself(&idmap)) {
            (false, false) => Some(asks.mapping.root()?),
            _ => None,
        };
        asks.unpack &= kind == Kind::Active && parent.is_empty();
        // Resolved before any transaction: the label is untrusted input,
        // and a rejection must leave nothing behind.
        let requested_base = base::requested(&labels)
            .map(|p| self.bases.resolve(p))
            .transpose()?;
        let subvolume = limit.is_some_and(|l| l.enforcer == Enforcer::BtrfsQgroup);
        let mut dir = self
            .layout
            .new_snapshot_dir(kind, subvolume)
            .context("creating snapshot directory")?;
        if let Some(limit) = limit {
            enforce(&mut dir, limit)?;
        }
        let in_image = limit.is_some_and(|l| l.enforcer == Enforcer::LoopExt4);
        // Outside the write lock, so concurrent Prepares sync their trees
        // at once rather than one after another in the batch.
        dir.sync().context("syncing the new snapshot directory")?;
        let installed: Cell<Option<Id>> = Cell::new(None);
        // A project quota set in a transaction that did not commit.
        let quotaed: Cell<Option<(Id, Limit)>> = Cell::new(None);
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
            let inherited = parent_rec.as_ref().and_then(|p| p.base.clone());
            let base = match (requested_base, inherited) {
                (Some(asked), Some(chain)) if asked != chain => {
                    return Err(Error::invalid_argument(format!(
                        "base {}: parent {parent:?} already sits on base {}, and a chain has one base",
                        asked.display(),
                        chain.display()
                    )))
                }
                (Some(asked), _) => Some(asked),
                (None, Some(chain)) => {
                    // The base belongs to the chain: every descendant shows it.
                    let shown = base_label(tx, parent_rec.as_ref().expect("inherited from a parent"))?;
                    labels.insert(BASE_LABEL.to_string(), shown);
                    Some(chain)
                }
                (None, None) => None,
            };
            let pinned = base.as_deref().map(|b| self.bases.open(b)).transpose()?;
            let id = tx.insert(
                &NewSnapshot {
                    kind,
                    key,
                    parent_id,
                    base: base.as_deref(),
                    labels: &labels,
                    limit,
                },
                Timestamp::now(),
            )?;
            if let Some(l) = limit.filter(|l| l.enforcer == Enforcer::ProjectQuota) {
                quota_new_snapshot(&dir, id, l)?;
                quotaed.set(Some((id, l)));
            }
            let mut ancestors = Vec::new();
            if let Some(pid) = parent_id {
                ancestors.push(pid);
                ancestors.extend(tx.ancestors(pid)?);
                let (uid, gid) = self
                    .layout
                    .owner(pid)
                    .with_context(|| format!("reading the owner of parent {parent:?}"))?;
                chown(dir.upper(), Some(uid), Some(gid))
                    .context("copying the parent's root owner")?;
            } else if let Some(b) = &pinned {
                base::copy_root_attributes(b.as_fd(), &dir.upper())
                    .context("copying the root mode and owner of the base")?;
            }
            if let Some((uid, gid)) = mapped_root {
                chown(dir.upper(), Some(uid), Some(gid))
                    .context("giving the root to the container's root")?;
            }
            if let Some(b) = &pinned {
                dir.pin_base(b.as_fd()).context("pinning the base directory")?;
            }
            let layers = self.layers(
                kind,
                id,
                &ancestors,
                base.is_some(),
                in_image,
                &asks,
                idmap,
            );
            self.layout
                .install(dir, id)
                .with_context(|| format!("moving snapshot {id} into place"))?;
            installed.set(Some(id));
            // Durable at the answer: the row, and the tree it points at.
            // The tree was synced before the lock; its entry in snapshots/
            // (once for the whole batch) and the root's owner, if changed
            // here, are synced before the batch commits.
            if parent_id.is_some() || pinned.is_some() || mapped_root.is_some() {
                tx.sync_before_commit(self.layout.upper(id, in_image));
            }
            tx.sync_before_commit(self.layout.snapshots_dir());
            Ok(layers)
        });
        match result {
            Ok(layers) => Ok(mounts::build(&layers, &self.overlay)),
            Err(e) => {
                // The transaction rolled back, so nothing refers to the
                // directory we renamed into place: take it back out.
                if let Some(id) = installed.get() {
                    self.reclaim(id, Pins::Unknown);
                }
                if let Some((id, l)) = quotaed.get() {
                    let dir = self.layout.snapshot_dir(id);
                    if let Err(e) = limit::set_quota(l.enforcer, &dir, id, None) {
                        tracing::warn!(id, error = %e, "could not lift the quota of a snapshot that was not made");
                    }
                }
                Err(e)
            }
        }
    }

    pub fn mounts(&self, key: &str, caller: Caller) -> Result<Vec<Mount>> {
        let plan = self.store.read(|tx| self.mount_plan(tx, key))?;
        self.mounts_for(plan, caller)
    }

    /// What Mounts needs from the database, if a reader is free right now
    /// (see [`Store::try_read`]).
    pub fn try_mount_plan(&self, key: &str) -> Option<Result<MountPlan>> {
        self.store.try_read(|tx| self.mount_plan(tx, key))
    }

    fn mount_plan(&self, tx: &Tx<'_>, key: &str) -> Result<MountPlan> {
        let rec = tx.require(key)?;
        if rec.kind == Kind::Committed {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            )));
        }
        let labels = tx.labels(rec.id)?;
        let mut asks = MountAsks::of(&labels)?;
        asks.unpack &= rec.kind == Kind::Active && rec.parent_id.is_none();
        let ancestors = tx.ancestors(rec.id)?;
        Ok(MountPlan {
            rec,
            ancestors,
            asks,
        })
    }

    /// The mounts of a planned snapshot, after the filesystem work some
    /// need (see [`MountPlan::touches_filesystem`]).
    pub fn mounts_for(&self, plan: MountPlan, caller: Caller) -> Result<Vec<Mount>> {
        let MountPlan {
            rec,
            ancestors,
            asks,
        } = plan;
        let idmap = self.idmaps.apply(&asks.mapping, caller)?;
        if let Some(b) = &rec.base {
            // Every time: after a reboot the pin is gone, and the host may
            // have put a new directory at the base's path.
            self.bases.pin(&self.layout, &rec, b)?;
        }
        if rec.in_loop_image() {
            // Start-up mounts it; this is for a mount someone took away.
            self.layout.mount_limit_image(rec.id).map_err(|e| {
                match e.downcast_ref::<std::io::Error>() {
                    Some(io) if io.kind() == std::io::ErrorKind::NotFound => {
                        Error::not_found(format!("snapshot {:?} does not exist", rec.key))
                    }
                    _ => Error::Internal(
                        e.context(format!("mounting the size-limited layer of {:?}", rec.key)),
                    ),
                }
            })?;
        }
        let writable_overlay =
            rec.kind == Kind::Active && (rec.base.is_some() || !ancestors.is_empty());
        if asks.volatile && writable_overlay {
            // The kernel leaves this marker after a volatile mount and
            // refuses the same upper and work dirs again until it is gone.
            self.layout
                .clear_volatile_marker(rec.id, rec.in_loop_image())
                .context("clearing the volatile marker")?;
        }
        let layers = self.layers(
            rec.kind,
            rec.id,
            &ancestors,
            rec.base.is_some(),
            rec.in_loop_image(),
            &asks,
            idmap,
        );
        Ok(mounts::build(&layers, &self.overlay))
    }

    /// Commits `key` as `name`. A non-empty `parent` rebases: containerd
    /// 2.2+ unpacks an image's layers in parallel, each prepared without a
    /// parent, and names the parent at Commit. Only a snapshot prepared
    /// without one can get it; the committed snapshot then sits on the
    /// parent's chain, host base included.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        require_key("name", name)?;
        require_key("key", key)?;
        let labels = labels::validate(labels)?;
        // Measure the upper before taking the write lock: the walk can be
        // long, and containerd holds its own write transaction meanwhile.
        let (rec, volatile) = self.store.read(|tx| {
            let rec = check_commit(tx, name, key)?;
            let volatile = base::volatile(&tx.labels(rec.id)?)?;
            Ok((rec, volatile))
        })?;
        if rec.in_loop_image() {
            // A committed layer is an ordinary one: its tree leaves the
            // image for `fs`, outside the write lock, as the walk below.
            limit::loop_ext4::copy_tree(&self.layout.upper(rec.id, true), &self.layout.fs(rec.id))
                .with_context(|| {
                    format!("copying snapshot {key:?} out of its size-limited image")
                })?;
        }
        let measured = self.upper_usage(rec.id, false)?;
        if self.sync_layers && !volatile {
            // Durable before the answer: a committed layer that comes back
            // from a power cut with empty or short files is a corrupt image.
            // One syncfs beat an fsync of every file by 10-17x for layers of
            // small files (docs/guarantees.md); it runs outside the write
            // lock, and Commits waiting at once share one.
            self.layer_syncs
                .sync()
                .with_context(|| format!("syncing the data of snapshot {key:?}"))?;
        }
        // A quota is lifted before the transaction, and put back if it
        // fails: a crash in between leaves an active snapshot that
        // start-up limits again.
        let quota = rec
            .enforced_limit()
            .filter(|l| l.enforcer != Enforcer::LoopExt4);
        if let Some(l) = quota {
            limit::set_quota(l.enforcer, &self.layout.snapshot_dir(rec.id), rec.id, None)
                .with_context(|| format!("lifting the size limit of snapshot {key:?}"))?;
        }
        let committed = self.store.write(|tx| {
            // Checked again: another request may have won in between.
            let now = check_commit(tx, name, key)?;
            let usage = if now.id == rec.id {
                measured
            } else if now.enforced_limit().is_some() {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} was removed and prepared again while being committed; \
                     commit it again"
                )));
            } else {
                // Another snapshot took the key meanwhile (rare): measure
                // and sync it here, under the lock.
                if self.sync_layers && !base::volatile(&tx.labels(now.id)?)? {
                    self.layer_syncs
                        .sync()
                        .with_context(|| format!("syncing the data of snapshot {key:?}"))?;
                }
                self.upper_usage(now.id, false)?
            };
            let rebased = rebase_parent(tx, &now, parent)?;
            // The base belongs to the chain: the active snapshot's own, or
            // the one of the parent it is rebased on.
            let inherited = rebased.as_ref().filter(|p| p.base.is_some());
            let current = match (&now.base, inherited) {
                (Some(own), Some(p)) if Some(own) != p.base.as_ref() => {
                    return Err(Error::invalid_argument(format!(
                        "cannot commit {key:?} onto {parent:?}: it sits on base {}, and the parent \
                         on base {}; a chain has one base",
                        own.display(),
                        p.base.as_deref().unwrap_or(Path::new("")).display()
                    )))
                }
                (Some(_), _) => Some(base_label(tx, &now)?),
                (None, Some(p)) => Some(base_label(tx, p)?),
                (None, None) => None,
            };
            // Commit replaces labels, but keeps the base.
            let mut labels = labels;
            if let Some(asked) = base::requested(&labels) {
                if current.as_deref() != Some(asked) {
                    return Err(Error::failed_precondition(format!(
                        "cannot commit {key:?} with base {asked:?}: a base is set on Prepare, View \
                         or Update of the active snapshot, and Commit keeps it"
                    )));
                }
            }
            if let Some(current) = current {
                labels.insert(BASE_LABEL.to_string(), current);
            }
            if let Some(p) = &rebased {
                tracing::debug!(key, parent, "rebased at commit");
                tx.set_parent(now.id, p.id)?;
                if now.base.is_none() && p.base.is_some() {
                    tx.set_base(now.id, p.base.as_deref())?;
                }
            }
            tx.commit(now.id, name, &labels, usage, Timestamp::now())?;
            Ok(now.base.is_some().then_some(now.id))
        });
        let unpin = match committed {
            Ok(unpin) => unpin,
            Err(e) => {
                if let Some(l) = quota {
                    let dir = self.layout.snapshot_dir(rec.id);
                    if let Err(e) = limit::set_quota(l.enforcer, &dir, rec.id, Some(l.bytes)) {
                        tracing::warn!(id = rec.id, error = %e, "could not put back a size limit after a failed Commit; start-up will");
                    }
                }
                return Err(e);
            }
        };
        if rec.in_loop_image() {
            // The tree is in `fs` now. An image left by a failure or a
            // crash here is only space: start-up deletes it.
            if let Err(e) = self.layout.drop_limit_image(rec.id) {
                tracing::warn!(id = rec.id, error = %e, "could not delete the image of a committed snapshot; start-up will");
            }
        }
        // A committed snapshot has no mounts, so its pin goes: children
        // pin the base themselves. A pin left by a failure or a crash here
        // is only a mount too many, which start-up takes down.
        if let Some(id) = unpin {
            if let Err(e) = self.layout.unpin_base(id) {
                tracing::warn!(id, error = %e, "could not unpin the base of a committed snapshot");
            }
        }
        Ok(())
    }

    /// Durable at the answer: the row's deletion, by the batch's COMMIT.
    /// The directory goes afterwards and needs no sync: a power cut first
    /// leaves a directory without a row, which start-up clears.
    pub fn remove(&self, key: &str) -> Result<()> {
        // A project's limit outlives its files: it goes before the row, so
        // that a crash in between leaves a row that start-up limits again,
        // never a limit no row knows.
        let quota = match self.limits.chosen {
            Ok(Enforcer::ProjectQuota) => self
                .store
                .read(|tx| tx.record(key))?
                .and_then(|r| Some((r.id, r.enforced_limit()?)))
                .filter(|(_, l)| l.enforcer == Enforcer::ProjectQuota),
            _ => None,
        };
        if let Some((id, l)) = quota {
            limit::set_quota(l.enforcer, &self.layout.snapshot_dir(id), id, None)
                .with_context(|| format!("lifting the size limit of snapshot {key:?}"))?;
        }
        let removed = self.store.write(|tx| {
            let rec = tx.require(key)?;
            if tx.has_children(rec.id)? {
                return Err(Error::failed_precondition(format!(
                    "cannot remove snapshot {key:?}: other snapshots depend on it; remove them first"
                )));
            }
            tx.delete(rec.id)?;
            let pins = match rec.base {
                Some(_) => Pins::Unknown,
                None => Pins::None,
            };
            Ok((rec.id, pins))
        });
        let (id, pins) = match removed {
            Ok(removed) => removed,
            Err(e) => {
                if let Some((id, l)) = quota {
                    let dir = self.layout.snapshot_dir(id);
                    if let Err(e) = limit::set_quota(l.enforcer, &dir, id, Some(l.bytes)) {
                        tracing::warn!(id, error = %e, "could not put back a size limit after a failed Remove; start-up will");
                    }
                }
                return Err(e);
            }
        };
        if let Some(watch) = &self.watch {
            watch.forget(id);
        }
        if !self.async_remove {
            // The id is never reused, so the directory can go after commit.
            // A failure is not the client's: the key is gone, and Cleanup
            // reclaims whatever is left.
            self.reclaim(id, pins);
        }
        Ok(())
    }

    /// Where the applier mounts a snapshot it writes through (see
    /// src/private_mount.rs).
    pub fn private_mount_dir(&self) -> PathBuf {
        self.layout.private_mount_dir()
    }

    /// The active snapshot whose upper dir is `upper` (as a Mounts answer
    /// named it), for an applier to write a layer straight into; `None`
    /// when the path is not under this root's snapshots. A path of one of
    /// ours that is not an active snapshot's upper is refused: writing
    /// there would change a committed layer.
    pub fn active_upper(&self, upper: &Path) -> Result<Option<Id>> {
        let Ok(rest) = upper.strip_prefix(self.layout.snapshots_dir()) else {
            return Ok(None);
        };
        let id: Option<Id> = rest
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .and_then(|s| s.parse().ok());
        let not_upper = || {
            Error::invalid_argument(format!(
                "{} is not the upper dir of an active snapshot",
                upper.display()
            ))
        };
        let id = id.ok_or_else(not_upper)?;
        let rec = self
            .store
            .read(|tx| tx.record_by_id(id))?
            .ok_or_else(|| Error::not_found(format!("no snapshot owns {}", upper.display())))?;
        if rec.kind != Kind::Active {
            return Err(Error::failed_precondition(format!(
                "{} belongs to {} snapshot {:?}: layers are applied to active snapshots only",
                upper.display(),
                rec.kind.as_str(),
                rec.key
            )));
        }
        if self.layout.upper(id, rec.in_loop_image()) != upper {
            return Err(not_upper());
        }
        Ok(Some(id))
    }

    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        self.store.read(|tx| tx.snapshot(key))
    }

    /// Stat, if a reader is free right now (see [`Store::try_read`]).
    pub fn try_stat(&self, key: &str) -> Option<Result<Snapshot>> {
        self.store.try_read(|tx| tx.snapshot(key))
    }

    /// Updates labels, the only mutable field. `fieldpaths` empty or
    /// `labels` replaces them all; `labels.KEY` sets or, when the request
    /// has no value for KEY, deletes that one label.
    ///
    /// The base label changes only when the request names it: containerd
    /// replaces labels with its own record, which may not carry the base.
    /// Changing it is allowed on an active snapshot that does not inherit
    /// it; anywhere else children or parents depend on it.
    pub fn update(
        &self,
        key: &str,
        requested: HashMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Snapshot> {
        labels::check_update(key, &requested, fieldpaths)?;
        let names_base = labels::update_names(&requested, fieldpaths, BASE_LABEL);
        let names_limit = limit::update_names(&requested, fieldpaths);
        // The root's mode and owner before this Update took the new base's,
        // to put back if the transaction does not commit.
        let root_before = Cell::new(None);
        let result = self.store.write(|tx| {
            let rec = tx.require(key)?;
            let old = tx.labels(rec.id)?;
            let mut labels = labels::merge_update(&old, &requested, fieldpaths);
            labels::check_count(&labels)?;
            MountAsks::of(&labels)?;

            if !names_limit {
                // Like the base: containerd's record may not carry them.
                for l in [limit::MAX_SIZE_LABEL, limit::ONTOP_MAX_SIZE_LABEL] {
                    match old.get(l) {
                        Some(v) => labels.insert(l.to_string(), v.clone()),
                        None => labels.remove(l),
                    };
                }
            } else {
                self.change_limit(tx, &rec, limit::requested(&labels)?)?;
            }

            let old_base = old.get(BASE_LABEL).cloned();
            let mut new_base = None;
            if !names_base {
                match &old_base {
                    Some(v) => labels.insert(BASE_LABEL.to_string(), v.clone()),
                    None => labels.remove(BASE_LABEL),
                };
            } else if labels.get(BASE_LABEL) != old_base.as_ref() {
                self.check_base_change(tx, &rec)?;
                let resolved = base::requested(&labels)
                    .map(|p| self.bases.resolve(p))
                    .transpose()?;
                tx.set_base(rec.id, resolved.as_deref())?;
                let opened = resolved
                    .as_deref()
                    .map(|b| self.bases.open(b))
                    .transpose()?;
                if let (Some(dir), None) = (&opened, rec.parent_id) {
                    // A root without a parent shows the base's mode and
                    // owner. Changed and synced before the batch commits,
                    // so an acknowledged Update keeps them through a power
                    // cut; put back below if the batch does not commit.
                    let fs = self.layout.fs(rec.id);
                    let before = std::fs::metadata(&fs)
                        .with_context(|| format!("reading the root of snapshot {key:?}"))?;
                    root_before.set(Some((rec.id, before)));
                    base::copy_root_attributes(dir.as_fd(), &fs)
                        .context("copying the root mode and owner of the base")?;
                    tx.sync_before_commit(fs);
                }
                new_base = Some(opened);
            }

            let updated = Timestamp::now();
            tx.update_labels(rec.id, &labels, updated)?;
            let mut snap = rec.into_snapshot(labels);
            snap.updated = updated;
            Ok((snap, new_base))
        });
        let (snap, new_base) = match result {
            Ok(done) => done,
            Err(e) => {
                if let Some((id, before)) = root_before.take() {
                    self.restore_root(id, &before);
                }
                return Err(e);
            }
        };
        if let Some(new_base) = new_base {
            // After the commit, so a failure only warns: Mounts pins again
            // from the database, and refuses a base it cannot pin.
            let repinned = match &new_base {
                Some(dir) => self.layout.pin_base(snap.id, dir.as_fd()),
                None => self.layout.unpin_base(snap.id),
            };
            if let Err(e) = repinned {
                tracing::warn!(id = snap.id, error = %format!("{e:#}"), "could not pin the new base; the next Mounts will try again");
            }
        }
        Ok(snap)
    }

    /// Holds an active snapshot to the limit an Update's labels ask for:
    /// a limit can be raised; lowered only where the enforcer can and
    /// above what the snapshot holds; never added or lifted before
    /// Commit. Elsewhere the labels are only labels.
    fn change_limit(&self, tx: &Tx<'_>, rec: &Record, asked: Option<u64>) -> Result<()> {
        let key = &rec.key;
        let asked = asked.filter(|&n| n != 0);
        let current = match (rec.enforced_limit(), asked) {
            (_, _) if rec.kind != Kind::Active => return Ok(()),
            (None, None) => return Ok(()),
            (None, Some(n)) => {
                return Err(Error::failed_precondition(format!(
                    "cannot limit snapshot {key:?} to {}: a size limit is set when a snapshot is \
                     prepared, and this one has none",
                    limit::human(n)
                )))
            }
            (Some(l), None) => {
                return Err(Error::failed_precondition(format!(
                    "cannot lift the size limit of active snapshot {key:?} ({}): it can be raised, \
                     and goes at Commit",
                    limit::human(l.bytes)
                )))
            }
            (Some(l), Some(_)) => l,
        };
        let asked = asked.expect("matched above");
        if asked == current.bytes {
            return Ok(());
        }
        let dir = self.layout.snapshot_dir(rec.id);
        match current.enforcer {
            Enforcer::LoopExt4 if asked < current.bytes => {
                return Err(Error::failed_precondition(format!(
                    "cannot lower the size limit of snapshot {key:?} from {} to {}: its ext4 \
                     image can grow while mounted, not shrink",
                    limit::human(current.bytes),
                    limit::human(asked)
                )))
            }
            Enforcer::LoopExt4 if !limit::loop_ext4::can_grow() => {
                return Err(Error::failed_precondition(format!(
                    "cannot raise the size limit of snapshot {key:?}: growing its mounted ext4 \
                     image needs CAP_SYS_RESOURCE, which ontop does not have here"
                )))
            }
            Enforcer::LoopExt4 => limit::loop_ext4::grow(
                &self.layout.limit_image(rec.id),
                &self.layout.limit_dir(rec.id),
                asked,
            )
            .with_context(|| format!("growing the image of snapshot {key:?}"))?,
            Enforcer::BtrfsQgroup | Enforcer::ProjectQuota => {
                if asked < current.bytes {
                    let used = self.upper_usage(rec.id, false)?;
                    if used.size as u64 > asked {
                        return Err(Error::failed_precondition(format!(
                            "cannot lower the size limit of snapshot {key:?} to {}: it holds {} already",
                            limit::human(asked),
                            limit::human(used.size as u64)
                        )));
                    }
                }
                limit::set_quota(current.enforcer, &dir, rec.id, Some(asked))
                    .with_context(|| format!("setting the size limit of snapshot {key:?}"))?;
            }
        }
        tx.set_limit(rec.id, asked)
    }

    /// A base can change only on an active snapshot that does not inherit
    /// it: a committed one has children built on it, a view is immutable,
    /// and an inherited base belongs to the committed parent.
    fn check_base_change(&self, tx: &Tx<'_>, rec: &Record) -> Result<()> {
        if rec.kind != Kind::Active {
            return Err(Error::failed_precondition(format!(
                "the base of {} snapshot {:?} cannot change{}",
                rec.kind.as_str(),
                rec.key,
                if rec.kind == Kind::Committed {
                    ": snapshots built on it depend on it"
                } else {
                    ""
                }
            )));
        }
        if let Some(pid) = rec.parent_id {
            if tx.record_by_id(pid)?.and_then(|p| p.base).is_some() {
                return Err(Error::failed_precondition(format!(
                    "the base of snapshot {:?} is inherited from its parent {:?} and cannot change",
                    rec.key, rec.parent
                )));
            }
        }
        Ok(())
    }

    /// Calls `f` with every snapshot matching `filter`, one at a time from
    /// one consistent read, so a List of any size holds little memory.
    pub fn list_each(
        &self,
        filter: &Filter,
        mut f: impl FnMut(Snapshot) -> Result<()>,
    ) -> Result<()> {
        self.store.read(|tx| {
            tx.each(|rec, labels| {
                let s = rec.into_snapshot(labels);
                if filter.matches(&s) {
                    f(s)?;
                }
                Ok(())
            })
        })
    }

    /// An active snapshot's upper as it is now; a committed one's frozen at
    /// Commit; a view's is zero, since it never writes.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.store.read(|tx| tx.require(key))?;
        match rec.kind {
            Kind::Active => {
                let walk = || self.upper_usage(rec.id, rec.in_loop_image());
                let usage = match (&self.watch, rec.enforced_limit()) {
                    (Some(watch), None) => watch.usage(rec.id, walk),
                    // A limited upper is on a filesystem or subvolume of
                    // its own, which the watch does not see.
                    _ => walk(),
                };
                usage.map_err(|e| match e {
                    // Removed while we were about to walk it.
                    Error::Internal(_) if !self.layout.fs(rec.id).exists() => {
                        Error::not_found(format!("snapshot {key:?} does not exist"))
                    }
                    e => e,
                })
            }
            Kind::Committed => Ok(rec.usage),
            Kind::View => Ok(Usage::default()),
        }
    }

    /// Reclaims every directory under `snapshots/` the database does not
    /// know: those of snapshots removed with `async_remove`, and orphans of
    /// a crash.
    ///
    /// Nothing to make durable: a power cut mid-way leaves directories no
    /// row owns, for the next start-up or Cleanup.
    pub fn cleanup(&self) -> Result<()> {
        let trashed = self.store.write(|tx| {
            let ids = tx.ids()?;
            Ok(self
                .layout
                .discard_unknown(|id| ids.contains(&id))
                .context("moving unknown snapshot directories to the trash")?)
        })?;
        for path in trashed {
            // Measuring costs a walk: only when someone is counting.
            let size = match crate::metrics::enabled() {
                true => crate::usage::unobserved_disk_usage(&path).map_or(0, |u| u.size.max(0)),
                false => 0,
            };
            crate::removal::remove_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
            crate::metrics::cleanup_reclaimed(size as u64);
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
            record.usage = self.upper_usage(record.id, record.in_loop_image())?;
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
                r.usage = self
                    .upper_usage(r.id, r.in_loop_image())
                    .unwrap_or_default();
            }
        }
        Ok(all)
    }

    #[allow(clippy::too_many_arguments)]
    fn layers(
        &self,
        kind: Kind,
        id: Id,
        ancestors: &[Id],
        has_base: bool,
        in_image: bool,
        asks: &MountAsks,
        idmap: IdMapping,
    ) -> Layers {
        Layers {
            kind,
            upper: self.layout.upper(id, in_image),
            work: self.layout.upper_work(id, in_image),
            parents: ancestors.iter().map(|&p| self.layout.fs(p)).collect(),
            base: has_base.then(|| self.layout.base_dir(id)),
            volatile: asks.volatile,
            idmap,
            empty: self.layout.empty_dir(),
            unpack: asks.unpack,
        }
    }

    fn upper_usage(&self, id: Id, in_image: bool) -> Result<Usage> {
        tracing::debug!(id, "usage: walking the upper dir");
        let fs = self.layout.upper(id, in_image);
        Ok(crate::usage::disk_usage(&fs)
            .with_context(|| format!("measuring disk usage of {}", fs.display()))?)
    }

    /// Puts back a root's mode and owner after an Update that changed them
    /// did not commit. Best effort: the row still names the old base, and
    /// only the root's attributes are off.
    fn restore_root(&self, id: Id, before: &std::fs::Metadata) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let fs = self.layout.fs(id);
        let restored = chown(&fs, Some(before.uid()), Some(before.gid())).and_then(|()| {
            std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(before.mode() & 0o7777))
        });
        if let Err(e) = restored {
            tracing::warn!(id, error = %e, "could not put back the root's mode and owner after a failed Update");
        }
    }

    /// Deletes a snapshot directory the database no longer refers to.
    fn reclaim(&self, id: Id, pins: Pins) {
        let result = self
            .layout
            .discard(id, pins)
            .and_then(|p| p.map_or(Ok(()), |p| crate::removal::remove_all(&p)));
        if let Err(e) = result {
            tracing::warn!(id, error = %e, "could not remove snapshot directory; Cleanup will retry");
        }
    }
}

/// What a metrics scrape reads from the core.
impl crate::metrics::State for Snapshotter {
    fn snapshots_by_kind(&self) -> anyhow::Result<Vec<(&'static str, i64)>> {
        let counts = self.counts_by_kind()?;
        Ok(counts.into_iter().map(|(k, n)| (k.as_str(), n)).collect())
    }

    fn database_path(&self) -> PathBuf {
        self.layout.db_path()
    }

    fn pinned_bases(&self) -> Option<usize> {
        self.layout.pinned().ok().map(|p| p.len())
    }

    fn backend_name(&self) -> &'static str {
        self.backend().as_str()
    }

    fn missing_trees(&self) -> usize {
        self.missing_trees
    }

    fn limited_snapshots(&self) -> anyhow::Result<Vec<(&'static str, i64)>> {
        let counts = self.store.read(|tx| tx.limited_counts())?;
        Ok(Enforcer::ALL
            .iter()
            .map(|e| {
                let n = counts.iter().find(|(c, _)| c == e).map_or(0, |(_, n)| *n);
                (e.as_str(), n)
            })
            .collect())
    }
}

/// Gives a new snapshot, in the transaction that made its id, the project
/// that holds its limit.
fn quota_new_snapshot(dir: &NewSnapshotDir, id: Id, limit: Limit) -> Result<()> {
    let done = limit::project::assign(&dir.fs(), id)
        .and_then(|()| limit::project::assign(&dir.path().join("work"), id))
        .and_then(|()| limit::project::set_limit(dir.path(), id, Some(limit.bytes)));
    done.map_err(|e| {
        crate::metrics::limit_refused();
        Error::failed_precondition(format!(
            "a size limit of {} cannot be enforced with {}: {e}",
            limit::human(limit.bytes),
            limit.enforcer
        ))
    })
}

/// Sets up what holds a new snapshot's limit, before the transaction:
/// FailedPrecondition when it cannot be, so that nothing runs unlimited
/// that asked for a limit.
fn enforce(dir: &mut NewSnapshotDir, limit: Limit) -> Result<()> {
    let done = match limit.enforcer {
        Enforcer::LoopExt4 => dir.enclose_in_image(limit.bytes),
        Enforcer::BtrfsQgroup => {
            limit::btrfs::set_limit(dir.path(), Some(limit.bytes)).map_err(anyhow::Error::from)
        }
        // Needs the snapshot's id: see `quota_new_snapshot`.
        Enforcer::ProjectQuota => Ok(()),
    };
    done.map_err(|e| {
        crate::metrics::limit_refused();
        Error::failed_precondition(format!(
            "a size limit of {} cannot be enforced with {}: {e:#}",
            limit::human(limit.bytes),
            limit.enforcer
        ))
    })
}

/// Start-up: holds every active snapshot to its limit again (after a
/// reboot no loop image is mounted; a crash inside Commit may have
/// lifted a qgroup's), and deletes the images Commit lifted but a crash
/// kept. A failure only warns: Mounts mounts an image again, and says
/// why it cannot.
fn hold_limits(layout: &Layout, store: &Store) -> anyhow::Result<()> {
    for rec in store.read(|tx| tx.limited())? {
        let held = match (rec.enforced_limit(), rec.limit) {
            (Some(l), _) if l.enforcer == Enforcer::LoopExt4 => layout.mount_limit_image(rec.id),
            (Some(l), _) => limit::set_quota(
                l.enforcer,
                &layout.snapshot_dir(rec.id),
                rec.id,
                Some(l.bytes),
            )
            .map_err(Into::into),
            (None, Some(l)) if l.enforcer == Enforcer::LoopExt4 => {
                layout.drop_limit_image(rec.id).map_err(Into::into)
            }
            // A quota lifted at Commit, or by a Remove a crash cut short.
            (None, Some(l)) => {
                limit::set_quota(l.enforcer, &layout.snapshot_dir(rec.id), rec.id, None)
                    .map_err(Into::into)
            }
            _ => Ok(()),
        };
        if let Err(e) = held {
            tracing::warn!(
                id = rec.id,
                key = rec.key,
                error = format!("{e:#}"),
                "could not hold a snapshot's size limit at start-up"
            );
        }
    }
    Ok(())
}

/// Says loudly what start-up's reconciliation found, and deletes the
/// orphans it moved to the trash on a thread of their own, so that a big
/// one does not hold up serving.
fn report_reconciled(found: &crate::check::Reconciled) {
    if !found.missing.is_empty() {
        let shown: Vec<String> = found.missing.iter().take(20).map(Id::to_string).collect();
        tracing::error!(
            count = found.missing.len(),
            ids = %shown.join(","),
            "snapshots whose directory is gone: their data is lost; `ontop check` lists them"
        );
    }
    if found.orphans.is_empty() {
        return;
    }
    tracing::info!(
        count = found.orphans.len(),
        "removing snapshot directories no snapshot owns (left by a crash)"
    );
    let orphans = found.orphans.clone();
    std::thread::spawn(move || {
        for p in orphans {
            if let Err(e) = crate::removal::remove_all(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove; Cleanup will retry");
            }
        }
    });
}

/// containerd's filter strings (ORed), or InvalidArgument saying where one
/// is malformed.
pub fn parse_filters(filters: &[String]) -> Result<Filter> {
    Filter::parse_all(filters).map_err(Error::InvalidArgument)
}

/// The base label as shown on `rec`, which has a base.
fn base_label(tx: &Tx<'_>, rec: &Record) -> Result<String> {
    let shown = tx.labels(rec.id)?.remove(BASE_LABEL);
    Ok(shown.unwrap_or_else(|| {
        rec.base
            .as_deref()
            .map(|b| b.display().to_string())
            .unwrap_or_default()
    }))
}

/// The longest key or name ontop stores. containerd's own keys are a few
/// hundred bytes at most (a namespace, an id, a chain id).
const MAX_KEY_SIZE: usize = 4096;

fn require_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument(format!("{what} must not be empty")));
    }
    if key.len() > MAX_KEY_SIZE {
        let shown: String = key.chars().take(64).collect();
        return Err(Error::invalid_argument(format!(
            "{what} {shown:?}... is {} bytes; the limit is {MAX_KEY_SIZE}",
            key.len()
        )));
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

/// The parent a Commit rebases `active` on, if any, with containerd's
/// bolt store's rules and codes: naming the parent it already has is no
/// change; a different one is InvalidArgument; a missing parent is
/// NotFound, an uncommitted one FailedPrecondition.
fn rebase_parent(tx: &Tx<'_>, active: &Record, parent: &str) -> Result<Option<Record>> {
    if parent.is_empty() || parent == active.parent {
        return Ok(None);
    }
    if active.parent_id.is_some() {
        return Err(Error::invalid_argument(format!(
            "cannot change the parent of active snapshot {:?} from {:?} to {parent:?} on \
             commit: only a snapshot prepared without a parent can be given one",
            active.key, active.parent
        )));
    }
    let rec = tx.record(parent)?.ok_or_else(|| {
        Error::not_found(format!(
            "cannot commit {:?} onto parent {parent:?}: it does not exist",
            active.key
        ))
    })?;
    if rec.kind != Kind::Committed {
        return Err(Error::failed_precondition(format!(
            "cannot commit {:?} onto parent {parent:?}: it is {}, not committed",
            active.key,
            rec.kind.as_str()
        )));
    }
    Ok(Some(rec))
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
