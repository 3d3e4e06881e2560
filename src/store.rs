//! The SQLite metadata store: schema, migrations and every query.
//!
//! It knows snapshots, their parent links, labels and frozen usage. It knows
//! nothing about directories or mounts: the snapshotter orchestrates those
//! around the transactions this module hands out.
//!
//! One writer connection serialises mutations; a few reader connections
//! serve Stat, Mounts and List from WAL snapshots without waiting on
//! writers, or on each other.
//!
//! Writes are group-committed. Each mutation runs in its own savepoint,
//! and the durable COMMIT (the fsync) is shared: a caller that finds others
//! queued behind it leaves the transaction open for them and waits, and the
//! last in the queue commits for all. One client alone commits at once, as
//! before; sixteen share one fsync. No caller returns before the COMMIT
//! that holds its work, so every acknowledged RPC is still durable.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::error::{Error, Result};
use crate::snapshot::{Id, Kind, Labels, Snapshot, Timestamp, Usage};

/// Schema migrations, applied in order. `PRAGMA user_version` records how
/// many have run. Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: snapshots and labels.
    //
    // AUTOINCREMENT, not plain rowid: containerd reuses keys right after
    // Remove, and a reused id would collide with a directory that async
    // removal has not reclaimed yet.
    //
    // parent_id has no ON DELETE action, so SQLite itself refuses to orphan
    // a child even if a caller forgets to check.
    "CREATE TABLE snapshots (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        key        TEXT    NOT NULL UNIQUE,
        kind       INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
        parent_id  INTEGER REFERENCES snapshots(id),
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL,
        size       INTEGER NOT NULL DEFAULT 0,
        inodes     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX snapshots_parent ON snapshots(parent_id);
    CREATE TABLE labels (
        snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        key         TEXT    NOT NULL,
        value       TEXT    NOT NULL CHECK (value <> ''),
        PRIMARY KEY (snapshot_id, key)
    ) WITHOUT ROWID;",
    // 2: host base directories. The canonical path of the host directory
    // under the snapshot's stack (own or inherited from its parent), as raw
    // bytes so any path round-trips.
    "ALTER TABLE snapshots ADD COLUMN base BLOB;",
];

/// The most mutations one COMMIT carries.
const MAX_BATCH: usize = 64;

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
}

impl Record {
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

pub struct Store {
    writer: Mutex<Writer>,
    /// Signalled when a batch commits (or fails to).
    committed: Condvar,
    /// Callers between wanting the writer and holding it.
    queued: AtomicUsize,
    readers: Vec<Mutex<Connection>>,
}

/// Reader connections: a long List holds one while Stats use the others.
const READERS: usize = 4;

/// The writer connection and its group-commit state.
struct Writer {
    conn: Connection,
    /// A transaction is open, holding work of callers waiting for COMMIT.
    open: bool,
    /// The open (or next) batch's outcome, shared with its callers, and
    /// how many mutations it holds.
    batch: Arc<Outcome>,
    in_batch: usize,
}

/// How a batch ended: Ok, or its COMMIT's error. Unset while open.
type Outcome = OnceLock<std::result::Result<(), String>>;

impl Writer {
    /// Commits the open transaction for everyone in it.
    fn finish(&mut self) -> rusqlite::Result<()> {
        let started = std::time::Instant::now();
        let result = self.conn.execute_batch("COMMIT");
        crate::metrics::group_commit(self.in_batch, started.elapsed());
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.end_batch(result.as_ref().err().map(|e| e.to_string()));
        result
    }

    fn end_batch(&mut self, failure: Option<String>) {
        let _ = self.batch.set(failure.map_or(Ok(()), Err));
        self.batch = Arc::new(Outcome::new());
        self.open = false;
        self.in_batch = 0;
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        restrict_mode(path)?;
        let writer = open_connection(path)?;
        migrate(&writer).with_context(|| format!("migrating {}", path.display()))?;
        let readers = (0..READERS)
            .map(|_| open_connection(path).map(Mutex::new))
            .collect::<anyhow::Result<_>>()?;
        Ok(Store {
            writer: Mutex::new(Writer {
                conn: writer,
                open: false,
                batch: Arc::new(Outcome::new()),
                in_batch: 0,
            }),
            committed: Condvar::new(),
            queued: AtomicUsize::new(0),
            readers,
        })
    }

    /// Runs `PRAGMA quick_check`, failing with what SQLite reported.
    pub fn quick_check(&self) -> anyhow::Result<()> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare("PRAGMA quick_check")?;
        let problems: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()?;
        if problems != ["ok"] {
            anyhow::bail!("database integrity check failed: {}", problems.join("; "));
        }
        Ok(())
    }

    /// Runs `f` atomically in a write transaction and returns once its work
    /// is durably committed. When `f` fails, or this returns any error,
    /// nothing of `f` is in the database, so the caller can undo its
    /// filesystem side.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let locked = self.writer.lock();
        self.queued.fetch_sub(1, Ordering::SeqCst);
        let mut w = locked.map_err(|_| anyhow::anyhow!("metadata writer lock poisoned"))?;
        let out = Self::run_in_savepoint(&mut w, f);
        let batch = Arc::clone(&w.batch);
        if !w.open {
            // BEGIN failed, or the batch was dropped: tell its waiters.
            self.committed.notify_all();
            return out;
        }
        // Last in the queue, or a batch big enough that its first callers
        // have waited long enough: commit for everyone in it.
        if self.queued.load(Ordering::SeqCst) == 0 || w.in_batch >= MAX_BATCH {
            let committed = w.finish();
            self.committed.notify_all();
            committed?;
            return out;
        }
        // Someone queued behind us commits the batch, ours included.
        let value = out?;
        while batch.get().is_none() {
            let (guard, timeout) = self
                .committed
                .wait_timeout(w, Duration::from_secs(1))
                .map_err(|_| anyhow::anyhow!("metadata writer lock poisoned"))?;
            w = guard;
            // Whoever was queued has gone without committing (it cannot,
            // but a stuck batch must never hang its callers): commit it.
            if timeout.timed_out()
                && w.open
                && Arc::ptr_eq(&w.batch, &batch)
                && self.queued.load(Ordering::SeqCst) == 0
            {
                let committed = w.finish();
                self.committed.notify_all();
                committed?;
            }
        }
        match batch.get() {
            Some(Err(e)) => Err(Error::Internal(anyhow::anyhow!(
                "committing the metadata transaction: {e}"
            ))),
            _ => Ok(value),
        }
    }

    /// Runs `f` in a savepoint of the open batch, opening one if needed;
    /// a failing `f` leaves the batch as it found it.
    fn run_in_savepoint<T>(w: &mut Writer, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        if !w.open {
            w.conn.execute_batch("BEGIN IMMEDIATE")?;
            w.open = true;
        }
        w.conn.execute_batch("SAVEPOINT op")?;
        w.in_batch += 1;
        let out = f(&Tx(&w.conn));
        let closed = match out {
            Ok(_) => w.conn.execute_batch("RELEASE op"),
            Err(_) => w.conn.execute_batch("ROLLBACK TO op; RELEASE op"),
        };
        if let Err(e) = closed {
            // The savepoint is gone or in an unknown state (SQLite rolls a
            // whole transaction back on some errors, such as a full disk):
            // drop the batch, which fails everyone in it, rather than
            // commit half of it.
            let _ = w.conn.execute_batch("ROLLBACK");
            w.end_batch(Some(e.to_string()));
            return Err(e.into());
        }
        out
    }

    /// Runs `f` on a consistent read snapshot of the database.
    pub fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let conn = match self.free_reader() {
            Some(conn) => conn,
            None => self.reader()?,
        };
        Self::read_on(conn, f)
    }

    /// Like `read`, but only if a reader connection is free right now, so
    /// that an async caller never waits on a lock: None otherwise.
    ///
    /// The rule for running a read inline on an async worker, which is
    /// what this is for: only a read of a bounded number of rows by key
    /// (Stat, Mounts' plan), that touches no file and takes no lock it
    /// could wait on. Anything that may walk a tree, scan the table, write,
    /// or wait for a connection goes to the blocking pool, where a slow
    /// call holds one pool thread, not a worker serving every connection.
    pub fn try_read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Option<Result<T>> {
        self.free_reader().map(|conn| Self::read_on(conn, f))
    }

    fn read_on<T>(
        mut conn: MutexGuard<'_, Connection>,
        f: impl FnOnce(&Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&Tx(&tx))
    }

    fn free_reader(&self) -> Option<MutexGuard<'_, Connection>> {
        self.readers.iter().find_map(|r| r.try_lock().ok())
    }

    fn reader(&self) -> anyhow::Result<MutexGuard<'_, Connection>> {
        self.readers[0]
            .lock()
            .map_err(|_| anyhow::anyhow!("metadata reader lock poisoned"))
    }
}

/// Creates the database file 0600, or narrows an existing one to it:
/// labels are any client's data. SQLite gives its -wal and -shm files the
/// database file's mode.
fn restrict_mode(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating database {}", path.display()))?;
    for p in [
        path.to_path_buf(),
        path.with_extension("db-wal"),
        path.with_extension("db-shm"),
    ] {
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("setting mode 0600 on {}", p.display()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn open_connection(path: &Path) -> anyhow::Result<Connection> {
    let conn =
        Connection::open(path).with_context(|| format!("opening database {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    // WAL lets the reader run beside the writer; FULL makes every
    // acknowledged RPC survive power loss, as containerd's bolt store does.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "database {} refused WAL mode (got {mode})",
        path.display()
    );
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
    Ok(conn)
}

/// Brings the schema up to date, one migration per transaction.
fn migrate(conn: &Connection) -> anyhow::Result<()> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    anyhow::ensure!(
        version <= MIGRATIONS.len(),
        "database schema version {version} is newer than this ontop understands ({})",
        MIGRATIONS.len()
    );
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// What `Tx::insert` needs to create a snapshot.
pub struct NewSnapshot<'a> {
    pub kind: Kind,
    pub key: &'a str,
    pub parent_id: Option<Id>,
    pub base: Option<&'a Path>,
    pub labels: &'a Labels,
}

/// A connection inside a transaction, read or write, with the queries
/// ontop needs.
pub struct Tx<'a>(&'a Connection);

const RECORD_COLUMNS: &str = "s.id, s.kind, s.key, s.parent_id, COALESCE(p.key, ''),
     s.created_ns, s.updated_ns, s.size, s.inodes, s.base
     FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id";

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let kind: i64 = r.get(1)?;
    Ok(Record {
        id: r.get(0)?,
        kind: Kind::from_i64(kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Integer,
                format!("unknown snapshot kind {kind}").into(),
            )
        })?,
        key: r.get(2)?,
        parent_id: r.get(3)?,
        parent: r.get(4)?,
        created: Timestamp(r.get(5)?),
        updated: Timestamp(r.get(6)?),
        usage: Usage {
            size: r.get(7)?,
            inodes: r.get(8)?,
        },
        base: r
            .get::<_, Option<Vec<u8>>>(9)?
            .map(|b| PathBuf::from(OsString::from_vec(b))),
    })
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
        for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
            let (kind, n) = row?;
            if let Some(slot) = counts
                .iter_mut()
                .find(|(k, _)| Some(*k) == Kind::from_i64(kind))
            {
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
        Ok(stmt.query_row([key], record_from_row).optional()?)
    }

    pub fn record_by_id(&self, id: Id) -> Result<Option<Record>> {
        let mut stmt = self
            .0
            .prepare_cached(&format!("SELECT {RECORD_COLUMNS} WHERE s.id = ?1"))?;
        Ok(stmt.query_row([id], record_from_row).optional()?)
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
            "INSERT INTO snapshots (key, kind, parent_id, base, created_ns, updated_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        )?;
        stmt.execute(params![
            new.key,
            new.kind as i64,
            new.parent_id,
            path_bytes(new.base),
            now.0
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
            Kind::Committed as i64,
            now.0,
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
        stmt.execute(params![id, now.0])?;
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
            let rec = record_from_row(row)?;
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

    use crate::snapshot::labels_of as labels;

    fn new<'a>(
        kind: Kind,
        key: &'a str,
        parent_id: Option<Id>,
        labels: &'a Labels,
    ) -> NewSnapshot<'a> {
        NewSnapshot {
            kind,
            key,
            parent_id,
            base: None,
            labels,
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("metadata.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn migrations_run_from_an_empty_database_and_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        let conn = store.reader().unwrap();
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        drop(conn);
        store.quick_check().unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).err().unwrap();
        assert!(format!("{err:#}").contains("newer"), "{err:#}");
    }

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
    fn concurrent_writes_share_commits_and_a_failure_undoes_only_its_own() {
        let (dir, store) = open();
        let store = std::sync::Arc::new(store);
        let now = Timestamp::now();
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let key = format!("t{t}-{i}");
                        let r = store.write(|tx| {
                            tx.insert(&new(Kind::Active, &key, None, &Labels::new()), now)?;
                            // Every fifth one fails after its insert.
                            if i % 5 == 0 {
                                return Err(Error::invalid_argument("refused"));
                            }
                            Ok(())
                        });
                        assert_eq!(r.is_ok(), i % 5 != 0, "{key}: {r:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every acknowledged write is there, durably: a fresh connection
        // sees exactly them.
        drop(store);
        let reopened = Store::open(&dir.path().join("metadata.db")).unwrap();
        let keys: HashSet<String> = reopened
            .read(|tx| tx.all())
            .unwrap()
            .into_iter()
            .map(|(r, _)| r.key)
            .collect();
        assert_eq!(keys.len(), 16 * 40);
        assert!(keys.contains("t3-1") && !keys.contains("t3-5"));
    }
}
