//! Clients other than containerd's. Many gRPC clients on a unix socket
//! send the socket path as `:authority`, which stock h2 answers with a
//! stream reset (PROTOCOL_ERROR); ontop's patched h2 (vendor/h2) serves
//! them. The client here is Python's grpcio from PyPI, in a venv kept in
//! cargo's scratch dir.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Daemon;

/// grpcio since 1.57 sends the %-encoded socket path as `:authority`.
const GRPCIO: &str = "grpcio==1.85.1";

/// A venv with grpcio; fails the test saying why when it cannot be made.
fn grpcio_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpcio-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(GRPCIO);
    if ready.exists() {
        return python;
    }
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed (this test needs python3 with venv, and PyPI to install {GRPCIO}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    );
    run(
        Command::new(venv.join("bin/pip")).args(["install", "-q", GRPCIO]),
        "pip install",
    );
    std::fs::write(ready, "").unwrap();
    python
}

#[tokio::test]
async fn a_grpcio_client_that_sends_the_socket_path_as_authority_gets_answers() {
    let d = Daemon::start().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/grpcio_snapshots.py");
    let out = Command::new(grpcio_python())
        .arg(script)
        .arg(&d.socket)
        .arg("from python/with space")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n--- ontop log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert_eq!(
        stdout,
        "prepare OK\n\
         stat from python/with space 2\n\
         list 1\n\
         stat-missing NOT_FOUND snapshot \"no-such-key\" does not exist\n",
        "kind 2 is Active"
    );
    // The snapshot is ontop's as any other client's.
    let mut c = d.client().await;
    assert_eq!(c.list(&[]).await.unwrap(), ["from python/with space"]);
}
