//! The SQLite metadata store: schema, migrations and every query.
//!
//! - this module opens the database, owns the schema and its migrations,
//!   and hands out read transactions;
//! - [`group_commit`] serialises writes and shares their durable COMMIT;
//! - [`tx`] holds every query and the mapping of rows to records.
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

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::{Connection, TransactionBehavior};

use crate::error::Result;
#[cfg(test)]
use crate::snapshot::Kind;

mod group_commit;
mod tx;

use group_commit::{Outcome, Writer};
pub use tx::{NewSnapshot, Record, Tx};

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
    // 3: the few snapshots on a host base, found without a scan: start-up
    // looks for what a crash left of their pins (`committed_on_bases`).
    "CREATE INDEX snapshots_on_bases ON snapshots(kind) WHERE base IS NOT NULL;",
    // 4: size limits (`crate::limit`): the bytes, and what enforces them
    // (1 loop-ext4, 2 btrfs-qgroup, 3 project-quota). Kept after Commit lifts the limit,
    // as the record that start-up may have a loop image to clear; the
    // index finds those few without a scan.
    "ALTER TABLE snapshots ADD COLUMN max_size INTEGER CHECK (max_size > 0);
    ALTER TABLE snapshots ADD COLUMN limit_by INTEGER CHECK (limit_by IN (1, 2, 3));
    CREATE INDEX snapshots_limited ON snapshots(kind) WHERE limit_by IS NOT NULL;",
];

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
                to_sync: Default::default(),
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
        f(&Tx(&tx, None))
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
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).context("a negative schema version")?;
    anyhow::ensure!(
        version <= MIGRATIONS.len(),
        "database schema version {version} is newer than this ontop understands ({})",
        MIGRATIONS.len()
    );
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// What the store's tests share.
#[cfg(test)]
pub(super) mod testing {
    use super::*;
    use crate::snapshot::{Id, Labels};

    pub(crate) fn new<'a>(
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
            limit: None,
        }
    }

    pub(crate) fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("metadata.db")).unwrap();
        (dir, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_from_an_empty_database_and_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        let conn = store.reader().unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
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

    /// A database as ontop 0.1's first release left it: schema version 1,
    /// with rows in both tables.
    fn version_1_database(path: &Path) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO snapshots (id, key, kind, parent_id, created_ns, updated_ns, size, inodes)
                 VALUES (1, 'layer-1', 3, NULL, 10, 11, 4096, 3),
                        (2, 'layer-2', 3, 1, 20, 21, 8192, 5),
                        (5, 'container', 2, 2, 30, 31, 0, 0),
                        (6, 'view', 1, 1, 40, 41, 0, 0);
             INSERT INTO labels (snapshot_id, key, value)
                 VALUES (1, 'containerd.io/snapshot.ref', 'sha256:aa'),
                        (5, 'containerd.io/gc.root', 'x'),
                        (5, 'k', 'v');",
        )
        .unwrap();
    }

    /// The schema as SQLite stores it: every table and index with its SQL.
    fn schema(path: &Path) -> Vec<(String, String, Option<String>)> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn a_limit_is_kept_with_its_enforcer_and_lifted_by_commit_only_in_effect() {
        use crate::limit::{Enforcer, Limit};
        let (_dir, store) = testing::open();
        let none = crate::snapshot::Labels::new();
        let limit = Limit {
            bytes: 32 << 20,
            enforcer: Enforcer::LoopExt4,
        };
        let id = store
            .write(|tx| {
                let mut n = testing::new(Kind::Active, "c", None, &none);
                n.limit = Some(limit);
                tx.insert(&n, crate::snapshot::Timestamp(1))
            })
            .unwrap();
        store
            .write(|tx| {
                tx.insert(
                    &testing::new(Kind::Active, "free", None, &none),
                    crate::snapshot::Timestamp(1),
                )
            })
            .unwrap();
        let rec = store.read(|tx| tx.require("c")).unwrap();
        assert_eq!(rec.enforced_limit(), Some(limit));
        assert!(rec.in_loop_image());
        store.write(|tx| tx.set_limit(id, 64 << 20)).unwrap();
        let counts = store.read(|tx| tx.limited_counts()).unwrap();
        assert_eq!(counts, vec![(Enforcer::LoopExt4, 1)]);
        store
            .write(|tx| {
                tx.commit(
                    id,
                    "done",
                    &none,
                    Default::default(),
                    crate::snapshot::Timestamp(2),
                )
            })
            .unwrap();
        let rec = store.read(|tx| tx.require("done")).unwrap();
        assert_eq!(
            rec.limit.map(|l| l.bytes),
            Some(64 << 20),
            "kept as a record"
        );
        assert_eq!(rec.enforced_limit(), None, "but no longer in effect");
        assert!(store.read(|tx| tx.limited_counts()).unwrap().is_empty());
        let limited: Vec<_> = store
            .read(|tx| tx.limited())
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(limited, ["done"]);
    }

    #[test]
    fn a_version_1_database_with_rows_upgrades_to_the_fresh_schema_losing_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.db");
        version_1_database(&old);
        let store = Store::open(&old).unwrap();
        let all = store.read(|tx| tx.all()).unwrap();
        let rows: Vec<_> = all
            .iter()
            .map(|(r, l)| {
                (
                    r.id,
                    r.key.as_str(),
                    r.kind,
                    r.parent.as_str(),
                    (r.created.0, r.updated.0),
                    (r.usage.size, r.usage.inodes),
                    r.base.is_none() && r.limit.is_none(),
                    l.len(),
                )
            })
            .collect();
        use crate::snapshot::Kind::*;
        assert_eq!(
            rows,
            vec![
                (1, "layer-1", Committed, "", (10, 11), (4096, 3), true, 1),
                (
                    2,
                    "layer-2",
                    Committed,
                    "layer-1",
                    (20, 21),
                    (8192, 5),
                    true,
                    0
                ),
                (5, "container", Active, "layer-2", (30, 31), (0, 0), true, 2),
                (6, "view", View, "layer-1", (40, 41), (0, 0), true, 0),
            ]
        );
        assert_eq!(all[2].1.get("k").map(String::as_str), Some("v"));
        // New ids continue after the old ones: AUTOINCREMENT kept its state.
        let id = store
            .write(|tx| {
                tx.insert(
                    &NewSnapshot {
                        kind: Kind::Active,
                        key: "new",
                        parent_id: Some(2),
                        base: None,
                        labels: &Default::default(),
                        limit: None,
                    },
                    crate::snapshot::Timestamp(50),
                )
            })
            .unwrap();
        assert_eq!(id, 7);
        drop(store);

        let fresh = dir.path().join("fresh.db");
        drop(Store::open(&fresh).unwrap());
        assert_eq!(schema(&old), schema(&fresh));
    }
}
