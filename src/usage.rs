//! Disk usage of a directory tree, counted the way containerd counts it.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::snapshot::Usage;

/// Bytes and inodes under `root`, the root itself included. Size is
/// allocated 512-byte blocks, as containerd's `fs.DiskUsage` reports, and a
/// hard-linked inode is counted once. Symlinks are not followed.
pub fn disk_usage(root: &Path) -> io::Result<Usage> {
    let started = std::time::Instant::now();
    let mut visited = 0u64;
    let usage = walk(root, &mut visited);
    crate::metrics::usage_walk(visited, started.elapsed());
    usage
}

/// [`disk_usage`] without counting the walk in the usage metrics: for
/// trees about to be deleted.
pub fn unobserved_disk_usage(root: &Path) -> io::Result<Usage> {
    walk(root, &mut 0)
}

fn walk(root: &Path, visited: &mut u64) -> io::Result<Usage> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut usage = Usage::default();
    let mut count = |md: &std::fs::Metadata| {
        *visited += 1;
        // Only a file with other links can be met twice: remembering just
        // those keeps a walk of 100k files out of a 100k-entry set.
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            return;
        }
        usage.inodes += 1;
        usage.size += (md.blocks() * 512) as i64;
    };
    let md = std::fs::symlink_metadata(root)?;
    count(&md);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let md = entry.metadata()?;
            if md.is_dir() {
                dirs.push(entry.path());
            }
            count(&md);
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_count_once_and_blocks_not_lengths_are_summed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("fs");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::hard_link(root.join("a"), root.join("b")).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.join("d/l")).unwrap();
        let u = disk_usage(&root).unwrap();
        assert_eq!(u.inodes, 4, "root, a=b, d, d/l");
        let blocks: u64 = ["", "a", "d", "d/l"]
            .iter()
            .map(|p| std::fs::symlink_metadata(root.join(p)).unwrap().blocks())
            .sum();
        assert_eq!(u.size, (blocks * 512) as i64);
        assert!(u.size >= 10_000);
    }
}
