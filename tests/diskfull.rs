//! A full disk: ontop's root on a small loop-mounted ext4 that fills up.
//! Prepare, Commit, Update and writes into uppers fail with
//! RESOURCE_EXHAUSTED and a message that says why, whatever did succeed is
//! intact, `ontop check` finds the root consistent, and once space is
//! freed everything works again.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{labels, Daemon};
use tonic::Code;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fills the filesystem under `dir` with one file, until it is full.
fn fill(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
    // Whatever is left is smaller than a chunk: take it too.
    while f
        .write_all(&chunk[..4096])
        .and_then(|()| f.sync_all())
        .is_ok()
    {}
}

#[tokio::test]
async fn a_full_disk_fails_cleanly_and_work_resumes_once_space_is_freed() {
    let d = Daemon::start_with(|dir| {
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(48 << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let root = dir.join("root");
        std::fs::create_dir(&root).unwrap();
        run(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), root.to_str().unwrap()],
        );
        String::new()
    })
    .await;
    let mut c = d.client().await;
    c.prepare("base-active", "").await.unwrap();
    c.commit("base", "base-active").await.unwrap();
    let before = c.prepare("written", "").await.unwrap();

    fill(&d.root);

    // Writes into an upper fail as the kernel says.
    let upper = std::path::PathBuf::from(&before[0].source);
    let err = std::fs::write(upper.join("big"), vec![1u8; 1 << 20]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));

    // Every RPC either works or says the disk is full; none is Internal.
    let mut made = vec!["base".to_string(), "written".to_string()];
    let mut refused = 0;
    for i in 0..30 {
        let key = format!("full-{i}");
        let result = match i % 3 {
            0 => c.prepare(&key, "base").await.map(|_| ()),
            1 => c.prepare(&key, "").await.map(|_| ()),
            _ => {
                let mut info = c.stat("written").await.unwrap();
                info.labels = labels(&[("full", &"x".repeat(3000))]);
                c.update(info, &["labels.full"]).await.map(|_| ())
            }
        };
        match result {
            Ok(()) if i % 3 != 2 => made.push(key),
            Ok(()) => {}
            Err(s) => {
                refused += 1;
                assert_eq!(s.code(), Code::ResourceExhausted, "{key}: {s}");
                assert!(
                    s.message().contains("No space left") || s.message().contains("full"),
                    "{key}: {s}"
                );
            }
        }
    }
    assert!(
        refused >= 20,
        "only {refused} of 30 requests met the full disk"
    );
    let commit = c.commit("written-committed", "written").await;
    match &commit {
        Ok(()) => made.retain(|k| k != "written"),
        Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s}"),
    }
    if commit.is_ok() {
        made.push("written-committed".into());
    }

    // What succeeded is there, nothing else is, and the root is consistent.
    made.sort();
    assert_eq!(c.list(&[]).await.unwrap(), made);
    d.assert_consistent();

    // Space back: everything works again.
    std::fs::remove_file(d.root.join("filler")).unwrap();
    c.prepare("after-active", "base").await.unwrap();
    c.commit("after", "after-active").await.unwrap();
    c.cleanup().await.unwrap();
    d.assert_consistent();
}
