//! Deployment on a cluster: `deploy/kubernetes/` validates against the
//! Kubernetes API schemas (kubernetes-validate from PyPI, offline once
//! installed), its config is one ontop accepts, and the container image
//! (`scripts/image.sh`, Dockerfile's equivalent) serves a node's socket
//! from a privileged container the way the DaemonSet runs it. No cluster
//! runs here; docs/kubernetes.md says what that leaves untested.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::{mount_all, stdout_of, unmount, Daemon, BIN};

const VALIDATOR: &str = "kubernetes-validate==1.37.0";

/// A venv with kubernetes-validate (and its PyYAML); fails saying why when
/// it cannot be made.
fn validator_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("k8s-validate-venv");
    if !venv.join(VALIDATOR).exists() {
        stdout_of(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv (this test needs python3 with venv)",
        );
        stdout_of(
            Command::new(venv.join("bin/pip")).args(["install", "-q", VALIDATOR]),
            &format!("pip install {VALIDATOR} (this test needs PyPI)"),
        );
        std::fs::write(venv.join(VALIDATOR), "").unwrap();
    }
    venv
}

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    files
}

#[test]
fn the_manifests_are_valid_kubernetes_objects_and_the_config_is_ontops() {
    let venv = validator_venv();
    let validate = |version: &str, files: &[PathBuf]| {
        Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", version])
            .args(files)
            .output()
            .unwrap()
    };
    // The oldest Kubernetes with the fields used, and the newest known.
    for version in ["1.29.0", "1.37.0"] {
        let out = validate(version, &manifests());
        assert!(
            out.status.success(),
            "Kubernetes {version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The validator does reject: a misspelt field fails strict validation.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let daemonset = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/daemonset.yaml"),
    )
    .unwrap();
    std::fs::write(
        &broken,
        daemonset.replace("mountPropagation:", "mountPropogation:"),
    )
    .unwrap();
    assert!(!validate("1.37.0", &[broken]).status.success());

    // The ConfigMap's config.toml is one ontop loads.
    let config = stdout_of(
        Command::new(venv.join("bin/python")).args([
            "-c",
            "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['config.toml'])",
            &format!(
                "{}/deploy/kubernetes/configmap.yaml",
                env!("CARGO_MANIFEST_DIR")
            ),
        ]),
        "reading the ConfigMap",
    );
    let file = dir.path().join("config.toml");
    std::fs::write(&file, config).unwrap();
    let fragment = stdout_of(
        Command::new(BIN)
            .args([
                "containerd-config",
                "--containerd-version",
                "2.3",
                "--config",
            ])
            .arg(&file),
        "ontop containerd-config with the ConfigMap's config",
    );
    assert!(
        fragment.contains("address = \"/run/ontop/ontop.sock\"")
            && fragment.contains("capabilities = [\"remap-ids\", \"rebase\"]"),
        "{fragment}"
    );
}

/// The image archive `scripts/image.sh` makes, and its reference: built
/// once per test process, since every containerd release's variant runs
/// at once and must not read the archive while the other writes it.
fn ontop_image() -> &'static (PathBuf, String) {
    static IMAGE: std::sync::OnceLock<(PathBuf, String)> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let tar = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ontop-image.tar");
        let image = stdout_of(
            Command::new("bash")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh"))
                .arg(&tar)
                .env("ONTOP_BIN", BIN),
            "scripts/image.sh",
        );
        (tar, image.trim().to_string())
    })
}

/// The image of a newer build of this source (its version says
/// `0.1.0-newer`), for a rolling update to something else: built once.
fn newer_image() -> &'static (PathBuf, String) {
    static IMAGE: std::sync::OnceLock<(PathBuf, String)> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target/newer");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        stdout_of(
            Command::new(cargo)
                .args(["build", "--locked", "--bin", "ontop"])
                .current_dir(root)
                .env("CARGO_TARGET_DIR", &target)
                .env("ONTOP_BUILD_VERSION", NEWER),
            "cargo build of the newer ontop",
        );
        let tar = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ontop-newer-image.tar");
        let image = stdout_of(
            Command::new("bash")
                .arg(root.join("scripts/image.sh"))
                .arg(&tar)
                .arg(format!("localhost/ontop:{NEWER}"))
                .env("ONTOP_BIN", target.join("debug/ontop")),
            "scripts/image.sh of the newer ontop",
        );
        (tar, image.trim().to_string())
    })
}

const NEWER: &str = "0.1.0-newer";

/// The version the ontop answering on `socket` reports.
async fn version_on(socket: &Path) -> String {
    let channel = ontop_tools::client::connect(socket).await.unwrap();
    ontop::admin::v1::admin_client::AdminClient::new(channel)
        .status(ontop::admin::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .version
}

/// The image, run as the DaemonSet runs it: privileged, with the node's
/// root, socket directory and config mounted from the host. The host then
/// uses the socket, and mounts what it returns.
async fn the_image_serves_the_nodes_socket_from_a_container() {
    // A containerd to run the image on (its own snapshotter, overlayfs).
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    let (tar, image) = ontop_image();
    let image = image.as_str();
    let daemonset = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/daemonset.yaml"),
    )
    .unwrap();
    assert!(
        daemonset.contains(&format!("image: {image}\n")),
        "the DaemonSet runs the image scripts/image.sh builds, {image}"
    );
    ctd.ctr_ok(&["images", "import", &tar.display().to_string()]);
    let node = Node::new(&d);
    node.run(&ctd, image, "ontop-node", &[]);
    // If the test fails from here, the container's ontop must not outlive
    // it: killing containerd and its shim would leave it running.
    let _kill = KillOnDrop(&ctd, "ontop-node");
    let (root, socket) = (node.root.clone(), node.socket());
    node.wait_for_socket().await;
    // The readiness probe, run in the container as the kubelet runs it.
    let probe = ctd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "probe",
        "ontop-node",
        "/usr/local/bin/ontop",
        "ping",
        "--address",
        &socket.display().to_string(),
    ]);
    assert!(probe.contains("ok: ontop answers"), "{probe}");

    // The host uses it: its snapshots live in the node's root.
    let channel = ontop_tools::client::connect(&socket).await.unwrap();
    let mut api = ontop_tools::client::Snapshots::new(channel, "ontop", Default::default());
    let mounts = api
        .prepare("from-the-host", "", Default::default())
        .await
        .unwrap();
    let target = d.mountpoint("from-the-host");
    mount_all(&mounts, &target);
    std::fs::write(target.join("f"), "written on the host").unwrap();
    unmount(&target);
    api.commit("layer", "from-the-host", Default::default())
        .await
        .unwrap();
    // The host's paths, as ontop in the container named them.
    assert!(
        mounts[0].source.starts_with(&root.display().to_string()),
        "{mounts:?}"
    );
    assert!(root.join("metadata.db").is_file());
    assert_eq!(
        std::fs::read_to_string(root.join("snapshots/1/fs/f")).unwrap(),
        "written on the host"
    );

    ctd.ctr_ok(&["tasks", "kill", "ontop-node"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctd.ctr(&["containers", "rm", "ontop-node"]).status.code() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the ontop container did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!socket.exists(), "a stopped ontop removes its socket");
}

/// SIGKILLs a container's task when dropped.
struct KillOnDrop<'a>(&'a Containerd, &'a str);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.0
            .ctr(&["tasks", "kill", "--signal", "SIGKILL", self.1]);
    }
}

/// A node's paths for ontop, as the DaemonSet mounts them: the same
/// inside the container as on the host, since the mounts ontop returns
/// name them and the host performs them.
struct Node {
    root: PathBuf,
    run: PathBuf,
    etc: PathBuf,
}

impl Node {
    fn new(d: &Daemon) -> Node {
        let node = d.dir.path().join("node");
        let (root, run, etc) = (node.join("root"), node.join("run"), node.join("etc"));
        for dir in [&root, &run, &etc] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(
            etc.join("config.toml"),
            format!(
                "root = {:?}\naddress = {:?}\nlog_format = \"json\"\n",
                root.display().to_string(),
                run.join("ontop.sock").display().to_string()
            ),
        )
        .unwrap();
        Node { root, run, etc }
    }

    fn socket(&self) -> PathBuf {
        self.run.join("ontop.sock")
    }

    /// Runs the image as container `id`, privileged with the node's
    /// paths; `command` replaces the image's (empty: its own).
    fn run(&self, ctd: &Containerd, image: &str, id: &str, command: &[&str]) {
        let bind = |src: &Path, dst: &str| {
            format!("type=bind,src={},dst={dst},options=rbind:rw", src.display())
        };
        let mounts = [
            bind(&self.root, &self.root.display().to_string()),
            bind(&self.run, &self.run.display().to_string()),
            bind(&self.etc, "/etc/ontop"),
        ];
        let log = format!(
            "--log-uri=file://{}/{id}.log",
            self.etc.parent().unwrap().display()
        );
        let mut args = vec!["run", "-d", "--privileged", log.as_str()];
        for m in &mounts {
            args.extend(["--mount", m.as_str()]);
        }
        args.extend([image, id]);
        args.extend(command);
        ctd.ctr_ok(&args);
    }

    async fn wait_for_socket(&self) {
        let socket = self.socket();
        let deadline = Instant::now() + Duration::from_secs(20);
        while ontop_tools::client::connect(&socket).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "ontop in the container did not answer on {}",
                socket.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `ontop ping --here` in container `id`, as the DaemonSet's readiness
/// probe: whether that container's ontop serves the node's socket.
fn ready(ctd: &Containerd, id: &str, socket: &Path) -> bool {
    probe(ctd, id, socket).status.success()
}

fn probe(ctd: &Containerd, id: &str, socket: &Path) -> std::process::Output {
    ctd.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        &format!("probe-{}", std::process::id()),
        id,
        "/usr/local/bin/ontop",
        "ping",
        "--here",
        "--address",
        &socket.display().to_string(),
    ])
}

/// Two rolling updates as the DaemonSet does them (maxSurge: the new pod
/// beside the old, `--takeover --linger`): the first under load on 8
/// connections of the test's client (no call fails, every acknowledged
/// Commit is kept), the second, to a newer build, while containerd runs
/// containers on the node's ontop (none fails). Each new container is
/// ready only once it serves; each old one lingers until stopped. (Two
/// rolls, not one: containerd's collections delete what the test's
/// client makes, which containerd never knew.)
async fn a_rolling_update_takes_the_socket_over_and_fails_no_call() {
    let d = Daemon::start().await;
    let node = Node::new(&d);
    // The containerd that runs ontop's containers also uses the node's
    // ontop, as snapshotter `node`.
    let ctd = Containerd::start_with(
        &d,
        &format!(
            "[proxy_plugins.node]\n  type = \"snapshot\"\n  address = {:?}\n",
            node.socket().display().to_string()
        ),
    )
    .await;
    let (tar, image) = ontop_image();
    ctd.ctr_ok(&["images", "import", &tar.display().to_string()]);
    let (newer_tar, newer) = newer_image();
    ctd.ctr_ok(&["images", "import", &newer_tar.display().to_string()]);
    let command = [
        "/usr/local/bin/ontop",
        "serve",
        "--config",
        "/etc/ontop/config.toml",
        "--takeover",
        "--linger",
    ];
    node.run(&ctd, image, "ontop-old", &command);
    let _old = KillOnDrop(&ctd, "ontop-old");
    node.wait_for_socket().await;
    let socket = node.socket();
    assert!(ready(&ctd, "ontop-old", &socket));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = common::load::on_its_own_thread(socket.clone(), 8, std::sync::Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.run(&ctd, image, "ontop-new", &command);
    let _new = KillOnDrop(&ctd, "ontop-new");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(&ctd, "ontop-new", &socket) {
        if Instant::now() > deadline {
            let out = probe(&ctd, "ontop-new", &socket);
            let log = |id: &str| {
                std::fs::read_to_string(node.etc.parent().unwrap().join(format!("{id}.log")))
                    .unwrap_or_default()
            };
            panic!(
                "the new container never became ready: {}{}\nnew: {}\nold: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log("ontop-new"),
                common::containerd::tail(&log("ontop-old"), 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!ready(&ctd, "ontop-old", &socket), "both containers ready");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The old container lingers until its pod is deleted: SIGTERM.
    let tasks = ctd.ctr_ok(&["tasks", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("ontop-old") && l.contains("RUNNING")),
        "{tasks}"
    );
    ctd.ctr_ok(&["tasks", "kill", "ontop-old"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let all = load.join().unwrap();
    println!(
        "rolling update: {} calls answered, {} failed, longest gap {:?}",
        all.ok, all.failed, all.longest_gap
    );
    assert!(all.ok > 0);
    assert_eq!(all.failed, 0, "first failure: {:?}", all.first_error);
    let channel = ontop_tools::client::connect(&socket).await.unwrap();
    let mut api = ontop_tools::client::Snapshots::new(channel, "ontop", Default::default());
    for name in &all.acknowledged {
        assert!(
            api.stat(name).await.is_ok(),
            "acknowledged commit {name} was lost"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctd.ctr(&["containers", "rm", "ontop-old"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "the old container did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The second roll, to the newer build, with containers running.
    let archive = common::containerd::image_archive().display().to_string();
    let mut import = vec!["images", "import", "--snapshotter", "node"];
    if ctd.release.major() >= 2 {
        // The transfer service unpacks only for snapshotters its config
        // names; the client-side import needs none.
        import.push("--local");
    }
    import.push(&archive);
    ctd.ctr_ok(&import);
    let runs = ctd.run_containers("node", "on-the-node", &["cat", "/added/new.txt"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.run(&ctd, newer, "ontop-newer", &command);
    let _newer = KillOnDrop(&ctd, "ontop-newer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready(&ctd, "ontop-newer", &socket) {
        assert!(
            Instant::now() < deadline,
            "the newer container never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(version_on(&socket).await, NEWER);
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctd.ctr_ok(&["tasks", "kill", "ontop-new"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = runs.finish().await;
    let (ran, failed, first) = (counts.ran, counts.failed, counts.first_failure);
    println!("rolling update to {NEWER}: {ran} containers ran, {failed} failed");
    assert!(ran > 0, "no container ran");
    let log = |id: &str| {
        std::fs::read_to_string(node.etc.parent().unwrap().join(format!("{id}.log")))
            .unwrap_or_default()
    };
    assert_eq!(
        failed,
        0,
        "containers failed to run during the roll: {first:?}\nold: {}\nnew: {}",
        common::containerd::tail(&log("ontop-new"), 12),
        common::containerd::tail(&log("ontop-newer"), 12)
    );
}

on_every_containerd!(
    kernel_only: the_image_serves_the_nodes_socket_from_a_container,
    a_rolling_update_takes_the_socket_over_and_fails_no_call,
);
