//! The daemon as an operator meets it: start-up, the socket, the root
//! lock, restarts, crash repair, async removal and the CLI.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{code, Daemon, BIN};
use tonic::Code;

fn ontop(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running ontop")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn it_starts_quickly_and_the_socket_is_0660_in_a_created_directory() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a/b/ontop.sock");
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["serve", "--root"])
        .arg(dir.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .spawn()
        .unwrap();
    while ontop_tools::client::connect(&socket).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no answer in 10s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The goal is under a second; the bound here only catches a hang, as
    // shared test machines are too noisy for a tight timing assertion.
    eprintln!("start-up to first connection: {:?}", started.elapsed());
    let md = fs::symlink_metadata(&socket).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    // Once it answers, its takeover socket is there too (0600).
    let channel = ontop_tools::client::connect(&socket).await.unwrap();
    let mut api = ontop_tools::client::Snapshots::new(channel, "ontop", Default::default());
    let answer = api.stat("nothing").await.unwrap_err();
    assert_eq!(answer.code(), tonic::Code::NotFound);
    let control = ontop::takeover::control_path(&socket);
    let md = fs::symlink_metadata(&control).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // Both were bound in a private directory and moved into place with
    // their mode; nothing of that is left beside them.
    let mut beside: Vec<_> = fs::read_dir(socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["ontop.sock", "ontop.sock.takeover"]);
    common::terminate(child.id()).unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start().await;
    let status = d.stop().await;
    assert!(status.success(), "{status}:\n{}", d.log());
    assert!(!d.socket.exists());
    assert!(d.log().contains("ontop stopped"), "{}", d.log());
}

#[tokio::test]
async fn a_client_that_never_hangs_up_cannot_block_a_stop() {
    let mut d = Daemon::start().await;
    // A real client that made a request and then froze: its connection
    // stays open and never acknowledges the server's goodbye.
    let socket = d.socket.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt.block_on(ontop_tools::client::connect(&socket)).unwrap();
        let mut client = ontop::admin::v1::admin_client::AdminClient::new(channel);
        rt.block_on(client.list(ontop::admin::v1::ListRequest {}))
            .unwrap();
        ready_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(60));
        drop(client);
    });
    ready_rx.recv().unwrap();
    let started = Instant::now();
    let status = d.stop().await;
    assert!(status.success(), "{status}:\n{}", d.log());
    assert!(!d.socket.exists());
    assert!(d.log().contains("clients still connected"), "{}", d.log());
    eprintln!("stopped after {:?} with a frozen client", started.elapsed());
}

#[tokio::test]
async fn a_second_daemon_on_the_same_root_is_refused() {
    let d = Daemon::start().await;
    let other = d.dir.path().join("other.sock");
    let out = ontop(&[
        "serve",
        "--root",
        d.root.to_str().unwrap(),
        "--address",
        other.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already serving root"),
        "{}",
        stderr(&out)
    );
    assert!(!other.exists());
    // The first one is unharmed.
    d.client().await.prepare("k", "").await.unwrap();
}

#[tokio::test]
async fn a_live_socket_is_never_replaced_but_a_stale_one_is() {
    let d = Daemon::start().await;
    let root2 = d.dir.path().join("root2");
    let out = ontop(&[
        "serve",
        "--root",
        root2.to_str().unwrap(),
        "--address",
        d.socket.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    d.client().await.prepare("still-served", "").await.unwrap();

    // A socket nobody listens on is stale: a crash leaves one behind.
    let stale = d.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut d2 = Daemon::start().await;
    d2.stop().await;
    d2.socket = stale.clone();
    d2.spawn().await;
    d2.client().await.prepare("k", "").await.unwrap();

    // Anything that is not a socket is left alone.
    let file = d.dir.path().join("file.sock");
    fs::write(&file, "precious").unwrap();
    let out = ontop(&[
        "serve",
        "--root",
        d.dir.path().join("root3").to_str().unwrap(),
        "--address",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a socket"), "{}", stderr(&out));
    assert_eq!(fs::read_to_string(&file).unwrap(), "precious");
}

#[tokio::test]
async fn snapshots_survive_a_restart_and_a_crash() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "base", "", |r| fs::write(r.join("f"), "data").unwrap())
        .await;
    c.prepare("a", "base").await.unwrap();
    d.restart().await;
    let mut c = d.client().await;
    assert_eq!(c.list(&[]).await.unwrap(), ["a", "base"]);
    d.kill();
    d.spawn().await;
    let mut c = d.client().await;
    let target = d.mountpoint("a");
    common::mount_all(&c.mounts("a").await.unwrap(), &target);
    assert_eq!(fs::read_to_string(target.join("f")).unwrap(), "data");
}

#[tokio::test]
async fn start_up_and_cleanup_repair_what_a_crash_leaves() {
    let mut d = Daemon::start().await;
    d.kill();
    // What a crash can leave: a half-built snapshot in tmp/, a half-deleted
    // one in trash/, and a directory renamed into place whose transaction
    // never committed (so its id is the next one the database hands out).
    fs::create_dir_all(d.root.join("tmp/new-1-0/fs/x")).unwrap();
    fs::create_dir_all(d.root.join("trash/7-1-0/fs")).unwrap();
    fs::create_dir_all(d.root.join("snapshots/1/fs/leftover")).unwrap();
    d.spawn().await;
    assert_eq!(fs::read_dir(d.root.join("tmp")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(d.root.join("trash")).unwrap().count(), 0);
    let mut c = d.client().await;
    c.prepare("k", "").await.unwrap();
    assert!(
        !d.root.join("snapshots/1/fs/leftover").exists(),
        "a fresh snapshot never inherits an orphan's content"
    );
    fs::create_dir_all(d.root.join("snapshots/55/fs")).unwrap();
    c.cleanup().await.unwrap();
    assert_eq!(d.snapshot_dirs(), ["1"]);
}

#[tokio::test]
async fn async_remove_frees_the_key_at_once_and_disk_at_cleanup() {
    let d = Daemon::start_with_config("async_remove = true").await;
    let mut c = d.client().await;
    c.prepare("k", "").await.unwrap();
    c.remove("k").await.unwrap();
    assert_eq!(code(c.stat("k").await), Code::NotFound);
    assert_eq!(d.snapshot_dirs(), ["1"], "the directory waits for Cleanup");
    c.prepare("k", "").await.unwrap();
    assert_eq!(d.snapshot_dirs(), ["1", "2"]);
    c.cleanup().await.unwrap();
    assert_eq!(d.snapshot_dirs(), ["2"]);
}

#[tokio::test]
async fn sync_remove_deletes_the_directory_before_returning() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.prepare("k", "").await.unwrap();
    fs::write(d.root.join("snapshots/1/fs/f"), "x").unwrap();
    c.remove("k").await.unwrap();
    assert!(d.snapshot_dirs().is_empty());
    assert_eq!(fs::read_dir(d.root.join("trash")).unwrap().count(), 0);
}

#[tokio::test]
async fn concurrent_clients_get_answers_and_leave_a_consistent_state() {
    let d = Daemon::start().await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for i in 0..20 {
                // Every task also fights over one shared key.
                match c.prepare("shared", "").await {
                    Ok(_) => c.remove("shared").await.unwrap(),
                    Err(s) => assert_eq!(s.code(), Code::AlreadyExists, "{s:?}"),
                }
                let key = format!("t{t}-{i}");
                c.prepare(&key, "").await.unwrap();
                c.commit(&format!("{key}-c"), &key).await.unwrap();
                committed.push(format!("{key}-c"));
            }
            committed
        }));
    }
    let mut want = Vec::new();
    for t in tasks {
        want.extend(t.await.unwrap());
    }
    want.sort();
    let mut c = d.client().await;
    let mut got = c.list(&[]).await.unwrap();
    got.retain(|k| k != "shared");
    assert_eq!(got, want);
    assert_eq!(d.snapshot_dirs().len(), c.list(&[]).await.unwrap().len());
    assert!(!d.log().contains("database is locked"));
}

#[tokio::test]
async fn ls_and_info_show_snapshots_chains_and_usage() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.layer(&d, "base", "", |r| {
        fs::write(r.join("f"), vec![1u8; 8192]).unwrap()
    })
    .await;
    c.prepare_with(
        "default/3/extract sha256:x",
        "base",
        common::labels(&[("containerd.io/snapshot/x", "1")]),
    )
    .await
    .unwrap();
    let sock = d.socket.to_str().unwrap();
    let out = ontop(&["ls", "--address", sock]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().next().unwrap().contains("KIND"));
    assert!(
        text.contains("committed") && text.contains("base"),
        "{text}"
    );
    assert!(text.contains("default/3/extract sha256:x"), "{text}");

    let out = ontop(&["info", "--address", sock, "default/3/extract sha256:x"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "Kind:    active",
        "Parent:  base",
        "containerd.io/snapshot/x=1",
        "Chain (1 ancestors",
        "snapshots/2",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let out = ontop(&["info", "--address", sock, "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    // ping: the readiness probe of deploy/kubernetes.
    let out = ontop(&["ping", "--address", sock]);
    assert!(out.status.success(), "{}", stderr(&out));
    let missing = d.dir.path().join("no.sock");
    let out = ontop(&["ping", "--address", missing.to_str().unwrap()]);
    assert!(!out.status.success());
}

#[tokio::test]
async fn bad_config_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    fs::write(&cfg, "async_remov = true\n").unwrap();
    let out = ontop(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown field"), "{}", stderr(&out));

    fs::write(&cfg, "log_format = \"json\"\n").unwrap();
    let mut d = Daemon::start_with_config("log_format = \"json\"").await;
    d.stop().await;
    let log = d.log();
    let first = log.lines().next().expect("a log line");
    assert!(
        first.starts_with('{') && first.contains("\"level\""),
        "{first}"
    );
}

#[tokio::test]
async fn the_fuse_backend_refuses_to_start_without_fuse_overlayfs_on_path() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = Command::new(BIN)
        .args(["serve", "--backend", "fuse-overlayfs", "--root"])
        .arg(&root)
        .arg("--address")
        .arg(dir.path().join("ontop.sock"))
        // Everything a system has, but no fuse-overlayfs.
        .env("PATH", dir.path().join("empty-bin"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("needs the fuse-overlayfs program on PATH") && err.contains("empty-bin"),
        "{err}"
    );
    assert!(!dir.path().join("ontop.sock").exists());
    // An unknown backend is refused, naming the real ones.
    let out = Command::new(BIN)
        .args(["serve", "--backend", "nonsense"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("fuse-overlayfs"), "{}", stderr(&out));
}

#[tokio::test]
async fn the_socket_group_is_configurable_and_the_database_is_private() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start_with_config("socket_group = \"daemon\"").await;
    let daemon_gid = nix::unistd::Group::from_name("daemon")
        .unwrap()
        .expect("Debian has a daemon group")
        .gid
        .as_raw();
    let md = fs::metadata(&d.socket).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (0, daemon_gid, 0o660)
    );
    let mut c = d.client().await;
    c.prepare("k", "").await.unwrap();
    for f in ["metadata.db", "metadata.db-wal", "metadata.db-shm"] {
        let mode = fs::metadata(d.root.join(f)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    // Unknown names and a world-writable config are refused with the reason.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    fs::write(&cfg, "socket_group = \"no-such-group\"\n").unwrap();
    let out = ontop(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(stderr(&out).contains("not a group"), "{}", stderr(&out));
    fs::write(&cfg, "").unwrap();
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o666)).unwrap();
    let out = ontop(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("world-writable"), "{}", stderr(&out));
}

/// Base pins are mounts that containerd must see, so a daemon in a mount
/// namespace of its own (as a unit with PrivateMounts= gets) says so, and
/// one in the host's namespace does not.
#[tokio::test]
async fn a_daemon_whose_pins_containerd_cannot_see_warns() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    fs::write(&config, format!("base_roots = [{:?}]\n", dir.path())).unwrap();
    for (launcher, warns) in [(&["unshare", "--mount"][..], true), (&[][..], false)] {
        let socket = dir.path().join(format!("{warns}.sock"));
        let mut argv: Vec<&str> = launcher.to_vec();
        argv.push(BIN);
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join(format!("root-{warns}")))
            .arg("--address")
            .arg(&socket)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while ontop_tools::client::connect(&socket).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no answer in 10s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            log.contains("mount namespace of its own"),
            warns,
            "{launcher:?}:\n{log}"
        );
    }
}
