//! ontop as operators run it: socket-activated restarts that no client
//! notices, systemd's readiness and watchdog protocol, the gRPC health
//! service, per-call logs, and Prometheus metrics scraped by a real
//! Prometheus server.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::containerd::eventually;
use common::load::{load, Seen};
use common::{http_get, Daemon, BIN};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SNAPSHOTS_SERVICE: &str = "containerd.services.snapshots.v1.Snapshots";

#[tokio::test]
async fn a_socket_activated_daemon_serves_on_the_inherited_socket_and_leaves_it_in_place() {
    let mut d = Daemon::start_activated("").await;
    let socket_ino = std::fs::metadata(&d.socket).unwrap().ino();
    let mut c = d.client().await;
    c.prepare("a", "").await.unwrap();
    c.commit("a-c", "a").await.unwrap();
    assert!(d.log().contains("activated=true"), "{}", d.log());

    let first = d.pid();
    d.restart().await;
    assert_ne!(d.pid(), first, "a new process serves");
    // The socket is systemd's: the old process neither removed it nor did
    // the new one bind another.
    assert_eq!(std::fs::metadata(&d.socket).unwrap().ino(), socket_ino);
    let mut c = d.client().await;
    assert_eq!(c.stat("a-c").await.unwrap().name, "a-c");

    assert!(d.stop().await.success(), "{}", d.log());
    assert!(
        d.socket.exists(),
        "the socket belongs to systemd, not ontop"
    );
}

#[tokio::test]
async fn a_socket_passed_for_another_process_is_ignored_and_a_wrong_one_is_refused() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ontop.sock");
    let serve = |listen_pid: &str, listen_fds: &str| {
        Command::new(BIN)
            .args(["serve", "--root"])
            .arg(dir.path().join("root"))
            .arg("--address")
            .arg(&socket)
            .env("LISTEN_PID", listen_pid)
            .env("LISTEN_FDS", listen_fds)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Meant for a parent (LISTEN_PID is not ontop's): ontop binds its own.
    let mut child = serve("1", "1");
    eventually(10, "ontop to bind its own socket", || socket.exists()).await;
    common::terminate(child.id()).unwrap();
    assert!(child.wait().unwrap().success());

    // Passed what ontop cannot serve on: refused with the reason, never a
    // guess. `setup` runs in the shell that execs ontop with fd 3 a file.
    let activated = |setup: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{setup}; export LISTEN_PID=$$; exec \"$0\" \"$@\" 3</dev/null"
            ))
            .arg(BIN)
            .args(["serve", "--root"])
            .arg(dir.path().join("root"))
            .arg("--address")
            .arg(&socket)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = activated("export LISTEN_FDS=2");
    assert!(err.contains("passed 2 sockets"), "{err}");
    let err = activated("export LISTEN_FDS=1");
    assert!(err.contains("not a listening unix stream socket"), "{err}");
}

/// How a test restarts ontop.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// SIGTERM, then start again (socket-activated: the socket stays).
    Plain,
    /// A successor with `--takeover` beside the running one.
    Takeover,
}

/// Restarts `d` ten times under load on eight connections; returns what
/// the connections saw.
async fn restarts_under_load(d: &mut Daemon, how: Restart) -> Seen {
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        // A connection each, made before the first restart.
        let client = d.client().await;
        workers.push(tokio::spawn(load(client, w, Arc::clone(&stop))));
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match how {
            Restart::Plain => d.restart().await,
            Restart::Takeover => d.take_over().await,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Seen::default();
    for w in workers {
        all.absorb(w.await.unwrap());
    }
    // Every Commit that was acknowledged is there after the restarts.
    let mut c = d.client().await;
    for name in &all.acknowledged {
        let info = c.stat(name).await;
        assert!(
            info.is_ok(),
            "acknowledged commit {name} was lost: {info:?}"
        );
    }
    if let Some(e) = &all.first_error {
        println!("  first failure: {e}");
    }
    println!(
        "  {} calls made again because the server never ran them",
        all.retried
    );
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_restarts_under_load_fail_no_call_when_socket_activated() {
    let mut activated = Daemon::start_activated("").await;
    let seen = restarts_under_load(&mut activated, Restart::Plain).await;
    println!(
        "socket-activated: {} calls answered, {} failed, longest gap {:?}",
        seen.ok, seen.failed, seen.longest_gap
    );
    // The same without activation, measured for the record: each restart
    // refuses connections until the new process has bound the socket.
    let mut bound = Daemon::start().await;
    let b = restarts_under_load(&mut bound, Restart::Plain).await;
    println!(
        "binding its own socket: {} calls answered, {} failed, longest gap {:?}",
        b.ok, b.failed, b.longest_gap
    );

    assert!(seen.ok > 0, "the load made calls");
    assert_eq!(
        seen.failed,
        0,
        "socket-activated restarts failed calls; the daemon's log about it:\n{}",
        seen.story(&activated.log())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_takeovers_under_load_fail_no_call_and_lose_nothing() {
    let mut d = Daemon::start().await;
    let seen = restarts_under_load(&mut d, Restart::Takeover).await;
    println!(
        "takeover: {} calls answered, {} failed, longest gap {:?}",
        seen.ok, seen.failed, seen.longest_gap
    );
    assert!(seen.ok > 0, "the load made calls");
    assert_eq!(
        seen.failed,
        0,
        "takeovers failed calls; the daemon's log about it:\n{}",
        seen.story(&d.log())
    );
    let log = d.log();
    assert_eq!(
        log.matches("handed over; stopping").count(),
        10,
        "ten handovers:\n{}",
        common::containerd::tail(&log, 60)
    );
}

/// A NOTIFY_SOCKET of the test's own, as systemd's.
struct Manager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Manager {
    fn new(dir: &std::path::Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Manager { socket, path }
    }

    /// The next notification, whole.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification in 15s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Notifications until one holds `what`; returns all of them.
    fn until(&self, what: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let m = self.next();
            let done = m.lines().any(|l| l == what);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_once_calls_are_answered_then_the_watchdog_then_stopping() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::new(dir.path());
    let socket = dir.path().join("ontop.sock");
    let mut child = Command::new(BIN)
        .args(["serve", "--root"])
        .arg(dir.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &manager.path)
        // 400 ms: fed every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();

    let ready = tokio::task::block_in_place(|| manager.next());
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means answering: the first call after it succeeds, no retry.
    let channel = ontop_tools::client::connect(&socket).await.unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: SNAPSHOTS_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let fed = tokio::task::block_in_place(|| {
        let mut fed = Vec::new();
        while fed.len() < 3 {
            let m = manager.next();
            if m.lines().any(|l| l == "WATCHDOG=1") {
                fed.push(m);
            }
        }
        fed
    });
    assert!(
        fed[0].contains("STATUS=serving, 0 snapshots"),
        "the status says what ontop does: {fed:?}"
    );

    common::terminate(pid).unwrap();
    let stopping = tokio::task::block_in_place(|| manager.until("STOPPING=1"));
    assert!(
        stopping.last().unwrap().contains("STATUS=shutting down"),
        "{stopping:?}"
    );
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_serving_and_a_watcher_hears_not_serving_at_shutdown() {
    let mut d = Daemon::start().await;
    let mut health = HealthClient::new(ontop_tools::client::connect(&d.socket).await.unwrap());
    for service in ["", SNAPSHOTS_SERVICE] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut watch = health
        .watch(HealthCheckRequest {
            service: SNAPSHOTS_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    common::terminate(d.pid()).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a status change within 5s of SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The watcher hangs up, as probes do, and the stop completes.
    drop(watch);
    drop(health);
    assert!(d.stop().await.success(), "{}", d.log());
}

#[tokio::test]
async fn every_call_is_logged_with_method_key_code_and_duration_and_slow_ones_warn() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.prepare("logged", "").await.unwrap();
    let _ = c.stat("missing").await;
    let log = d.log();
    assert!(
        log.contains(r#"call method="Prepare" key="logged" code="OK" duration_ms="#),
        "{log}"
    );
    assert!(
        log.contains(r#"call method="Stat" key="missing" code="NotFound""#),
        "{log}"
    );
    assert!(!log.contains("slow call"), "{log}");

    // Every call is slow past a threshold of a nanosecond; JSON carries
    // the same fields.
    let d = Daemon::start_with_config("slow_call_seconds = 1e-9\nlog_format = \"json\"\n").await;
    let mut c = d.client().await;
    c.prepare("slow", "").await.unwrap();
    let log = d.log();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "slow call")
        .unwrap_or_else(|| panic!("no slow call in the JSON log:\n{log}"));
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["fields"]["method"], "Prepare");
    assert_eq!(line["fields"]["key"], "slow");
    assert_eq!(line["fields"]["code"], "OK");
    assert!(line["fields"]["duration_ms"].as_f64().unwrap() > 0.0);
}

/// GET `path` from 127.0.0.1:`port` over HTTP/1.0; the status and body.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_metrics_that_promtool_accepts_and_counts_the_calls() {
    let install = "apt-get install prometheus (scripts/test.sh installs it)";
    common::require_program("promtool", install);
    common::require_program("prometheus", install);
    let port = common::free_port();
    let d = Daemon::start_with_config(&format!(
        "metrics_address = \"127.0.0.1:{port}\"\nasync_remove = true\n"
    ))
    .await;
    let mut c = d.client().await;
    // A layer of 1 MiB, removed: Cleanup reclaims it.
    c.layer(&d, "big", "", |dir| {
        std::fs::write(dir.join("blob"), vec![7u8; 1 << 20]).unwrap()
    })
    .await;
    c.remove("big").await.unwrap();
    c.cleanup().await.unwrap();
    for i in 1..25 {
        c.prepare(&format!("p{i}"), "").await.unwrap();
    }
    c.prepare("p0", "").await.unwrap();
    c.commit("p0-c", "p0").await.unwrap();
    c.prepare_with(
        "limited",
        "",
        common::labels(&[(ontop::limit::ONTOP_MAX_SIZE_LABEL, "16MiB")]),
    )
    .await
    .unwrap();
    let _ = c.stat("missing").await;
    let _ = c.usage("p1").await;

    let (status, scrape) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{scrape}");
    for expected in [
        r#"ontop_calls_total{method="Prepare",code="OK"} 27"#,
        r#"ontop_calls_total{method="Stat",code="NotFound"} 1"#,
        r#"ontop_call_duration_seconds_bucket{method="Prepare",le="+Inf"} 27"#,
        r#"ontop_snapshots{kind="active"} 25"#,
        r#"ontop_limited_snapshots{enforcer="loop-ext4"} 1"#,
        r#"ontop_limited_snapshots{enforcer="btrfs-qgroup"} 0"#,
        r#"ontop_snapshots{kind="committed"} 1"#,
        r#"ontop_call_phase_duration_seconds_count{method="Prepare",phase="durable_commit"} 27"#,
        r#"ontop_call_phase_duration_seconds_count{method="Commit",phase="queue"} 2"#,
        "ontop_group_commit_batch_size_count",
        "ontop_durable_commit_duration_seconds_bucket",
        "ontop_database_size_bytes",
        "ontop_database_wal_size_bytes",
        "ontop_pinned_bases 0",
        "ontop_snapshots_missing_tree 0",
        "ontop_usage_walk_duration_seconds_count",
        "ontop_usage_walk_files_total",
        "ontop_cleanup_reclaimed_bytes_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_threads",
        r#"ontop_build_info{version=""#,
    ] {
        assert!(scrape.contains(expected), "no {expected} in:\n{scrape}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reclaimed: f64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("ontop_cleanup_reclaimed_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(reclaimed >= (1 << 20) as f64, "{reclaimed}");
    assert_eq!(http_get(port, "/other").0, 404);

    // A real Prometheus scrapes ontop every second, with the sample alerts.
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/prometheus/ontop-alerts.yml");
    common::stdout_of(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
        "promtool check rules",
    );
    let prom_dir = d.dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: ontop\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let prom_port = common::free_port();
    let prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            prom_dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(prom_dir.join("log")).unwrap())
        .spawn()
        .expect("starting prometheus");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Kill(prometheus);
    let query = percent_encode(r#"sum(ontop_calls_total{method="Prepare",code="OK"})"#);
    let mut last = String::new();
    let answered = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", prom_port)).is_ok() {
                let (status, body) = http_get(prom_port, &format!("/api/v1/query?query={query}"));
                if status == 200 {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    if v["data"]["result"][0]["value"][1] == "27" {
                        return true;
                    }
                }
                last = body;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    });
    assert!(
        answered,
        "Prometheus did not report 27 Prepare calls; last answer: {last}\n{}",
        std::fs::read_to_string(prom_dir.join("log")).unwrap_or_default()
    );
    let (_, rules_loaded) = http_get(prom_port, "/api/v1/rules");
    assert!(rules_loaded.contains("OntopCallErrors"), "{rules_loaded}");
}

#[test]
fn the_contrib_units_pass_systemd_analyze_and_listen_where_ontop_serves() {
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let dir = tempfile::tempdir().unwrap();
    let socket = std::fs::read_to_string(contrib.join("ontop.socket")).unwrap();
    assert!(
        socket
            .lines()
            .any(|l| l == format!("ListenStream={}", ontop::config::DEFAULT_ADDRESS)),
        "ontop.socket listens where ontop serves by default"
    );
    assert!(socket.lines().any(|l| l == "SocketMode=0660"));
    // verify checks that ExecStart= exists: point it at this build.
    let service = std::fs::read_to_string(contrib.join("ontop.service"))
        .unwrap()
        .replace("/usr/bin/ontop", BIN);
    assert!(service.lines().any(|l| l == "Type=notify"));
    assert!(service.lines().any(|l| l.starts_with("WatchdogSec=")));
    std::fs::write(dir.path().join("ontop.socket"), socket).unwrap();
    std::fs::write(dir.path().join("ontop.service"), service).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("ontop.socket"))
        .arg(dir.path().join("ontop.service"))
        .output()
        .expect("systemd-analyze (package systemd) is missing");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
}
