//! A load on ontop, as a restart test drives it: Prepare, Mounts,
//! Commit, Stat and List in a loop on a connection of its own, counting
//! calls answered and failed, the longest wait, and the Commits
//! acknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Rpc;

/// What one load connection saw.
#[derive(Default)]
pub struct Seen {
    pub ok: u64,
    pub failed: u64,
    /// The longest time between two answers on one connection.
    pub longest_gap: Duration,
    pub acknowledged: Vec<String>,
    pub first_error: Option<String>,
    /// The key of the call that failed first.
    pub first_failed_key: Option<String>,
    /// The key of the call being made.
    current_key: String,
    /// Calls made again because they never left the client.
    pub retried: u64,
    last_answer: Option<Instant>,
}

impl Seen {
    /// Adds what another connection saw.
    pub fn absorb(&mut self, seen: Seen) {
        self.ok += seen.ok;
        self.failed += seen.failed;
        self.retried += seen.retried;
        self.longest_gap = self.longest_gap.max(seen.longest_gap);
        self.acknowledged.extend(seen.acknowledged);
        if self.first_error.is_none() {
            self.first_error = seen.first_error;
            self.first_failed_key = seen.first_failed_key;
        }
    }

    /// Counts one call; the value when it succeeded.
    pub fn note<T>(&mut self, r: Rpc<T>) -> Option<T> {
        match r {
            Ok(v) => {
                self.ok += 1;
                let now = Instant::now();
                if let Some(last) = self.last_answer.replace(now) {
                    self.longest_gap = self.longest_gap.max(now - last);
                }
                Some(v)
            }
            Err(e) => {
                self.failed += 1;
                if self.first_failed_key.is_none() {
                    self.first_failed_key = Some(self.current_key.clone());
                }
                self.first_error.get_or_insert_with(|| {
                    let mut chain = format!("{}: {}", e.code(), e.message());
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        chain.push_str(&format!(" <- {s:?}"));
                        source = s.source();
                    }
                    chain
                });
                None
            }
        }
    }

    /// What the daemon's `log` says about the first failed call, and how
    /// its processes started and stopped: for a failure message.
    pub fn story(&self, log: &str) -> String {
        let key = self.first_failed_key.as_deref().unwrap_or("\u{0}");
        let quoted = format!("{key:?}");
        log.lines()
            .filter(|l| {
                l.contains(&quoted)
                    || l.contains(" WARN ")
                    || l.contains(" ERROR ")
                    || l.contains("ontop is serving")
                    || l.contains("shutting down")
                    || l.contains("ontop stopped")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether a call failed without the server having run it, so that
/// making it again cannot run it twice:
/// - hyper cancels a request still queued for a connection that closes
///   (here, one the server said goodbye on): it never left this process;
/// - the server's goodbye (an HTTP/2 GOAWAY with NO_ERROR) refuses a
///   stream above the last one it took: RFC 9113 §6.8 says such streams
///   were not processed.
///
/// gRPC clients retry exactly these by themselves, as the retry design
/// (gRFC A6) says and grpc-go, which containerd uses, does. tonic does
/// not, so this client does.
pub fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if e.downcast_ref::<h2::Error>().is_some_and(|h2| {
            h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR)
        }) {
            return true;
        }
        source = e.source();
    }
    false
}

/// How long a call may go unanswered before it counts as failed: a
/// client must never wait forever on a restart.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Makes a call, again while it was never sent (see [`never_sent`]); one
/// unanswered for [`CALL_TIMEOUT`] fails, naming the call, its key and
/// when it was made, so that the server's log can say where it went.
macro_rules! transparently {
    ($seen:expr, $method:literal, $key:expr, $call:expr) => {{
        $seen.current_key = $key.to_string();
        loop {
            let made = std::time::SystemTime::now();
            let r = match tokio::time::timeout(CALL_TIMEOUT, async { $call }).await {
                Ok(r) => r,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "{} {:?} made at {} got no answer within {CALL_TIMEOUT:?}",
                    $method,
                    $key,
                    wall_clock(made)
                ))),
            };
            match &r {
                Err(e) if never_sent(e) && $seen.retried < 1000 => $seen.retried += 1,
                _ => break r,
            }
        }
    }};
}

/// `t` as the daemon's log shows times (UTC, to the microsecond).
fn wall_clock(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    format!(
        "{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        d.subsec_micros()
    )
}

/// Prepare, Mounts, Commit, Stat and List in a loop on one connection of
/// its own until `stop`; a failed call starts the next round.
pub async fn load(mut c: super::Client, worker: usize, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let active = format!("w{worker}-{round}");
        let name = format!("{active}-c");
        let prepared = transparently!(seen, "Prepare", active, c.prepare(&active, "").await);
        if seen.note(prepared).is_none() {
            continue;
        }
        let mounts = transparently!(seen, "Mounts", active, c.mounts(&active).await);
        if seen.note(mounts).is_none() {
            continue;
        }
        let committed = transparently!(seen, "Commit", name, c.commit(&name, &active).await);
        if seen.note(committed).is_none() {
            continue;
        }
        seen.acknowledged.push(name.clone());
        let stat = transparently!(seen, "Stat", name, c.stat(&name).await);
        if seen.note(stat).is_none() {
            continue;
        }
        let filter = format!("name=={name}");
        let listed = transparently!(seen, "List", name, c.list(&[filter.as_str()]).await);
        seen.note(listed);
    }
    seen
}

/// The load on `socket`, on `connections` connections of its own, on a
/// runtime and thread of its own (a test that blocks its own runtime must
/// not starve the clients), until `stop`: what they saw, together.
pub fn on_its_own_thread(
    socket: std::path::PathBuf,
    connections: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut workers = Vec::new();
            for w in 0..connections {
                let channel = ontop_tools::client::connect(&socket).await.unwrap();
                let client = super::Client {
                    api: ontop_tools::client::Snapshots::new(channel, "ontop", Default::default()),
                };
                workers.push(tokio::spawn(load(client, w, Arc::clone(&stop))));
            }
            let mut all = Seen::default();
            for w in workers {
                all.absorb(w.await.unwrap());
            }
            all
        })
    })
}
