//! containerd's own snapshotter testsuite (`snapshots/testsuite`, the
//! contract's reference), run against `ontop serve` on both backends
//! through containerd's own proxy client: the client containerd uses for
//! a `[proxy_plugins]` snapshotter.
//!
//! The suite is containerd 1.6.20's, from Debian 12's
//! `golang-github-containerd-containerd-dev`, built with Debian's
//! `golang-go` in GOPATH mode; `tests/testsuite/ontop_test.go` (ours)
//! hands it a fresh daemon per case. `tests/api.rs` keeps what the suite
//! does not cover.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{backend, require_program, require_root, stdout_of, BIN};

/// Where Debian's Go packages put their sources.
const GOCODE: &str = "/usr/share/gocode";
const SUITE_PACKAGE: &str = "github.com/containerd/containerd/snapshots/testsuite";

/// Builds the Go test program once per test process, into target/.
fn suite_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        require_program("go", "apt-get install golang-go");
        assert!(
            Path::new(GOCODE).join("src").join(SUITE_PACKAGE).is_dir(),
            "containerd's testsuite source is missing: apt-get install golang-github-containerd-containerd-dev"
        );
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let work = manifest.join("target/testsuite");
        let binary = work.join("ontop.test");
        let gopath = format!("{}:{GOCODE}", work.join("gopath").display());
        stdout_of(
            Command::new("go")
                .args(["test", "-c", "-o"])
                .arg(&binary)
                .arg(".")
                .current_dir(manifest.join("tests/testsuite"))
                .env("GO111MODULE", "off")
                .env("GOPATH", gopath)
                .env("GOCACHE", work.join("gocache")),
            "building containerd's testsuite (go test -c)",
        );
        binary
    })
}

/// The suite of containerd 1.6.20, the one Debian 12 packages.
mod containerd_1_6 {
    use super::*;

    /// Runs every case of the suite against ontop on the test's backend; each
    /// case's name and result is printed (see them with `--nocapture`).
    async fn containerds_own_testsuite_passes() {
        require_root();
        let suite = suite_binary();
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(suite)
            .args(["-test.v", "-test.root", "-test.timeout", "10m"])
            .current_dir(dir.path())
            .env("ONTOP_BIN", BIN)
            .env("ONTOP_BACKEND", backend().as_str())
            .env("TMPDIR", dir.path())
            .output()
            .expect("running containerd's testsuite");
        let stdout = String::from_utf8_lossy(&out.stdout);
        for line in stdout.lines().filter(|l| l.contains("--- ")) {
            println!("{}: {}", backend(), line.trim());
        }
        assert!(
            out.status.success(),
            "containerd's testsuite failed on {}:\n{stdout}\n{}",
            backend(),
            String::from_utf8_lossy(&out.stderr)
        );
        let passed = stdout.matches("--- PASS: TestOntop/").count();
        assert!(passed >= 20, "only {passed} cases passed:\n{stdout}");
    }

    on_every_backend!(containerds_own_testsuite_passes);
}
