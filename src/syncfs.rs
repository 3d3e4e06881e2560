//! One syncfs(2) for every Commit waiting at once.
//!
//! Commit makes its layer's data durable before it answers. syncfs writes
//! back the whole filesystem, so one call covers every Commit whose data
//! was written before the call started: concurrent Commits share calls, as
//! the group commit's batches share a COMMIT.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};

pub struct SyncGroup {
    /// A directory on the filesystem to sync that outlives every caller
    /// (the root's `snapshots/`): not a caller's own, which a Remove may
    /// take away while others wait on the sync.
    dir: PathBuf,
    state: Mutex<State>,
    finished: Condvar,
}

#[derive(Default)]
struct State {
    /// How many syncs have started, and whether the last is running.
    started: u64,
    running: bool,
    /// The last sync to finish, and its error.
    finished: u64,
    error: Option<(io::ErrorKind, String)>,
}

impl SyncGroup {
    pub fn new(dir: PathBuf) -> SyncGroup {
        SyncGroup {
            dir,
            state: Mutex::default(),
            finished: Condvar::new(),
        }
    }

    /// Returns once a syncfs of the filesystem that started after this
    /// call has finished: the one this call runs, or one that another
    /// caller ran meanwhile.
    pub fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        // One that is running may have started before our data was
        // written: only the next one counts.
        let needed = st.started + 1;
        loop {
            if st.finished >= needed {
                return match &st.error {
                    None => Ok(()),
                    Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
                };
            }
            if !st.running {
                st.started += 1;
                st.running = true;
                let mine = st.started;
                drop(st);
                let result = File::open(&self.dir).and_then(|f| Ok(nix::unistd::syncfs(&f)?));
                let mut st = self.lock();
                st.running = false;
                st.finished = mine;
                st.error = result.as_ref().err().map(|e| (e.kind(), e.to_string()));
                self.finished.notify_all();
                return result;
            }
            st = self.finished.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_syncs_and_each_waits_for_one_started_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let group = Arc::new(SyncGroup::new(dir.path().to_path_buf()));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let group = group.clone();
                std::thread::spawn(move || group.sync().unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = group.lock();
        assert!(!st.running);
        assert!(st.started >= 1 && st.started <= 16, "{}", st.started);
        assert_eq!(st.finished, st.started);
    }

    #[test]
    fn a_failed_sync_fails_its_callers() {
        let dir = tempfile::tempdir().unwrap();
        let group = SyncGroup::new(dir.path().join("gone"));
        let e = group.sync().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // The next caller runs a sync of its own.
        std::fs::create_dir(dir.path().join("gone")).unwrap();
        group.sync().unwrap();
    }
}
