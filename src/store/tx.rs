//! Every query, inside a read or write transaction, and the mapping of
//! rows to [`Record`]s: columns are read by name, and ontop's types carry
//! their own SQL conversions.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::limit::{Enforcer, Limit};
use crate::snapshot::{Id, Kind, Labels, Snapshot, Timestamp, Usage};

/// A snapshot row without its labels: what the hot paths need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: Id,
    pub kind: Kind,
    pub key: String,
    pub parent_id: Option<Id>,
    pub parent: String,
    pub created: Timestamp,
    pub updated: Timestamp,
    pub usage: Usage,
    /// The host base directory at the bottom of the stack, if any.
    pub base: Option<PathBuf>,
    /// The size limit: enforced while active, lifted at Commit.
    pub limit: Option<Limit>,
}

impl Record {
    /// The limit that holds now: an active snapshot's.
    pub fn enforced_limit(&self) -> Option<Limit> {
        self.limit.filter(|_| self.kind == Kind::Active)
    }

    /// Whether the upper and work dirs are in a loop image.
    pub fn in_loop_image(&self) -> bool {
        self.enforced_limit()
            .is_some_and(|l| l.enforcer == Enforcer::LoopExt4)
    }

    pub fn into_snapshot(self, labels: Labels) -> Snapshot {
        Snapshot {
            id: self.id,
            kind: self.kind,
            key: self.key,
            parent: self.parent,
            labels,
            created: self.created,
            updated: self.updated,
        }
    }
}

/// What `Tx::insert` needs to create a snapshot.
pub struct NewSnapshot<'a> {
    pub kind: Kind,
    pub key: &'a str,
    pub parent_id: Option<Id>,
    pub base: Option<&'a Path>,
    pub labels: &'a Labels,
    pub limit: Option<Limit>,
}

/// A connection inside a transaction, read or write, with the queries
/// ontop needs; a write's also collects the directories to make durable
/// before its batch commits (see [`Tx::sync_before_commit`]).
pub struct Tx<'a>(
    pub(super) &'a Connection,
    pub(super) Option<&'a RefCell<Vec<PathBuf>>>,
);

impl Tx<'_> {
    /// Has `dir` fsynced before the COMMIT that makes this write durable,
    /// once per batch however many writes ask: a row that points at a
    /// directory must never outlive a power cut that the directory does
    /// not. A directory gone by then was removed by a later write of the
    /// same batch, and is skipped.
    pub fn sync_before_commit(&self, dir: PathBuf) {
        match self.1 {
            Some(syncs) => syncs.borrow_mut().push(dir),
            None => debug_assert!(false, "sync_before_commit in a read transaction"),
        }
    }
}

const RECORD_COLUMNS: &str = "s.id AS id, s.kind AS kind, s.key AS key,
     s.parent_id AS parent_id, COALESCE(p.key, '') AS parent,
     s.created_ns AS created_ns, s.updated_ns AS updated_ns,
     s.size AS size, s.inodes AS inodes, s.base AS base,
     s.max_size AS max_size, s.limit_by AS limit_by
     FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id";

/// Where each column of [`RECORD_COLUMNS`] is in a statement: found by
/// name once per statement, then read by position on every row. (By name
/// on every row, List of 100k snapshots took 1.6 times as long.)
struct RecordColumns {
    id: usize,
    kind: usize,
    key: usize,
    parent_id: usize,
    parent: usize,
    created: usize,
    updated: usize,
    size: usize,
    inodes: usize,
    base: usize,
    max_size: usize,
    limit_by: usize,
}

impl RecordColumns {
    fn of(stmt: &rusqlite::Statement<'_>) -> rusqlite::Result<RecordColumns> {
        let at = |name| stmt.column_index(name);
        Ok(RecordColumns {
            id: at("id")?,
            kind: at("kind")?,
            key: at("key")?,
            parent_id: at("parent_id")?,
            parent: at("parent")?,
            created: at("created_ns")?,
            updated: at("updated_ns")?,
            size: at("size")?,
            inodes: at("inodes")?,
            base: at("base")?,
            max_size: at("max_size")?,
            limit_by: at("limit_by")?,
        })
    }

    fn read(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
        Ok(Record {
            id: r.get(self.id)?,
            kind: r.get(self.kind)?,
            key: r.get(self.key)?,
            parent_id: r.get(self.parent_id)?,
            parent: r.get(self.parent)?,
            created: r.get(self.created)?,
            updated: r.get(self.updated)?,
            usage: Usage {
                size: r.get(self.size)?,
                inodes: r.get(self.inodes)?,
            },
            base: r.get::<_, Option<SqlPath>>(self.base)?.map(|p| p.0),
            limit: match (
                r.get::<_, Option<i64>>(self.max_size)?,
                r.get::<_, Option<Enforcer>>(self.limit_by)?,
            ) {
                (Some(bytes), Some(enforcer)) => Some(Limit {
                    bytes: bytes as u64,
                    enforcer,
                }),
                _ => None,
            },
        })
    }
}

/// A kind is stored as containerd's enum number (1 view, 2 active, 3
/// committed), which the schema's CHECK holds to.
impl ToSql for Kind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(*self as i64))
    }
}

impl FromSql for Kind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let n = value.as_i64()?;
        Kind::from_i64(n)
            .ok_or_else(|| FromSqlError::Other(format!("unknown snapshot kind {n}").into()))
    }
}

/// An enforcer is stored as its number (1 loop-ext4, 2 btrfs-qgroup, 3
/// project-quota),
/// which the schema's CHECK holds to.
impl ToSql for Enforcer {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(*self as i64))
    }
}

impl FromSql for Enforcer {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let n = value.as_i64()?;
        Enforcer::from_i64(n)
            .ok_or_else(|| FromSqlError::Other(format!("unknown limit enforcer {n}").into()))
    }
}

/// Nanoseconds since the epoch, as an integer.
impl ToSql for Timestamp {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0))
    }
}

impl FromSql for Timestamp {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_i64().map(Timestamp)
    }
}

/// A path as its raw bytes, so that any path round-trips, not only UTF-8.
struct SqlPath(PathBuf);

impl FromSql for SqlPath {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(SqlPath(PathBuf::from(OsString::from_vec(
            value.as_blob()?.to_vec(),
        ))))
    }
}

fn path_bytes(p: Option<&Path>) -> Option<&[u8]> {
    p.map(|p| p.as_os_str().as_bytes())
}

impl Tx<'_> {
    /// Every kind with its number of snapshots, zeros included.
    pub fn counts_by_kind(&self) -> Result<Vec<(Kind, i64)>> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind")?;
        let mut counts: Vec<(Kind, i64)> = [Kind::View, Kind::Active, Kind::Committed]
            .into_iter()
            .map(|k| (k, 0))
            .collect();
        for row in stmt.query_map([], |r| Ok((r.get::<_, Kind>(0)?, r.get::<_, i64>(1)?)))? {
            let (kind, n) = row?;
            if let Some(slot) = counts.iter_mut().find(|(k, _)| *k == kind) {
                slot.1 = n;
            }
        }
        Ok(counts)
    }

    /// The record for `key`, or None.
    pub fn record(&self, key: &str) -> Result<Option<Record>> {
        let mut stmt = self
            .0
            .prepare_cached(&format!("SELECT {RECORD_COLUMNS} WHERE s.key = ?1"))?;
        let cols = RecordColumns::of(&stmt)?;
        Ok(stmt.query_row([key], |r| cols.read(r)).optional()?)
    }

    pub fn record_by_id(&self, id: Id) -> Result<Option<Record>> {
        let mut stmt = self
            .0
            .prepare_cached(&format!("SELECT {RECORD_COLUMNS} WHERE s.id = ?1"))?;
        let cols = RecordColumns::of(&stmt)?;
        Ok(stmt.query_row([id], |r| cols.read(r)).optional()?)
    }

    /// The record for `key`, or NotFound naming it.
    pub fn require(&self, key: &str) -> Result<Record> {
        self.record(key)?
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))
    }

    pub fn labels(&self, id: Id) -> Result<Labels> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT key, value FROM labels WHERE snapshot_id = ?1")?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The snapshot for `key` with its labels, or NotFound.
    pub fn snapshot(&self, key: &str) -> Result<Snapshot> {
        let rec = self.require(key)?;
        let labels = self.labels(rec.id)?;
        Ok(rec.into_snapshot(labels))
    }

    /// Ids of every ancestor of `id`, nearest first, in one recursive query.
    pub fn ancestors(&self, id: Id) -> Result<Vec<Id>> {
        let mut stmt = self.0.prepare_cached(
            "WITH RECURSIVE chain(id, parent_id, depth) AS (
                 SELECT id, parent_id, 0 FROM snapshots WHERE id = ?1
                 UNION ALL
                 SELECT s.id, s.parent_id, c.depth + 1
                 FROM snapshots s JOIN chain c ON s.id = c.parent_id
             )
             SELECT id FROM chain WHERE depth > 0 ORDER BY depth",
        )?;
        let rows = stmt.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn has_children(&self, id: Id) -> Result<bool> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM snapshots WHERE parent_id = ?1)")?;
        Ok(stmt.query_row([id], |r| r.get(0))?)
    }

    /// Inserts a new snapshot; `created == updated == now`. The caller has
    /// already checked that the key is free and the parent committed.
    pub fn insert(&self, new: &NewSnapshot<'_>, now: Timestamp) -> Result<Id> {
        let mut stmt = self.0.prepare_cached(
            "INSERT INTO snapshots (key, kind, parent_id, base, created_ns, updated_ns,
                 max_size, limit_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
        )?;
        stmt.execute(params![
            new.key,
            new.kind,
            new.parent_id,
            path_bytes(new.base),
            now,
            new.limit.map(|l| l.bytes as i64),
            new.limit.map(|l| l.enforcer),
        ])?;
        let labels = new.labels;
        let id = self.0.last_insert_rowid();
        self.insert_labels(id, labels)?;
        Ok(id)
    }

    /// Turns active snapshot `id` into committed snapshot `name`: new key,
    /// only the given labels, usage frozen, created and updated set to now.
    pub fn commit(
        &self,
        id: Id,
        name: &str,
        labels: &Labels,
        usage: Usage,
        now: Timestamp,
    ) -> Result<()> {
        let mut stmt = self.0.prepare_cached(
            "UPDATE snapshots SET key = ?2, kind = ?3, created_ns = ?4, updated_ns = ?4,
                 size = ?5, inodes = ?6
             WHERE id = ?1",
        )?;
        stmt.execute(params![
            id,
            name,
            Kind::Committed,
            now,
            usage.size,
            usage.inodes
        ])?;
        self.replace_labels(id, labels)
    }

    /// Puts `id`, prepared without a parent, on `parent` (Commit's
    /// rebase); the caller has checked that `parent` is committed.
    pub fn set_parent(&self, id: Id, parent: Id) -> Result<()> {
        self.0
            .prepare_cached("UPDATE snapshots SET parent_id = ?2 WHERE id = ?1")?
            .execute(params![id, parent])?;
        Ok(())
    }

    /// Replaces all labels of `id` and stamps `updated`.
    pub fn update_labels(&self, id: Id, labels: &Labels, now: Timestamp) -> Result<()> {
        let mut stmt = self
            .0
            .prepare_cached("UPDATE snapshots SET updated_ns = ?2 WHERE id = ?1")?;
        stmt.execute(params![id, now])?;
        self.replace_labels(id, labels)
    }

    /// Changes the base of `id`, which must have no children: they would
    /// keep the old one.
    pub fn set_base(&self, id: Id, base: Option<&Path>) -> Result<()> {
        let mut stmt = self
            .0
            .prepare_cached("UPDATE snapshots SET base = ?2 WHERE id = ?1")?;
        stmt.execute(params![id, path_bytes(base)])?;
        Ok(())
    }

    pub fn delete(&self, id: Id) -> Result<()> {
        let mut stmt = self
            .0
            .prepare_cached("DELETE FROM snapshots WHERE id = ?1")?;
        stmt.execute([id])?;
        Ok(())
    }

    /// Every snapshot record with its labels, in id order (oldest first):
    /// two queries whatever the count.
    pub fn all(&self) -> Result<Vec<(Record, Labels)>> {
        let mut out = Vec::new();
        self.each(|rec, labels| {
            out.push((rec, labels));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with every record and its labels, in id order, without
    /// holding them all in memory: two ordered cursors, merged.
    pub fn each(&self, mut f: impl FnMut(Record, Labels) -> Result<()>) -> Result<()> {
        let mut records = self
            .0
            .prepare_cached(&format!("SELECT {RECORD_COLUMNS} ORDER BY s.id"))?;
        let mut labels = self
            .0
            .prepare_cached("SELECT snapshot_id, key, value FROM labels ORDER BY snapshot_id")?;
        let cols = RecordColumns::of(&records)?;
        let mut records = records.query([])?;
        let mut labels = labels.query([])?;
        let next_label = |labels: &mut rusqlite::Rows<'_>| -> rusqlite::Result<_> {
            Ok(match labels.next()? {
                Some(r) => Some((
                    r.get::<_, Id>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                )),
                None => None,
            })
        };
        let mut pending = next_label(&mut labels)?;
        while let Some(row) = records.next()? {
            let rec = cols.read(row)?;
            let mut own = Labels::new();
            while let Some((id, k, v)) = pending.take() {
                if id > rec.id {
                    pending = Some((id, k, v));
                    break;
                }
                if id == rec.id {
                    own.insert(k, v);
                }
                pending = next_label(&mut labels)?;
            }
            f(rec, own)?;
        }
        Ok(())
    }

    /// What SQLite's integrity and foreign-key checks report; empty when
    /// the database is sound.
    pub fn database_problems(&self) -> Result<Vec<String>> {
        let mut problems: Vec<String> = self
            .0
            .prepare("PRAGMA integrity_check")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()?;
        problems.retain(|p| p != "ok");
        let broken = self
            .0
            .prepare("PRAGMA foreign_key_check")?
            .query_map([], |r| {
                Ok(format!(
                    "{} row {} refers to a missing {}",
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?.unwrap_or_default(),
                    r.get::<_, String>(2)?
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        problems.extend(broken);
        Ok(problems)
    }

    /// Committed snapshots that sit on a host base (their own or
    /// inherited): the only ones whose Commit took a pin down.
    pub fn committed_on_bases(&self) -> Result<Vec<Id>> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT id FROM snapshots WHERE kind = ?1 AND base IS NOT NULL")?;
        let rows = stmt.query_map([Kind::Committed], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every snapshot that has or had a size limit: the few start-up
    /// holds to their limit, or clears of what Commit lifted.
    pub fn limited(&self) -> Result<Vec<Record>> {
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} WHERE s.limit_by IS NOT NULL ORDER BY s.id"
        ))?;
        let cols = RecordColumns::of(&stmt)?;
        let rows = stmt.query_map([], |r| cols.read(r))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Active snapshots with a limit, by enforcer.
    pub fn limited_counts(&self) -> Result<Vec<(Enforcer, i64)>> {
        let mut stmt = self.0.prepare_cached(
            "SELECT limit_by, COUNT(*) FROM snapshots
             WHERE kind = ?1 AND limit_by IS NOT NULL GROUP BY limit_by",
        )?;
        let rows = stmt.query_map([Kind::Active], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Changes the bytes of `id`'s limit, which it has.
    pub fn set_limit(&self, id: Id, bytes: u64) -> Result<()> {
        let mut stmt = self.0.prepare_cached(
            "UPDATE snapshots SET max_size = ?2 WHERE id = ?1 AND limit_by IS NOT NULL",
        )?;
        stmt.execute(params![id, bytes as i64])?;
        Ok(())
    }

    /// The ids the database knows, for reconciling with the disk.
    pub fn ids(&self) -> Result<HashSet<Id>> {
        let mut stmt = self.0.prepare_cached("SELECT id FROM snapshots")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn replace_labels(&self, id: Id, labels: &Labels) -> Result<()> {
        let mut stmt = self
            .0
            .prepare_cached("DELETE FROM labels WHERE snapshot_id = ?1")?;
        stmt.execute([id])?;
        self.insert_labels(id, labels)
    }

    fn insert_labels(&self, id: Id, labels: &Labels) -> Result<()> {
        let mut stmt = self
            .0
            .prepare_cached("INSERT INTO labels (snapshot_id, key, value) VALUES (?1, ?2, ?3)")?;
        // Empty values mean "unset" in containerd and are never stored.
        for (k, v) in labels.iter().filter(|(_, v)| !v.is_empty()) {
            stmt.execute(params![id, k, v])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{new, open};

    use crate::snapshot::labels_of as labels;

    #[test]
    fn a_base_path_round_trips_as_raw_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let (_d, store) = open();
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"/srv/a,b:c \xff"));
        let id = store
            .write(|tx| {
                let none = Labels::new();
                let mut n = new(Kind::Active, "a", None, &none);
                n.base = Some(odd);
                tx.insert(&n, Timestamp::now())
            })
            .unwrap();
        assert_eq!(
            store.read(|tx| tx.require("a")).unwrap().base.as_deref(),
            Some(odd)
        );
        store.write(|tx| tx.set_base(id, None)).unwrap();
        assert_eq!(store.read(|tx| tx.require("a")).unwrap().base, None);
    }

    #[test]
    fn ids_are_never_reused_after_delete() {
        let (_d, store) = open();
        let now = Timestamp::now();
        let a = store
            .write(|tx| tx.insert(&new(Kind::Active, "a", None, &Labels::new()), now))
            .unwrap();
        store.write(|tx| tx.delete(a)).unwrap();
        let b = store
            .write(|tx| tx.insert(&new(Kind::Active, "a", None, &Labels::new()), now))
            .unwrap();
        assert!(b > a, "id {b} must be newer than removed id {a}");
    }

    #[test]
    fn ancestors_come_nearest_first() {
        let (_d, store) = open();
        let now = Timestamp::now();
        let (c1, c2, c3) = store
            .write(|tx| {
                let c1 = tx.insert(&new(Kind::Committed, "c1", None, &Labels::new()), now)?;
                let c2 = tx.insert(&new(Kind::Committed, "c2", Some(c1), &Labels::new()), now)?;
                let c3 = tx.insert(&new(Kind::Active, "c3", Some(c2), &Labels::new()), now)?;
                Ok((c1, c2, c3))
            })
            .unwrap();
        let chain = store.read(|tx| tx.ancestors(c3)).unwrap();
        assert_eq!(chain, vec![c2, c1]);
        assert_eq!(store.read(|tx| tx.ancestors(c1)).unwrap(), Vec::<Id>::new());
        let rec = store.read(|tx| tx.require("c3")).unwrap();
        assert_eq!(rec.parent, "c2");
        assert!(store.read(|tx| tx.has_children(c2)).unwrap());
        assert!(!store.read(|tx| tx.has_children(c3)).unwrap());
    }

    #[test]
    fn the_schema_refuses_to_orphan_a_child() {
        let (_d, store) = open();
        let now = Timestamp::now();
        let p = store
            .write(|tx| {
                let p = tx.insert(&new(Kind::Committed, "p", None, &Labels::new()), now)?;
                tx.insert(&new(Kind::Active, "c", Some(p), &Labels::new()), now)?;
                Ok(p)
            })
            .unwrap();
        assert!(store.write(|tx| tx.delete(p)).is_err());
        assert!(store.read(|tx| tx.record("p")).unwrap().is_some());
    }

    #[test]
    fn empty_label_values_are_never_stored() {
        let (_d, store) = open();
        let now = Timestamp::now();
        let id = store
            .write(|tx| {
                let l = labels(&[("keep", "1"), ("drop", "")]);
                tx.insert(&new(Kind::Active, "a", None, &l), now)
            })
            .unwrap();
        assert_eq!(
            store.read(|tx| tx.labels(id)).unwrap(),
            labels(&[("keep", "1")])
        );
    }

    #[test]
    fn commit_renames_freezes_usage_and_replaces_labels() {
        let (_d, store) = open();
        let t0 = Timestamp(1);
        let id = store
            .write(|tx| tx.insert(&new(Kind::Active, "a", None, &labels(&[("old", "1")])), t0))
            .unwrap();
        let usage = Usage {
            size: 4096,
            inodes: 3,
        };
        store
            .write(|tx| tx.commit(id, "c", &labels(&[("new", "2")]), usage, Timestamp(5)))
            .unwrap();
        let snap = store.read(|tx| tx.snapshot("c")).unwrap();
        assert_eq!(snap.id, id);
        assert_eq!(snap.kind, Kind::Committed);
        assert_eq!(snap.labels, labels(&[("new", "2")]));
        assert_eq!((snap.created, snap.updated), (Timestamp(5), Timestamp(5)));
        assert_eq!(store.read(|tx| tx.require("c")).unwrap().usage, usage);
        assert!(store.read(|tx| tx.record("a")).unwrap().is_none());
    }

    #[test]
    fn a_failed_write_rolls_back_everything() {
        let (_d, store) = open();
        let res: Result<()> = store.write(|tx| {
            tx.insert(
                &new(Kind::Active, "a", None, &Labels::new()),
                Timestamp::now(),
            )?;
            Err(Error::invalid_argument("boom"))
        });
        assert!(res.is_err());
        assert!(store.read(|tx| tx.record("a")).unwrap().is_none());
    }

    #[test]
    fn all_returns_labels_with_each_snapshot() {
        let (_d, store) = open();
        let now = Timestamp::now();
        store
            .write(|tx| {
                tx.insert(&new(Kind::Active, "a", None, &labels(&[("x", "1")])), now)?;
                tx.insert(&new(Kind::View, "b", None, &Labels::new()), now)?;
                Ok(())
            })
            .unwrap();
        let all = store.read(|tx| tx.all()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0.key, "a");
        assert_eq!(all[0].1, labels(&[("x", "1")]));
        assert!(all[1].1.is_empty());
    }

    #[test]
    fn committed_snapshots_on_bases_are_found_by_index_not_by_scan() {
        let (_d, store) = open();
        let plan: String = store
            .read(|tx| {
                Ok(tx.0.query_row(
                    "EXPLAIN QUERY PLAN SELECT id FROM snapshots WHERE kind = 3 AND base IS NOT NULL",
                    [],
                    |r| r.get::<_, String>(3),
                )?)
            })
            .unwrap();
        assert!(plan.contains("snapshots_on_bases"), "{plan}");
        let now = Timestamp::now();
        let odd = Path::new("/srv/base");
        let (on_base, _plain) = store
            .write(|tx| {
                let none = Labels::new();
                let mut n = new(Kind::Committed, "on-base", None, &none);
                n.base = Some(odd);
                let a = tx.insert(&n, now)?;
                let b = tx.insert(&new(Kind::Committed, "plain", None, &none), now)?;
                Ok((a, b))
            })
            .unwrap();
        assert_eq!(
            store.read(|tx| tx.committed_on_bases()).unwrap(),
            vec![on_base]
        );
    }
}
