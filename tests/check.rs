//! `ontop check`: every kind of damage a root can take is found, what is
//! safe is repaired, and what needs a person is said so, online through the
//! daemon and offline on its root.

mod common;

use std::fs;
use std::process::{Command, Output};

use common::{labels, Daemon, BIN};

use ontop::base::BASE_LABEL;

fn check(args: &[&str]) -> (Output, String) {
    let out = Command::new(BIN)
        .arg("check")
        .args(args)
        .output()
        .expect("running ontop check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn lines_with<'a>(text: &'a str, status: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(status)).collect()
}

#[tokio::test]
async fn damage_is_found_the_safe_part_repaired_and_the_rest_named() {
    let mut d = Daemon::start_with_bases("").await;
    let mut c = d.client().await;
    let host = d.hosts().join("tree");
    fs::create_dir_all(&host).unwrap();
    let gone = d.hosts().join("gone");
    fs::create_dir_all(&gone).unwrap();

    c.prepare("plain", "").await.unwrap(); // 1
    c.prepare("layer-active", "").await.unwrap(); // 2
    c.commit("layer", "layer-active").await.unwrap();
    c.prepare("child", "layer").await.unwrap(); // 3
    let on = |p: &std::path::Path| labels(&[(BASE_LABEL, p.to_str().unwrap())]);
    c.prepare_with("on-base", "", on(&host)).await.unwrap(); // 4
    c.prepare_with("on-gone", "", on(&gone)).await.unwrap(); // 5

    let sock = d.socket.to_str().unwrap().to_string();
    let (out, text) = check(&["--address", &sock]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ok: the database and the disk agree"),
        "{text}"
    );

    // The damage: an orphan directory, a lost work dir, the lost trees of
    // an active snapshot and of a committed one, a base replaced by a new
    // directory under its pin, a stray base dir, and a host base gone.
    let snaps = d.root.join("snapshots");
    fs::create_dir_all(snaps.join("999/fs")).unwrap();
    fs::remove_dir(snaps.join("1/work")).unwrap();
    fs::remove_dir_all(snaps.join("3")).unwrap();
    fs::remove_dir_all(snaps.join("2/fs")).unwrap();
    fs::rename(&host, d.hosts().join("tree-old")).unwrap();
    fs::create_dir(&host).unwrap();
    fs::create_dir(snaps.join("1/base")).unwrap();
    fs::remove_dir(&gone).unwrap();

    let (out, text) = check(&["--address", &sock]);
    assert!(!out.status.success(), "{text}");
    let repairable = lines_with(&text, "repairable with --repair");
    assert_eq!(repairable.len(), 5, "{text}");
    assert!(
        repairable.iter().any(|l| l.contains("\"child\"")
            && l.contains("what was written in it")
            && l.contains("empty over its parents")),
        "an active snapshot's lost tree can be made again, and check says what is lost: {text}"
    );
    let person = lines_with(&text, "needs a person");
    assert_eq!(person.len(), 2, "{text}");
    assert!(
        person
            .iter()
            .any(|l| l.contains("\"layer\"") && l.contains("cannot be made again")),
        "{text}"
    );
    assert!(
        person
            .iter()
            .any(|l| l.contains("\"on-gone\"") && l.contains("is gone")),
        "{text}"
    );

    let (out, text) = check(&["--address", &sock, "--repair"]);
    assert!(
        !out.status.success(),
        "what needs a person is still there: {text}"
    );
    assert_eq!(lines_with(&text, "repaired").len(), 5, "{text}");
    assert!(!snaps.join("999").exists());
    assert!(snaps.join("1/work").is_dir());
    assert!(snaps.join("3/fs").is_dir() && snaps.join("3/work").is_dir());
    assert_eq!(fs::read_dir(snaps.join("3/fs")).unwrap().count(), 0);
    assert!(
        !snaps.join("2/fs").exists(),
        "a committed tree is never faked"
    );
    assert_eq!(
        ontop::pin::identity_at(&snaps.join("4/base")).unwrap(),
        ontop::pin::identity_at(&host).unwrap(),
        "the pin holds the directory now at the base's path"
    );
    assert!(!snaps.join("1/base").exists());
    // The repaired snapshots work again.
    c.mounts("on-base").await.unwrap();

    // Offline: refused while the daemon holds the root...
    let root = d.root.to_str().unwrap().to_string();
    let (out, text) = check(&["--root", &root]);
    assert!(!out.status.success());
    assert!(text.contains("in use"), "{text}");
    // ...and once it is stopped, it also sees a crash's leftovers.
    d.stop().await;
    fs::create_dir_all(d.root.join("tmp/new-1-0/fs")).unwrap();
    let (_, text) = check(&["--root", &root]);
    assert_eq!(
        lines_with(&text, "repairable with --repair").len(),
        1,
        "{text}"
    );
    let (_, text) = check(&["--root", &root, "--repair"]);
    assert_eq!(lines_with(&text, "repaired").len(), 1, "{text}");
    assert_eq!(fs::read_dir(d.root.join("tmp")).unwrap().count(), 0);
    assert_eq!(lines_with(&text, "needs a person").len(), 2, "{text}");
}

#[tokio::test]
async fn start_up_sets_rows_against_directories_and_says_what_is_lost() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    c.prepare("kept", "").await.unwrap(); // 1
    c.prepare("lost", "").await.unwrap(); // 2
    d.stop().await;
    // A tree lost to a crash, and a directory a Prepare left in place
    // without its row (it crashed before its COMMIT).
    let snaps = d.root.join("snapshots");
    fs::remove_dir_all(snaps.join("2")).unwrap();
    fs::create_dir_all(snaps.join("77/fs")).unwrap();
    fs::write(snaps.join("77/fs/data"), "unacknowledged").unwrap();

    d.spawn().await;
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("directory is gone") && l.contains("2")),
        "start-up names the lost snapshot at error level:\n{log}"
    );
    // The orphan goes (on a thread of its own), the kept snapshot works.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while snaps.join("77").exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        !snaps.join("77").exists(),
        "the orphan directory is removed"
    );
    assert_eq!(fs::read_dir(d.root.join("trash")).unwrap().count(), 0);
    let mut c = d.client().await;
    c.mounts("kept").await.unwrap();
    // What is lost stays listed: check names it, and what was lost with it.
    let sock = d.socket.to_str().unwrap().to_string();
    let (out, text) = check(&["--address", &sock]);
    assert!(!out.status.success(), "{text}");
    assert!(
        lines_with(&text, "repairable with --repair")
            .iter()
            .any(|l| {
                l.contains("\"lost\"") && l.contains("lost its tree") && l.contains("written in it")
            }),
        "{text}"
    );
    // The way out the docs give for an active snapshot: remove it (or
    // have --repair make it again, empty); the root is whole again.
    c.remove("lost").await.unwrap();
    let (out, text) = check(&["--address", &sock]);
    assert!(out.status.success(), "{text}");
}

/// The id of an active snapshot from the upper dir its mounts name:
/// `.../snapshots/<id>/limit/fs` for one in a loop image.
fn id_in(mounts: &[ontop::containerd_api::types::Mount]) -> String {
    let upper = mounts
        .iter()
        .flat_map(|m| &m.options)
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(str::to_string)
        .unwrap_or_else(|| mounts[0].source.clone());
    let after = upper.split("/snapshots/").nth(1).unwrap();
    after.split('/').next().unwrap().to_string()
}

#[tokio::test]
async fn a_size_limit_not_in_force_or_left_behind_is_found_and_repaired() {
    const LIMIT: &str = "containerd.io/snapshot/ontop.max-size";
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let snapshots = d.root.join("snapshots");
    // An image someone unmounted.
    let id = id_in(
        &c.prepare_with("a", "", labels(&[(LIMIT, "16MiB")]))
            .await
            .unwrap(),
    );
    nix::mount::umount2(
        &snapshots.join(&id).join("limit"),
        nix::mount::MntFlags::MNT_DETACH,
    )
    .unwrap();
    // A committed layer with an image a crash kept.
    let b = id_in(
        &c.prepare_with("b", "", labels(&[(LIMIT, "16MiB")]))
            .await
            .unwrap(),
    );
    c.commit("b1", "b").await.unwrap();
    fs::write(snapshots.join(&b).join("limit.img"), "left").unwrap();
    // An image lost, with its data.
    let lost = id_in(
        &c.prepare_with("c", "", labels(&[(LIMIT, "16MiB")]))
            .await
            .unwrap(),
    );
    nix::mount::umount2(
        &snapshots.join(&lost).join("limit"),
        nix::mount::MntFlags::MNT_DETACH,
    )
    .unwrap();
    fs::remove_file(snapshots.join(&lost).join("limit.img")).unwrap();

    let socket = d.socket.display().to_string();
    let (out, text) = check(&["--address", &socket]);
    assert!(!out.status.success(), "{text}");
    let found = lines_with(&text, "repairable with --repair");
    assert_eq!(found.len(), 2, "{text}");
    assert!(
        text.contains("\"a\"") && text.contains("not mounted"),
        "{text}"
    );
    assert!(
        text.contains("\"b1\"") && text.contains("limit.img"),
        "{text}"
    );
    let person = lines_with(&text, "needs a person");
    assert_eq!(person.len(), 1, "{text}");
    assert!(
        person[0].contains("\"c\"") && person[0].contains("lost its loop image"),
        "{text}"
    );

    let (_, text) = check(&["--repair", "--address", &socket]);
    assert_eq!(lines_with(&text, "repaired").len(), 2, "{text}");
    assert!(
        ontop::pin::is_mount_point(&snapshots.join(&id).join("limit")).unwrap(),
        "{text}"
    );
    assert!(!snapshots.join(&b).join("limit.img").exists(), "{text}");
    c.remove("c").await.unwrap();
    let (out, text) = check(&["--address", &socket]);
    assert!(out.status.success(), "{text}");
}
