//! Prometheus metrics: what ontop counts, rendered in the text exposition
//! format. A leaf: the store, the usage walk and the core call in; the
//! endpoint that serves the text is `exporter`'s.
//!
//! The recorder is process-wide (the `metrics` crate's global): there is
//! one daemon per process, and the places that count (the group commit in
//! the store, the usage walk, Cleanup) are far from the server that owns
//! the endpoint. Without a metrics address no recorder is installed, and
//! counting costs nothing. What is cheaper to read than to count
//! (snapshots by kind, database size, pins, process RSS) is read at
//! scrape time.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process's own CPU, memory, descriptors, threads and start time
/// (metrics-process, read from /proc at each scrape).
static PROCESS: std::sync::LazyLock<metrics_process::Collector> =
    std::sync::LazyLock::new(metrics_process::Collector::default);

/// The recorder's handle, once [`install`] ran: before that (and when no
/// metrics address is set) the `metrics` macros record nothing.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// 100 µs to about 6.5 s: a Stat's floor to a Commit walking a big layer.
fn latency_buckets() -> Vec<f64> {
    (0..17).map(|i| 0.0001 * 2f64.powi(i)).collect()
}

/// Installs the process-wide recorder and describes every metric.
pub fn install() -> anyhow::Result<()> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets())?
        .set_buckets_for_metric(
            Matcher::Full("ontop_group_commit_batch_size".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    let _ = HANDLE.set(handle);
    describe();
    Ok(())
}

fn describe() {
    describe_counter!(
        "ontop_calls_total",
        "gRPC calls served, by method and status code"
    );
    describe_histogram!(
        "ontop_call_duration_seconds",
        Unit::Seconds,
        "Time from a call's arrival to its answer, by method"
    );
    describe_histogram!(
        "ontop_call_phase_duration_seconds",
        Unit::Seconds,
        "Where calls run on the blocking pool spend their time, by method and phase: \
         queue (the hand-off to the pool), writer_wait (other writes), durable_commit \
         (their COMMIT), work (SQL and filesystem)"
    );
    describe_gauge!("ontop_snapshots", "Snapshots in the database, by kind");
    describe_histogram!(
        "ontop_group_commit_batch_size",
        "Calls made durable by one database COMMIT"
    );
    describe_histogram!(
        "ontop_durable_commit_duration_seconds",
        Unit::Seconds,
        "Time of one database COMMIT, its fsyncs included"
    );
    describe_gauge!(
        "ontop_database_size_bytes",
        Unit::Bytes,
        "Size of the metadata database file"
    );
    describe_gauge!(
        "ontop_database_wal_size_bytes",
        Unit::Bytes,
        "Size of the database's write-ahead log"
    );
    describe_gauge!(
        "ontop_pinned_bases",
        "Host base directories pinned by a bind mount under the root"
    );
    describe_histogram!(
        "ontop_usage_walk_duration_seconds",
        Unit::Seconds,
        "Time of one walk of a snapshot's tree for its disk usage"
    );
    describe_counter!(
        "ontop_usage_walk_files_total",
        "Files and directories visited by usage walks"
    );
    describe_counter!(
        "ontop_cleanup_reclaimed_bytes_total",
        Unit::Bytes,
        "Disk space freed by Cleanup"
    );
    // process_* under the names every Prometheus client's process
    // collector uses, so that standard dashboards and alerts find them.
    PROCESS.describe();
    describe_gauge!(
        "ontop_snapshots_missing_tree",
        "Snapshots whose directory start-up found gone (data lost; see ontop check)"
    );
    describe_gauge!(
        "ontop_limited_snapshots",
        "Active snapshots with a size limit, by what enforces it"
    );
    describe_counter!(
        "ontop_limit_failures_total",
        "Prepares refused because their size limit could not be enforced"
    );
    describe_gauge!(
        "ontop_build_info",
        "Always 1: ontop's version and the backend it serves, as labels"
    );
}

/// One finished gRPC call.
pub fn call(method: &'static str, code: tonic::Code, took: Duration) {
    counter!("ontop_calls_total", "method" => method, "code" => code_name(code)).increment(1);
    histogram!("ontop_call_duration_seconds", "method" => method).record(took);
}

/// One COMMIT of the group commit: how many calls it made durable, and
/// how long the COMMIT (its fsyncs) took.
pub fn group_commit(calls: usize, took: Duration) {
    histogram!("ontop_group_commit_batch_size").record(calls as f64);
    histogram!("ontop_durable_commit_duration_seconds").record(took);
}

/// One walk of a directory tree for its disk usage.
pub fn usage_walk(files: u64, took: Duration) {
    histogram!("ontop_usage_walk_duration_seconds").record(took);
    counter!("ontop_usage_walk_files_total").increment(files);
}

/// Bytes Cleanup freed.
pub fn cleanup_reclaimed(bytes: u64) {
    counter!("ontop_cleanup_reclaimed_bytes_total").increment(bytes);
}

/// Where a call's time went, for `ontop_call_phase_duration_seconds`.
/// The store notes its waits on the thread that runs the call (the
/// blocking pool's), and the gRPC layer reads them back when the call's
/// work is done there.
pub mod phases {
    use std::cell::Cell;
    use std::time::Duration;

    use metrics::histogram;

    #[derive(Debug, Default, Clone, Copy)]
    struct Waits {
        writer: Duration,
        durable: Duration,
    }

    thread_local! {
        static WAITS: Cell<Waits> = const { Cell::new(Waits { writer: Duration::ZERO, durable: Duration::ZERO }) };
    }

    /// Time a write waited for the metadata writer (other writes).
    pub fn writer_wait(d: Duration) {
        WAITS.with(|w| {
            let mut v = w.get();
            v.writer += d;
            w.set(v);
        });
    }

    /// Time a write spent making itself durable: its batch's COMMIT (the
    /// fsyncs), run by itself or waited for.
    pub fn durable_commit(d: Duration) {
        WAITS.with(|w| {
            let mut v = w.get();
            v.durable += d;
            w.set(v);
        });
    }

    /// Starts counting a call's waits on this thread.
    pub fn begin() {
        WAITS.with(|w| w.set(Waits::default()));
    }

    /// Records a call that ran on this thread for `ran` after `queued` in
    /// the hand-off to it: the queue, the two waits, and the rest, which
    /// is the call's own work (SQL and filesystem).
    pub fn record(method: &'static str, queued: Duration, ran: Duration) {
        let waits = WAITS.with(|w| w.take());
        let work = ran.saturating_sub(waits.writer + waits.durable);
        for (phase, d) in [
            ("queue", queued),
            ("writer_wait", waits.writer),
            ("durable_commit", waits.durable),
            ("work", work),
        ] {
            histogram!("ontop_call_phase_duration_seconds", "method" => method, "phase" => phase)
                .record(d);
        }
    }
}

/// One Prepare refused because its size limit could not be enforced.
pub fn limit_refused() {
    counter!("ontop_limit_failures_total").increment(1);
}

/// Whether anything is recorded: Cleanup measures what it frees only then.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

/// What a scrape reads from the daemon rather than counts as it goes. The
/// snapshotter implements it, so this module needs nothing above it.
pub trait State: Send + Sync {
    /// How many snapshots there are of each kind, by the kind's name.
    fn snapshots_by_kind(&self) -> anyhow::Result<Vec<(&'static str, i64)>>;
    /// The SQLite database's file (its WAL sits beside it).
    fn database_path(&self) -> PathBuf;
    /// How many host bases are pinned, when that could be read.
    fn pinned_bases(&self) -> Option<usize>;
    /// The backend's name, for `ontop_build_info`.
    fn backend_name(&self) -> &'static str;
    /// Snapshots whose directory start-up found gone.
    fn missing_trees(&self) -> usize;
    /// Active snapshots with a size limit, by the enforcer's name.
    fn limited_snapshots(&self) -> anyhow::Result<Vec<(&'static str, i64)>>;
}

/// Reads what is cheaper to read than to count.
fn refresh(state: &dyn State) {
    match state.snapshots_by_kind() {
        Ok(counts) => {
            for (kind, n) in counts {
                gauge!("ontop_snapshots", "kind" => kind).set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: could not count snapshots"),
    }
    let db = state.database_path();
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len()) as f64;
    gauge!("ontop_database_size_bytes").set(size(&db));
    let mut wal = db.into_os_string();
    wal.push("-wal");
    gauge!("ontop_database_wal_size_bytes").set(size(wal.as_ref()));
    match state.limited_snapshots() {
        Ok(counts) => {
            for (enforcer, n) in counts {
                gauge!("ontop_limited_snapshots", "enforcer" => enforcer).set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: could not count limited snapshots"),
    }
    gauge!("ontop_snapshots_missing_tree").set(state.missing_trees() as f64);
    if let Some(pins) = state.pinned_bases() {
        gauge!("ontop_pinned_bases").set(pins as f64);
    }
    PROCESS.collect();
    gauge!(
        "ontop_build_info",
        "version" => crate::VERSION,
        "backend" => state.backend_name()
    )
    .set(1.0);
}

/// The text exposition of every metric, in Prometheus's text format.
pub fn render(state: &dyn State) -> String {
    let Some(handle) = HANDLE.get() else {
        return String::new();
    };
    refresh(state);
    handle.run_upkeep();
    handle.render()
}

/// The name gRPC gives a status code, as grpc-go's `codes.Code.String()`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_go_s() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FailedPrecondition"
        );
    }
}
