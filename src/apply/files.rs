//! Regular files finished on threads of their own: the writer makes each
//! file (its name, in archive order) and hands the open file, its content
//! and its attributes here, so that writing the data, owner, xattrs, mode
//! and times of one file overlaps with making the next ones.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A file's content and what is set on it once written.
pub(super) struct FileJob {
    pub file: OwnedFd,
    pub data: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub times: [libc::timespec; 2],
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The entry's name, for errors.
    pub name: Vec<u8>,
}

// `timespec` is plain data.
unsafe impl Send for FileJob {}

/// The largest file handed to the pool: bigger ones are written by the
/// writer itself, so that queued content stays bounded.
pub(super) const MAX_QUEUED_FILE: u64 = 1 << 20;
/// Files queued at most (so at most this many MiB held).
const QUEUE: usize = 32;

/// Jobs not yet done, and the first failure.
#[derive(Default)]
struct State {
    pending: usize,
    failed: Option<io::Error>,
}

pub(super) struct Pool {
    jobs: Option<SyncSender<FileJob>>,
    workers: Vec<JoinHandle<()>>,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Pool {
    /// `threads` workers; none when there is no second core to use.
    pub fn new(threads: usize) -> Option<Pool> {
        if threads == 0 {
            return None;
        }
        let (tx, rx) = sync_channel::<FileJob>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let state = Arc::clone(&state);
                std::thread::spawn(move || work(&rx, &state))
            })
            .collect();
        Some(Pool {
            jobs: Some(tx),
            workers,
            state,
        })
    }

    /// Queues `job`; the first failure of any earlier job, if one failed.
    pub fn submit(&self, job: FileJob) -> io::Result<()> {
        self.check()?;
        self.state.0.lock().unwrap().pending += 1;
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        if !matches!(sent, Some(Ok(()))) {
            // Nobody will finish it: `wait` must not count on it.
            self.state.0.lock().unwrap().pending -= 1;
            return Err(io::Error::other("the file writers stopped"));
        }
        Ok(())
    }

    /// Waits until every queued job is done; the first failure.
    pub fn wait(&self) -> io::Result<()> {
        let (lock, done) = &*self.state;
        let mut state = lock.lock().unwrap();
        while state.pending > 0 {
            state = done.wait(state).unwrap();
        }
        drop(state);
        self.check()
    }

    fn check(&self) -> io::Result<()> {
        match self.state.0.lock().unwrap().failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn work(rx: &Mutex<Receiver<FileJob>>, state: &(Mutex<State>, Condvar)) {
    loop {
        let job = match rx.lock().unwrap().recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let name = job.name.clone();
        let result = finish(job);
        let (lock, done) = state;
        let mut s = lock.lock().unwrap();
        if let Err(e) = result {
            s.failed.get_or_insert(super::tree::at_entry(&name, e));
        }
        s.pending -= 1;
        if s.pending == 0 {
            done.notify_all();
        }
    }
}

/// Writes the content, then owner, xattrs, mode (after the owner, which
/// clears setuid) and times, as containerd's applier orders them.
pub(super) fn finish(job: FileJob) -> io::Result<()> {
    let mut out = std::fs::File::from(job.file);
    out.write_all(&job.data)?;
    super::tree::finish_file(
        &out,
        job.uid,
        job.gid,
        &job.xattrs,
        job.mode,
        &job.times,
        &job.name,
    )
}
