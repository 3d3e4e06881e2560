//! ontop's layer applier: an image layer (tar, gzip or zstd) written into
//! a directory with containerd's semantics, hashing the uncompressed
//! stream on the way so the answer carries the layer's diff ID.
//!
//! `tar` reads untrusted archives with bounded headers; `tree` writes
//! entries without ever leaving the target; `content` finds a blob in
//! containerd's content store.

pub(crate) mod content;
mod files;
pub(crate) mod tar;
pub(crate) mod tree;

use std::io::{self, BufRead, BufReader, Read};

use sha2::{Digest, Sha256};

pub(crate) use tree::{Target, Whiteouts};

/// How a layer blob is compressed, as its media type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    /// gzip or zstd, told apart by the stream's magic bytes, as
    /// containerd's `DecompressStream` does.
    Detect,
}

/// A media type ontop's applier does not handle (encrypted layers, say):
/// containerd's own applier may.
#[derive(Debug, thiserror::Error)]
#[error("ontop's applier does not handle layers of media type {0:?}")]
pub(crate) struct Unsupported(pub String);

/// The compression a layer media type names. The OCI and Docker layer
/// types (distributable or not) are handled; anything else, such as
/// `+encrypted`, is not.
pub(crate) fn compression(media_type: &str) -> Result<Compression, Unsupported> {
    const PLAIN: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
    ];
    const COMPRESSED: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
    if PLAIN.contains(&media_type) {
        Ok(Compression::None)
    } else if COMPRESSED.contains(&media_type) {
        Ok(Compression::Detect)
    } else {
        Err(Unsupported(media_type.to_string()))
    }
}

/// The uncompressed layer as applied: containerd checks its digest
/// against the image's diff IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Applied {
    pub digest: String,
    pub size: u64,
}

/// Counts and hashes what passes through.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    size: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A corrupt or cut-short compressed stream is a bad layer.
        let n = self.inner.read(buf).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                tar::Malformed(format!("decompressing the layer: {e}")),
            )
        })?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// The uncompressed stream of `blob`.
fn decompressed<'a>(
    blob: impl Read + 'a,
    compression: Compression,
) -> io::Result<Box<dyn Read + 'a>> {
    let mut blob = BufReader::with_capacity(256 * 1024, blob);
    if compression == Compression::None {
        return Ok(Box::new(blob));
    }
    let head = blob.fill_buf()?;
    if head.starts_with(GZIP_MAGIC) {
        // Multi-member, as Go's gzip reader is by default.
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(blob)))
    } else if head.starts_with(ZSTD_MAGIC) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(blob)?))
    } else {
        // containerd passes a stream with neither magic through as is.
        Ok(Box::new(blob))
    }
}

/// Applies the layer `blob` to `target`.
pub(crate) fn apply(
    blob: impl Read,
    compression: Compression,
    target: Target,
) -> io::Result<Applied> {
    let stream = Hashing {
        inner: decompressed(blob, compression)?,
        hash: Sha256::new(),
        size: 0,
    };
    let mut archive = tar::Reader::new(BufReader::with_capacity(256 * 1024, stream));
    let mut writer = tree::Writer::new(target)?;
    while let Some(header) = archive.next_header()? {
        let name = header.name.clone();
        writer
            .entry(&header, &mut |buf| archive.read_content(buf))
            .map_err(|e| tree::at_entry(&name, e))?;
    }
    writer.finish()?;
    // What follows the archive's end counts, as containerd counts it.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())?;
    let stream = rest.into_inner();
    Ok(Applied {
        digest: format!("sha256:{}", hex(&stream.hash.finalize())),
        size: stream.size,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `e` says the layer itself is bad (as opposed to the disk).
pub(crate) fn is_malformed(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::UnexpectedEof
}

#[cfg(test)]
mod tests {
    use super::tar::tests::{Builder, Entry};
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::Path;

    fn target(root: &Path, whiteouts: Whiteouts) -> Target {
        Target {
            root: root.to_path_buf(),
            whiteouts,
            lowers: Vec::new(),
            in_userns: false,
        }
    }

    const OVERLAY: Whiteouts = Whiteouts::Overlay {
        opaque_xattr: "trusted.overlay.opaque",
    };

    fn apply_to(root: &Path, whiteouts: Whiteouts, archive: &[u8]) -> io::Result<Applied> {
        apply(archive, Compression::None, target(root, whiteouts))
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (len >= 0).then(|| buf[..len as usize].to_vec())
    }

    #[test]
    fn files_links_devices_owners_modes_times_and_xattrs_land_as_containerd_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Builder::default()
            .entry(Entry {
                name: "bin/",
                typeflag: b'5',
                mode: 0o755,
                mtime: 1_500_000_000,
                ..Default::default()
            })
            .entry(Entry {
                name: "bin/su",
                mode: 0o4755,
                uid: 0,
                gid: 0,
                data: b"setuid",
                ..Default::default()
            })
            .entry(Entry {
                name: "home/u/notes",
                uid: 1000,
                gid: 1001,
                mode: 0o600,
                data: b"n",
                ..Default::default()
            })
            .entry(Entry {
                name: "bin/sh",
                typeflag: b'2',
                link: "busybox",
                uid: 7,
                ..Default::default()
            })
            // A hard link's header repeats its file's mode, as tar writes it.
            .entry(Entry {
                name: "bin/ln",
                typeflag: b'1',
                link: "bin/su",
                mode: 0o4755,
                ..Default::default()
            })
            .entry(Entry {
                name: "dev/null",
                typeflag: b'3',
                dev: (1, 3),
                mode: 0o666,
                ..Default::default()
            })
            .entry(Entry {
                name: "run/fifo",
                typeflag: b'6',
                mode: 0o600,
                ..Default::default()
            })
            .entry(Entry {
                name: "etc/cap",
                data: b"c",
                pax: vec![("SCHILY.xattr.user.tag".into(), b"v".to_vec())],
                ..Default::default()
            })
            .finish();
        apply_to(dir.path(), OVERLAY, &archive).unwrap();
        let md = |p: &str| std::fs::symlink_metadata(dir.path().join(p)).unwrap();
        assert_eq!(md("bin/su").permissions().mode() & 0o7777, 0o4755);
        assert_eq!(std::fs::read(dir.path().join("bin/su")).unwrap(), b"setuid");
        assert_eq!(
            (md("home/u/notes").uid(), md("home/u/notes").gid()),
            (1000, 1001)
        );
        // Implied parents get 0755.
        assert_eq!(md("home/u").permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(md("bin/sh").uid(), 7);
        assert_eq!(md("bin/ln").ino(), md("bin/su").ino());
        assert!(md("dev/null").file_type().is_char_device());
        assert_eq!(md("dev/null").rdev(), libc::makedev(1, 3));
        assert!(md("run/fifo").file_type().is_fifo());
        assert_eq!(
            xattr(&dir.path().join("etc/cap"), "user.tag"),
            Some(b"v".to_vec())
        );
        // Directory times are set last, after their files were made.
        assert_eq!(md("bin").mtime(), 1_500_000_000);
        assert_eq!(md("bin/su").mtime(), 1_600_000_000);
    }

    #[test]
    fn whiteouts_become_overlay_devices_and_opaque_xattrs_or_removals() {
        let archive = Builder::default()
            .dir("a/")
            .file("a/keep", b"k")
            .file("gone", b"g")
            .file(".wh.gone", b"")
            .file("a/.wh..wh..opq", b"")
            .finish();
        let over = tempfile::tempdir().unwrap();
        apply_to(over.path(), OVERLAY, &archive).unwrap();
        let gone = std::fs::symlink_metadata(over.path().join("gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        assert_eq!(
            xattr(&over.path().join("a"), "trusted.overlay.opaque"),
            Some(b"y".to_vec())
        );
        assert!(!over.path().join(".wh.gone").exists());

        let plain = tempfile::tempdir().unwrap();
        std::fs::create_dir(plain.path().join("a")).unwrap();
        std::fs::write(plain.path().join("a/old"), b"o").unwrap();
        apply_to(plain.path(), Whiteouts::Remove, &archive).unwrap();
        assert!(!plain.path().join("gone").exists());
        assert!(
            !plain.path().join("a/old").exists(),
            "opaque removes what the layer did not write"
        );
        assert!(plain.path().join("a/keep").exists());
    }

    #[test]
    fn a_directory_replaced_by_a_file_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Builder::default()
            .dir("x/")
            .file("x/inner", b"i")
            .file("x", b"now a file")
            .file("y", b"file")
            .dir("y/")
            .file("y/z", b"z")
            .finish();
        apply_to(dir.path(), OVERLAY, &archive).unwrap();
        assert_eq!(std::fs::read(dir.path().join("x")).unwrap(), b"now a file");
        assert_eq!(std::fs::read(dir.path().join("y/z")).unwrap(), b"z");
    }

    #[test]
    fn no_hostile_entry_writes_outside_the_target() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let secret = outer.path().join("secret");
        std::fs::write(&secret, b"s").unwrap();
        let archive = Builder::default()
            .file("../../escape-dots", b"1")
            .file("/abs", b"2")
            .entry(Entry {
                name: "up",
                typeflag: b'2',
                link: "../..",
                ..Default::default()
            })
            .file("up/through-symlink", b"3")
            .entry(Entry {
                name: "abs",
                typeflag: b'2',
                link: outer.path().to_str().unwrap(),
                ..Default::default()
            })
            .file("abs/through-absolute", b"4")
            .finish();
        apply_to(&root, OVERLAY, &archive).unwrap();
        // Everything stayed inside, scoped as containerd scopes it.
        assert_eq!(std::fs::read(root.join("escape-dots")).unwrap(), b"1");
        assert_eq!(std::fs::read(root.join("abs")).unwrap_or_default(), b"");
        assert_eq!(std::fs::read(root.join("through-symlink")).unwrap(), b"3");
        let inside_abs = root
            .join(outer.path().strip_prefix("/").unwrap())
            .join("through-absolute");
        assert_eq!(std::fs::read(inside_abs).unwrap(), b"4");
        let mut names: Vec<_> = std::fs::read_dir(outer.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["root", "secret"],
            "nothing was written beside the target"
        );

        // A hard link's target is resolved inside too: it never links a
        // file outside.
        let archive = Builder::default()
            .entry(Entry {
                name: "pw",
                typeflag: b'1',
                link: "../secret",
                ..Default::default()
            })
            .finish();
        let err = apply_to(&root, OVERLAY, &archive).unwrap_err();
        assert!(err.to_string().contains("\"pw\""), "{err}");
        assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);

        for link in ["/", "..", "missing"] {
            let archive = Builder::default()
                .entry(Entry {
                    name: "l",
                    typeflag: b'1',
                    link,
                    ..Default::default()
                })
                .finish();
            let err = apply_to(&root, OVERLAY, &archive).unwrap_err();
            assert!(is_malformed(&err), "a hard link to {link:?}: {err}");
        }
        for bad in [".wh..", ".wh.", "d/.wh.."] {
            let archive = Builder::default().file(bad, b"").finish();
            let err = apply_to(&root, OVERLAY, &archive).unwrap_err();
            assert!(is_malformed(&err), "{bad}: {err}");
        }
    }

    #[test]
    fn the_answer_is_the_uncompressed_digest_whatever_the_compression() {
        let archive = Builder::default()
            .dir("d/")
            .file("d/f", &[5u8; 100_000])
            .finish();
        let expected = format!("sha256:{}", hex(&Sha256::digest(&archive)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&archive).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(archive.as_slice(), 1).unwrap();
        for (blob, how) in [
            (&archive, Compression::None),
            (&gz, Compression::Detect),
            (&zst, Compression::Detect),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let applied = apply(blob.as_slice(), how, target(dir.path(), OVERLAY)).unwrap();
            assert_eq!(
                applied,
                Applied {
                    digest: expected.clone(),
                    size: archive.len() as u64
                }
            );
            assert_eq!(
                std::fs::read(dir.path().join("d/f")).unwrap().len(),
                100_000
            );
        }
        // A cut-short compressed layer is a bad layer, not a short one.
        let dir = tempfile::tempdir().unwrap();
        let err = apply(
            &gz[..gz.len() / 2],
            Compression::Detect,
            target(dir.path(), OVERLAY),
        )
        .unwrap_err();
        assert!(is_malformed(&err), "{err}");
    }

    #[test]
    fn an_entrys_failure_keeps_the_os_error_so_a_full_disk_is_told_apart() {
        let full = tree::at_entry(b"f", io::Error::from_raw_os_error(libc::ENOSPC));
        let e = anyhow::Error::new(full);
        assert!(e.to_string().contains("\"f\""), "{e}");
        assert!(e.chain().any(|c| c
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            == Some(libc::ENOSPC)));
    }

    #[test]
    fn media_types_name_their_compression_and_others_are_not_ours() {
        assert_eq!(
            compression("application/vnd.oci.image.layer.v1.tar").unwrap(),
            Compression::None
        );
        assert_eq!(
            compression("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Compression::Detect
        );
        assert_eq!(
            compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Detect
        );
        assert!(compression("application/vnd.oci.image.layer.v1.tar+gzip+encrypted").is_err());
    }
}
