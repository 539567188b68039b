//! `CopyFile`: files and directories the host places under the pod's
//! directory in the guest (configMap, secret, downwardAPI, emptyDir).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tonic::Status;
use vmrun_proto::v1::CopyFileRequest;

#[derive(Debug, thiserror::Error)]
pub enum CopyFileError {
    #[error("copy file {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("copy file {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

impl From<CopyFileError> for Status {
    fn from(e: CopyFileError) -> Self {
        match e {
            CopyFileError::InvalidPath { .. } => Status::invalid_argument(e.to_string()),
            CopyFileError::Io { .. } => Status::internal(e.to_string()),
        }
    }
}

/// Resolves `rel` under `base`, refusing anything that could leave it:
/// absolute paths, `..`, and existing symlinks on the way (a container can
/// create those in a volume it shares with the pod directory).
pub(crate) fn resolve(base: &Path, rel: &str) -> Result<PathBuf, CopyFileError> {
    let invalid = |reason| CopyFileError::InvalidPath {
        path: rel.to_string(),
        reason,
    };
    if rel.is_empty() {
        return Err(invalid("empty path"));
    }
    let mut path = base.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(name) => path.push(name),
            Component::CurDir => {}
            _ => return Err(invalid("must be relative without \"..\"")),
        }
        if path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(invalid("a component is a symlink"));
        }
    }
    if path == base {
        return Err(invalid("names the pod directory itself"));
    }
    Ok(path)
}

/// Writes the file (atomically: temp file + rename, so a container never
/// reads half a configMap update) or makes the directory.
pub(crate) fn copy_file(base: &Path, req: &CopyFileRequest) -> Result<PathBuf, CopyFileError> {
    let path = resolve(base, &req.path)?;
    let io = |what| {
        let path = path.clone();
        move |source| CopyFileError::Io { path, what, source }
    };
    let parent = path.parent().unwrap_or(base);
    std::fs::create_dir_all(parent).map_err(io("create parent directories"))?;
    let owner = (req.uid.is_some() || req.gid.is_some()).then_some((req.uid, req.gid));
    if req.directory {
        if !req.data.is_empty() {
            return Err(CopyFileError::InvalidPath {
                path: req.path.clone(),
                reason: "a directory cannot have data",
            });
        }
        let mode = if req.mode == 0 {
            0o755
        } else {
            req.mode & 0o7777
        };
        std::fs::create_dir_all(&path).map_err(io("create directory"))?;
        if let Some(size) = req.tmpfs_size_bytes {
            mount_tmpfs(&path, mode, size).map_err(io("mount a tmpfs on"))?;
        }
        // Explicitly: create_dir_all applies the umask.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io("chmod"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, uid, gid).map_err(io("chown"))?;
        }
        return Ok(path);
    }
    let mode = if req.mode == 0 {
        0o644
    } else {
        req.mode & 0o7777
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.vmrun-tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create temporary file"))?;
    let written = file
        .write_all(&req.data)
        .and_then(|_| file.set_permissions(std::fs::Permissions::from_mode(mode)))
        .map_err(io("write"))
        .and_then(|_| match owner {
            Some((uid, gid)) => std::os::unix::fs::fchown(&file, uid, gid).map_err(io("chown")),
            None => Ok(()),
        })
        .and_then(|_| std::fs::rename(&tmp, &path).map_err(io("rename into place")));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|_| path)
}

/// A size-limited tmpfs on `dir` (once: a directory that already is a
/// mount point keeps its mount). Size 0 is tmpfs' own "no limit".
fn mount_tmpfs(dir: &Path, mode: u32, size: u64) -> std::io::Result<()> {
    if is_mount_point(dir)? {
        return Ok(());
    }
    let data = format!("mode={mode:o},size={size}");
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(std::io::Error::from)
}

/// Whether `dir` is where a filesystem is mounted (its device differs
/// from its parent's).
fn is_mount_point(dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let parent = dir.parent().unwrap_or(dir);
    Ok(std::fs::metadata(dir)?.dev() != std::fs::metadata(parent)?.dev())
}

/// Unmounts every mount at or below `dir`, deepest first (the sandbox's
/// size-limited emptyDirs); returns what could not be unmounted.
pub(crate) fn unmount_below(dir: &Path) -> Vec<String> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec!["cannot read /proc/self/mountinfo".into()];
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
        .into_iter()
        .filter_map(|point| {
            nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH)
                .err()
                .map(|e| format!("unmount {}: {e}", point.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn req(path: &str, data: &[u8], mode: u32) -> CopyFileRequest {
        CopyFileRequest {
            path: path.into(),
            mode,
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn writes_files_with_mode_and_parents() {
        let dir = tempfile::tempdir().unwrap();
        let p = copy_file(dir.path(), &req("volumes/cfg/key", b"v1", 0o600)).unwrap();
        assert_eq!(p, dir.path().join("volumes/cfg/key"));
        assert_eq!(std::fs::read(&p).unwrap(), b"v1");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        // Overwrite in place.
        copy_file(dir.path(), &req("volumes/cfg/key", b"v2", 0)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"v2");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o644);
    }

    #[test]
    fn makes_directories() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = req("volumes/scratch", b"", 0o777);
        r.directory = true;
        let p = copy_file(dir.path(), &r).unwrap();
        assert!(p.is_dir());
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o777);
    }

    #[test]
    fn refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "."] {
            let err = copy_file(dir.path(), &req(bad, b"x", 0)).unwrap_err();
            assert!(
                matches!(err, CopyFileError::InvalidPath { .. }),
                "{bad}: {err}"
            );
        }
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        let err = copy_file(dir.path(), &req("link/evil", b"x", 0)).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    /// Needs root (mounts): a size-limited directory refuses more than its
    /// size, is mounted once, and `unmount_below` takes it and a mount
    /// inside it away.
    #[test]
    fn tmpfs_directories_are_size_limited_and_unmounted_below_the_pod_dir() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "tmpfs_directories_are_size_limited_and_unmounted_below_the_pod_dir needs root"
        );
        let base = tempfile::tempdir().unwrap();
        // Unmounts whatever the test mounted even if an assertion fails.
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                unmount_below(&self.0);
            }
        }
        let _unmount = Unmount(base.path().to_path_buf());
        let mut r = req("volumes/data", b"", 0o777);
        r.directory = true;
        r.tmpfs_size_bytes = Some(64 << 10);
        let dir = copy_file(base.path(), &r).unwrap();
        // Again: still one mount.
        copy_file(base.path(), &r).unwrap();
        assert!(is_mount_point(&dir).unwrap());
        assert!(std::fs::write(dir.join("small"), vec![0u8; 16 << 10]).is_ok());
        let too_big = std::fs::write(dir.join("big"), vec![0u8; 128 << 10]).unwrap_err();
        assert_eq!(too_big.raw_os_error(), Some(libc::ENOSPC), "{too_big}");
        let inner = dir.join("inner");
        std::fs::create_dir(&inner).unwrap();
        mount_tmpfs(&inner, 0o755, 0).unwrap();

        assert_eq!(unmount_below(base.path()), Vec::<String>::new());
        assert!(!is_mount_point(&dir).unwrap());
        assert!(
            !dir.join("small").exists(),
            "the tmpfs content went with it"
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(&*base.path().to_string_lossy()));
    }
}
