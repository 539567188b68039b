//! Host paths a CRI container mounts (the kubelet's /etc/hosts,
//! termination log, service-account token and every volume it resolved on
//! the host), made present in a pod VM.
//!
//! The guest cannot see host directories (there is no shared filesystem),
//! so each is copied in when the container starts, as Kata Containers does
//! without a shared filesystem: files with their modes, directories
//! recursively, symlinks followed (the kubelet's projected volumes point
//! `token` at `..data/token`). It is a snapshot: later host changes do not
//! reach the guest, and what the container writes there stays in the guest.

use std::path::{Path, PathBuf};

/// The most a container's host mounts may copy into its VM together.
pub const MAX_COPY_BYTES: u64 = 64 << 20;
/// Directory entries followed, so a symlink loop ends.
const MAX_ENTRIES: usize = 10_000;

/// One thing to make in the guest, relative to the mount's copy.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HostMountError {
    #[error("host path {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "host path {0}: more than {MAX_COPY_BYTES} bytes to copy into the pod VM (it has no shared filesystem)"
    )]
    TooLarge(PathBuf),
    #[error("host path {0}: more than {MAX_ENTRIES} entries to copy into the pod VM")]
    TooManyEntries(PathBuf),
    #[error(
        "host path {0} is a socket, FIFO or device: the pod VM gets copies of files and directories only"
    )]
    Unsupported(PathBuf),
}

/// What copying `host` into the guest takes, the top first (path "" is
/// the mount itself). `budget` is what the container may still copy.
pub fn entries(host: &Path, budget: &mut u64) -> Result<Vec<Entry>, HostMountError> {
    let mut out = Vec::new();
    walk(host, String::new(), budget, &mut out)?;
    Ok(out)
}

fn walk(
    host: &Path,
    rel: String,
    budget: &mut u64,
    out: &mut Vec<Entry>,
) -> Result<(), HostMountError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| HostMountError::Io {
        path: host.to_path_buf(),
        source,
    };
    if out.len() >= MAX_ENTRIES {
        return Err(HostMountError::TooManyEntries(host.to_path_buf()));
    }
    // Followed: a symlink is copied as what it points at.
    let meta = std::fs::metadata(host).map_err(io)?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        out.push(Entry::Dir {
            path: rel.clone(),
            mode,
        });
        let mut names: Vec<_> = std::fs::read_dir(host)
            .map_err(io)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        names.sort();
        for name in names {
            let name = name.to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            walk(&host.join(&name), child, budget, out)?;
        }
        Ok(())
    } else if meta.is_file() {
        if meta.len() > *budget {
            return Err(HostMountError::TooLarge(host.to_path_buf()));
        }
        let data = std::fs::read(host).map_err(io)?;
        *budget = budget.saturating_sub(data.len() as u64);
        out.push(Entry::File {
            path: rel,
            mode,
            data,
        });
        Ok(())
    } else {
        Err(HostMountError::Unsupported(host.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_is_copied_with_modes_and_symlinks_followed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("token"), "secret").unwrap();
        std::fs::set_permissions(data.join("token"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::symlink("..2026_data", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.path().join("token")).unwrap();
        let mut budget = MAX_COPY_BYTES;
        let got = entries(dir.path(), &mut budget).unwrap();
        let files: Vec<_> = got
            .iter()
            .filter_map(|e| match e {
                Entry::File { path, mode, data } => Some((path.as_str(), *mode, data.as_slice())),
                Entry::Dir { .. } => None,
            })
            .collect();
        assert_eq!(
            files,
            vec![
                ("..2026_data/token", 0o640, &b"secret"[..]),
                ("..data/token", 0o640, &b"secret"[..]),
                ("token", 0o640, &b"secret"[..]),
            ]
        );
        assert!(matches!(&got[0], Entry::Dir { path, .. } if path.is_empty()));
        assert_eq!(budget, MAX_COPY_BYTES - 18);
    }

    #[test]
    fn a_file_is_one_entry_and_the_budget_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 localhost\n").unwrap();
        let mut budget = 10;
        let err = entries(&file, &mut budget).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        let mut budget = 100;
        let got = entries(&file, &mut budget).unwrap();
        assert!(matches!(&got[..], [Entry::File { path, .. }] if path.is_empty()));
    }

    #[test]
    fn loops_and_special_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(".", dir.path().join("self")).unwrap();
        let err = entries(dir.path(), &mut MAX_COPY_BYTES.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                HostMountError::TooManyEntries(_) | HostMountError::Io { .. }
            ),
            "{err}"
        );
        let err = entries(Path::new("/dev/null"), &mut 1).unwrap_err();
        assert!(err.to_string().contains("socket, FIFO or device"), "{err}");
    }
}
