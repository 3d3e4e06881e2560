//! Mount-level behaviour: mount what the daemon returns with the real
//! kernel overlayfs or fuse-overlayfs and check what a container would
//! see. Mirrors the filesystem cases of containerd's snapshotter testsuite.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{code, labels, mount_all, unmount, Backend, Daemon};
use tonic::Code;

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

async fn a_committed_write_is_seen_by_a_child_and_a_change_in_the_child_stays_there() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| {
        fs::write(r.join("foo"), "foo\n").unwrap();
        fs::create_dir(r.join("dir")).unwrap();
        fs::write(r.join("dir/bar"), "bar\n").unwrap();
    })
    .await;
    c.layer(&d, "l2", "l1", |r| {
        assert_eq!(read(&r.join("foo")), "foo\n");
        fs::write(r.join("foo"), "changed\n").unwrap();
    })
    .await;
    let target = d.mountpoint("check");
    mount_all(&c.view("check", "l2").await.unwrap(), &target);
    assert_eq!(read(&target.join("foo")), "changed\n");
    assert_eq!(read(&target.join("dir/bar")), "bar\n");
    unmount(&target);
    let target = d.mountpoint("check1");
    mount_all(&c.view("check1", "l1").await.unwrap(), &target);
    assert_eq!(
        read(&target.join("foo")),
        "foo\n",
        "the lower layer is untouched"
    );
}

async fn deletes_renames_and_directory_removal_across_layers() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| {
        fs::write(r.join("gone"), "x").unwrap();
        fs::write(r.join("moved"), "payload").unwrap();
        fs::create_dir_all(r.join("tree/sub")).unwrap();
        fs::write(r.join("tree/sub/f"), "f").unwrap();
    })
    .await;
    c.layer(&d, "l2", "l1", |r| {
        fs::remove_file(r.join("gone")).unwrap();
        fs::rename(r.join("moved"), r.join("renamed")).unwrap();
        fs::remove_dir_all(r.join("tree")).unwrap();
    })
    .await;
    let target = d.mountpoint("v");
    mount_all(&c.view("v", "l2").await.unwrap(), &target);
    assert!(!target.join("gone").exists());
    assert!(!target.join("moved").exists());
    assert_eq!(read(&target.join("renamed")), "payload");
    assert!(!target.join("tree").exists());
    let mut names: Vec<_> = fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["renamed"]);
}

async fn a_chown_survives_commit() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| {
        fs::create_dir(r.join("d")).unwrap();
        fs::write(r.join("d/f"), "x").unwrap();
    })
    .await;
    c.layer(&d, "l2", "l1", |r| {
        std::os::unix::fs::chown(r.join("d"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::chown(r.join("d/f"), Some(4321), Some(8765)).unwrap();
    })
    .await;
    let target = d.mountpoint("v");
    mount_all(&c.view("v", "l2").await.unwrap(), &target);
    let md = fs::metadata(target.join("d")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    let md = fs::metadata(target.join("d/f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (4321, 8765));
}

async fn directory_modes_survive_commit() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| {
        fs::create_dir(r.join("d")).unwrap();
        fs::set_permissions(r.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(r.join("sticky")).unwrap();
        fs::set_permissions(r.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    })
    .await;
    c.layer(&d, "l2", "l1", |r| {
        fs::write(r.join("d/f"), "x").unwrap();
    })
    .await;
    let target = d.mountpoint("v");
    mount_all(&c.view("v", "l2").await.unwrap(), &target);
    assert_eq!(
        fs::metadata(target.join("d")).unwrap().mode() & 0o7777,
        0o700
    );
    assert_eq!(
        fs::metadata(target.join("sticky")).unwrap().mode() & 0o7777,
        0o1777
    );
}

async fn views_are_really_read_only() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| fs::write(r.join("a"), "a").unwrap())
        .await;
    c.layer(&d, "l2", "l1", |r| fs::write(r.join("b"), "b").unwrap())
        .await;
    // One view of each shape: no parent (bind of its own empty tree), one
    // parent (bind of the parent) and several parents (lowerdir-only overlay).
    for (key, parent, shape) in [
        ("v0", "", "bind"),
        ("v1", "l1", "bind"),
        ("v2", "l2", common::layered()),
    ] {
        let mounts = c.view(key, parent).await.unwrap();
        assert_eq!(mounts[0].r#type, shape, "{key}");
        let target = d.mountpoint(key);
        mount_all(&mounts, &target);
        let err = fs::write(target.join("new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{key}: {err}");
        if !parent.is_empty() {
            let err = fs::remove_file(target.join("a")).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{key}: {err}");
        }
        unmount(&target);
    }
}

async fn a_new_root_is_0755_and_a_child_root_takes_its_parents_owner() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mounts = c.prepare("p-a", "").await.unwrap();
    let target = d.mountpoint("p-a");
    mount_all(&mounts, &target);
    let md = fs::metadata(&target).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o755);
    std::os::unix::fs::chown(&target, Some(1000), Some(1001)).unwrap();
    unmount(&target);
    c.commit("p", "p-a").await.unwrap();
    c.prepare("child", "p").await.unwrap();
    let upper = fs::metadata(d.root.join("snapshots/2/fs")).unwrap();
    assert_eq!((upper.uid(), upper.gid()), (1000, 1001));
    let target = d.mountpoint("child");
    mount_all(&c.mounts("child").await.unwrap(), &target);
    let md = fs::metadata(&target).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1001));
}

async fn a_chain_of_128_layers_mounts_and_reads_right() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mut parent = String::new();
    for i in 0..128 {
        let name = format!("layer-{i}");
        let key = format!("{name}-active");
        c.prepare(&key, &parent).await.unwrap();
        // Write straight into the upper dir: mounting 128 times is slow and
        // the mount of each depth is exercised by the view below.
        let upper = d.root.join(format!("snapshots/{}/fs", i + 1));
        fs::write(upper.join(format!("f{i}")), format!("{i}")).unwrap();
        fs::write(upper.join("top"), format!("{i}")).unwrap();
        c.commit(&name, &key).await.unwrap();
        parent = name;
    }
    let mounts = c.view("flat", &parent).await.unwrap();
    let lowerdir = mounts[0]
        .options
        .iter()
        .find(|o| o.starts_with("lowerdir="))
        .unwrap();
    assert_eq!(lowerdir.split(':').count(), 128);
    let target = d.mountpoint("flat");
    mount_all(&mounts, &target);
    for i in 0..128 {
        assert_eq!(read(&target.join(format!("f{i}"))), format!("{i}"));
    }
    assert_eq!(read(&target.join("top")), "127", "the nearest layer wins");
    unmount(&target);

    // And a writable snapshot on top of all of them.
    let mounts = c.prepare("rw", &parent).await.unwrap();
    let target = d.mountpoint("rw");
    mount_all(&mounts, &target);
    fs::write(target.join("top"), "rw").unwrap();
    assert_eq!(read(&target.join("f0")), "0");
}

async fn removing_an_intermediate_snapshot_fails_until_its_child_is_gone() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "base", "", |r| fs::write(r.join("a"), "a").unwrap())
        .await;
    c.layer(&d, "mid", "base", |r| fs::write(r.join("b"), "b").unwrap())
        .await;
    c.prepare("top", "mid").await.unwrap();
    assert_eq!(code(c.remove("mid").await), Code::FailedPrecondition);
    assert_eq!(code(c.remove("base").await), Code::FailedPrecondition);
    c.remove("top").await.unwrap();
    c.remove("mid").await.unwrap();
    c.remove("base").await.unwrap();
    assert!(d.snapshot_dirs().is_empty(), "{:?}", d.snapshot_dirs());
}

/// Kernel overlay gets `index=off` where the kernel has the parameter and
/// `userxattr` only in a user namespace; fuse-overlayfs takes neither.
async fn layered_mounts_carry_the_backends_options() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "base", "", |_| {}).await;
    let mounts = c.prepare("a", "base").await.unwrap();
    assert_eq!(mounts.len(), 1);
    let m = &mounts[0];
    assert_eq!(
        (m.r#type.as_str(), m.source.as_str()),
        (common::layered(), "overlay")
    );
    let has_index = Path::new("/sys/module/overlay/parameters/index").exists();
    assert_eq!(
        m.options.iter().any(|o| o == "index=off"),
        has_index && common::backend() == Backend::Overlayfs
    );
    assert!(
        !m.options.iter().any(|o| o == "userxattr"),
        "not in a user namespace"
    );
    let upper = d.root.join("snapshots/2/fs");
    assert!(m.options.contains(&format!("upperdir={}", upper.display())));
    assert!(m.options.contains(&format!(
        "workdir={}",
        d.root.join("snapshots/2/work").display()
    )));
    assert!(m.options.contains(&format!(
        "lowerdir={}",
        d.root.join("snapshots/1/fs").display()
    )));
}

async fn configured_mount_options_reach_layered_mounts_only() {
    // An option each backend understands.
    let option = match common::backend() {
        Backend::Overlayfs => "redirect_dir=off",
        Backend::FuseOverlayfs => "noacl",
    };
    let d = Daemon::start_with_config(&format!("mount_options = [{option:?}]")).await;
    let mut c = d.client().await;
    assert_eq!(
        c.prepare("b", "").await.unwrap()[0].options,
        ["rw", "rbind"]
    );
    c.commit("base", "b").await.unwrap();
    let mounts = c.prepare("a", "base").await.unwrap();
    assert_eq!(mounts[0].options.last().unwrap(), option);
    let target = d.mountpoint("a");
    mount_all(&mounts, &target);
    fs::write(target.join("f"), "x").unwrap();
}

/// containerd's `WithRemapperLabels` for user namespaces. fuse-overlayfs
/// shifts owners on the fly. On the kernel backend the mounts carry
/// containerd 2's `uidmap=`/`gidmap=` options, which containerd idmap-mounts
/// (tests/containerd.rs runs such a container), and the upper's root
/// belongs to the container's root.
async fn id_mapping_labels_shift_owners_on_fuse_and_become_containerds_idmap_options_on_the_kernel()
{
    use std::os::unix::fs::{chown, MetadataExt};
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| {
        fs::write(r.join("root-file"), "r").unwrap();
        fs::write(r.join("user-file"), "u").unwrap();
        chown(r.join("user-file"), Some(5), Some(7)).unwrap();
    })
    .await;
    let mapping = labels(&[
        ("containerd.io/snapshot/uidmapping", "0:100000:65536"),
        ("containerd.io/snapshot/gidmapping", "0:200000:65536"),
    ]);
    let malformed = labels(&[("containerd.io/snapshot/uidmapping", "0:100000")]);
    let err = c.prepare_with("bad", "l1", malformed).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ctrID:hostID:size"), "{err}");

    if common::backend() == Backend::Overlayfs {
        // containerd idmap-mounts only with both mappings.
        let uid_only = labels(&[("containerd.io/snapshot/uidmapping", "0:100000:65536")]);
        let err = c.prepare_with("half", "l1", uid_only).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("both"), "{err}");
        assert_eq!(code(c.stat("half").await), Code::NotFound);

        let mounts = c.prepare_with("m", "l1", mapping.clone()).await.unwrap();
        assert_eq!(mounts[0].r#type, "overlay");
        assert_eq!(
            mounts[0].options[..2],
            ["uidmap=0:100000:65536", "gidmap=0:200000:65536"]
        );
        assert_eq!(mounts, c.mounts("m").await.unwrap());
        let upper = Path::new(
            mounts[0]
                .options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap(),
        );
        let md = fs::metadata(upper).unwrap();
        assert_eq!((md.uid(), md.gid()), (100000, 200000));
        // With no parent, a bind carrying the same options.
        let mounts = c.prepare_with("fresh", "", mapping).await.unwrap();
        assert_eq!(mounts[0].r#type, "bind");
        assert_eq!(
            mounts[0].options,
            [
                "uidmap=0:100000:65536",
                "gidmap=0:200000:65536",
                "rw",
                "rbind"
            ]
        );
        // The layer under them keeps its owners.
        let view = c.view("look", "l1").await.unwrap();
        let owners = fs::metadata(Path::new(&view[0].source).join("user-file")).unwrap();
        assert_eq!((owners.uid(), owners.gid()), (5, 7));
        return;
    }

    let mounts = c.prepare_with("m", "l1", mapping.clone()).await.unwrap();
    let opts = &mounts[0].options;
    assert!(
        opts.contains(&"uidmapping=0:100000:65536".to_string()),
        "{opts:?}"
    );
    assert!(
        opts.contains(&"gidmapping=0:200000:65536".to_string()),
        "{opts:?}"
    );
    let target = d.mountpoint("m");
    mount_all(&mounts, &target);
    let owner = |name: &str| {
        let md = fs::metadata(target.join(name)).unwrap();
        (md.uid(), md.gid())
    };
    assert_eq!(owner("root-file"), (100000, 200000));
    assert_eq!(owner("user-file"), (100005, 200007));
    unmount(&target);

    // Even a snapshot with no parent, which would otherwise be a bind of
    // its tree, is mounted through fuse-overlayfs to map its owners.
    let mounts = c.prepare_with("fresh", "", mapping).await.unwrap();
    assert_eq!(mounts[0].r#type, "fuse3.fuse-overlayfs");
    let target = d.mountpoint("fresh");
    mount_all(&mounts, &target);
    assert_eq!(fs::metadata(&target).unwrap().uid(), 100000);
    unmount(&target);
}

/// `remap_ids = false`: containerd 2.x maps by copying and chowning the
/// image itself, and still sends the labels, which then only say who owns
/// the new snapshot's root. Mapping again would shift owners twice.
async fn without_remap_ids_the_labels_only_give_the_root_to_the_containers_root() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start_with_config("remap_ids = false\n").await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| fs::write(r.join("f"), "x").unwrap())
        .await;
    let mapping = labels(&[
        ("containerd.io/snapshot/uidmapping", "0:100000:65536"),
        ("containerd.io/snapshot/gidmapping", "0:200000:65536"),
    ]);
    let mounts = c.prepare_with("m", "l1", mapping).await.unwrap();
    let opts = mounts[0].options.join(",");
    assert!(!opts.contains("map"), "{opts}");
    let target = d.mountpoint("m");
    mount_all(&mounts, &target);
    let md = fs::metadata(&target).unwrap();
    assert_eq!((md.uid(), md.gid()), (100000, 200000));
    assert_eq!(fs::metadata(target.join("f")).unwrap().uid(), 0);
    unmount(&target);
}

/// containerd's unpacker prepares each image layer with
/// `containerd.io/snapshot.ref`; one without a parent (every layer, when
/// containerd 2.2+ unpacks in parallel) gets an overlay holding only its
/// upper dir, which containerd's applier writes into directly, turning
/// whiteouts into overlay's.
async fn a_parentless_layer_unpack_gets_an_overlay_with_only_its_upperdir() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let unpack = labels(&[
        ("containerd.io/snapshot.ref", "sha256:abc"),
        ("containerd.io/snapshot/parent-chain-id", "sha256:def"),
    ]);
    let mounts = c
        .prepare_with("extract-1 sha256:abc", "", unpack)
        .await
        .unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(
        (mounts[0].r#type.as_str(), mounts[0].source.as_str()),
        ("overlay", "overlay")
    );
    assert_eq!(mounts[0].options.len(), 1, "{mounts:?}");
    let upper = mounts[0].options[0].strip_prefix("upperdir=").unwrap();
    assert!(Path::new(upper).is_dir(), "{upper}");
    assert_eq!(mounts, c.mounts("extract-1 sha256:abc").await.unwrap());
    // An ordinary parentless snapshot keeps its bind.
    let plain = c.prepare("plain", "").await.unwrap();
    assert_eq!(plain[0].r#type, "bind");
}

on_every_backend!(
    a_committed_write_is_seen_by_a_child_and_a_change_in_the_child_stays_there,
    deletes_renames_and_directory_removal_across_layers,
    a_chown_survives_commit,
    directory_modes_survive_commit,
    views_are_really_read_only,
    a_new_root_is_0755_and_a_child_root_takes_its_parents_owner,
    a_chain_of_128_layers_mounts_and_reads_right,
    removing_an_intermediate_snapshot_fails_until_its_child_is_gone,
    layered_mounts_carry_the_backends_options,
    configured_mount_options_reach_layered_mounts_only,
    id_mapping_labels_shift_owners_on_fuse_and_become_containerds_idmap_options_on_the_kernel,
    without_remap_ids_the_labels_only_give_the_root_to_the_containers_root,
    a_parentless_layer_unpack_gets_an_overlay_with_only_its_upperdir,
);
