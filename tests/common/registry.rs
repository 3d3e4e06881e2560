//! A real OCI registry on 127.0.0.1: Debian's `docker-registry`
//! (distribution 2.8), with its storage in the test's directory, and
//! images pushed into it with `skopeo`, so containerd pulls as it does on
//! a node.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    child: Child,
}

impl Registry {
    /// Starts a registry storing under `dir`, on a free port.
    pub fn start(dir: &Path) -> Registry {
        for tool in ["docker-registry", "skopeo"] {
            super::require_program(
                tool,
                "apt-get install docker-registry skopeo (scripts/test.sh installs them)",
            );
        }
        std::fs::create_dir_all(dir).unwrap();
        let host = format!("127.0.0.1:{}", super::free_port());
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {host} in 10s: {}",
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Registry { host, child }
    }

    /// Pushes the OCI archive `tar` as `name` (`repo:tag`); returns the
    /// reference to pull.
    pub fn push(&self, tar: &Path, name: &str) -> String {
        let reference = format!("{}/{name}", self.host);
        super::stdout_of(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
                .arg(format!("oci-archive:{}", tar.display()))
                .arg(format!("docker://{reference}")),
            "skopeo copy",
        );
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
