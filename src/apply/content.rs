//! Layer blobs, read straight from containerd's content store on disk:
//! the Diff API names a blob only by its digest, and the store keeps each
//! one, verified at ingest, at `blobs/<algorithm>/<hex>`.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a blob cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BlobError {
    #[error("{0:?} is not a digest containerd's content store keeps")]
    BadDigest(String),
    #[error("blob {digest} is not in containerd's content store at {}", dir.display())]
    Missing { digest: String, dir: PathBuf },
    #[error("blob {digest} holds {found} bytes, its descriptor says {expected}")]
    WrongSize {
        digest: String,
        found: u64,
        expected: u64,
    },
    #[error("opening blob {digest}: {source}")]
    Io { digest: String, source: io::Error },
}

/// The path of `digest`'s blob under the content store `dir`, for a
/// well-formed digest only (nothing else may become a path).
pub(crate) fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, BlobError> {
    let bad = || BlobError::BadDigest(digest.to_string());
    let (algorithm, hex) = digest.split_once(':').ok_or_else(bad)?;
    let len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(bad()),
    };
    if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    Ok(dir.join("blobs").join(algorithm).join(hex))
}

/// Opens `digest`'s blob, checking its size against the descriptor's
/// when that gives one.
pub(crate) fn open(dir: &Path, digest: &str, size: i64) -> Result<File, BlobError> {
    let path = blob_path(dir, digest)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobError::Missing {
                digest: digest.to_string(),
                dir: dir.to_path_buf(),
            },
            _ => BlobError::Io {
                digest: digest.to_string(),
                source: e,
            },
        })?;
    let found = file
        .metadata()
        .map_err(|e| BlobError::Io {
            digest: digest.to_string(),
            source: e,
        })?
        .len();
    if size > 0 && found != size as u64 {
        return Err(BlobError::WrongSize {
            digest: digest.to_string(),
            found,
            expected: size as u64,
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_digests_become_paths() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            blob_path(Path::new("/c"), &ok).unwrap(),
            Path::new("/c/blobs/sha256").join("a".repeat(64))
        );
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("md5:{}", "a".repeat(32)),
            format!("sha256:{}/x", "a".repeat(62)),
            "a".repeat(64),
        ] {
            assert!(
                matches!(
                    blob_path(Path::new("/c"), &bad),
                    Err(BlobError::BadDigest(_))
                ),
                "{bad}"
            );
        }
    }
}
