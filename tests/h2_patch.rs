//! The vendored h2 (vendor/h2, see its ONTOP-PATCH.md) is exactly a
//! crates.io release plus `ontop.patch`, its page names that release, and
//! no newer h2 0.4 is out: when one is, this fails and says whether the new
//! release still refuses a malformed `:authority` (update the vendored
//! copy) or no longer does (drop the patch). It asks crates.io through
//! cargo, as the build itself does.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn cargo() -> Command {
    Command::new(option_env!("CARGO").unwrap_or("cargo"))
}

fn vendor() -> PathBuf {
    Path::new(ROOT).join("vendor/h2")
}

/// The value of the first `version = "..."` line after `after` in `text`.
fn version_after<'a>(text: &'a str, after: &str) -> &'a str {
    let from = text.find(after).unwrap_or_else(|| panic!("no {after:?}"));
    let line = text[from..]
        .lines()
        .find(|l| l.starts_with("version = "))
        .expect("a version line");
    line.trim_start_matches("version = ").trim_matches('"')
}

fn vendored_version() -> String {
    let toml = std::fs::read_to_string(vendor().join("Cargo.toml")).unwrap();
    version_after(&toml, "[package]").to_string()
}

/// Has cargo download h2 `version` from crates.io and returns where its
/// published source sits.
fn published(version: &str) -> PathBuf {
    let probe = tempfile::tempdir().unwrap();
    std::fs::create_dir(probe.path().join("src")).unwrap();
    std::fs::write(probe.path().join("src/lib.rs"), "").unwrap();
    std::fs::write(
        probe.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"probe\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             [dependencies]\nh2 = \"={version}\"\n"
        ),
    )
    .unwrap();
    let out = cargo()
        .arg("fetch")
        .arg("--manifest-path")
        .arg(probe.path().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo could not fetch h2 {version} from crates.io:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    std::fs::read_dir(home.join("registry/src"))
        .unwrap()
        .map(|e| e.unwrap().path().join(format!("h2-{version}")))
        .find(|p| p.join("src/server.rs").is_file())
        .unwrap_or_else(|| panic!("h2 {version} is not in cargo's registry after fetching"))
}

/// Copies `from`'s `src/` into a temporary tree and applies ontop.patch.
fn patched_copy(from: &Path) -> (tempfile::TempDir, std::process::Output) {
    let tree = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(from.join("src"))
        .arg(tree.path())
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new("patch")
        .args(["-p1", "--forward", "--no-backup-if-mismatch", "-i"])
        .arg(vendor().join("ontop.patch"))
        .current_dir(tree.path())
        .output()
        .expect("running patch (Debian's patch package)");
    (tree, out)
}

#[test]
fn the_page_the_manifest_and_the_lock_file_name_one_h2() {
    let version = vendored_version();
    let page = std::fs::read_to_string(vendor().join("ONTOP-PATCH.md")).unwrap();
    assert!(
        page.lines()
            .next()
            .unwrap()
            .contains(&format!("h2 {version},")),
        "ONTOP-PATCH.md's title does not name h2 {version}"
    );
    let lock = std::fs::read_to_string(Path::new(ROOT).join("Cargo.lock")).unwrap();
    assert_eq!(
        version_after(&lock, "name = \"h2\""),
        version,
        "Cargo.lock: run `cargo update -p h2`"
    );
}

#[test]
fn the_vendored_h2_is_the_release_plus_ontops_patch() {
    let version = vendored_version();
    let (tree, out) = patched_copy(&published(&version));
    assert!(
        out.status.success(),
        "ontop.patch does not apply to h2 {version}:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let diff = Command::new("diff")
        .arg("-r")
        .arg(tree.path().join("src"))
        .arg(vendor().join("src"))
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "vendor/h2/src is not h2 {version} plus ontop.patch:\n{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

#[test]
fn no_newer_h2_0_4_is_out() {
    let vendored = vendored_version();
    // Outside the workspace, so cargo reports crates.io's h2, not ours.
    let away = tempfile::tempdir().unwrap();
    let out = cargo()
        .args(["info", "h2@0.4"])
        .current_dir(away.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo could not ask crates.io about h2:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = String::from_utf8_lossy(&out.stdout);
    let newest = info
        .lines()
        .find_map(|l| l.strip_prefix("version: "))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no version in `cargo info h2`:\n{info}"))
        .to_string();
    if newest == vendored {
        return;
    }
    let release = published(&newest);
    let server = std::fs::read_to_string(release.join("src/server.rs")).unwrap();
    let (_, applied) = patched_copy(&release);
    let refuses = server.contains("maybe_authority.or_else(");
    panic!(
        "h2 {newest} is out; vendor/h2 is {vendored}. {}",
        match (refuses, applied.status.success()) {
            (true, true) => format!(
                "It still refuses a malformed :authority and ontop.patch applies: \
                 bash vendor/h2/update.sh {newest}"
            ),
            (true, false) => "It still refuses a malformed :authority, but ontop.patch \
                 no longer applies: make the patch anew against it"
                .to_string(),
            (false, _) => "Its authority check changed: see whether it still refuses \
                 grpcio's path (tests/clients.rs against an unpatched build); if not, drop \
                 vendor/h2 and [patch.crates-io]"
                .to_string(),
        }
    );
}
