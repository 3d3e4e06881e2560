//! Host base directories: snapshots copy-on-write over real host trees,
//! mounted with the real kernel overlayfs. The host tree must come out of
//! every operation exactly as it went in.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{code, labels, mount_all, mounts_under, tree_state, unmount, Backend, Client, Daemon};
use ontop::base::{BASE_LABEL, VOLATILE_LABEL};
use ontop::containerd_api::snapshots::v1 as api;
use tonic::Code;

/// A host tree with files, a subdirectory, a symlink and a hard link, a
/// root with its own mode and owner, and a submount.
fn host_tree(d: &Daemon, name: &str) -> PathBuf {
    let t = d.hosts().join(name);
    fs::create_dir_all(t.join("dir/sub")).unwrap();
    fs::write(t.join("a.txt"), "host a\n").unwrap();
    fs::write(t.join("dir/b.txt"), "host b\n").unwrap();
    fs::write(t.join("dir/sub/c.txt"), "host c\n").unwrap();
    fs::hard_link(t.join("a.txt"), t.join("a-hard")).unwrap();
    std::os::unix::fs::symlink("a.txt", t.join("a-link")).unwrap();
    fs::set_permissions(&t, fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(&t, Some(1234), Some(4321)).unwrap();
    t
}

fn base(path: &Path) -> std::collections::HashMap<String, String> {
    labels(&[(BASE_LABEL, path.to_str().unwrap())])
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

async fn view_with(
    c: &mut Client,
    key: &str,
    parent: &str,
) -> Vec<ontop::containerd_api::types::Mount> {
    c.view(key, parent).await.unwrap()
}

async fn writes_go_to_the_upper_and_the_host_tree_stays_identical() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let before = tree_state(&host);
    let mut c = d.client().await;

    let mounts = c.prepare_with("k", "", base(&host)).await.unwrap();
    assert_eq!(
        mounts[0].r#type,
        common::layered(),
        "a base-only snapshot is an overlay, not a bind"
    );
    let target = d.mountpoint("k");
    mount_all(&mounts, &target);

    // The container sees the host tree, with the host root's mode and owner.
    assert_eq!(read(&target.join("a.txt")), "host a\n");
    assert_eq!(read(&target.join("a-link")), "host a\n");
    let root = fs::metadata(&target).unwrap();
    assert_eq!(
        (root.mode() & 0o7777, root.uid(), root.gid()),
        (0o750, 1234, 4321)
    );

    // Every kind of change, inside the mount.
    fs::write(target.join("a.txt"), "changed\n").unwrap();
    fs::write(target.join("new.txt"), "new\n").unwrap();
    fs::remove_file(target.join("dir/b.txt")).unwrap();
    fs::rename(target.join("dir/sub/c.txt"), target.join("moved.txt")).unwrap();
    // A lower directory cannot be renamed on overlay without redirect_dir
    // (EXDEV); mv copies instead, as every container runtime user sees.
    let mv = std::process::Command::new("mv")
        .arg(target.join("dir/sub"))
        .arg(target.join("sub-moved"))
        .status()
        .unwrap();
    assert!(mv.success());
    fs::set_permissions(target.join("a-hard"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(target.join("dir"), Some(99), Some(99)).unwrap();
    fs::remove_file(target.join("a-link")).unwrap();
    std::os::unix::fs::symlink("new.txt", target.join("a-link")).unwrap();
    assert_eq!(read(&target.join("moved.txt")), "host c\n");
    assert!(!target.join("dir/b.txt").exists());

    // Usage counts the upper only, never the base.
    let (_, inodes) = c.usage("k").await.unwrap();
    assert!(inodes < 20, "{inodes} inodes: the base must not be counted");

    unmount(&target);
    assert_eq!(tree_state(&host), before, "the host tree was modified");

    // Mounting again shows the container's changes, still over the host.
    mount_all(&c.mounts("k").await.unwrap(), &target);
    assert_eq!(read(&target.join("new.txt")), "new\n");
    assert_eq!(read(&target.join("moved.txt")), "host c\n");
    if common::backend() == Backend::Overlayfs {
        // a.txt has a hard link (a-hard) in the host tree. fuse-overlayfs
        // 1.10 copies a write to one name of a lower hard link up under the
        // other name, and a remount shows neither: its bug, not ontop's,
        // and the host tree is untouched either way (checked above).
        assert_eq!(read(&target.join("a.txt")), "changed\n");
    }
    assert!(!target.join("dir/b.txt").exists());
    unmount(&target);

    // Removing the snapshot discards the changes, never touches the host,
    // and takes the base's pin with it.
    assert_eq!(mounts_under(&d.root).len(), 1, "the base is pinned");
    c.remove("k").await.unwrap();
    assert!(d.snapshot_dirs().is_empty());
    assert_eq!(mounts_under(&d.root), Vec::<PathBuf>::new());
    assert_eq!(tree_state(&host), before);
}

async fn a_base_set_by_update_takes_effect_at_the_next_mounts() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let mut c = d.client().await;
    let mounts = c.prepare("k", "").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    // The root the merged tree shows comes from the base, set by Update too.
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(&host, Some(1234), Some(5678)).unwrap();

    // As `ctr snapshots label KEY containerd.io/snapshot/ontop.base=...` does.
    let info = api::Info {
        name: "k".into(),
        labels: base(&host),
        ..Default::default()
    };
    let st = c
        .update(info, &[&format!("labels.{BASE_LABEL}")])
        .await
        .unwrap();
    assert_eq!(st.labels.get(BASE_LABEL).map(String::as_str), host.to_str());
    let root = std::fs::metadata(d.root.join("snapshots/1/fs")).unwrap();
    assert_eq!(
        (root.mode() & 0o7777, root.uid(), root.gid()),
        (0o750, 1234, 5678),
        "the upper's root takes the base's mode and owner at Update"
    );

    let mounts = c.mounts("k").await.unwrap();
    assert_eq!(mounts[0].r#type, common::layered());
    let target = d.mountpoint("k");
    mount_all(&mounts, &target);
    assert_eq!(read(&target.join("dir/b.txt")), "host b\n");
    unmount(&target);

    // Removing the label removes the base.
    let info = api::Info {
        name: "k".into(),
        ..Default::default()
    };
    let st = c
        .update(info, &[&format!("labels.{BASE_LABEL}")])
        .await
        .unwrap();
    assert!(!st.labels.contains_key(BASE_LABEL));
    assert_eq!(c.mounts("k").await.unwrap()[0].r#type, "bind");
    assert!(!d.root.join("snapshots/1/base").exists());
}

async fn the_base_survives_commit_into_children_and_views() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let before = tree_state(&host);
    let mut c = d.client().await;

    c.prepare_with("l1-a", "", base(&host)).await.unwrap();
    let t = d.mountpoint("l1");
    mount_all(&c.mounts("l1-a").await.unwrap(), &t);
    fs::write(t.join("layer1.txt"), "1\n").unwrap();
    fs::remove_file(t.join("a.txt")).unwrap();
    unmount(&t);
    // Commit replaces labels, except the base, which belongs to the chain.
    c.commit_with("l1", "l1-a", labels(&[("x", "1")]))
        .await
        .unwrap();
    assert!(
        !d.root.join("snapshots/1/base").exists(),
        "a committed snapshot has no mounts, so no pin"
    );
    let st = c.stat("l1").await.unwrap();
    assert_eq!(st.labels.get("x").map(String::as_str), Some("1"));
    assert_eq!(st.labels.get(BASE_LABEL).map(String::as_str), host.to_str());

    c.prepare("l2-a", "l1").await.unwrap();
    assert_eq!(
        c.stat("l2-a")
            .await
            .unwrap()
            .labels
            .get(BASE_LABEL)
            .map(String::as_str),
        host.to_str(),
        "a child shows the inherited base"
    );
    let t = d.mountpoint("l2");
    mount_all(&c.mounts("l2-a").await.unwrap(), &t);
    assert_eq!(read(&t.join("layer1.txt")), "1\n");
    assert_eq!(read(&t.join("dir/b.txt")), "host b\n");
    assert!(
        !t.join("a.txt").exists(),
        "layer 1's whiteout hides the host file"
    );
    fs::write(t.join("layer2.txt"), "2\n").unwrap();
    unmount(&t);
    c.commit("l2", "l2-a").await.unwrap();

    // Views of one and of two layers over the base: read-only, base included.
    for (key, parent) in [("v1", "l1"), ("v2", "l2")] {
        let mounts = view_with(&mut c, key, parent).await;
        assert_eq!(mounts[0].r#type, common::layered(), "{key}");
        assert!(!mounts[0].options.iter().any(|o| o.starts_with("upperdir")));
        let t = d.mountpoint(key);
        mount_all(&mounts, &t);
        assert_eq!(read(&t.join("dir/sub/c.txt")), "host c\n");
        assert_eq!(read(&t.join("layer1.txt")), "1\n");
        let err = fs::write(t.join("nope"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{key}");
        unmount(&t);
        assert_eq!(
            c.stat(key)
                .await
                .unwrap()
                .labels
                .get(BASE_LABEL)
                .map(String::as_str),
            host.to_str()
        );
    }
    assert_eq!(tree_state(&host), before);
}

/// A layer committed onto a parent (containerd 2.2+'s rebase) joins the
/// parent's chain, base included; a layer on a base of its own cannot join
/// a chain on another.
async fn a_layer_rebased_at_commit_inherits_the_parents_base() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let other = host_tree(&d, "other");
    let before = tree_state(&host);
    let mut c = d.client().await;
    c.prepare_with("l1-a", "", base(&host)).await.unwrap();
    c.commit("l1", "l1-a").await.unwrap();

    c.prepare_with("elsewhere", "", base(&other)).await.unwrap();
    let err = c.commit_onto("x", "elsewhere", "l1").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("a chain has one base"), "{err}");

    c.prepare("l3-a", "").await.unwrap();
    c.commit_onto("l3", "l3-a", "l1").await.unwrap();
    let st = c.stat("l3").await.unwrap();
    assert_eq!(st.parent, "l1");
    assert_eq!(st.labels.get(BASE_LABEL).map(String::as_str), host.to_str());
    let mounts = c.prepare("top", "l3").await.unwrap();
    let t = d.mountpoint("top");
    mount_all(&mounts, &t);
    assert_eq!(read(&t.join("dir/b.txt")), "host b\n");
    unmount(&t);
    assert_eq!(tree_state(&host), before);
    d.assert_consistent();
}

async fn a_view_of_a_bare_base_is_a_read_only_bind_that_hides_host_submounts() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    // A tmpfs mounted inside the host tree: an rbind would carry it along
    // writable, since a read-only remount does not reach submounts.
    let sub = host.join("dir/sub");
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let mut c = d.client().await;
    c.api
        .rpc
        .view(api::ViewSnapshotRequest {
            snapshotter: "ontop".into(),
            key: "v".into(),
            parent: String::new(),
            labels: base(&host),
        })
        .await
        .unwrap();
    let mounts = c.mounts("v").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(mounts[0].options, ["ro", "bind"]);
    let t = d.mountpoint("v");
    // Performed as containerd does a plain `bind`: no MS_REC.
    nix::mount::mount(
        Some(mounts[0].source.as_str()),
        &t,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    nix::mount::mount(
        None::<&str>,
        &t,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND
            | nix::mount::MsFlags::MS_REMOUNT
            | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    assert_eq!(read(&t.join("a.txt")), "host a\n");
    let err = fs::write(t.join("dir/sub/x"), "x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "the submount is not reachable writable"
    );
    unmount(&t);
    nix::mount::umount(&sub).unwrap();
}

async fn the_base_of_a_chain_cannot_be_changed_once_built_on() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let other = host_tree(&d, "other");
    let mut c = d.client().await;
    c.prepare_with("a", "", base(&host)).await.unwrap();
    c.commit("c", "a").await.unwrap();
    c.prepare("child", "c").await.unwrap();
    c.view("view", "c").await.unwrap();
    let path = format!("labels.{BASE_LABEL}");
    let set = |name: &str, l| api::Info {
        name: name.into(),
        labels: l,
        ..Default::default()
    };

    // Committed, a view, and an active child that inherits: all refused.
    for key in ["c", "view", "child"] {
        let r = c.update(set(key, base(&other)), &[&path]).await;
        assert_eq!(
            code(r),
            Code::FailedPrecondition,
            "{key}: changing the base"
        );
    }
    let r = c.update(set("c", labels(&[])), &[&path]).await;
    assert_eq!(
        code(r),
        Code::FailedPrecondition,
        "removing a committed base"
    );

    // containerd's own full replace omits the base: it is kept.
    let st = c
        .update(set("c", labels(&[("k", "v")])), &[])
        .await
        .unwrap();
    assert_eq!(st.labels.get(BASE_LABEL).map(String::as_str), host.to_str());
    assert_eq!(st.labels.get("k").map(String::as_str), Some("v"));
    // Naming the same base again is no change.
    c.update(set("c", base(&host)), &[&path]).await.unwrap();

    // A child cannot bring a different base, nor Commit change it.
    let r = c.prepare_with("x", "c", base(&other)).await;
    assert_eq!(code(r), Code::InvalidArgument);
    c.prepare_with("same", "c", base(&host)).await.unwrap();
    let r = c.commit_with("c2", "child", base(&other)).await;
    assert_eq!(code(r), Code::FailedPrecondition);
    c.prepare("plain", "").await.unwrap();
    let r = c.commit_with("c3", "plain", base(&host)).await;
    assert_eq!(
        code(r),
        Code::FailedPrecondition,
        "a base is not attached at Commit"
    );
}

async fn untrusted_base_labels_are_refused_and_leave_nothing_behind() {
    let d = Daemon::start_with_bases("").await;
    let hosts = d.hosts();
    fs::create_dir_all(hosts.join("ok")).unwrap();
    fs::write(hosts.join("file"), "x").unwrap();
    let outside = d.dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, hosts.join("escape")).unwrap();
    let mut c = d.client().await;
    let h = hosts.display();
    let cases = [
        ("relative/dir".to_string(), "absolute"),
        (format!("{h}/missing"), "does not exist"),
        (format!("{h}/file"), "not a directory"),
        (
            outside.display().to_string(),
            "outside the allowed base_roots",
        ),
        (format!("{h}/escape"), "outside the allowed base_roots"),
        (
            format!("{h}/ok/../../outside"),
            "outside the allowed base_roots",
        ),
        ("/etc".to_string(), "outside the allowed base_roots"),
        (
            d.root.display().to_string(),
            "outside the allowed base_roots",
        ),
    ];
    for (path, why) in &cases {
        let l = labels(&[(BASE_LABEL, path)]);
        let err = c.prepare_with("k", "", l.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}");
        assert!(err.message().contains(why), "{path}: {}", err.message());
        let err = c.view("k", "").await.map(|_| ());
        assert!(err.is_ok(), "the key stays free after a rejection");
        c.remove("k").await.unwrap();
    }
    c.prepare("active", "").await.unwrap();
    for (path, _) in &cases {
        let info = api::Info {
            name: "active".into(),
            labels: labels(&[(BASE_LABEL, path)]),
            ..Default::default()
        };
        let r = c.update(info, &[&format!("labels.{BASE_LABEL}")]).await;
        assert_eq!(code(r), Code::InvalidArgument, "update to {path}");
    }
    assert!(!c
        .stat("active")
        .await
        .unwrap()
        .labels
        .contains_key(BASE_LABEL));
    assert_eq!(
        d.snapshot_dirs().len(),
        1,
        "only the accepted snapshot is on disk"
    );
    assert_eq!(fs::read_dir(d.root.join("tmp")).unwrap().count(), 0);

    let bad_volatile = labels(&[(VOLATILE_LABEL, "yes")]);
    assert_eq!(
        code(c.prepare_with("v", "", bad_volatile).await),
        Code::InvalidArgument
    );
}

async fn with_no_base_roots_the_feature_is_off_and_says_how_to_enable_it() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let err = c
        .prepare_with("k", "", labels(&[(BASE_LABEL, "/srv")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("base_roots"), "{}", err.message());
    assert!(d.snapshot_dirs().is_empty());
}

async fn paths_with_commas_colons_spaces_and_great_length_work() {
    let d = Daemon::start_with_bases("").await;
    let long: PathBuf = (0..12)
        .map(|i| format!("level-{i}-{}", "x".repeat(60)))
        .collect();
    let odd = ["with,comma", "with:colon", "with space", "a,b:c d=e"];
    let mut c = d.client().await;
    for (i, name) in odd
        .iter()
        .map(|s| s.to_string())
        .chain([long.display().to_string()])
        .enumerate()
    {
        let host = d.hosts().join(&name);
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("f"), &name).unwrap();
        let key = format!("k{i}");
        let mounts = c.prepare_with(&key, "", base(&host)).await.unwrap();
        for o in &mounts[0].options {
            assert!(
                !o.contains(&name),
                "the raw path must not reach overlay options: {o}"
            );
        }
        let t = d.mountpoint(&key);
        mount_all(&mounts, &t);
        assert_eq!(read(&t.join("f")), name);
        unmount(&t);
    }
}

async fn volatile_snapshots_mount_again_and_again() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let mut c = d.client().await;
    let mut l = base(&host);
    l.insert(VOLATILE_LABEL.into(), "true".into());
    let mounts = c.prepare_with("k", "", l).await.unwrap();
    assert!(
        mounts[0].options.contains(&"volatile".to_string()),
        "{mounts:?}"
    );
    let t = d.mountpoint("k");
    let marker = d.root.join("snapshots/1/work/work/incompat/volatile");
    for round in 0..3 {
        mount_all(&c.mounts("k").await.unwrap(), &t);
        fs::write(t.join(format!("round-{round}")), "x").unwrap();
        unmount(&t);
        // fuse-overlayfs keeps no such marker.
        assert_eq!(
            marker.exists(),
            common::backend() == Backend::Overlayfs,
            "the kernel leaves its marker after round {round}"
        );
    }
    mount_all(&c.mounts("k").await.unwrap(), &t);
    assert_eq!(read(&t.join("round-2")), "x");

    // Volatile over image layers without a base works the same.
    c.prepare("b", "").await.unwrap();
    c.commit("img", "b").await.unwrap();
    let mounts = c
        .prepare_with("v", "img", labels(&[(VOLATILE_LABEL, "true")]))
        .await
        .unwrap();
    assert!(mounts[0].options.contains(&"volatile".to_string()));
}

async fn a_vanished_base_fails_mounts_but_not_stat_list_or_remove() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let mut c = d.client().await;
    c.prepare_with("k", "", base(&host)).await.unwrap();
    let canonical = host.canonicalize().unwrap();
    let moved = d.hosts().join("moved-away");
    fs::rename(&host, &moved).unwrap();
    let err = c.mounts("k").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(canonical.to_str().unwrap()),
        "{}",
        err.message()
    );

    // A file where the directory was is no better.
    fs::write(&host, "not a dir").unwrap();
    let err = c.mounts("k").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("no longer a directory"),
        "{}",
        err.message()
    );

    c.stat("k").await.unwrap();
    assert_eq!(c.list(&[]).await.unwrap(), ["k"]);
    c.remove("k").await.unwrap();
    assert_eq!(read(&host), "not a dir");
    assert!(moved.join("a.txt").exists());
}

async fn a_chain_of_128_layers_mounts_on_a_base() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let before = tree_state(&host);
    let mut c = d.client().await;
    let mut parent = String::new();
    for i in 0..128 {
        let key = format!("a{i}");
        if i == 0 {
            c.prepare_with(&key, "", base(&host)).await.unwrap();
        } else {
            c.prepare(&key, &parent).await.unwrap();
        }
        fs::write(
            d.root.join(format!("snapshots/{}/fs/f{i}", i + 1)),
            format!("{i}"),
        )
        .unwrap();
        let name = format!("l{i}");
        c.commit(&name, &key).await.unwrap();
        parent = name;
    }
    let mounts = c.prepare("top", &parent).await.unwrap();
    let lowerdir = mounts[0]
        .options
        .iter()
        .find(|o| o.starts_with("lowerdir="))
        .unwrap();
    assert_eq!(lowerdir.split(':').count(), 129, "128 layers and the base");
    assert!(lowerdir.ends_with("/base"));
    let t = d.mountpoint("top");
    mount_all(&mounts, &t);
    assert_eq!(read(&t.join("f0")), "0");
    assert_eq!(read(&t.join("f127")), "127");
    assert_eq!(read(&t.join("dir/b.txt")), "host b\n");
    fs::write(t.join("a.txt"), "over").unwrap();
    unmount(&t);
    assert_eq!(tree_state(&host), before);
}

/// The swap a pin defends against: between ontop's check and containerd's
/// mount, someone who can write inside an allowed root replaces the base,
/// or a directory on its path, with a symlink that leads out of it.
async fn a_base_path_swapped_for_a_symlink_after_the_check_is_never_followed() {
    let d = Daemon::start_with_bases("").await;
    let outside = d.dir.path().join("outside");
    fs::create_dir_all(outside.join("tree")).unwrap();
    fs::write(outside.join("a.txt"), "outside\n").unwrap();
    fs::write(outside.join("tree/a.txt"), "outside\n").unwrap();
    let outside_before = tree_state(&outside);
    fs::create_dir_all(d.hosts().join("sub")).unwrap();
    let nested = host_tree(&d, "sub/tree");
    let direct = host_tree(&d, "tree");
    // (the path swapped, where it leads, the base)
    let swaps = [
        (direct.clone(), outside.clone(), direct.clone()),
        (d.hosts().join("sub"), outside.clone(), nested.clone()),
    ];
    let mut c = d.client().await;
    for (i, (swapped, aim, host)) in swaps.into_iter().enumerate() {
        let key = format!("k{i}");
        let inside = tree_state(&host.join("dir"));
        let mounts = c.prepare_with(&key, "", base(&host)).await.unwrap();

        let moved = d.hosts().join(format!("moved{i}"));
        fs::rename(&swapped, &moved).unwrap();
        std::os::unix::fs::symlink(&aim, &swapped).unwrap();

        let target = d.mountpoint(&key);
        mount_all(&mounts, &target);
        assert_eq!(
            read(&target.join("a.txt")),
            "host a\n",
            "{key}: containerd mounts the directory ontop checked"
        );
        unmount(&target);
        let err = c.mounts(&key).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{key}");
        assert!(
            err.message().contains(&format!(
                "{} on its path is now a symlink",
                swapped.display()
            )),
            "{key}: {}",
            err.message()
        );

        // A real directory back at the path is a base again: Mounts pins it.
        fs::remove_file(&swapped).unwrap();
        fs::rename(&moved, &swapped).unwrap();
        let target = d.mountpoint(&format!("{key}-again"));
        mount_all(&c.mounts(&key).await.unwrap(), &target);
        assert_eq!(read(&target.join("dir/b.txt")), "host b\n", "{key}");
        unmount(&target);
        c.remove(&key).await.unwrap();
        assert_eq!(tree_state(&host.join("dir")), inside, "{key}");
    }
    assert_eq!(tree_state(&outside), outside_before);
    assert_eq!(mounts_under(&d.root), Vec::<PathBuf>::new());
    d.assert_consistent();
}

/// What a SIGKILL can leave: the pin of a snapshot committed just before
/// (Commit unpins after its transaction), the empty mount point of one
/// killed between its unmount and rmdir, and a pinned directory the
/// database never knew (killed between install and commit).
async fn pins_a_crash_leaves_are_taken_down_and_the_host_kept() {
    let mut d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let before = tree_state(&host);
    let mut c = d.client().await;
    c.prepare_with("a", "", base(&host)).await.unwrap();
    c.commit("layer", "a").await.unwrap();
    c.prepare("child", "layer").await.unwrap();
    c.prepare_with("b", "", base(&host)).await.unwrap();
    c.commit("other", "b").await.unwrap();
    d.kill();
    fs::create_dir(d.root.join("snapshots/3/base")).unwrap();
    let bind = |dir: &Path| {
        fs::create_dir_all(dir).unwrap();
        nix::mount::mount(
            Some(&host),
            dir,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
    };
    bind(&d.root.join("snapshots/1/base"));
    bind(&d.root.join("snapshots/99/base"));

    d.spawn().await;
    let mut c = d.client().await;
    let left = mounts_under(&d.root);
    assert!(
        !left.contains(&d.root.join("snapshots/1/base")),
        "start-up unpins the committed snapshot: {left:?}"
    );
    assert!(!d.root.join("snapshots/1/base").exists());
    assert!(
        !d.root.join("snapshots/3/base").exists(),
        "start-up removes an empty mount point a crash left"
    );
    c.cleanup().await.unwrap();
    // Only the child's own pin is left.
    assert_eq!(mounts_under(&d.root), [d.root.join("snapshots/2/base")]);
    assert!(!d.root.join("snapshots/99").exists());
    d.assert_consistent();
    for key in ["child", "layer", "other"] {
        c.remove(key).await.unwrap();
    }
    assert_eq!(mounts_under(&d.root), Vec::<PathBuf>::new());
    assert_eq!(tree_state(&host), before);
}

/// Mounts pins, Remove unpins: raced on the same snapshots, they leave no
/// pin stacked, none behind, and every Mounts either works or finds the
/// snapshot gone.
async fn mounts_racing_remove_leave_no_pin_behind() {
    let d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let before = tree_state(&host);
    let mut c = d.client().await;
    let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    for key in &keys {
        c.prepare_with(key, "", base(&host)).await.unwrap();
    }
    let mut racers = tokio::task::JoinSet::new();
    for key in &keys {
        for n in 0..8 {
            let (mut c, key) = (d.client().await, key.clone());
            racers.spawn(async move {
                if n == 4 {
                    c.remove(&key).await.map(drop)
                } else {
                    match c.mounts(&key).await {
                        Err(e) if e.code() == Code::NotFound => Ok(()),
                        other => other.map(drop),
                    }
                }
            });
        }
    }
    while let Some(r) = racers.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(mounts_under(&d.root), Vec::<PathBuf>::new());
    c.cleanup().await.unwrap();
    assert!(d.snapshot_dirs().is_empty(), "{:?}", d.snapshot_dirs());
    assert_eq!(tree_state(&host), before);
}

/// The allowlist is the operator's current word: a root taken out of the
/// config no longer lends bases, even to snapshots created while it was in.
async fn a_base_whose_root_left_the_config_is_refused_at_mounts() {
    let mut d = Daemon::start_with_bases("").await;
    let host = host_tree(&d, "tree");
    let mut c = d.client().await;
    c.prepare_with("k", "", base(&host)).await.unwrap();
    let elsewhere = d.dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(
        d.dir.path().join("config.toml"),
        format!("base_roots = [{:?}]\n", elsewhere.display().to_string()),
    )
    .unwrap();
    d.restart().await;
    let mut c = d.client().await;
    let err = c.mounts("k").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("no longer inside the allowed base_roots"),
        "{}",
        err.message()
    );
    c.remove("k").await.unwrap();
    assert_eq!(mounts_under(&d.root), Vec::<PathBuf>::new());
}

on_every_backend!(
    writes_go_to_the_upper_and_the_host_tree_stays_identical,
    a_base_whose_root_left_the_config_is_refused_at_mounts,
    mounts_racing_remove_leave_no_pin_behind,
    pins_a_crash_leaves_are_taken_down_and_the_host_kept,
    a_base_path_swapped_for_a_symlink_after_the_check_is_never_followed,
    a_base_set_by_update_takes_effect_at_the_next_mounts,
    the_base_survives_commit_into_children_and_views,
    a_layer_rebased_at_commit_inherits_the_parents_base,
    a_view_of_a_bare_base_is_a_read_only_bind_that_hides_host_submounts,
    the_base_of_a_chain_cannot_be_changed_once_built_on,
    untrusted_base_labels_are_refused_and_leave_nothing_behind,
    with_no_base_roots_the_feature_is_off_and_says_how_to_enable_it,
    paths_with_commas_colons_spaces_and_great_length_work,
    volatile_snapshots_mount_again_and_again,
    a_vanished_base_fails_mounts_but_not_stat_list_or_remove,
    a_chain_of_128_layers_mounts_on_a_base,
);
