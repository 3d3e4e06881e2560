//! Takeover's failure paths (src/takeover.rs): whatever goes wrong, one
//! ontop ends up serving the root, or the old one goes on serving, and a
//! successor that cannot take over says why and exits. The takeover under
//! load is in tests/operations.rs, beside the other restarts.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, BIN};

/// `ontop serve` on `d`'s root and socket, with `extra` flags, run to
/// its end.
fn second(d: &Daemon, extra: &[&str]) -> Output {
    successor(d, extra).wait_with_output().unwrap()
}

fn successor(d: &Daemon, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["serve", "--backend", d.backend.as_str(), "--root"])
        .arg(&d.root)
        .arg("--address")
        .arg(&d.socket)
        .args(["--log-level", "info"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn control(d: &Daemon) -> PathBuf {
    ontop::takeover::control_path(&d.socket)
}

/// A successor written by hand: asks for the socket and gets it, then
/// does what the test says (in particular, never ACKs).
fn ask(control: &Path, root: &Path) -> (UnixStream, String) {
    let s = UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    writeln!(&s, "TAKEOVER {}", root.display()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    (s, line)
}

async fn still_answers(d: &Daemon, key: &str) {
    let mut c = d.client().await;
    tokio::time::timeout(Duration::from_secs(5), c.prepare(key, ""))
        .await
        .expect("an answer within 5 s")
        .unwrap();
}

#[tokio::test]
async fn without_the_flag_a_second_ontop_is_refused_and_told_of_takeover() {
    let d = Daemon::start().await;
    let out = second(&d, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("already serving root") && err.contains("--takeover"),
        "{err}"
    );
    still_answers(&d, "after").await;
}

#[tokio::test]
async fn with_the_old_ontop_gone_a_successor_starts_as_usual() {
    let mut d = Daemon::start().await;
    d.kill();
    assert!(control(&d).exists(), "a crash leaves the control socket");
    let mut new = successor(&d, &["--takeover"]);
    let mut c = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.is_none() {
        assert!(Instant::now() < deadline, "the successor never answered");
        if let Ok(Some(status)) = new.try_wait() {
            panic!("the successor exited with {status}");
        }
        if let Ok(channel) = ontop_tools::client::connect(&d.socket).await {
            let mut client = common::Client {
                api: ontop_tools::client::Snapshots::new(
                    channel,
                    "ontop",
                    ontop_tools::client::Namespace::default(),
                ),
            };
            if client.prepare("after", "").await.is_ok() {
                c = Some(client);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    new.kill().unwrap();
    new.wait().unwrap();
}

#[tokio::test]
async fn a_hung_old_ontop_is_waited_for_then_the_successor_refuses_and_the_old_serves_on() {
    let d = Daemon::start().await;
    let pid = nix::unistd::Pid::from_raw(d.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let out = second(&d, &["--takeover"]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("did not answer a takeover") && err.contains("hung"),
        "{err}"
    );
    assert!(started.elapsed() >= ontop::takeover::ANSWER_WITHIN);
    // The old one, running again, meets a request whose sender is gone.
    still_answers(&d, "after").await;
}

#[tokio::test]
async fn a_successor_that_goes_away_before_its_ack_leaves_the_old_ontop_serving() {
    let d = Daemon::start().await;
    let root = std::fs::canonicalize(&d.root).unwrap();
    let (conn, line) = ask(&control(&d), &root);
    assert!(line.starts_with("FD 1 "), "{line}");
    // Paused meanwhile: a call waits, and is answered once it resumes.
    let mut c = d.client().await;
    let waiting = tokio::spawn(async move { c.prepare("waited", "").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(conn);
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered once the old ontop resumed")
        .unwrap()
        .unwrap();
    still_answers(&d, "after").await;
    assert!(
        d.log().contains("went away before it took the socket"),
        "{}",
        d.log()
    );
}

#[tokio::test]
async fn a_request_for_another_root_is_refused() {
    let d = Daemon::start().await;
    let (_conn, line) = ask(&control(&d), Path::new("/somewhere/else"));
    assert!(line.starts_with("NO this ontop serves"), "{line}");
    still_answers(&d, "after").await;
}

#[tokio::test]
async fn only_root_may_ask() {
    let d = Daemon::start().await;
    // The control socket is root's alone (0600), and the server checks
    // the peer's uid besides.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(control(&d)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg("/usr/bin/python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n print(e.errno)",
        ])
        .arg(control(&d))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.trim(), libc::EACCES.to_string(), "{said}");
    still_answers(&d, "after").await;
}

#[tokio::test]
async fn two_successors_racing_leave_exactly_one_ontop_serving() {
    let mut d = Daemon::start().await;
    let mut old = d.take_child();
    let a = successor(&d, &["--takeover"]);
    let b = successor(&d, &["--takeover"]);
    let mut racers = vec![a, b];
    // The old one hands over and exits.
    let deadline = Instant::now() + Duration::from_secs(40);
    while old.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old ontop never exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each racer either serves, or exits having been refused (or handed
    // on to the other, which is a takeover of its own).
    let mut serving = Vec::new();
    while Instant::now() < deadline {
        serving = racers
            .iter_mut()
            .map(|r| r.try_wait().unwrap().is_none())
            .collect();
        if serving.iter().filter(|s| **s).count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(serving.iter().filter(|s| **s).count(), 1, "{serving:?}");
    still_answers(&d, "after").await;
    for r in &mut racers {
        let _ = r.kill();
        let _ = r.wait();
    }
}

#[tokio::test]
async fn a_socket_systemd_passed_is_handed_on_and_left_to_systemd() {
    let d = Daemon::start_activated("").await;
    let mut c = d.client().await;
    c.prepare("before", "").await.unwrap();
    // The supervisor must not start ontop again once it exits.
    d.stop_restarting();
    let mut new = ChildGuard(successor(&d, &["--takeover"]));
    still_answers(&d, "after").await;
    assert!(c.stat("before").await.is_ok());
    // Stopped, the successor leaves systemd's socket where it is.
    let pid = nix::unistd::Pid::from_raw(new.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = new.0.wait().unwrap();
    assert!(status.success());
    assert!(d.socket.exists(), "the successor removed systemd's socket");
}

/// Kills the child when the test ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_lingering_ontop_lets_go_of_the_root_and_waits_for_sigterm() {
    let mut d = Daemon::start_with_config("linger = true\n").await;
    let mut old = d.take_child();
    let new = ChildGuard(successor(&d, &["--takeover"]));
    // The successor serves (so the old one let go of the root) ...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = ontop_tools::client::connect(&d.socket).await {
            let mut api = ontop_tools::client::Snapshots::new(channel, "ontop", Default::default());
            if api.prepare("after", "", Default::default()).await.is_ok() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the successor never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... while the old one waits, serving nothing, until SIGTERM.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(old.try_wait().unwrap().is_none(), "the old ontop exited");
    let pid = nix::unistd::Pid::from_raw(old.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = old.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the lingering ontop ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(d.log().contains("lingering until SIGTERM"), "{}", d.log());
    drop(new);
}
