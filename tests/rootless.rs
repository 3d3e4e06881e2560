//! Rootless: `ontop serve` run by an unprivileged user inside a user and
//! mount namespace (`unshare --user --map-root-user --mount`), as rootless
//! containerd runs its snapshotters. The snapshots are mounted inside that
//! namespace too, where a rootless containerd would mount them, by entering
//! it with nsenter: every file operation below is the namespace's.

#[macro_use]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use common::{Backend, Daemon};
use ontop::containerd_api::types::Mount;

const USER: &str = "ontop-rootless";

/// The test user's uid and gid, creating the user on first use.
fn test_user() -> (u32, u32) {
    static CREATING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap();
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id("-u").is_none() {
        let out = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args([
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()
            .expect("running useradd (Debian package passwd)");
        assert!(
            out.status.success(),
            "useradd {USER}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// Runs `script` with sh inside the daemon's namespaces, as the
/// namespace's root (the unprivileged user outside), and returns stdout.
fn in_namespace(d: &Daemon, script: &str) -> String {
    let out = Command::new("nsenter")
        .args(["-t", &d.pid().to_string(), "--user", "--mount", "--"])
        .args(["sh", "-c", script])
        .output()
        .expect("running nsenter");
    assert!(
        out.status.success(),
        "in the namespace: {script}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Mounts as containerd would, from inside the namespace: a bind, a
/// kernel overlay, or the fuse helper.
fn mount_in_namespace(d: &Daemon, m: &Mount, target: &Path) {
    let t = target.display();
    let opts = m.options.join(",");
    let script = match m.r#type.as_str() {
        "bind" => format!("mount --bind -o {opts} {} {t}", m.source),
        "overlay" => format!("mount -t overlay overlay -o {opts} {t}"),
        "fuse3.fuse-overlayfs" => {
            format!("mount.fuse3 overlay {t} -o {opts} -t fuse-overlayfs")
        }
        other => panic!("unexpected mount type {other}"),
    };
    in_namespace(d, &script);
}

/// Held by each test for its whole run: the tests change /dev/fuse's mode,
/// and one must not put it back while another's mounts still open it.
static DEV_FUSE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Gives everyone read-write access to /dev/fuse while it lives, as a
/// rootless set-up does for its user, and puts the old mode back.
struct DevFuseOpen(u32);

impl DevFuseOpen {
    fn new() -> DevFuseOpen {
        let mode = std::fs::metadata("/dev/fuse")
            .expect("/dev/fuse exists (modprobe fuse)")
            .permissions()
            .mode();
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o20666)).unwrap();
        DevFuseOpen(mode)
    }
}

impl Drop for DevFuseOpen {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0));
    }
}

async fn an_unprivileged_user_prepares_commits_mounts_and_removes() {
    let _dev_fuse = DEV_FUSE.lock().await;
    let (uid, gid) = test_user();
    let _fuse = (common::backend() == Backend::FuseOverlayfs).then(|| {
        // As this machine ships it (0600), the user cannot open
        // /dev/fuse, and the daemon says so before it serves anything.
        let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
        if mode & 0o006 != 0o006 {
            let mut refused = Daemon::rootless(uid, gid);
            let log = refused.start_expecting_failure();
            assert!(log.contains("cannot open /dev/fuse"), "{log}");
        }
        DevFuseOpen::new()
    });
    let d = Daemon::start_rootless(uid, gid).await;

    // The per-user defaults, owned by the user.
    use std::os::unix::fs::MetadataExt;
    for p in [&d.socket, &d.root.join("metadata.db")] {
        let md = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!((md.uid(), md.gid()), (uid, gid), "{}", p.display());
    }

    let mut c = d.client().await;
    let mnt = |name: &str| d.dir.path().join("mnt").join(name);

    // A first layer: a bind of its own tree.
    let target = mnt("one");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(uid), Some(gid)).unwrap();
    let mounts = c.prepare("one-active", "").await.unwrap();
    mount_in_namespace(&d, &mounts[0], &target);
    in_namespace(
        &d,
        &format!(
            "(cd {} && echo one > keep && echo doomed > gone && mkdir dir) && umount {0}",
            target.display()
        ),
    );
    c.commit("one", "one-active").await.unwrap();

    // A second layer over it: a real layered mount in the namespace.
    let mounts = c.prepare("two-active", "one").await.unwrap();
    assert_eq!(mounts[0].r#type, common::layered());
    let userxattr = mounts[0].options.iter().any(|o| o == "userxattr");
    assert_eq!(
        userxattr,
        common::backend() == Backend::Overlayfs,
        "userxattr is detected in a user namespace, for the kernel only: {mounts:?}"
    );
    mount_in_namespace(&d, &mounts[0], &target);
    let seen = in_namespace(
        &d,
        &format!(
            "(cd {} && cat keep && rm gone && echo two > new && mv keep kept) && umount {0}",
            target.display()
        ),
    );
    assert_eq!(seen, "one\n");
    // No fanotify in a user namespace: every Usage walks, as exactly.
    assert!(d.log().contains("usage: no fanotify here"), "{}", d.log());
    let upper = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap();
    let walked = ontop::usage::disk_usage(std::path::Path::new(upper)).unwrap();
    assert_eq!(
        c.usage("two-active").await.unwrap(),
        (walked.size, walked.inodes)
    );
    c.commit("two", "two-active").await.unwrap();

    // A read-only view of both.
    let mounts = c.view("look", "two").await.unwrap();
    mount_in_namespace(&d, &mounts[0], &target);
    let seen = in_namespace(
        &d,
        &format!(
            "(cd {} && ls && cat kept new && if touch x 2>/dev/null; then echo writable; fi) && umount {0}",
            target.display()
        ),
    );
    assert_eq!(seen, "dir\nkept\nnew\none\ntwo\n");

    for key in ["look", "two", "one"] {
        c.remove(key).await.unwrap();
    }
    c.cleanup().await.unwrap();
    assert!(d.snapshot_dirs().is_empty(), "{:?}", d.snapshot_dirs());
}

/// A host base, pinned by a daemon that holds no privilege outside its
/// namespace: the read-only bind must keep the flags the namespace locks.
async fn an_unprivileged_user_works_on_top_of_its_own_host_directory() {
    let _dev_fuse = DEV_FUSE.lock().await;
    let (uid, gid) = test_user();
    let _fuse = (common::backend() == Backend::FuseOverlayfs).then(DevFuseOpen::new);
    let mut d = Daemon::rootless(uid, gid);
    let hosts = d.dir.path().join("hosts");
    // On a mount with nosuid, nodev and noexec, which the user namespace
    // locks: a read-only remount of the pin that dropped one is refused.
    std::fs::create_dir(&hosts).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &hosts,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0755"),
    )
    .unwrap();
    let tree = hosts.join("tree");
    std::fs::create_dir_all(tree.join("dir")).unwrap();
    std::fs::write(tree.join("dir/host.txt"), "host\n").unwrap();
    for p in [&hosts, &tree, &tree.join("dir"), &tree.join("dir/host.txt")] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    }
    let config = d.dir.path().join("home/.config/ontop");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("config.toml"),
        format!("base_roots = [{:?}]\n", hosts.display().to_string()),
    )
    .unwrap();
    let before = common::tree_state(&tree);

    // Root's directory: its owner has no number inside the namespace.
    let roots = hosts.join("roots");
    std::fs::create_dir(&roots).unwrap();
    std::fs::write(roots.join("r.txt"), "root's\n").unwrap();
    d.spawn().await;

    let mut c = d.client().await;
    let target = d.dir.path().join("mnt/on-base");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(uid), Some(gid)).unwrap();
    let base = common::labels(&[(ontop::base::BASE_LABEL, tree.to_str().unwrap())]);
    let mounts = c.prepare_with("on-base", "", base).await.unwrap();
    mount_in_namespace(&d, &mounts[0], &target);
    let seen = in_namespace(
        &d,
        &format!(
            "(cd {} && cat dir/host.txt && echo mine > dir/host.txt && echo new > new) && umount {0}",
            target.display()
        ),
    );
    assert_eq!(seen, "host\n");

    let base = common::labels(&[(ontop::base::BASE_LABEL, roots.to_str().unwrap())]);
    let mounts = c.prepare_with("on-roots", "", base).await.unwrap();
    mount_in_namespace(&d, &mounts[0], &target);
    let seen = in_namespace(&d, &format!("cat {}/r.txt && umount {0}", target.display()));
    assert_eq!(seen, "root's\n");
    c.remove("on-roots").await.unwrap();
    c.remove("on-base").await.unwrap();
    assert!(d.snapshot_dirs().is_empty(), "{:?}", d.snapshot_dirs());
    assert_eq!(
        common::tree_state(&tree),
        before,
        "the host tree is untouched"
    );
}

on_every_backend!(
    an_unprivileged_user_prepares_commits_mounts_and_removes,
    an_unprivileged_user_works_on_top_of_its_own_host_directory,
);
