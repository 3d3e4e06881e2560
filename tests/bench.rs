//! `ontop bench --quick` keeps working, end to end: against a daemon it
//! starts itself, and through a real containerd against its built-in
//! overlayfs. Only completion and the report's shape are checked: timings
//! belong to benchmark runs, not to tests on a noisy machine.

#[macro_use]
mod common;

use std::process::Command;

use common::containerd::{image_archive, pause_image_archive, Containerd, IMAGE};
use common::{Daemon, BIN};

/// Runs `ontop bench --quick ARGS --json FILE` and returns the JSON rows'
/// workload names per target.
fn bench(dir: &std::path::Path, args: &[&str]) -> Vec<(String, String)> {
    let tool = std::path::Path::new(BIN).with_file_name("ontop-bench");
    assert!(
        tool.is_file(),
        "no {}: `ontop bench` runs it; build it with `cargo build` (scripts/test.sh does)",
        tool.display()
    );
    let json = dir.join("bench.json");
    let out = Command::new(BIN)
        // The running test's containerd release's ctr, for image runs.
        .env("PATH", common::containerd::path_env())
        .args(["bench", "--quick", "--scratch"])
        .arg(dir)
        .arg("--json")
        .arg(&json)
        .args(args)
        .output()
        .expect("running ontop bench");
    assert!(
        out.status.success(),
        "ontop bench failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().unwrap().to_string(),
                r["target"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has(rows: &[(String, String)], workload: &str, target: &str) -> bool {
    rows.iter()
        .any(|(w, t)| w.starts_with(workload) && t == target)
}

#[tokio::test]
async fn quick_bench_runs_every_workload_against_a_daemon_it_starts() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let serve = format!("ontop={BIN} serve --root {{root}} --address {{address}} --log-level warn");
    let rows = bench(dir.path(), &["--serve", &serve]);
    for workload in [
        "chain: layer",
        "chain: prepare",
        "chain: commit",
        "rpc floor (health check) at",
        "stat at",
        "mounts at",
        "list at",
        "list filtered at",
        "create c1: prepare+commit",
        "create c1: prepare",
        "create c1: commit",
        "create c1: prepare / floor",
        "create c1: commit / floor",
        "create c16",
        "peak rss",
        "start-up",
        "usage of",
        "usage poll of",
        "teardown: remove",
        "teardown: cleanup",
    ] {
        assert!(
            has(&rows, workload, "ontop"),
            "no {workload:?} row in {rows:?}"
        );
    }
    assert!(
        has(&rows, "floor: 3 mkdir, rename, fdatasync", "this machine"),
        "no floor row in {rows:?}"
    );
}

async fn quick_bench_runs_through_containerd_with_image_unpack_and_run() {
    let d = Daemon::start().await;
    // containerd 2 pulls with parallel unpack; 1.x ignores the section.
    let ctd = match common::containerd::release().major() {
        1 => Containerd::start(&d).await,
        _ => {
            Containerd::start_with(
                &d,
                "[plugins.\"io.containerd.transfer.v1.local\"]\n  max_concurrent_unpacks = 4\n",
            )
            .await
        }
    };
    let registry = common::registry::Registry::start(&d.dir.path().join("registry"));
    let pulled = registry.push(image_archive(), "ontop/e2e:latest");
    let image = format!("{IMAGE}={}", image_archive().display());
    // A second image: `--image` takes several, each with rows of its own.
    let pause = format!(
        "docker.io/ontop/pause:latest={}",
        pause_image_archive().display()
    );
    let socket = ctd.socket.display().to_string();
    let rows = bench(
        d.dir.path(),
        &[
            "--containerd",
            &socket,
            "--namespace",
            &ctd.ns,
            "--snapshotter",
            "overlayfs",
            "--snapshotter",
            "ontop",
            "--only",
            "chain,lookups,image",
            "--image",
            &image,
            "--image",
            &pause,
            "--pull",
            &pulled,
        ],
    );
    for target in ["overlayfs via containerd", "ontop via containerd"] {
        for workload in [
            "chain: layer",
            "stat at",
            "image e2e: import",
            "image e2e: ctr run",
            "image e2e: pull",
            "image pause: import",
            "image pause: ctr run",
        ] {
            assert!(
                has(&rows, workload, target),
                "no {workload:?} for {target} in {rows:?}"
            );
        }
    }
}

on_every_containerd!(kernel_only: quick_bench_runs_through_containerd_with_image_unpack_and_run);
