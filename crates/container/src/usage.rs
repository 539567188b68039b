//! What a container's writable layer holds: the bytes its blocks take and
//! its inodes, as kubelet's `writable_layer` stats count them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Space used under a directory tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirUsage {
    /// Allocated blocks, in bytes (`du`, not apparent sizes).
    pub bytes: u64,
    /// Files, directories and links, the directory itself included.
    pub inodes: u64,
}

/// Walks `dir` without following links and without crossing into other
/// filesystems; entries that vanish midway are skipped. A missing `dir`
/// counts zero.
pub fn dir_usage(dir: &Path) -> DirUsage {
    let mut usage = DirUsage::default();
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return usage;
    };
    let device = top.dev();
    let mut stack = vec![(dir.to_path_buf(), top)];
    while let Some((path, meta)) = stack.pop() {
        usage.bytes += meta.blocks() * 512;
        usage.inodes += 1;
        if !meta.is_dir() || meta.dev() != device {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                stack.push((path, meta));
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_blocks_and_inodes_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(dir_usage(&dir.path().join("missing")), DirUsage::default());
        let empty = dir_usage(dir.path());
        assert_eq!(empty.inodes, 1);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/data"), vec![7u8; 256 * 1024]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).unwrap();
        let used = dir_usage(dir.path());
        assert_eq!(used.inodes, 4, "dir, sub, data, link");
        assert!(used.bytes >= 256 * 1024, "{used:?}");
        assert!(
            used.bytes < 1024 * 1024,
            "the link to /usr was followed: {used:?}"
        );
    }
}
