//! The Snapshots API, case by case from containerd's contract and its Go
//! testsuite. The server runs in the test's own process, through
//! `ontop::server::serve_on` on a real socket, root and database; the
//! usage test runs the binary, whose log it reads.

#[macro_use]
mod common;

use std::collections::HashMap;

use common::{code, labels, Client, Daemon};
use ontop::containerd_api::snapshots::v1::{self as api, Kind};
use tonic::Code;

/// containerd testsuite's base set: committed c1 <- c2, active a1 and view
/// v1 on c2, and parentless a2 and v2.
async fn base(c: &mut Client) {
    c.prepare("c1-a", "").await.unwrap();
    c.commit("c1", "c1-a").await.unwrap();
    c.prepare("c2-a", "c1").await.unwrap();
    c.commit("c2", "c2-a").await.unwrap();
    c.prepare("a1", "c2").await.unwrap();
    c.prepare("a2", "").await.unwrap();
    c.view("v1", "c2").await.unwrap();
    c.view("v2", "").await.unwrap();
}

fn big_label() -> HashMap<String, String> {
    labels(&[("containerd.io/snapshot/big", &"x".repeat(4096))])
}

/// One label more than a snapshot may carry.
fn too_many_labels() -> HashMap<String, String> {
    (0..=512)
        .map(|i| (format!("containerd.io/snapshot/l{i}"), "v".to_string()))
        .collect()
}

fn info(name: &str, l: HashMap<String, String>) -> api::Info {
    api::Info {
        name: name.into(),
        labels: l,
        ..Default::default()
    }
}

async fn every_error_in_the_contract_table_has_its_code() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    base(&mut c).await;
    let mut c2 = c.clone();
    let none = HashMap::new;

    let cases: Vec<(&str, Code, common::Rpc<()>)> = vec![
        (
            "prepare: parent missing",
            Code::NotFound,
            c.prepare("x", "nope").await.map(drop),
        ),
        (
            "prepare: parent missing is checked before the key",
            Code::NotFound,
            c.prepare("a1", "nope").await.map(drop),
        ),
        (
            "prepare: parent active",
            Code::InvalidArgument,
            c.prepare("x", "a1").await.map(drop),
        ),
        (
            "prepare: parent a view",
            Code::InvalidArgument,
            c.prepare("x", "v1").await.map(drop),
        ),
        (
            "view: parent missing",
            Code::NotFound,
            c.view("x", "nope").await.map(drop),
        ),
        (
            "view: parent active",
            Code::InvalidArgument,
            c.view("x", "a2").await.map(drop),
        ),
        (
            "prepare: key is active",
            Code::AlreadyExists,
            c.prepare("a1", "").await.map(drop),
        ),
        (
            "prepare: key is a view",
            Code::AlreadyExists,
            c.prepare("v1", "c2").await.map(drop),
        ),
        (
            "prepare: key is committed",
            Code::AlreadyExists,
            c.prepare("c1", "").await.map(drop),
        ),
        (
            "view: key is active",
            Code::AlreadyExists,
            c.view("a2", "").await.map(drop),
        ),
        (
            "view: key is a view",
            Code::AlreadyExists,
            c.view("v2", "c1").await.map(drop),
        ),
        (
            "prepare: empty key",
            Code::InvalidArgument,
            c.prepare("", "").await.map(drop),
        ),
        (
            "prepare: label over 4096 bytes",
            Code::InvalidArgument,
            c.prepare_with("x", "", big_label()).await.map(drop),
        ),
        (
            "prepare: key over 4096 bytes",
            Code::InvalidArgument,
            c.prepare(&"k".repeat(4097), "").await.map(drop),
        ),
        (
            "prepare: more than 512 labels",
            Code::InvalidArgument,
            c.prepare_with("x", "", too_many_labels()).await.map(drop),
        ),
        (
            "commit: name exists, checked first",
            Code::AlreadyExists,
            c.commit("c1", "nope").await,
        ),
        (
            "commit: name is an active key",
            Code::AlreadyExists,
            c.commit("a2", "a1").await,
        ),
        (
            "commit: key missing",
            Code::NotFound,
            c.commit("x", "nope").await,
        ),
        (
            "commit: key is a view",
            Code::FailedPrecondition,
            c.commit("x", "v1").await,
        ),
        (
            "commit: key is committed",
            Code::FailedPrecondition,
            c.commit("x", "c2").await,
        ),
        (
            "commit: empty name",
            Code::InvalidArgument,
            c.commit("", "a2").await,
        ),
        (
            "commit: label over 4096 bytes",
            Code::InvalidArgument,
            c.commit_with("x", "a2", big_label()).await,
        ),
        (
            "mounts: key missing",
            Code::NotFound,
            c.mounts("nope").await.map(drop),
        ),
        (
            "mounts: key committed",
            Code::FailedPrecondition,
            c.mounts("c1").await.map(drop),
        ),
        (
            "stat: key missing",
            Code::NotFound,
            c.stat("nope").await.map(drop),
        ),
        (
            "usage: key missing",
            Code::NotFound,
            c.usage("nope").await.map(drop),
        ),
        (
            "update: key missing",
            Code::NotFound,
            c.update(info("nope", none()), &[]).await.map(drop),
        ),
        (
            "update: immutable field",
            Code::InvalidArgument,
            c.update(info("a1", none()), &["parent"]).await.map(drop),
        ),
        (
            "update: unknown field",
            Code::InvalidArgument,
            c.update(info("a1", none()), &["labels.x", "name"])
                .await
                .map(drop),
        ),
        (
            "update: label over 4096 bytes",
            Code::InvalidArgument,
            c.update(info("a1", big_label()), &[]).await.map(drop),
        ),
        (
            "update: more than 512 labels",
            Code::InvalidArgument,
            c.update(info("a1", too_many_labels()), &[]).await.map(drop),
        ),
        (
            "remove: key missing",
            Code::NotFound,
            c.remove("nope").await,
        ),
        (
            "remove: has an active child",
            Code::FailedPrecondition,
            c.remove("c2").await,
        ),
        (
            "remove: has a committed child",
            Code::FailedPrecondition,
            c.remove("c1").await,
        ),
        (
            "list: filter does not parse",
            Code::InvalidArgument,
            c.list(&["name=="]).await.map(drop),
        ),
        (
            "list: bad regex",
            Code::InvalidArgument,
            c.list(&["name~=/(/"]).await.map(drop),
        ),
    ];
    for (what, want, got) in cases {
        assert_eq!(code(got), want, "{what}");
    }

    let missing_info = c2
        .api
        .rpc
        .update(api::UpdateSnapshotRequest {
            snapshotter: "ontop".into(),
            info: None,
            update_mask: None,
        })
        .await;
    assert_eq!(
        code(missing_info),
        Code::InvalidArgument,
        "update without info"
    );

    // None of the failures changed anything.
    assert_eq!(
        c.list(&[]).await.unwrap(),
        ["a1", "a2", "c1", "c2", "v1", "v2"]
    );
    assert_eq!(d.snapshot_dirs().len(), 6);
    assert_eq!(std::fs::read_dir(d.root.join("tmp")).unwrap().count(), 0);
}

async fn error_messages_name_what_was_wrong() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    base(&mut c).await;
    let msg = |r: common::Rpc<Vec<_>>| r.unwrap_err().message().to_string();
    assert!(msg(c.prepare("x", "nope").await).contains("\"nope\""));
    let m = msg(c.prepare("x", "a1").await);
    assert!(m.contains("\"a1\"") && m.contains("not committed"), "{m}");
    let m = msg(c.prepare_with("x", "", big_label()).await);
    assert!(
        m.contains("containerd.io/snapshot/big") && m.contains("4096"),
        "{m}"
    );
    let m = msg(c.list(&["name=="]).await.map(|_| vec![]));
    assert!(m.contains("name=="), "{m}");
    let m = c
        .update(info("a1", HashMap::new()), &["parent"])
        .await
        .unwrap_err()
        .message()
        .to_string();
    assert!(m.contains("\"parent\""), "{m}");
    let m = msg(c.prepare("", "").await);
    assert!(m.contains("empty"), "{m}");
}

async fn stat_reports_kind_parent_and_equal_timestamps_at_creation() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    base(&mut c).await;
    let want = [
        ("c1", Kind::Committed, ""),
        ("c2", Kind::Committed, "c1"),
        ("a1", Kind::Active, "c2"),
        ("a2", Kind::Active, ""),
        ("v1", Kind::View, "c2"),
        ("v2", Kind::View, ""),
    ];
    for (name, kind, parent) in want {
        let st = c.stat(name).await.unwrap();
        assert_eq!(st.name, name);
        assert_eq!(st.kind, kind as i32, "{name}");
        assert_eq!(st.parent, parent, "{name}");
        assert_eq!(st.created_at, st.updated_at, "{name}");
        assert!(st.created_at.unwrap().seconds > 1_600_000_000);
    }
}

async fn keys_with_slashes_and_spaces_are_opaque() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    let key = "default/12/extract-12345-AbCd sha256:0123/../x";
    c.prepare(key, "").await.unwrap();
    c.commit("default/13/sha256:abc def", key).await.unwrap();
    assert_eq!(c.list(&[]).await.unwrap(), ["default/13/sha256:abc def"]);
    assert_eq!(d.snapshot_dirs(), ["1"]);
}

async fn commit_replaces_labels_and_frees_the_key_at_once() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    c.prepare_with("k", "", labels(&[("a", "1"), ("b", "2")]))
        .await
        .unwrap();
    let before = c.stat("k").await.unwrap();
    c.commit_with("c", "k", labels(&[("b", "3"), ("c", "4"), ("empty", "")]))
        .await
        .unwrap();
    let st = c.stat("c").await.unwrap();
    assert_eq!(st.labels, labels(&[("b", "3"), ("c", "4")]));
    assert_eq!(st.kind, Kind::Committed as i32);
    assert_eq!(st.created_at, st.updated_at);
    let (b, a) = (before.created_at.unwrap(), st.created_at.unwrap());
    assert!((a.seconds, a.nanos) >= (b.seconds, b.nanos));
    assert_eq!(code(c.stat("k").await), Code::NotFound);
    // The key is free again, and the committed one keeps its directory.
    c.prepare("k", "c").await.unwrap();
    assert_eq!(d.snapshot_dirs(), ["1", "2"]);
}

/// containerd 2.2+'s `rebase`: a layer prepared without a parent gets
/// one at Commit (`CommitSnapshotRequest.parent`), with the rules and codes
/// of containerd's bolt store.
async fn commit_with_a_parent_rebases_only_a_snapshot_prepared_without_one() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    c.layer(&d, "l1", "", |r| {
        std::fs::write(r.join("one"), "1").unwrap()
    })
    .await;
    c.prepare("l2-a", "").await.unwrap();
    let t = d.mountpoint("l2-a");
    common::mount_all(&c.mounts("l2-a").await.unwrap(), &t);
    std::fs::write(t.join("two"), "2").unwrap();
    common::unmount(&t);

    // Refusals leave the active snapshot as it was.
    assert_eq!(
        code(c.commit_onto("l2", "l2-a", "missing").await),
        Code::NotFound
    );
    c.prepare("not-committed", "").await.unwrap();
    assert_eq!(
        code(c.commit_onto("l2", "l2-a", "not-committed").await),
        Code::FailedPrecondition
    );
    c.prepare("on-l1", "l1").await.unwrap();
    c.layer(&d, "other", "", |_| {}).await;
    let err = c.commit_onto("x", "on-l1", "other").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("only a snapshot prepared without a parent"),
        "{err}"
    );
    // Naming the parent it already has is no change.
    c.commit_onto("on-l1-done", "on-l1", "l1").await.unwrap();
    assert_eq!(c.stat("on-l1-done").await.unwrap().parent, "l1");
    assert_eq!(c.stat("l2-a").await.unwrap().kind, Kind::Active as i32);

    c.commit_onto("l2", "l2-a", "l1").await.unwrap();
    let st = c.stat("l2").await.unwrap();
    assert_eq!(
        (st.parent.as_str(), st.kind),
        ("l1", Kind::Committed as i32)
    );
    assert!(c
        .list(&["parent==l1"])
        .await
        .unwrap()
        .contains(&"l2".to_string()));
    // The chain is the parent's: a view shows both layers.
    let mounts = c.view("v", "l2").await.unwrap();
    let t = d.mountpoint("v");
    common::mount_all(&mounts, &t);
    assert_eq!(std::fs::read_to_string(t.join("one")).unwrap(), "1");
    assert_eq!(std::fs::read_to_string(t.join("two")).unwrap(), "2");
    common::unmount(&t);
    assert_eq!(code(c.remove("l1").await), Code::FailedPrecondition);
    d.assert_consistent();
}

async fn keys_are_reusable_after_remove_and_ids_are_never_reused() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    for _ in 0..3 {
        c.prepare("k", "").await.unwrap();
        c.remove("k").await.unwrap();
    }
    c.prepare("k", "").await.unwrap();
    assert_eq!(
        d.snapshot_dirs(),
        ["4"],
        "removed dirs are gone, ids move on"
    );
}

async fn update_follows_the_testsuite() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    base(&mut c).await;
    let cases = [
        ("c1", Kind::Committed, ""),
        ("c2", Kind::Committed, "c1"),
        ("a1", Kind::Active, "c2"),
        ("a2", Kind::Active, ""),
        ("v1", Kind::View, "c2"),
        ("v2", Kind::View, ""),
    ];
    for (name, kind, parent) in cases {
        let mut st = c.stat(name).await.unwrap();
        let created = st.created_at;
        let root = ("containerd.io/gc.root", "2026-01-01T00:00:00Z");
        st.parent = "doesnotexist".into();
        st.labels = labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3"), root]);
        let st = c.update(st, &[]).await.unwrap();
        assert_eq!(st.created_at, created, "{name}: created never changes");
        assert_ne!(st.updated_at, created, "{name}: updated moves");
        assert_eq!(st.parent, parent, "{name}: parent is immutable");
        assert_eq!(st.kind, kind as i32);
        assert_eq!(
            st.labels,
            labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3"), root])
        );

        let mut req = st.clone();
        req.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st = c.update(req, &["labels.l1", "labels.l2"]).await.unwrap();
        assert_eq!(
            st.labels,
            labels(&[("l1", "updated"), ("l3", "v3"), root]),
            "{name}: labels.KEY sets, deletes, and adds nothing else"
        );

        let mut req = st.clone();
        req.labels = labels(&[("l4", "v4"), root]);
        let st = c.update(req, &["labels"]).await.unwrap();
        assert_eq!(st.labels, labels(&[("l4", "v4"), root]));
        assert_eq!(
            c.stat(name).await.unwrap().labels,
            st.labels,
            "{name}: stored"
        );

        let mut req = st.clone();
        req.labels = labels(&[("l4", "")]);
        let st = c.update(req, &["labels.l4"]).await.unwrap();
        assert_eq!(st.labels, labels(&[root]), "{name}: empty value deletes");
    }
}

async fn empty_label_values_are_never_stored() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    c.prepare_with("a", "", labels(&[("x", ""), ("y", "1")]))
        .await
        .unwrap();
    assert_eq!(c.stat("a").await.unwrap().labels, labels(&[("y", "1")]));
    let st = c
        .update(info("a", labels(&[("z", ""), ("w", "2")])), &[])
        .await
        .unwrap();
    assert_eq!(st.labels, labels(&[("w", "2")]));
    assert_eq!(c.list(&["labels.z"]).await.unwrap(), Vec::<String>::new());
}

async fn list_filters_match_the_testsuite_walk() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    let root = ("containerd.io/gc.root", "check-walk");
    c.prepare_with("p-tmp", "", labels(&[root])).await.unwrap();
    c.commit_with("p", "p-tmp", labels(&[root])).await.unwrap();
    c.prepare_with("a-wl", "p", labels(&[root, ("l", "1")]))
        .await
        .unwrap();
    c.prepare_with("a-np-wl", "", labels(&[root]))
        .await
        .unwrap();
    c.api
        .rpc
        .view(api::ViewSnapshotRequest {
            snapshotter: "ontop".into(),
            key: "v-wl".into(),
            parent: "p".into(),
            labels: labels(&[root, ("l", "2")]),
        })
        .await
        .unwrap();
    c.prepare("c-np-tmp", "").await.unwrap();
    c.commit("c-np", "c-np-tmp").await.unwrap();

    let cases: &[(&[&str], &[&str])] = &[
        (&[], &["a-np-wl", "a-wl", "c-np", "p", "v-wl"]),
        (
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
            &["a-np-wl", "a-wl", "p", "v-wl"],
        ),
        (
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
            &["a-np-wl", "a-wl"],
        ),
        (&["name==a-wl,labels.l"], &["a-wl"]),
        (&["parent==p"], &["a-wl", "v-wl"]),
        (
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
            &["a-wl", "v-wl"],
        ),
        (&["labels.l"], &["a-wl", "v-wl"]),
        (&["labels.l==2"], &["v-wl"]),
        (&["name==p", "name==a-np-wl"], &["a-np-wl", "p"]),
        (&["kind==view"], &["v-wl"]),
    ];
    for (filters, want) in cases {
        assert_eq!(&c.list(filters).await.unwrap(), want, "{filters:?}");
    }
}

async fn list_streams_in_batches_of_one_hundred() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    for i in 0..250 {
        c.prepare(&format!("k{i}"), "").await.unwrap();
    }
    let (infos, batches) = c.list_batches(&[]).await.unwrap();
    assert_eq!(infos.len(), 250);
    assert_eq!(batches, [100, 100, 50]);
}

async fn usage_counts_the_upper_only_and_freezes_at_commit() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    c.layer(&d, "base", "", |root| {
        std::fs::write(root.join("big"), vec![7u8; 1 << 20]).unwrap();
    })
    .await;
    let mounts = c.prepare("a", "base").await.unwrap();
    let target = d.mountpoint("a");
    common::mount_all(&mounts, &target);
    let (size0, inodes0) = c.usage("a").await.unwrap();
    assert_eq!(inodes0, 1, "an empty upper is just its root");
    std::fs::write(target.join("f"), vec![1u8; 64 << 10]).unwrap();
    std::fs::hard_link(target.join("f"), target.join("g")).unwrap();
    let (size1, inodes1) = c.usage("a").await.unwrap();
    assert_eq!(inodes1, 2, "a hard-linked file counts once");
    assert!(
        size1 - size0 >= 64 << 10 && size1 < 1 << 20,
        "{size0} -> {size1}: parent not counted"
    );
    common::unmount(&target);
    c.commit("c", "a").await.unwrap();
    assert_eq!(c.usage("c").await.unwrap(), (size1, inodes1));
    let (base_size, _) = c.usage("base").await.unwrap();
    assert!(base_size >= 1 << 20);
    c.view("v", "c").await.unwrap();
    assert_eq!(c.usage("v").await.unwrap(), (0, 0));
}

/// CRI polls Usage of every active snapshot. With fanotify, an unchanged
/// upper is not walked again, and the answer stays exact: after random
/// writes, appends, truncates, deletes, hard links, renames across
/// directories, directory removal and xattrs, made through the real mount
/// while it stays mounted, Usage equals a fresh walk of the upper dir.
async fn usage_stays_exact_under_random_changes_and_skips_unchanged_uppers() {
    use std::fs;
    // The binary: the test reads its log.
    let d = Daemon::start().await;
    assert!(
        d.log().contains("usage: tracking changes with fanotify"),
        "{}",
        d.log()
    );
    let mut c = d.client().await;
    c.layer(&d, "base", "", |root| {
        fs::create_dir(root.join("lower-dir")).unwrap();
        for i in 0..20 {
            fs::write(root.join(format!("lower-dir/{i}")), vec![3u8; 5000]).unwrap();
        }
    })
    .await;
    let mut uppers = Vec::new();
    for key in ["a", "b"] {
        let mounts = c.prepare(key, "base").await.unwrap();
        let upper = mounts[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .unwrap()
            .to_string();
        let target = d.mountpoint(key);
        common::mount_all(&mounts, &target);
        uppers.push((key, target, std::path::PathBuf::from(upper)));
    }
    let walks = || d.log().matches("usage: walking the upper dir").count();
    let check = |c: &mut common::Client, key: &'static str, upper: std::path::PathBuf| {
        let mut c = c.clone();
        async move {
            let got = c.usage(key).await.unwrap();
            let walked = ontop::usage::disk_usage(&upper).unwrap();
            assert_eq!(got, (walked.size, walked.inodes), "{key} (see the seed)");
        }
    };
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    for round in 0..150 {
        let (key, target, upper) = &uppers[rng.usize(..uppers.len())];
        let dirs = ["", "d1", "d2", "lower-dir"];
        let dir = target.join(dirs[rng.usize(..dirs.len())]);
        let _ = fs::create_dir(&dir);
        let name = |rng: &mut fastrand::Rng| dir.join(format!("f{}", rng.usize(..6)));
        let f = name(&mut rng);
        // Each may fail when its file is missing; what matters is that
        // Usage then agrees with the disk.
        let _ = match rng.usize(..9) {
            0 => fs::write(&f, vec![1u8; rng.usize(..200_000)]),
            1 => fs::OpenOptions::new()
                .append(true)
                .open(&f)
                .and_then(|mut h| std::io::Write::write_all(&mut h, &[2u8; 70_000])),
            2 => fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .and_then(|h| h.set_len(rng.u64(..10_000))),
            3 => fs::remove_file(&f),
            4 => fs::hard_link(&f, name(&mut rng)),
            5 => fs::rename(&f, target.join(format!("moved-{round}"))),
            6 => fs::remove_dir_all(&dir),
            7 => fs::remove_file(target.join(format!("lower-dir/{}", rng.usize(..20)))),
            _ => {
                let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
                let value = vec![b'x'; 3000];
                let r = unsafe {
                    libc::setxattr(
                        c.as_ptr(),
                        c"user.ontop".as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
        };
        check(&mut c, key, upper.clone()).await;
    }
    // Unchanged uppers are answered without a walk, and still right.
    let before = walks();
    for (key, _, upper) in &uppers {
        for _ in 0..3 {
            check(&mut c, key, upper.clone()).await;
        }
    }
    assert_eq!(walks(), before, "an unchanged upper was walked again");
    for (key, target, _) in &uppers {
        common::unmount(target);
        c.remove(key).await.unwrap();
    }
}

async fn cleanup_removes_directories_the_database_does_not_know() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    c.prepare("keep", "").await.unwrap();
    std::fs::create_dir_all(d.root.join("snapshots/999/fs/deep")).unwrap();
    std::fs::create_dir_all(d.root.join("snapshots/not-an-id")).unwrap();
    c.cleanup().await.unwrap();
    assert_eq!(d.snapshot_dirs(), ["1"]);
    c.cleanup().await.unwrap();
    assert_eq!(d.snapshot_dirs(), ["1"]);
}

async fn a_request_over_grpcs_message_limit_is_refused_before_it_is_read() {
    let d = Daemon::start_in_process().await;
    let mut c = d.client().await;
    // 1,100 labels of 4,000 bytes: 4.4 MB, over the 4 MiB limit.
    let huge: HashMap<String, String> = (0..1100)
        .map(|i| (format!("containerd.io/snapshot/l{i}"), "v".repeat(4000)))
        .collect();
    let err = c.prepare_with("huge", "", huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(d.snapshot_dirs().len(), 0);
    c.prepare("small", "").await.unwrap();
}

on_every_backend!(
    a_request_over_grpcs_message_limit_is_refused_before_it_is_read,
    every_error_in_the_contract_table_has_its_code,
    error_messages_name_what_was_wrong,
    stat_reports_kind_parent_and_equal_timestamps_at_creation,
    keys_with_slashes_and_spaces_are_opaque,
    commit_replaces_labels_and_frees_the_key_at_once,
    commit_with_a_parent_rebases_only_a_snapshot_prepared_without_one,
    keys_are_reusable_after_remove_and_ids_are_never_reused,
    update_follows_the_testsuite,
    empty_label_values_are_never_stored,
    list_filters_match_the_testsuite_walk,
    list_streams_in_batches_of_one_hundred,
    usage_counts_the_upper_only_and_freezes_at_commit,
    usage_stays_exact_under_random_changes_and_skips_unchanged_uppers,
    cleanup_removes_directories_the_database_does_not_know,
);
