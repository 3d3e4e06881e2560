//! ontop under a real containerd: images unpack, containers run, `ctr
//! snapshots` drives ontop, garbage collection cleans up, and containerd
//! survives ontop restarts. Everything is Debian's containerd, runc and
//! ctr; nothing is mocked.

#[macro_use]
mod common;

use std::fs;

use std::path::Path;

use common::containerd::{eventually, Containerd, ROOTFS_CHECK, ROOTFS_EXPECTED};
use common::{Backend, Daemon};

async fn an_image_unpacks_through_ontop_and_ctr_shows_its_chain() {
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();

    // ls: three committed layers, each the parent of the next.
    let ls = ctd.snapshots(&["ls"]);
    let rows: Vec<Vec<&str>> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{ls}");
    assert!(rows.iter().all(|r| r.last() == Some(&"Committed")), "{ls}");
    let base = rows
        .iter()
        .find(|r| r.len() == 2)
        .expect("a layer without parent");
    let mid = rows
        .iter()
        .find(|r| r.len() == 3 && r[1] == base[0])
        .expect("layer 2");
    let top = rows
        .iter()
        .find(|r| r.len() == 3 && r[1] == mid[0])
        .expect("layer 3");

    // tree nests them; info shows one; usage is plausible for each.
    let tree = ctd.snapshots(&["tree"]);
    let depth = |key: &str| {
        tree.lines()
            .find(|l| l.contains(key))
            .map(|l| l.find("sha256").unwrap())
    };
    assert!(
        depth(base[0]) < depth(mid[0]) && depth(mid[0]) < depth(top[0]),
        "{tree}"
    );
    let info = ctd.snapshots(&["info", top[0]]);
    assert!(info.contains("\"Kind\": \"Committed\""), "{info}");
    assert!(
        info.contains(&format!("\"Parent\": \"{}\"", mid[0])),
        "{info}"
    );

    let usage = ctd.snapshots(&["usage"]);
    let inodes = |key: &str| -> i64 {
        let line = usage.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    // Layer 1: busybox plus one symlink per applet; layer 3: links dir,
    // target=hard (one inode), two symlinks and the root.
    assert!(inodes(base[0]) > 100, "{usage}");
    // fuse-overlayfs marks a directory it creates as opaque with two
    // entries of its own (`.wh..wh..opq` and `.wh..opq`), here in links/,
    // when containerd's applier writes the layer through it (1.6). From
    // 1.7 on ontop's applier writes the upper itself, as overlay has it.
    let through_fuse = !common::containerd::release().at_least(1, 7);
    let markers = match common::backend() {
        common::Backend::FuseOverlayfs if through_fuse => 2,
        _ => 0,
    };
    assert_eq!(inodes(top[0]), 5 + markers, "{usage}");
    assert!(
        usage.contains("MiB"),
        "busybox makes layer 1 megabytes:\n{usage}"
    );

    // ontop itself agrees, under containerd's namespaced keys.
    let mut admin = d.admin().await;
    let list = admin
        .list(ontop::admin::v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.snapshots.len(), 3);
    assert!(list
        .snapshots
        .iter()
        .all(|s| s.key.starts_with(&format!("{}/", ctd.ns))));

    // mounts: an active snapshot on the image's top layer, as ctr prints it.
    ctd.snapshots(&["prepare", "work", top[0]]);
    let target = d.mountpoint("work");
    let cmd = ctd.snapshots(&["mounts", target.to_str().unwrap(), "work"]);
    assert!(
        cmd.starts_with(&format!("mount -t {} overlay", common::layered())),
        "{cmd}"
    );
    assert_eq!(
        cmd.matches("snapshots/").count(),
        5,
        "upper, work and 3 lowers: {cmd}"
    );
}

async fn containers_see_the_image_rootfs_and_keep_their_writes_to_themselves() {
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();

    assert_eq!(ctd.run("check", ROOTFS_CHECK), ROOTFS_EXPECTED);

    // A container that is kept after it exits keeps its writes...
    ctd.ctr_ok(&[
        "run",
        "--snapshotter",
        "ontop",
        common::containerd::IMAGE,
        "keeper",
        "sh",
        "-c",
        "echo mine > /mine",
    ]);
    // ...which a second container from the same image does not see.
    assert_eq!(
        ctd.run(
            "other",
            "test ! -e /mine && test ! -e /written && echo clean"
        ),
        "clean\n"
    );
    let target = d.mountpoint("keeper");
    mount_printed(&ctd, &target, "keeper");
    assert_eq!(fs::read_to_string(target.join("mine")).unwrap(), "mine\n");
    common::unmount(&target);
    ctd.ctr_ok(&["containers", "rm", "keeper"]);
}

/// Runs the mount command `ctr snapshots mounts` printed.
fn mount_printed(ctd: &Containerd, target: &std::path::Path, key: &str) {
    let cmd = ctd.snapshots(&["mounts", target.to_str().unwrap(), key]);
    common::containerd::run_printed_mount(&cmd);
}

async fn ctr_snapshot_commands_drive_ontop_directly() {
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;

    // A three-layer chain built with ctr alone, each layer written through
    // the mount ctr prints.
    let mut parent: Option<String> = None;
    for i in 1..=3 {
        let key = format!("active-{i}");
        match &parent {
            None => ctd.snapshots(&["prepare", &key]),
            Some(p) => ctd.snapshots(&["prepare", &key, p]),
        };
        let target = d.mountpoint(&key);
        mount_printed(&ctd, &target, &key);
        fs::write(target.join(format!("file-{i}")), format!("layer {i}\n")).unwrap();
        common::unmount(&target);
        let name = format!("layer-{i}");
        ctd.snapshots(&["commit", &name, &key]);
        parent = Some(name);
    }

    ctd.snapshots(&["view", "look", "layer-3"]);
    let target = d.mountpoint("look");
    mount_printed(&ctd, &target, "look");
    for i in 1..=3 {
        assert_eq!(
            fs::read_to_string(target.join(format!("file-{i}"))).unwrap(),
            format!("layer {i}\n")
        );
    }
    let err = fs::write(target.join("nope"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    common::unmount(&target);

    // Labels set with ctr reach ontop.
    ctd.snapshots(&["label", "layer-3", "containerd.io/snapshot/team=storage"]);
    let info = ctd.snapshots(&["info", "layer-3"]);
    assert!(
        info.contains("\"containerd.io/snapshot/team\": \"storage\""),
        "{info}"
    );
    // containerd numbers keys with its own sequence: find ours by label.
    let mut c = d.client().await;
    let keys = c
        .list(&["labels.\"containerd.io/snapshot/team\"==storage"])
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].starts_with(&format!("{}/", ctd.ns)) && keys[0].ends_with("/layer-3"),
        "{keys:?}"
    );

    // rm: children first, as containerd enforces too.
    assert!(!ctd
        .ctr(&["snapshots", "--snapshotter", "ontop", "rm", "layer-2"])
        .status
        .success());
    for key in ["look", "layer-3", "layer-2", "layer-1"] {
        ctd.snapshots(&["rm", key]);
    }
    assert!(ctd.snapshot_keys().is_empty());
    ctd.after_gc(10, "containerd's GC to remove ontop's snapshots", || {
        d.snapshot_dirs().is_empty()
    })
    .await;
}

async fn garbage_collection_leaves_nothing_behind() {
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();
    ctd.run("once", "echo ran > /ran");
    ctd.snapshots(&["prepare", "loose"]);
    // A snapshot made straight on ontop's socket, behind containerd's back:
    // containerd's GC owns the snapshotter and removes what it does not know.
    let mut c = d.client().await;
    c.prepare("made-behind-containerds-back", "").await.unwrap();

    ctd.snapshots(&["rm", "loose"]);
    ctd.ctr_ok(&["images", "rm", "--sync", common::containerd::IMAGE]);
    ctd.after_gc(15, "GC to remove every snapshot", || {
        ctd.snapshot_keys().is_empty() && d.snapshot_dirs().is_empty()
    })
    .await;
    assert!(c.list(&[]).await.unwrap().is_empty());
    assert_eq!(fs::read_dir(d.root.join("trash")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(d.root.join("tmp")).unwrap().count(), 0);
}

async fn containerd_keeps_working_across_ontop_restarts() {
    let mut d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();
    let before = ctd.snapshot_keys();
    assert_eq!(before.len(), 3);

    d.restart().await;
    // containerd redials with backoff; give it a few seconds.
    eventually(15, "containerd to reach the restarted ontop", || {
        ctd.ctr(&["snapshots", "--snapshotter", "ontop", "ls"])
            .status
            .success()
    })
    .await;
    assert_eq!(ctd.snapshot_keys(), before);
    assert_eq!(ctd.run("after-restart", ROOTFS_CHECK), ROOTFS_EXPECTED);

    d.kill();
    d.spawn().await;
    eventually(15, "containerd to reach ontop after a crash", || {
        ctd.ctr(&["snapshots", "--snapshotter", "ontop", "ls"])
            .status
            .success()
    })
    .await;
    assert_eq!(ctd.snapshot_keys(), before);
    assert_eq!(
        ctd.run("after-crash", "cat /added/new.txt"),
        "new in layer 2\n"
    );
}

async fn a_container_runs_on_a_host_directory_under_the_image_layers() {
    let d = Daemon::start_with_bases("").await;
    let host = d.hosts().join("srv tree");
    fs::create_dir_all(host.join("shared")).unwrap();
    fs::write(host.join("shared/config.txt"), "from the host\n").unwrap();
    fs::create_dir_all(host.join("data")).unwrap();
    fs::write(host.join("data/keep.txt"), "host version\n").unwrap();
    let before = common::tree_state(&host);
    let ctd = Containerd::start(&d).await;
    ctd.import_image();

    let label = format!("{}={}", ontop::base::BASE_LABEL, host.display());
    let out = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "ontop",
        "--snapshotter-label",
        &label,
        common::containerd::IMAGE,
        "on-base",
        "sh",
        "-c",
        "cat /shared/config.txt /data/keep.txt /added/new.txt; \
         echo changed > /shared/config.txt; rm /data/keep.txt; echo new > /shared/new; \
         cat /shared/config.txt; ls /data",
    ]);
    // The image's layers sit above the base: its /data/keep.txt wins.
    assert_eq!(out, "from the host\nkeep\nnew in layer 2\nchanged\n");
    assert_eq!(
        common::tree_state(&host),
        before,
        "the host directory was modified"
    );
}

async fn a_container_cannot_write_past_its_size_limit() {
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();
    let label = format!("{}=16MiB", ontop::limit::ONTOP_MAX_SIZE_LABEL);
    let out = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "ontop",
        "--snapshotter-label",
        &label,
        common::containerd::IMAGE,
        "limited",
        "sh",
        "-c",
        "df -k / | tail -1; dd if=/dev/zero of=/big bs=1048576 count=64 2>&1; sync; \
         echo dd=$?; cat /added/new.txt",
    ]);
    assert!(
        out.contains("No space left on device") || out.contains("Disk quota exceeded"),
        "the container wrote 64 MiB under a 16 MiB limit:\n{out}"
    );
    assert!(out.contains("new in layer 2"), "{out}");
    // df in the container shows the limit (loop-ext4 on the test's ext4).
    let total_kib: u64 = out
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no df line:\n{out}"));
    assert!(
        (16 * 1024..=(16 + 13) * 1024).contains(&total_kib),
        "df shows {total_kib} KiB for a 16 MiB limit"
    );
    // --rm removed the snapshot: no image, mount or loop device is left.
    common::containerd::eventually(10, "the limited snapshot's image to go", || {
        common::mounts_under(&d.root.join("snapshots")).is_empty()
            && !std::fs::read_dir("/sys/block").unwrap().any(|e| {
                std::fs::read_to_string(e.unwrap().path().join("loop/backing_file"))
                    .is_ok_and(|f| f.starts_with(&*d.root.to_string_lossy()))
            })
    })
    .await;
    d.assert_consistent();
}

/// What a container sees of its whole root filesystem: every path's type,
/// mode, owner, and its link target or content digest.
const ROOTFS_MANIFEST: &str = r#"find / -xdev | sort | while read -r f; do
  t=$(stat -c %F "$f")
  printf '%s %s %s ' "$f" "$t" "$(stat -c '%a %u:%g' "$f")"
  case "$t" in
    "symbolic link") readlink "$f" ;;
    regular*) md5sum < "$f" ;;
    *) echo ;;
  esac
done"#;

/// containerd 2.2+ with `max_concurrent_unpacks > 1` pulls an image by
/// unpacking its layers concurrently, each into a snapshot prepared
/// without its parent, which Commit rebases (ontop declares `rebase`).
/// No package registry carries containerd 2.2 yet, so that path runs only
/// as `containerd_extra`, with a containerd of the user's own.
/// The seven-layer image stacks whiteouts, opaque dirs, and mode and
/// owner changes on each other, so a lost whiteout or a layer applied
/// against the wrong parent shows. The rootfs must be the same from a
/// sequential unpack (import), from the parallel pull, and from
/// containerd's own overlayfs pulling in parallel too. Older releases
/// unpack sequentially either way, and must agree as well.
async fn parallel_unpack_gives_the_rootfs_of_a_sequential_one_and_of_containerds_overlayfs() {
    use common::containerd::{deep_image_archive, DEEP_IMAGE};
    let d = Daemon::start().await;
    let release = common::containerd::release();
    let rebases = release.at_least(2, 2);
    let extra = match release.major() >= 2 {
        true => "[plugins.\"io.containerd.transfer.v1.local\"]\n  max_concurrent_unpacks = 4\n",
        false => "",
    };
    let ctd = Containerd::start_with(&d, extra).await;
    let registry = common::registry::Registry::start(&d.dir.path().join("registry"));
    let tar = deep_image_archive();
    let pulled = registry.push(tar, "ontop/deep:latest");
    let tar = tar.display().to_string();

    // Each in a namespace of its own, so each unpacks every layer.
    ctd.ctr_ok_in(
        &ctd.namespace("seq"),
        &["images", "import", "--snapshotter", "ontop", &tar],
    );
    let rebased_before = d.log().matches("rebased at commit").count();
    let pull = |ns: &str, snapshotter: &str| {
        ctd.ctr_ok_in(
            &ctd.namespace(ns),
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                &pulled,
            ],
        );
    };
    pull("par", "ontop");
    let rebased = d.log().matches("rebased at commit").count() - rebased_before;
    pull("ovl", "overlayfs");
    // Layers 2 to 7 are each rebased when they unpack in parallel.
    assert_eq!(rebased, if rebases { 6 } else { 0 }, "{}", d.log());

    let rootfs = |ns: &str, snapshotter: &str, image: &str| {
        ctd.ctr_ok_in(
            &ctd.namespace(ns),
            &[
                "run",
                "--rm",
                "--snapshotter",
                snapshotter,
                image,
                "look",
                "sh",
                "-c",
                ROOTFS_MANIFEST,
            ],
        )
    };
    let sequential = rootfs("seq", "ontop", DEEP_IMAGE);
    let concurrent = rootfs("par", "ontop", &pulled);
    let overlayfs = rootfs("ovl", "overlayfs", &pulled);
    assert_same_tree(
        "ontop, sequential",
        &sequential,
        "ontop, pulled",
        &concurrent,
    );
    assert_same_tree(
        "ontop, pulled",
        &concurrent,
        "overlayfs, pulled",
        &overlayfs,
    );

    // And the tree is the image's, not three copies of one mistake.
    for line in [
        "/added directory 755 0:0",
        "/data/keep.txt regular file 640 0:42",
        "/deep directory 711 9:9",
        "/deep/final regular file 644 0:0",
        "/empty-file regular empty file 0 0:0",
        "/modes/file regular file 604 2000:3000",
        "/olddir/c/inner regular file 644 0:0",
        "/setuid regular file 4755 0:0",
        "/symdir symbolic link 777 0:0 /deep",
        "/tmp directory 770 5:5",
    ] {
        assert!(
            sequential.lines().any(|l| l.starts_with(line)),
            "{line:?} is missing from:\n{sequential}"
        );
    }
    for gone in [
        "/links/sym ",
        "/added/other.txt",
        "/added/new.txt",
        "/deep/a",
        "/deep/c",
        "/bin/vi ",
        "/olddir/a",
        "/data/delete-me.txt",
    ] {
        assert!(
            !sequential.lines().any(|l| l.starts_with(gone)),
            "{gone:?} should be gone:\n{sequential}"
        );
    }
}

/// Fails with the entries only one of two rootfs manifests has.
fn assert_same_tree(a_name: &str, a: &str, b_name: &str, b: &str) {
    if a == b {
        return;
    }
    let only = |x: &str, y: &str| -> Vec<String> {
        let y: std::collections::HashSet<&str> = y.lines().collect();
        x.lines()
            .filter(|l| !y.contains(l))
            .take(10)
            .map(|l| format!("  {l}"))
            .collect()
    };
    panic!(
        "the rootfs differs.\nonly in {a_name}:\n{}\nonly in {b_name}:\n{}",
        only(a, b).join("\n"),
        only(b, a).join("\n")
    );
}

/// A container in a user namespace (`ctr run --uidmap --remap-labels`,
/// which is what Kubernetes' `hostUsers: false` asks of containerd 2):
/// containerd 2 declares ontop's `remap-ids`, hands it the mapping labels,
/// and ontop maps: fuse-overlayfs itself, the kernel backend through
/// containerd 2's idmapped mounts. containerd 1.x cannot idmap-mount, so on
/// the kernel backend it gets an error naming the way out.
async fn user_namespaced_containers_see_the_image_owners_mapped() {
    user_namespaced_container("").await
}

/// With `remap_ids = false`, containerd-config leaves out `remap-ids`, so
/// containerd 1.7 and 2 map by copying the image into a snapshot they
/// chown, and still send the labels: ontop must not map a second time
/// (on 1.7's fuse backend it does, asserted as a known limitation).
/// containerd 1.6 has no capabilities and its labels always mean "map".
async fn without_remap_ids_containerd_2_maps_by_copying_and_ontop_does_not_map_twice() {
    user_namespaced_container("remap_ids = false\n").await
}

async fn user_namespaced_container(config: &str) {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start_with_config(config).await;
    // Without the `remap-ids` capability, containerd's client (1.7 and
    // later) copies the image into a snapshot it chowns; 1.6 never copies.
    let copies =
        config.contains("remap_ids = false") && common::containerd::release().at_least(1, 7);
    let ctd = Containerd::start(&d).await;
    ctd.import_image();
    let layers: Vec<_> = committed_dirs(&d).await;
    let before: Vec<_> = layers.iter().map(|l| common::tree_state(l)).collect();
    let run = [
        "run",
        "--snapshotter",
        "ontop",
        "--uidmap",
        "0:100000:65536",
        "--gidmap",
        "0:100000:65536",
        "--remap-labels",
        common::containerd::IMAGE,
        "userns",
        "sh",
        "-c",
        "cat /proc/self/uid_map; id -u; stat -c '%u:%g %n' /data/keep.txt /owner/file; \
         echo mine > /written; stat -c '%u:%g %n' /written",
    ];
    if ctd.release.major() == 1 && common::backend() == Backend::Overlayfs {
        let err = ctd.ctr_err(&run);
        assert!(
            err.contains("needs containerd 2.0 or later") && err.contains("fuse-overlayfs"),
            "{err}"
        );
        return;
    }
    if copies
        && ctd.release == common::containerd::Release::V1_7
        && common::backend() == Backend::FuseOverlayfs
    {
        // Known limitation: ontop cannot tell 1.7 (which copied) from 1.6
        // (which never copies, so its labels mean "map"), so it maps the
        // chowned copy a second time and the container's root may not
        // write its own rootfs. Why config.toml.example says to keep
        // remap_ids on under 1.x.
        let err = ctd.ctr_err(&run);
        assert!(err.contains("rootfs/proc: permission denied"), "{err}");
        return;
    }
    if copies && common::backend() == Backend::FuseOverlayfs {
        // containerd chowns a copy of the image through a fuse-overlayfs
        // mount, where 1.10 copies a hard-linked file up under its other
        // name (see docs/backends.md): the walk then meets the image's second
        // link already chowned. Why the fuse backend wants remap_ids.
        let err = ctd.ctr_err(&run);
        assert!(err.contains("cannot be mapped to a host ID"), "{err}");
        return;
    }
    let out = ctd.ctr_ok(&run);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        [
            "0",
            "100000",
            "65536", // uid_map: the container's root is host 100000
            "0",
            "0:0",
            "/data/keep.txt",
            "1000:1000",
            "/owner/file",
            "0:0",
            "/written"
        ],
        "{out}"
    );
    // The container's write sits in its own upper: with the host's ids
    // on the kernel backend (containerd idmap-mounts only the layers
    // below), with the container's on fuse-overlayfs (which maps writes
    // back).
    let mut c = d.client().await;
    let key = c
        .list(&["kind==active"])
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.ends_with("/userns"))
        .expect("the container's snapshot");
    let upper = d
        .admin()
        .await
        .info(ontop::admin::v1::InfoRequest { key })
        .await
        .unwrap();
    let written = Path::new(&upper.into_inner().path).join("fs/written");
    let md = fs::metadata(&written).unwrap();
    let expected = match common::backend() {
        Backend::Overlayfs => 100000,
        Backend::FuseOverlayfs if copies => 100000,
        Backend::FuseOverlayfs => 0,
    };
    assert_eq!((md.uid(), md.gid()), (expected, expected));
    // containerd's copy is a fourth committed snapshot over the image's
    // three, held by the container until it goes (then GC takes it).
    let committed = c.list(&["kind==committed"]).await.unwrap().len();
    assert_eq!(committed, if copies { 4 } else { 3 });
    ctd.ctr_ok(&["containers", "rm", "userns"]);
    // Nothing under the image changed owner.
    let after: Vec<_> = layers.iter().map(|l| common::tree_state(l)).collect();
    assert!(before == after, "the image's layers changed");
}

/// The `fs` dirs of ontop's committed snapshots.
async fn committed_dirs(d: &Daemon) -> Vec<std::path::PathBuf> {
    let list = d
        .admin()
        .await
        .list(ontop::admin::v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    list.snapshots
        .iter()
        .filter(|s| s.kind == "committed")
        .map(|s| d.root.join(format!("snapshots/{}/fs", s.id)))
        .collect()
}

/// containerd's garbage collector meets ontop restarting and crashing at
/// the moments it calls List, Remove and Cleanup: a restart right before a
/// `ctr run --rm` (whose removal triggers a collection), and a SIGKILL in
/// the middle of removing an image's snapshots. containerd retries, ontop
/// answers idempotently, and in the end neither has anything left.
async fn garbage_collection_finishes_across_ontop_restarts_and_crashes() {
    let mut d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();

    d.restart().await;
    eventually(15, "a container run right after ontop restarts", || {
        ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "ontop",
            common::containerd::IMAGE,
            "after-restart",
            "true",
        ])
        .status
        .success()
    })
    .await;

    // Remove the image, its collection running while ontop dies.
    let mut rm = ctd.ctr_command(&ctd.ns);
    rm.args(["images", "rm", "--sync", common::containerd::IMAGE]);
    let rm = std::thread::spawn(move || rm.output());
    tokio::time::sleep(std::time::Duration::from_millis(fastrand::u64(0..30))).await;
    d.kill();
    d.spawn().await;
    let _ = rm.join();
    ctd.after_gc(30, "GC to finish what the crash interrupted", || {
        ctd.snapshot_keys().is_empty() && d.snapshot_dirs().is_empty()
    })
    .await;
    let mut c = d.client().await;
    assert!(c.list(&[]).await.unwrap().is_empty());
}

/// The issue's scenario, with ontop socket-activated: a chain made with
/// ctr, a restart of ontop, `ctr run --rm` right after it (its removal
/// starts a collection), then the chain and the image removed. containerd
/// never meets a refused connection, so every collection reaches ontop,
/// and in the end neither has anything left, with no later removal needed
/// to retry a failed one (no `after_gc` nudges here).
async fn garbage_collection_across_a_socket_activated_restart_leaves_nothing() {
    let mut d = Daemon::start_activated("").await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();
    ctd.snapshots(&["prepare", "chain-1"]);
    ctd.snapshots(&["commit", "chain-1-c", "chain-1"]);
    ctd.snapshots(&["prepare", "chain-2", "chain-1-c"]);
    ctd.snapshots(&["commit", "chain-2-c", "chain-2"]);
    ctd.snapshots(&["prepare", "chain-3", "chain-2-c"]);

    d.restart().await;
    // Right away, and once: no retry.
    assert_eq!(ctd.run("after-restart", "echo ran"), "ran\n");
    for key in ["chain-3", "chain-2-c", "chain-1-c"] {
        ctd.snapshots(&["rm", key]);
    }
    ctd.ctr_ok(&["images", "rm", "--sync", common::containerd::IMAGE]);
    eventually(15, "containerd's collections to leave nothing", || {
        ctd.snapshot_keys().is_empty() && d.snapshot_dirs().is_empty()
    })
    .await;
    let log = ctd.log();
    assert!(
        !log.contains("garbage collection failed"),
        "a collection failed:\n{}",
        common::containerd::tail(&log, 30)
    );
    let mut c = d.client().await;
    assert!(c.list(&[]).await.unwrap().is_empty());
}

/// The three ways to restart ontop, measured the same way on every
/// containerd (docs/operations.md's table comes from one run of this):
/// eight connections of load through three restarts (calls failed, the
/// longest wait for an answer), then one more restart, `ctr run --rm` at
/// once, and the removal of a `ctr snapshots` chain and of the image
/// (what containerd's collections leave on ontop's disk).
mod restarts {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Way {
        Plain,
        SocketActivated,
        Takeover,
    }

    async fn restart(d: &mut Daemon, way: Way) {
        match way {
            Way::Plain | Way::SocketActivated => d.restart().await,
            Way::Takeover => d.take_over().await,
        }
    }

    async fn measure(way: Way) -> String {
        let mut d = match way {
            Way::SocketActivated => Daemon::start_activated("").await,
            _ => Daemon::start().await,
        };
        let ctd = Containerd::start(&d).await;
        ctd.import_image();
        // 1. The test's client on 8 connections through 3 restarts.
        let stop = Arc::new(AtomicBool::new(false));
        let load = common::load::on_its_own_thread(d.socket.clone(), 8, Arc::clone(&stop));
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            restart(&mut d, way).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let seen = tokio::task::spawn_blocking(move || load.join().unwrap())
            .await
            .unwrap();
        // Whatever the way, every acknowledged Commit is there.
        let mut c = d.client().await;
        for name in &seen.acknowledged {
            assert!(
                c.stat(name).await.is_ok(),
                "{way:?}: acknowledged {name} was lost"
            );
        }

        // 2. containerd running containers, `ctr run --rm` one after the
        //    other, each made once, through 2 restarts. (Apart from the
        //    load: their removals make containerd collect, and it deletes
        //    what the load made, which it never knew.)
        let runs = ctd.run_containers("ontop", "during", &["true"]);
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            restart(&mut d, way).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let counts = runs.finish().await;
        let (ran, run_failed) = (counts.ran, counts.failed);

        // 3. A restart, then at once a container and the collections.
        // Set up once containerd reaches ontop again (after plain
        // restarts its client backs off): not what is measured.
        for step in [
            &["prepare", "chain-1"][..],
            &["commit", "chain-1-c", "chain-1"],
            &["prepare", "chain-2", "chain-1-c"],
        ] {
            let mut args = vec!["snapshots", "--snapshotter", "ontop"];
            args.extend(step);
            eventually(15, "containerd to reach ontop again", || {
                ctd.ctr(&args).status.success()
            })
            .await;
        }
        restart(&mut d, way).await;
        // Right away, and once: no retry.
        let after = ctd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "ontop",
                common::containerd::IMAGE,
                "after-restart",
                "true",
            ])
            .status
            .success();
        for key in ["chain-2", "chain-1-c"] {
            ctd.snapshots(&["rm", key]);
        }
        ctd.ctr(&["images", "rm", "--sync", common::containerd::IMAGE]);
        // containerd's collections also take what the load made, which it
        // never knew: what is left is what a failed collection left.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.snapshot_dirs().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = d.snapshot_dirs().len();
        let (major, minor) = common::containerd::release().version();
        let row = format!(
            "| {major}.{minor} | {way:?} | {} | {} | {:?} | {ran} of {} | {} | {left} |",
            seen.ok,
            seen.failed,
            seen.longest_gap.as_millis(),
            ran + run_failed,
            if after { "runs" } else { "fails" },
        );
        println!("RESTARTS {row}");
        if way != Way::Plain {
            assert_eq!(seen.failed, 0, "{way:?}: {:?}", seen.first_error);
            assert_eq!(
                run_failed, 0,
                "{way:?}: containers failed to run during restarts"
            );
            assert!(
                after,
                "{way:?}: ctr run --rm right after the restart failed"
            );
            assert_eq!(left, 0, "{way:?}: collections left snapshots on disk");
        }
        row
    }

    /// | containerd | way | calls answered | failed | longest wait (ms) |
    /// ctr run --rm right after | snapshot dirs left |
    async fn three_ways_to_restart_measured_alike() {
        for way in [Way::Plain, Way::SocketActivated, Way::Takeover] {
            measure(way).await;
        }
    }

    on_every_containerd!(kernel_only: three_ways_to_restart_measured_alike);
}

mod rendering {
    use super::*;

    /// `ontop containerd-config` renders for every containerd from 1.6 to
    /// 2.3. Each rendering this containerd can take (its own generation's, up
    /// to its own release) is loaded by it, and wires ontop in: an image
    /// imports (on 2.x, through the transfer service's `unpack_config`) and
    /// ctr sees its layers.
    async fn every_rendering_this_containerd_can_take_wires_ontop_in() {
        let (major, minor) = common::containerd::release().version();
        let first = if major == 1 { 6 } else { 0 };
        for rendered in first..=minor.min(3) {
            let version = format!("{major}.{rendered}");
            let d = Daemon::start().await;
            let ctd = Containerd::start_rendered_for(&d, &version).await;
            let config = std::fs::read_to_string(ctd.dir.join("config.toml")).unwrap();
            assert!(
                config.contains(&format!("# ontop for containerd {version}")),
                "{config}"
            );
            ctd.import_image();
            assert_eq!(ctd.snapshot_keys().len(), 3, "rendered for {version}");
            println!("the rendering for containerd {version} loads and serves");
        }
    }

    on_every_containerd!(kernel_only: every_rendering_this_containerd_can_take_wires_ontop_in);
}

on_every_containerd!(
    an_image_unpacks_through_ontop_and_ctr_shows_its_chain,
    containers_see_the_image_rootfs_and_keep_their_writes_to_themselves,
    ctr_snapshot_commands_drive_ontop_directly,
    garbage_collection_leaves_nothing_behind,
    garbage_collection_finishes_across_ontop_restarts_and_crashes,
    garbage_collection_across_a_socket_activated_restart_leaves_nothing,
    containerd_keeps_working_across_ontop_restarts,
    a_container_runs_on_a_host_directory_under_the_image_layers,
    user_namespaced_containers_see_the_image_owners_mapped,
    without_remap_ids_containerd_2_maps_by_copying_and_ontop_does_not_map_twice,
    parallel_unpack_gives_the_rootfs_of_a_sequential_one_and_of_containerds_overlayfs,
    a_container_cannot_write_past_its_size_limit,
);
