//! The group commit: one writer connection, every mutation in a savepoint
//! of a shared transaction, and one durable COMMIT (its fsyncs) for as
//! many callers as are queued. See the module doc of [`super`].

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::Connection;

use super::{Store, Tx};
use crate::error::{Error, Result};

/// The most mutations one COMMIT carries.
const MAX_BATCH: usize = 64;

/// The writer connection and its group-commit state.
pub(super) struct Writer {
    pub(super) conn: Connection,
    /// A transaction is open, holding work of callers waiting for COMMIT.
    pub(super) open: bool,
    /// The open (or next) batch's outcome, shared with its callers, and
    /// how many mutations it holds.
    pub(super) batch: Arc<Outcome>,
    pub(super) in_batch: usize,
    /// Directories the batch's rows point at, fsynced before its COMMIT.
    pub(super) to_sync: BTreeSet<PathBuf>,
}

/// How a batch ended: Ok, or its COMMIT's error. Unset while open.
pub(super) type Outcome = OnceLock<std::result::Result<(), String>>;

impl Writer {
    /// Makes the batch's directories durable, then commits the open
    /// transaction for everyone in it. A directory that cannot be synced
    /// fails the whole batch: nothing of it is acknowledged.
    fn finish(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let result = match sync_dirs(&std::mem::take(&mut self.to_sync)) {
            Ok(()) => self.conn.execute_batch("COMMIT").map_err(Error::from),
            Err(e) => Err(e),
        };
        crate::metrics::group_commit(self.in_batch, started.elapsed());
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.end_batch(result.as_ref().err().map(|e| format!("{e:#}")));
        result
    }

    fn end_batch(&mut self, failure: Option<String>) {
        let _ = self.batch.set(failure.map_or(Ok(()), Err));
        self.batch = Arc::new(Outcome::new());
        self.open = false;
        self.in_batch = 0;
        self.to_sync.clear();
    }
}

/// fsyncs each directory, so that the entries and inodes a batch's rows
/// depend on are on disk before the rows are.
fn sync_dirs(dirs: &BTreeSet<PathBuf>) -> Result<()> {
    for dir in dirs {
        let synced = std::fs::File::open(dir).and_then(|d| d.sync_all());
        match synced {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other.with_context(|| format!("syncing {}", dir.display()))?,
        }
    }
    Ok(())
}

impl Store {
    /// Runs `f` atomically in a write transaction and returns once its work
    /// is durably committed. When `f` fails, or this returns any error,
    /// nothing of `f` is in the database, so the caller can undo its
    /// filesystem side.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let asked = Instant::now();
        self.queued.fetch_add(1, Ordering::SeqCst);
        let locked = self.writer.lock();
        self.queued.fetch_sub(1, Ordering::SeqCst);
        let mut w = locked.map_err(|_| anyhow::anyhow!("metadata writer lock poisoned"))?;
        crate::metrics::phases::writer_wait(asked.elapsed());
        let out = Self::run_in_savepoint(&mut w, f);
        let durable = Instant::now();
        let result = self.make_durable(w, out);
        crate::metrics::phases::durable_commit(durable.elapsed());
        result
    }

    /// Commits the batch `out` joined, or waits for whoever does; the
    /// result is `out` once its work is durable.
    fn make_durable<T>(&self, mut w: MutexGuard<'_, Writer>, out: Result<T>) -> Result<T> {
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
        let syncs = RefCell::new(Vec::new());
        let out = f(&Tx(&w.conn, Some(&syncs)));
        let closed = match out {
            Ok(_) => w.conn.execute_batch("RELEASE op"),
            Err(_) => w.conn.execute_batch("ROLLBACK TO op; RELEASE op"),
        };
        if out.is_ok() && closed.is_ok() {
            w.to_sync.extend(syncs.into_inner());
        }
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
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::snapshot::{Kind, Labels, Timestamp};
    use crate::store::testing::{new, open};

    #[test]
    fn a_directory_that_cannot_be_synced_fails_the_batch_and_commits_nothing() {
        let (dir, store) = open();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let labels = Labels::new();
        let err = store
            .write(|tx| {
                tx.insert(&new(Kind::Active, "k", None, &labels), Timestamp::now())?;
                tx.sync_before_commit(file.join("not-a-dir"));
                Ok(())
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("not-a-dir"), "{err:#}");
        assert!(store.read(|tx| tx.record("k")).unwrap().is_none());
        // The writer goes on: the next batch commits.
        store
            .write(|tx| tx.insert(&new(Kind::Active, "k", None, &labels), Timestamp::now()))
            .unwrap();
    }

    #[test]
    fn a_directory_gone_by_the_commit_is_skipped_and_a_rolled_back_one_never_synced() {
        let (dir, store) = open();
        let labels = Labels::new();
        store
            .write(|tx| {
                tx.insert(&new(Kind::Active, "k", None, &labels), Timestamp::now())?;
                tx.sync_before_commit(dir.path().join("removed-meanwhile"));
                Ok(())
            })
            .unwrap();
        assert!(store.read(|tx| tx.record("k")).unwrap().is_some());
        // A write that fails leaves nothing to sync for the batch it was in.
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let _ = store.write(|tx| -> Result<()> {
            tx.sync_before_commit(file.join("not-a-dir"));
            Err(Error::invalid_argument("refused"))
        });
        store
            .write(|tx| tx.insert(&new(Kind::Active, "k2", None, &labels), Timestamp::now()))
            .unwrap();
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
