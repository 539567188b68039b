//! Cgroups behind one interface for both hierarchies: v1 (one directory per
//! controller, as on this host) and v2 (unified, as inside the microVM guest).
//!
//! Every entry point has an `*_at` variant taking the filesystem root
//! (normally `/sys/fs/cgroup`) so unit tests run the v1 and v2 logic against a
//! temporary directory.

mod fsutil;
mod v1;
mod v2;

use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

pub use v1::CgroupV1;
pub use v2::CgroupV2;

/// Where cgroup filesystems are mounted on a normal Linux system.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// Resource usage of a cgroup. Values the kernel does not expose are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub memory_usage_bytes: u64,
    pub cpu_usage_ns: u64,
    pub pids: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("no cgroup hierarchy found under {0}")]
    NoHierarchy(PathBuf),
    #[error("create cgroup directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("remove cgroup directory {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cgroup {path}: {what} is not supported by this cgroup hierarchy")]
    Unsupported { path: String, what: String },
    #[error("cgroup {path}: processes {pids:?} still running after SIGKILL")]
    KillTimeout { path: String, pids: Vec<i32> },
}

/// One cgroup, in every controller of the host's hierarchy.
pub trait Cgroup: Send + Sync + std::fmt::Debug {
    /// The cgroup path relative to the hierarchy root, e.g. `/vmrun/pod/ctr`.
    fn path(&self) -> &str;
    /// Moves a process (0 = the calling process) into the cgroup.
    fn add_pid(&self, pid: i32) -> Result<(), CgroupError>;
    fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError>;
    /// How many processes the kernel OOM killer killed in this cgroup.
    fn oom_kill_count(&self) -> u64;
    fn stats(&self) -> CgroupStats;
    fn pids(&self) -> Vec<i32>;
    /// SIGKILLs every process in the cgroup and waits until it is empty.
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// Removes the cgroup directory (and any sub-cgroups, leaf first) in every
    /// controller. Missing directories are not an error.
    fn remove(&self) -> Result<(), CgroupError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// v2 when the root itself is a cgroup2 mount (it has `cgroup.controllers`);
/// v1 for legacy and hybrid layouts (a hybrid host's v2 tree at
/// `unified/` carries no useful controllers, so it is ignored).
pub fn detect_version(root: &Path) -> CgroupVersion {
    if root.join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// Opens (creating directories and parents in every controller as needed)
/// the cgroup at `path` under `/sys/fs/cgroup`, applying `resources` if given.
pub fn open(
    path: &str,
    resources: Option<&LinuxResources>,
) -> Result<Box<dyn Cgroup>, CgroupError> {
    open_at(Path::new(DEFAULT_ROOT), path, resources)
}

/// [`open`] with an explicit filesystem root.
pub fn open_at(
    root: &Path,
    path: &str,
    resources: Option<&LinuxResources>,
) -> Result<Box<dyn Cgroup>, CgroupError> {
    let cg: Box<dyn Cgroup> = match detect_version(root) {
        CgroupVersion::V2 => Box::new(CgroupV2::create(root, path)?),
        CgroupVersion::V1 => Box::new(CgroupV1::create(root, path)?),
    };
    if let Some(r) = resources {
        cg.apply(r)?;
    }
    Ok(cg)
}

/// Opens an existing cgroup (for joining it, e.g. from `exec`) without
/// creating anything; fails if it does not exist.
pub fn open_existing(path: &str) -> Result<Box<dyn Cgroup>, CgroupError> {
    open_existing_at(Path::new(DEFAULT_ROOT), path)
}

/// [`open_existing`] with an explicit filesystem root.
pub fn open_existing_at(root: &Path, path: &str) -> Result<Box<dyn Cgroup>, CgroupError> {
    let rel = normalize(path)?;
    let probe = match detect_version(root) {
        CgroupVersion::V2 => root.join(&rel),
        CgroupVersion::V1 => v1::hierarchies(root)?
            .first()
            .map(|h| h.dir.join(&rel))
            .ok_or_else(|| CgroupError::NoHierarchy(root.to_path_buf()))?,
    };
    if !probe.is_dir() {
        return Err(CgroupError::Read {
            path: probe,
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    open_at(root, path, None)
}

/// Removes the cgroup at `path` (and its sub-cgroups, leaf first) in every
/// controller; used for pod-level parent cgroups. Missing is not an error.
pub fn remove_path(path: &str) -> Result<(), CgroupError> {
    remove_path_at(Path::new(DEFAULT_ROOT), path)
}

/// [`remove_path`] with an explicit filesystem root.
pub fn remove_path_at(root: &Path, path: &str) -> Result<(), CgroupError> {
    let rel = normalize(path)?;
    let dirs = match detect_version(root) {
        CgroupVersion::V2 => vec![root.join(&rel)],
        CgroupVersion::V1 => v1::hierarchies(root)?
            .into_iter()
            .map(|h| h.dir.join(&rel))
            .collect(),
    };
    for d in dirs {
        fsutil::remove_tree(&d)?;
    }
    Ok(())
}

/// Turns "/vmrun/pod/ctr" (or "vmrun/pod/ctr") into a relative path, refusing
/// anything that could leave the hierarchy. Relative paths are taken relative
/// to the hierarchy root too (not to the caller's own cgroup as runc does).
pub(crate) fn normalize(path: &str) -> Result<PathBuf, CgroupError> {
    let bad = |reason| CgroupError::InvalidPath {
        path: path.to_string(),
        reason,
    };
    if path.contains(':') {
        return Err(bad("systemd slice notation is not supported"));
    }
    let mut out = PathBuf::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(bad("\"..\" is not allowed"));
        }
        out.push(part);
    }
    if out.as_os_str().is_empty() {
        return Err(bad("the root cgroup cannot be used"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
