//! ontop on a Kubernetes node: containerd's CRI driven by crictl the way
//! kubelet drives it, with ontop as CRI's default snapshotter (from
//! `ontop containerd-config --cri`), images pulled from a real registry on
//! 127.0.0.1, host-network pods (no CNI), on containerd 1.6 and 2.3.4 and
//! both backends.

#[macro_use]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::containerd::{
    image_archive, pause_image_archive, Containerd, Generation, ROOTFS_CHECK, ROOTFS_EXPECTED,
};
use common::registry::Registry;
use common::Daemon;
use serde_json::{json, Value};

/// CRI's stats poll in these tests (`stats_collect_period`); kubelet's
/// nodes use 10 s.
const STATS_PERIOD: Duration = Duration::from_secs(1);

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A protobuf JSON integer, which protojson writes as a string for 64 bits.
fn int(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap(),
        other => other
            .as_u64()
            .unwrap_or_else(|| panic!("not an integer: {other}")),
    }
}

fn write_json(dir: &Path, name: &str, value: Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path.display().to_string()
}

async fn kubelets_flow_runs_on_ontop_from_pull_to_garbage_collection() {
    let d = Daemon::start().await;
    let registry = Registry::start(&d.dir.path().join("registry"));
    let image = registry.push(image_archive(), "ontop/e2e:latest");
    let pause = registry.push(pause_image_archive(), "ontop/pause:latest");
    let ctd = Containerd::start_cri(&d, &registry.host, &pause).await;
    let k8s = |args: &[&str]| ctd.ctr_ok_in("k8s.io", args);

    // Pull, through ontop.
    ctd.crictl_ok(&["pull", &image]);
    let inspect = parse(&ctd.crictl_ok(&["inspecti", "-o", "json", &image]));
    assert_eq!(inspect["status"]["repoTags"][0], json!(image));

    // ImageFsInfo: ontop's root, with what ontop holds once CRI's next
    // poll has summed its snapshots' Usage.
    let imagefs = || {
        let info = parse(&ctd.crictl_ok(&["imagefsinfo", "-o", "json"]));
        info["status"]["imageFilesystems"][0].clone()
    };
    let polled = Instant::now();
    let mut fs = imagefs();
    while int(&fs["usedBytes"]["value"]) == 0 && polled.elapsed() < 3 * STATS_PERIOD {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fs = imagefs();
    }
    let info = &fs;
    let expected = match ctd.generation {
        // containerd 2 reports `exports.root`.
        Generation::Two => d.root.display().to_string(),
        // containerd 1.x, the path under its root (linked to ontop's).
        Generation::One => ctd
            .dir
            .join("root/io.containerd.snapshotter.v1.ontop")
            .display()
            .to_string(),
    };
    assert_eq!(fs["fsId"]["mountpoint"], json!(expected), "{info}");
    let used = int(&fs["usedBytes"]["value"]);
    let inodes = int(&fs["inodesUsed"]["value"]);
    assert!(used >= 1 << 20, "busybox alone is over 1 MiB: {info}");
    assert!(inodes > 100, "busybox and its applets: {info}");

    // A host-network pod, and a container of the image in it.
    let dir = d.dir.path();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let pod_config = write_json(
        dir,
        "pod.json",
        json!({
            "metadata": {"name": "ontop-pod", "namespace": "default", "uid": "ontop-pod-uid", "attempt": 0},
            "log_directory": dir.join("logs").display().to_string(),
            "linux": {"security_context": {"namespace_options": {"network": 2}}}
        }),
    );
    let container = |name: &str, readonly: bool| {
        write_json(
            dir,
            &format!("{name}.json"),
            json!({
                "metadata": {"name": name},
                "image": {"image": image},
                "command": ["/bin/sleep", "2147483647"],
                "log_path": format!("{name}.log"),
                "linux": {"security_context": {"readonly_rootfs": readonly}}
            }),
        )
    };
    let pod = ctd.crictl_ok(&["runp", &pod_config]).trim().to_string();
    let app = ctd
        .crictl_ok(&["create", &pod, &container("app", false), &pod_config])
        .trim()
        .to_string();
    ctd.crictl_ok(&["start", &app]);
    let frozen = ctd
        .crictl_ok(&["create", &pod, &container("frozen", true), &pod_config])
        .trim()
        .to_string();
    ctd.crictl_ok(&["start", &frozen]);

    // The container sees the image's tree: whiteout, opaque dir, modes,
    // owners and links.
    let exec = |id: &str, script: &str| ctd.crictl(&["exec", "-s", id, "sh", "-c", script]);
    let out = exec(&app, ROOTFS_CHECK);
    // crictl ends exec's output with blank lines of its own.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        ROOTFS_EXPECTED.trim_end(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A read-only rootfs reads the same tree and takes no write.
    let out = exec(&frozen, "cat /data/keep.txt");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "keep");
    let out = exec(&frozen, "touch /nope");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stats: the writable layer grows by what the container writes, as
    // CRI's poll (ontop's Usage) sees it within two periods.
    let writable = || {
        let stats = parse(&ctd.crictl_ok(&["stats", "-o", "json", "--id", &app]));
        int(&stats["stats"][0]["writableLayer"]["usedBytes"]["value"])
    };
    let before = writable();
    const WRITTEN: u64 = 8 << 20;
    let out = exec(
        &app,
        "dd if=/dev/zero of=/grown bs=1048576 count=8 2>/dev/null && sync",
    );
    assert!(out.status.success());
    let written_at = Instant::now();
    let mut after = writable();
    while after < before + WRITTEN && written_at.elapsed() < 2 * STATS_PERIOD + STATS_PERIOD / 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = writable();
    }
    println!(
        "writable layer: {before} then {after} bytes, seen {:?} after the write",
        written_at.elapsed()
    );
    assert!(
        after >= before + WRITTEN && after < before + WRITTEN + (1 << 20),
        "the writable layer went from {before} to {after} bytes for {WRITTEN} written"
    );

    // containerd's view of ontop: the image's layers and the containers'
    // active snapshots.
    let ls = k8s(&["snapshots", "--snapshotter", "ontop", "ls"]);
    let kinds: Vec<&str> = ls
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    // Two containers and the pod's sandbox; three layers, since the pause
    // image's one layer is the test image's first.
    assert_eq!(
        kinds.iter().filter(|k| **k == "Committed").count(),
        3,
        "{ls}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "Active").count(), 3, "{ls}");

    // Teardown as kubelet does it, then containerd's GC.
    for id in [&app, &frozen] {
        ctd.crictl_ok(&["stop", id]);
        ctd.crictl_ok(&["rm", id]);
    }
    ctd.crictl_ok(&["stopp", &pod]);
    ctd.crictl_ok(&["rmp", &pod]);
    ctd.crictl_ok(&["rmi", &image]);
    // The sandbox image too (on containerd 2 it is pinned, which crictl
    // removes all the same).
    ctd.crictl_ok(&["rmi", &pause]);
    assert_eq!(k8s(&["images", "ls", "-q"]), "", "CRI keeps no image");
    ctd.after_gc(30, "GC to remove every snapshot of the node", || {
        k8s(&["snapshots", "--snapshotter", "ontop", "ls"])
            .lines()
            .count()
            <= 1
            && d.snapshot_dirs().is_empty()
    })
    .await;
    assert!(ctd.crictl_ok(&["pods", "-q"]).trim().is_empty());
    assert!(ctd.crictl_ok(&["ps", "-a", "-q"]).trim().is_empty());
    d.assert_consistent();
}

on_every_containerd!(kubelets_flow_runs_on_ontop_from_pull_to_garbage_collection);
