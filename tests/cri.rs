//! ontop on a Kubernetes node: containerd's CRI driven the way kubelet
//! drives it (by the suite's own CRI client, `common::cri`), with ontop as
//! CRI's default snapshotter (from `ontop containerd-config --cri`),
//! images pulled from a real registry on 127.0.0.1, host-network pods (no
//! CNI), on every containerd release of the suite and both backends.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::containerd::{
    image_archive, pause_image_archive, Containerd, ROOTFS_CHECK, ROOTFS_EXPECTED,
};
use common::cri::{host_network_pod, sleeper, Cri};
use common::registry::Registry;
use common::Daemon;

/// CRI's stats poll in these tests (`stats_collect_period`); kubelet's
/// nodes use 10 s.
const STATS_PERIOD: Duration = Duration::from_secs(1);

async fn kubelets_flow_runs_on_ontop_from_pull_to_garbage_collection() {
    let d = Daemon::start().await;
    let registry = Registry::start(&d.dir.path().join("registry"));
    let image = registry.push(image_archive(), "ontop/e2e:latest");
    let pause = registry.push(pause_image_archive(), "ontop/pause:latest");
    let ctd = Containerd::start_cri(&d, &registry.host, &pause).await;
    let k8s = |args: &[&str]| ctd.ctr_ok_in("k8s.io", args);
    let mut cri = Cri::connect(&ctd.socket).await;
    let dir = d.dir.path();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let pod_config = host_network_pod("ontop-pod", &dir.join("logs"));

    // Pull, through ontop.
    let image_ref = cri.pull(&image, &pod_config).await;
    let status = cri.image_status(&image).await.expect("the pulled image");
    assert_eq!(status.repo_tags, vec![image.to_string()]);
    assert_eq!(status.id, image_ref);

    // ImageFsInfo: ontop's root, with what ontop holds once CRI's poll has
    // summed its snapshots' Usage. A poll that ran mid-pull saw only part
    // of the image, so wait for a sum that holds all of busybox.
    let used = |fs: &common::cri::v1::FilesystemUsage| {
        let bytes = fs.used_bytes.as_ref().map_or(0, |u| u.value);
        let inodes = fs.inodes_used.as_ref().map_or(0, |u| u.value);
        (bytes, inodes)
    };
    let whole_image = |f: &common::cri::v1::FilesystemUsage| {
        let (bytes, inodes) = used(f);
        bytes >= 1 << 20 && inodes > 100
    };
    let polled = Instant::now();
    let mut fs = cri.image_fs_info().await;
    while !fs.first().is_some_and(whole_image) && polled.elapsed() < 3 * STATS_PERIOD {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fs = cri.image_fs_info().await;
    }
    assert_eq!(fs.len(), 1, "one image filesystem: {fs:?}");
    let info = &fs[0];
    let expected = match ctd.release.major() {
        // containerd 1.x, the path under its root (linked to ontop's).
        1 => ctd
            .dir
            .join("root/io.containerd.snapshotter.v1.ontop")
            .display()
            .to_string(),
        // containerd 2 reports `exports.root`.
        _ => d.root.display().to_string(),
    };
    let mountpoint = info.fs_id.as_ref().map(|id| id.mountpoint.clone());
    assert_eq!(mountpoint, Some(expected), "{info:?}");
    let (bytes, inodes) = used(info);
    assert!(bytes >= 1 << 20, "busybox alone is over 1 MiB: {info:?}");
    assert!(inodes > 100, "busybox and its applets: {info:?}");

    // A host-network pod, and containers of the image in it.
    let pod = cri.run_pod(&pod_config).await;
    let app = cri
        .create(&pod, sleeper("app", &image, false), &pod_config)
        .await;
    cri.start(&app).await;
    let frozen = cri
        .create(&pod, sleeper("frozen", &image, true), &pod_config)
        .await;
    cri.start(&frozen).await;

    // The container sees the image's tree: whiteout, opaque dir, modes,
    // owners and links.
    let out = cri.exec(&app, ROOTFS_CHECK).await;
    assert_eq!(out.stdout, ROOTFS_EXPECTED, "{out:?}");
    assert_eq!(out.exit_code, 0, "{out:?}");
    // A read-only rootfs reads the same tree and takes no write.
    let out = cri.exec(&frozen, "cat /data/keep.txt").await;
    assert_eq!(out.stdout, "keep\n", "{out:?}");
    let out = cri.exec(&frozen, "touch /nope").await;
    assert_ne!(out.exit_code, 0, "{out:?}");
    assert!(out.stderr.contains("Read-only file system"), "{out:?}");

    // Stats: the writable layer grows by what the container writes, as
    // CRI's poll (ontop's Usage) sees it within two periods.
    let writable = |stats: common::cri::v1::ContainerStats| {
        let layer = stats.writable_layer.expect("stats of the writable layer");
        layer.used_bytes.map_or(0, |u| u.value)
    };
    let before = writable(cri.stats(&app).await);
    const WRITTEN: u64 = 8 << 20;
    let out = cri
        .exec(
            &app,
            "dd if=/dev/zero of=/grown bs=1048576 count=8 2>/dev/null && sync",
        )
        .await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    let written_at = Instant::now();
    let mut after = writable(cri.stats(&app).await);
    while after < before + WRITTEN && written_at.elapsed() < 2 * STATS_PERIOD + STATS_PERIOD / 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = writable(cri.stats(&app).await);
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
        cri.stop_and_remove(id).await;
    }
    cri.stop_and_remove_pod(&pod).await;
    cri.remove_image(&image).await;
    // The sandbox image too (on containerd 2 it is pinned, which CRI
    // removes all the same).
    cri.remove_image(&pause).await;
    assert!(cri.image_status(&image).await.is_none());
    assert!(cri.list_images().await.is_empty(), "CRI keeps no image");
    assert_eq!(k8s(&["images", "ls", "-q"]), "", "CRI keeps no image");
    ctd.after_gc(30, "GC to remove every snapshot of the node", || {
        k8s(&["snapshots", "--snapshotter", "ontop", "ls"])
            .lines()
            .count()
            <= 1
            && d.snapshot_dirs().is_empty()
    })
    .await;
    assert!(cri.pods().await.is_empty());
    assert!(cri.containers().await.is_empty());
    d.assert_consistent();
}

/// A node's default size limit (docs/size-limits.md): every container's
/// writable layer stops at it, while the image's layers, unpacked without
/// one, hold the whole image.
async fn a_nodes_default_size_limit_holds_every_container() {
    let d = Daemon::start_with_config("default_max_size = \"32MiB\"\n").await;
    let registry = Registry::start(&d.dir.path().join("registry"));
    let image = registry.push(image_archive(), "ontop/e2e:latest");
    let pause = registry.push(pause_image_archive(), "ontop/pause:latest");
    let ctd = Containerd::start_cri(&d, &registry.host, &pause).await;
    let mut cri = Cri::connect(&ctd.socket).await;
    let dir = d.dir.path();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let pod_config = host_network_pod("limited-pod", &dir.join("logs"));
    cri.pull(&image, &pod_config).await;
    let pod = cri.run_pod(&pod_config).await;
    let app = cri
        .create(&pod, sleeper("app", &image, false), &pod_config)
        .await;
    cri.start(&app).await;
    let out = cri
        .exec(
            &app,
            "cat /added/new.txt; dd if=/dev/zero of=/big bs=1048576 count=100 2>&1; sync",
        )
        .await;
    assert!(out.stdout.starts_with("new in layer 2\n"), "{out:?}");
    assert!(
        out.stdout.contains("No space left on device")
            || out.stdout.contains("Disk quota exceeded"),
        "100 MiB went into a container limited to 32 MiB: {out:?}"
    );
    let out = cri
        .exec(&app, "rm /big; echo fits > /small && cat /small")
        .await;
    assert_eq!(out.stdout, "fits\n", "{out:?}");
    cri.stop_and_remove(&app).await;
    cri.stop_and_remove_pod(&pod).await;
    cri.remove_image(&image).await;
    cri.remove_image(&pause).await;
    ctd.after_gc(30, "GC to remove every snapshot of the node", || {
        d.snapshot_dirs().is_empty()
    })
    .await;
    assert!(
        common::mounts_under(&d.root.join("snapshots")).is_empty(),
        "an image is still mounted"
    );
    d.assert_consistent();
}

on_every_containerd!(
    kubelets_flow_runs_on_ontop_from_pull_to_garbage_collection,
    a_nodes_default_size_limit_holds_every_container,
);
