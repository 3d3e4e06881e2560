//! The group commit: one writer connection, every mutation in a savepoint
//! of a shared transaction, and one durable COMMIT (its fsyncs) for as
//! many callers as are queued. See the module doc of [`super`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

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
}

/// How a batch ended: Ok, or its COMMIT's error. Unset while open.
pub(super) type Outcome = OnceLock<std::result::Result<(), String>>;

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
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::snapshot::{Kind, Labels, Timestamp};
    use crate::store::testing::{new, open};

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
