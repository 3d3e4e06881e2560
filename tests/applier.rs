//! ontop's layer applier under a real containerd: every test image
//! unpacked through it gives, file for file, the root filesystem that
//! containerd's own applier gives on its own overlayfs snapshotter; on
//! containerd 1.6, which takes no diff plugin, containerd's applier does
//! the work and nothing changes.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::containerd::{
    deep_image_archive, image_archive, many_image_archive, pause_image_archive, Containerd,
};
use common::Daemon;
use sha2::{Digest, Sha256};

/// Every file of the tree at `root`: path, type, mode, owner, times, link
/// target, device, xattrs (but overlay's own) and content hash.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let t = md.file_type();
            let mut line = format!(
                "{:o} {}:{} mtime={}.{:09}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.mtime(),
                md.mtime_nsec()
            );
            if t.is_symlink() {
                line += &format!(" -> {}", std::fs::read_link(&path).unwrap().display());
            } else if t.is_file() {
                let hash = Sha256::digest(std::fs::read(&path).unwrap());
                line += &format!(" nlink={} sha256={hash:x?}", md.nlink());
            } else if t.is_char_device() || t.is_block_device() {
                line += &format!(" rdev={:x}", md.rdev());
            }
            for (k, v) in xattrs(&path) {
                line += &format!(" {k}={v}");
            }
            if t.is_dir() {
                stack.push(path.clone());
            }
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, line);
        }
    }
    out
}

fn xattrs(path: &Path) -> Vec<(String, String)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let name_s = String::from_utf8_lossy(name).into_owned();
        if name_s.starts_with("trusted.overlay.") || name_s.starts_with("user.fuseoverlayfs.") {
            continue;
        }
        let name_c = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name_c.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        let value = if len < 0 {
            Vec::new()
        } else {
            value[..len as usize].to_vec()
        };
        out.push((name_s, format!("{value:x?}")));
    }
    out.sort();
    out
}

/// Imports `tar` with `snapshotter` in namespace `ns`, mounts a view of
/// the image's top layer at `target` the way `ctr snapshots mounts`
/// prints it, and returns its manifest.
fn unpacked(
    ctd: &Containerd,
    ns: &str,
    snapshotter: &str,
    tar: &Path,
    target: &Path,
) -> BTreeMap<String, String> {
    let ns = ctd.namespace(ns);
    let tar = tar.display().to_string();
    ctd.ctr_ok_in(
        &ns,
        &["images", "import", "--snapshotter", snapshotter, &tar],
    );
    let top = ctd.top_layer(&ns, snapshotter);
    // The view's mount is printed as it is made: the garbage collector
    // may remove a view that nothing references before a second call
    // could ask for it, but not the layers the mount names.
    let cmd = ctd.ctr_ok_in(
        &ns,
        &[
            "snapshots",
            "--snapshotter",
            snapshotter,
            "view",
            "--target",
            target.to_str().unwrap(),
            "check",
            &top,
        ],
    );
    common::containerd::run_printed_mount(&cmd);
    let tree = manifest(target);
    common::unmount(target);
    tree
}

fn assert_same(what: &str, ours: &BTreeMap<String, String>, theirs: &BTreeMap<String, String>) {
    let mut differences = Vec::new();
    for (path, line) in theirs {
        match ours.get(path) {
            Some(l) if l == line => {}
            Some(l) => {
                differences.push(format!("  {path}: ontop {l}\n  {path}: containerd {line}"))
            }
            None => differences.push(format!("  {path}: only containerd's ({line})")),
        }
    }
    for (path, line) in ours {
        if !theirs.contains_key(path) {
            differences.push(format!("  {path}: only ontop's ({line})"));
        }
    }
    assert!(
        differences.is_empty(),
        "{what}: ontop's tree differs from the reference in {} paths:\n{}",
        differences.len(),
        differences
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

async fn every_test_image_unpacks_to_the_rootfs_containerds_own_applier_gives() {
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    let release = common::containerd::release();
    let images: [(&str, &Path, usize); 4] = [
        ("e2e", image_archive(), 3),
        ("deep", deep_image_archive(), 7),
        ("many", many_image_archive(), 7),
        ("pause", pause_image_archive(), 1),
    ];
    let target = d.mountpoint("check");
    let mut layers = 0;
    for (name, tar, n) in images {
        let ours = unpacked(&ctd, &format!("{name}-ontop"), "ontop", tar, &target);
        let theirs = unpacked(&ctd, &format!("{name}-ovl"), "overlayfs", tar, &target);
        assert_same(name, &ours, &theirs);
        layers += n;
    }
    if release == common::containerd::Release::V1_7 {
        // 1.7's transfer service (`--local=false`; ctr's default is the
        // client-side unpack) picks its differ from unpack_config, where
        // the fragment names one for each snapshotter: overlayfs keeps
        // containerd's, ontop gets ontop's.
        let tar = image_archive().display().to_string();
        for snapshotter in ["overlayfs", "ontop"] {
            ctd.ctr_ok_in(
                &ctd.namespace(&format!("transfer-{snapshotter}")),
                &[
                    "images",
                    "import",
                    "--local=false",
                    "--snapshotter",
                    snapshotter,
                    &tar,
                ],
            );
        }
        layers += 3;
    }
    let applied = d
        .log()
        .lines()
        .filter(|l| l.contains("method=\"Apply\"") && l.contains("code=\"OK\""))
        .count();
    let expected = if release.at_least(1, 7) { layers } else { 0 };
    assert_eq!(
        applied,
        expected,
        "containerd {release:?} applies {expected} layers through ontop's applier:\n{}",
        common::containerd::tail(&d.log(), 20)
    );
}

on_every_containerd!(
    every_test_image_unpacks_to_the_rootfs_containerds_own_applier_gives,
    a_layer_built_from_a_snapshot_unpacks_again_to_the_same_tree,
);

// The Diff API on ontop's own socket, with no containerd: layers built
// here, blobs placed where containerd's content store keeps them.

use ontop::containerd_api::diff::v1::diff_client::DiffClient;
use ontop::containerd_api::diff::v1::{ApplyRequest, DiffRequest};
use ontop::containerd_api::types::{Descriptor, Mount};
use tonic::Code;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A layer made by Python's `tarfile` (PAX format) from `entries`, which
/// call `f(name, data, **attrs)` for files and `l(name, type, target)`
/// for links: what hostile tools could write, too.
fn layer(entries: &str) -> Vec<u8> {
    let script = format!(
        "import tarfile, io, sys\n\
         buf = io.BytesIO()\n\
         t = tarfile.open(fileobj=buf, mode='w', format=tarfile.PAX_FORMAT)\n\
         def f(name, data=b'', **kw):\n    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 1600000000\n    \
         [setattr(ti, k, v) for k, v in kw.items()]\n    t.addfile(ti, io.BytesIO(data))\n\
         def l(name, kind, target):\n    ti = tarfile.TarInfo(name); ti.type = kind; ti.linkname = target; t.addfile(ti)\n\
         {entries}\n\
         t.close(); sys.stdout.buffer.write(buf.getvalue())\n"
    );
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 (Debian's python3) builds the test layers");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Puts `blob` into the content store the daemon reads (see
/// `Daemon::prepared`); its descriptor.
fn store(d: &Daemon, media_type: &str, blob: &[u8]) -> Descriptor {
    let digest = digest(blob);
    let dir = d.dir.path().join("content/blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(digest.trim_start_matches("sha256:")), blob).unwrap();
    Descriptor {
        media_type: media_type.into(),
        digest,
        size: blob.len() as i64,
        annotations: Default::default(),
    }
}

async fn apply(
    d: &Daemon,
    diff: &Descriptor,
    mounts: Vec<Mount>,
) -> Result<Descriptor, tonic::Status> {
    let mut client = DiffClient::new(ontop_tools::client::connect(&d.socket).await.unwrap());
    let req = ApplyRequest {
        diff: Some(diff.clone()),
        mounts,
        payloads: Default::default(),
        sync_fs: true,
    };
    client
        .apply(req)
        .await
        .map(|r| r.into_inner().applied.unwrap())
}

/// The upper dir an active snapshot's mounts name.
fn upper(mounts: &[Mount]) -> std::path::PathBuf {
    let m = &mounts[0];
    match m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
        Some(u) => u.into(),
        None => m.source.clone().into(),
    }
}

#[tokio::test]
async fn apply_writes_the_layer_into_the_snapshot_and_answers_its_uncompressed_digest() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let tar = layer(
        "f('etc/hello', b'hi', mode=0o640, uid=5, gid=6)\nl('etc/link', tarfile.SYMTYPE, 'hello')",
    );
    let blob = store(&d, TAR_GZIP, &gzip(&tar));
    // The first layer: a plain tree (a bind mount), whiteouts removed.
    let mounts = c.prepare("l1", "").await.unwrap();
    let applied = apply(&d, &blob, mounts.clone()).await.unwrap();
    assert_eq!(
        applied.digest,
        digest(&tar),
        "the diff ID: the uncompressed layer's digest"
    );
    assert_eq!(
        (applied.size, applied.media_type.as_str()),
        (tar.len() as i64, TAR)
    );
    let up = upper(&mounts);
    let md = std::fs::metadata(up.join("etc/hello")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o640, 5, 6));
    c.commit("l1-c", "l1").await.unwrap();

    // The second: an overlay upper, where a whiteout is overlay's device.
    let tar = layer("f('etc/.wh.hello')");
    let blob = store(&d, TAR, &tar);
    let mounts = c.prepare("l2", "l1-c").await.unwrap();
    apply(&d, &blob, mounts.clone()).await.unwrap();
    let wh = std::fs::symlink_metadata(upper(&mounts).join("etc/hello")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    // The implied parent took the lower's mode.
    assert_eq!(
        std::fs::metadata(upper(&mounts).join("etc"))
            .unwrap()
            .mode()
            & 0o7777,
        std::fs::metadata(up.join("etc")).unwrap().mode() & 0o7777
    );
    d.assert_consistent();
}

#[tokio::test]
async fn hostile_and_broken_layers_write_nothing_outside_and_leave_the_snapshot_empty() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let outside = d.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"s").unwrap();
    let outside_s = outside.display().to_string();

    // Escapes that containerd, too, keeps inside: they land under the
    // snapshot, scoped.
    let tar = layer(&format!(
        "f('../../../../escape', b'1')\nl('abs', tarfile.SYMTYPE, '{outside_s}')\nf('abs/through', b'2')"
    ));
    let mounts = c.prepare("scoped", "").await.unwrap();
    apply(&d, &store(&d, TAR, &tar), mounts.clone())
        .await
        .unwrap();
    let up = upper(&mounts);
    assert_eq!(std::fs::read(up.join("escape")).unwrap(), b"1");
    let scoped = up.join(outside_s.trim_start_matches('/')).join("through");
    assert_eq!(std::fs::read(scoped).unwrap(), b"2");
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"], "nothing was written outside");

    // Refused: a hard link out, a corrupt stream, a truncated one, a
    // whiteout naming its parent. The snapshot is left as Prepare made it.
    let good = layer("f('a/b', b'x' * 100000)");
    let gz = gzip(&good);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "hard link out",
            TAR,
            layer("f('ok', b'1')\nl('pw', tarfile.LNKTYPE, '../../outside/secret')"),
        ),
        ("truncated gzip", TAR_GZIP, gz[..gz.len() / 2].to_vec()),
        ("truncated tar", TAR, good[..good.len() / 2].to_vec()),
        ("not a tar", TAR, vec![b'x'; 4096]),
        ("bad whiteout", TAR, layer("f('ok', b'1')\nf('d/.wh..')")),
    ];
    for (i, (what, media, blob)) in cases.into_iter().enumerate() {
        let key = format!("broken-{i}");
        let mounts = c.prepare(&key, "").await.unwrap();
        let err = apply(&d, &store(&d, media, &blob), mounts.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::NotFound),
            "{what}: {err:?}"
        );
        let left: Vec<_> = std::fs::read_dir(upper(&mounts)).unwrap().collect();
        assert!(left.is_empty(), "{what}: the snapshot kept {left:?}");
    }
    assert_eq!(
        std::fs::metadata(outside.join("secret")).unwrap().nlink(),
        1
    );

    // Blobs that are not there, or digests that could be paths.
    let mounts = c.prepare("missing", "").await.unwrap();
    let mut missing = store(&d, TAR, &good);
    missing.digest = digest(b"not stored");
    assert_eq!(
        apply(&d, &missing, mounts.clone())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    missing.digest = "sha256:../../../etc/passwd".into();
    assert_eq!(
        apply(&d, &missing, mounts).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    d.assert_consistent();
}

#[tokio::test]
async fn what_is_not_ontops_own_is_unimplemented_so_containerd_passes_it_on() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let blob = store(&d, TAR, &layer("f('x', b'1')"));
    let unimplemented = |r: Result<Descriptor, tonic::Status>, what: &str| {
        let err = r.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{what}: {err:?}");
    };
    // Another snapshotter's directory.
    let elsewhere = d.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let bind = Mount {
        r#type: "bind".into(),
        source: elsewhere.display().to_string(),
        target: String::new(),
        options: vec!["rbind".into(), "rw".into()],
    };
    unimplemented(apply(&d, &blob, vec![bind]).await, "a foreign bind");
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    // A media type ontop does not decode, such as an encrypted layer.
    let mounts = c.prepare("a", "").await.unwrap();
    let mut encrypted = blob.clone();
    encrypted.media_type = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted".into();
    unimplemented(
        apply(&d, &encrypted, mounts.clone()).await,
        "an encrypted layer",
    );
    // Comparing snapshots is containerd's own differ's.
    let mut client = DiffClient::new(ontop_tools::client::connect(&d.socket).await.unwrap());
    let err = client.diff(DiffRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // A committed snapshot is never written: refused, not passed on.
    c.commit("a-c", "a").await.unwrap();
    let err = apply(&d, &blob, mounts).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

/// A build as BuildKit and `nerdctl commit` do it, through containerd's
/// own APIs: a snapshot over the image changed, compared with the image
/// into a new layer (Diff: containerd's differ, ontop's answers
/// Unimplemented), and that layer applied again on the image (Apply:
/// ontop's applier on 1.7 and later). The result is the changed tree.
async fn a_layer_built_from_a_snapshot_unpacks_again_to_the_same_tree() {
    use ontop_tools::client::{Namespace, Snapshots};
    let d = Daemon::start().await;
    let ctd = Containerd::start(&d).await;
    ctd.import_image();
    let top = ctd.top_layer(&ctd.ns, "ontop");
    let channel = || async { ontop_tools::client::connect(&ctd.socket).await.unwrap() };
    let ns = || Namespace::new(&ctd.ns).unwrap();
    let mut sn = Snapshots::new(channel().await, "ontop", ns());
    // containerd's garbage collector would take what no image holds.
    let root = || common::labels(&[("containerd.io/gc.root", "2026-12-07T00:00:00Z")]);

    let built = sn.prepare("build", &top, root()).await.unwrap();
    let target = d.mountpoint("build");
    common::mount_all(&built, &target);
    std::fs::write(target.join("added.txt"), "built\n").unwrap();
    std::fs::write(target.join("data/keep.txt"), "changed\n").unwrap();
    std::fs::remove_file(target.join("bin/ls")).unwrap();
    std::fs::remove_dir_all(target.join("olddir")).unwrap();
    std::fs::create_dir(target.join("olddir")).unwrap();
    std::fs::write(target.join("olddir/fresh"), "fresh\n").unwrap();
    std::os::unix::fs::chown(target.join("added.txt"), Some(1234), Some(99)).unwrap();
    let expected = manifest(&target);
    common::unmount(&target);

    let base = sn.view("base", &top, root()).await.unwrap();
    let mut differ = DiffClient::with_interceptor(channel().await, ns());
    let layer = differ
        .diff(DiffRequest {
            left: base,
            right: built,
            media_type: TAR_GZIP.into(),
            r#ref: "ontop-build".into(),
            labels: root(),
            source_date_epoch: None,
        })
        .await
        .unwrap()
        .into_inner()
        .diff
        .unwrap();

    let applied_before = d.log().matches("method=\"Apply\"").count();
    let again = sn.prepare("again", &top, root()).await.unwrap();
    differ
        .apply(ApplyRequest {
            diff: Some(layer),
            mounts: again,
            payloads: Default::default(),
            sync_fs: false,
        })
        .await
        .unwrap();
    sn.commit("again-c", "again", root()).await.unwrap();
    let view = sn.view("again-view", "again-c", root()).await.unwrap();
    let target = d.mountpoint("again");
    common::mount_all(&view, &target);
    let rebuilt = manifest(&target);
    common::unmount(&target);
    // A layer records whole seconds (containerd's tar writer drops the
    // rest), so the changed files come back without their nanoseconds.
    let seconds = |m: BTreeMap<String, String>| -> BTreeMap<String, String> {
        let re = regex::Regex::new(r"mtime=(\d+)\.\d+").unwrap();
        m.into_iter()
            .map(|(k, v)| (k, re.replace(&v, "mtime=$1").into_owned()))
            .collect()
    };
    assert_same(
        "the layer built and applied again",
        &seconds(rebuilt),
        &seconds(expected),
    );
    let applied = d.log().matches("method=\"Apply\"").count() - applied_before;
    let release = common::containerd::release();
    assert_eq!(applied, usize::from(release.at_least(1, 7)), "{release:?}");
}

/// A user-namespaced container's snapshot (containerd's
/// `WithRemapperLabels`), written as containerd's applier writes it on
/// each backend. On the kernel the overlay's `uidmap=`/`gidmap=` map only
/// the lower dirs for containerd, whose applier writes the upper dir with
/// the layer's own ids: so does ontop's. fuse-overlayfs maps on the fly,
/// and containerd applies through the mount: so does ontop, in a mount
/// namespace no one else sees, and the mapping decides what is stored
/// (ids outside it become the overflow id, 65534). A mapped snapshot with
/// no parent is, on the kernel, a bind that containerd would idmap-mount:
/// that is left to containerd's applier.
async fn an_id_mapped_snapshot_gets_the_layer_as_containerds_applier_writes_it() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let base = layer("f('keep', b'k')\nf('gone', b'g')");
    let mounts = c.prepare("l1", "").await.unwrap();
    apply(&d, &store(&d, TAR, &base), mounts).await.unwrap();
    c.commit("l1-c", "l1").await.unwrap();
    let mapping: std::collections::HashMap<String, String> = [
        ("containerd.io/snapshot/uidmapping", "0:100000:65536"),
        ("containerd.io/snapshot/gidmapping", "0:200000:65536"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let tar = layer(
        "f('root-file', b'r')\nf('mapped-file', b'm', uid=101000, gid=201000)\nf('.wh.gone')",
    );
    let blob = store(&d, TAR, &tar);
    let owner = |p: std::path::PathBuf| {
        let md = std::fs::symlink_metadata(p).unwrap();
        (md.uid(), md.gid())
    };
    let fuse = common::backend() == common::Backend::FuseOverlayfs;

    let mounts = c.prepare_with("m", "l1-c", mapping.clone()).await.unwrap();
    let applied = apply(&d, &blob, mounts.clone()).await.unwrap();
    assert_eq!(applied.digest, digest(&tar));
    let up = upper(&mounts);
    if fuse {
        assert_eq!(owner(up.join("mapped-file")), (1000, 1000));
        assert_eq!(owner(up.join("root-file")), (65534, 65534));
    } else {
        assert_eq!(owner(up.join("mapped-file")), (101000, 201000));
        assert_eq!(owner(up.join("root-file")), (0, 0));
    }
    assert_eq!(std::fs::read(up.join("root-file")).unwrap(), b"r");
    let wh = std::fs::symlink_metadata(up.join("gone")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "the lower's file is whited out in overlay's form"
    );
    assert!(!up.join(".wh.gone").exists());

    let fresh = c.prepare_with("fresh", "", mapping).await.unwrap();
    let result = apply(&d, &blob, fresh.clone()).await;
    if fuse {
        result.unwrap();
        assert_eq!(owner(upper(&fresh).join("mapped-file")), (1000, 1000));
    } else {
        assert_eq!(result.unwrap_err().code(), Code::Unimplemented);
        let left: Vec<_> = std::fs::read_dir(upper(&fresh)).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
    // Nothing was mounted where anyone else can see it.
    let point = d.root.join("mnt");
    assert!(std::fs::read_dir(&point).unwrap().next().is_none());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&point.display().to_string()),
        "{mountinfo}"
    );
    d.assert_consistent();
}

on_every_backend!(an_id_mapped_snapshot_gets_the_layer_as_containerds_applier_writes_it);
