//! Small file helpers for cgroup interface files, with errors naming the file.

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::CgroupError;

pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    // create(true) only matters for the plain directories used by unit tests;
    // cgroupfs refuses to create files, so a missing interface file still
    // fails there (callers check optional files with `exists()` first).
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file holding one integer; "max" and unreadable files give None.
pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Value of `key` in a flat-keyed file like memory.events ("oom_kill 3").
pub(crate) fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

pub(crate) fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Calls `done` with growing pauses (1ms .. 50ms) until it returns true or
/// `timeout` passes; returns the last result.
pub(crate) fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn is_cgroupfs(path: &Path) -> bool {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
    statfs(path)
        .map(|s| {
            s.filesystem_type() == CGROUP_SUPER_MAGIC || s.filesystem_type() == CGROUP2_SUPER_MAGIC
        })
        .unwrap_or(false)
}

/// rmdir of a cgroup and its sub-cgroups, leaf first. A cgroup that is still
/// busy (its last processes are exiting) is retried for a short while.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Remove {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let cgroupfs = is_cgroupfs(dir);
    for entry in entries.flatten() {
        let p = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => remove_tree(&p)?,
            // Interface files vanish with the directory on cgroupfs; plain
            // directories (unit tests) need them removed first.
            Ok(_) if !cgroupfs => {
                let _ = std::fs::remove_file(&p);
            }
            _ => {}
        }
    }
    let mut last: Option<io::Error> = None;
    let ok = poll_until(Duration::from_secs(5), || match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            last = Some(e);
            false
        }
        Err(e) => {
            last = Some(e);
            true
        }
    });
    match last {
        Some(source) if !ok || dir.exists() => Err(CgroupError::Remove {
            path: dir.to_path_buf(),
            source,
        }),
        _ => Ok(()),
    }
}
