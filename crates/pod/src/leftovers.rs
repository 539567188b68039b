//! What a pod leaves on the host when whoever ran it died without tearing
//! it down (a SIGKILLed `vmrun-supervisor` or CRI owner): its pod VM's VMM,
//! the processes of its cgroup tree and the tree itself, and the mounts
//! under its directory. Found from the host's own tables (/proc, the cgroup
//! filesystems, the mount table), not from the dead process's memory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmrun_container::cgroups;

/// How long a SIGKILLed VMM may take to be gone.
const VMM_KILL_WAIT: Duration = Duration::from_secs(10);

/// Kills what runs for the pod at `dir` whose cgroup is `cgroup` (the VMM
/// first: it holds the pod's files), removes the cgroup tree (leaves
/// first), then unmounts everything under `dir`, deepest first. Every step
/// is tried; the errors are joined.
pub fn remove(dir: &Path, cgroup: &str) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Err(e) = kill_vmms(dir) {
        errors.push(e);
    }
    let mut paths = cgroup_tree(cgroup);
    paths.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for path in paths {
        match cgroups::open_existing(&path) {
            Ok(cg) => {
                if let Err(e) = cg.kill_all().and_then(|_| cg.remove()) {
                    errors.push(format!("cgroup {path}: {e}"));
                }
            }
            Err(e) => errors.push(format!("cgroup {path}: {e}")),
        }
    }
    for mount in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
            errors.push(format!("unmounting {}: {e}", mount.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// SIGKILLs every VMM of the pod and waits until each is gone. A VMM is
/// known by its fd 3, the VM directory inside the pod's directory
/// (`vm::vmm_process` opens it there for every VMM it starts).
fn kill_vmms(dir: &Path) -> Result<(), String> {
    let Ok(dir) = dir.canonicalize() else {
        return Ok(()); // no directory: nothing can hold it
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let holds_dir = std::fs::read_link(entry.path().join("fd/3"))
            .is_ok_and(|target| target.starts_with(&dir));
        let is_vmm = std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| {
            exe.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmrun-vmm"))
        });
        if holds_dir && is_vmm {
            pids.push(pid);
        }
    }
    let mut errors = Vec::new();
    for pid in pids {
        // Opened first, so the wait cannot miss the exit.
        let Ok(pidfd) = crate::native::pidfd_open(pid) else {
            continue; // gone already
        };
        let target = nix::unistd::Pid::from_raw(pid);
        if let Err(e) = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
            errors.push(format!("killing VMM {pid}: {e}"));
            continue;
        }
        match crate::native::poll_exit(&pidfd, Some(VMM_KILL_WAIT)) {
            Ok(true) => {}
            Ok(false) => errors.push(format!(
                "VMM {pid} still there {VMM_KILL_WAIT:?} after SIGKILL"
            )),
            Err(e) => errors.push(format!("waiting for VMM {pid}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The cgroup at `path` and all below it, as found in any hierarchy.
fn cgroup_tree(path: &str) -> Vec<String> {
    let root = Path::new(cgroups::DEFAULT_ROOT);
    let rel = path.trim_start_matches('/');
    let bases: Vec<PathBuf> = match cgroups::detect_version(root) {
        cgroups::CgroupVersion::V2 => vec![root.to_path_buf()],
        cgroups::CgroupVersion::V1 => ["pids", "memory", "cpu,cpuacct", "freezer", "cpuset"]
            .iter()
            .map(|c| root.join(c))
            .collect(),
    };
    let mut found = std::collections::BTreeSet::new();
    for base in bases {
        let mut stack = vec![base.join(rel)];
        while let Some(dir) = stack.pop() {
            if !dir.is_dir() {
                continue;
            }
            if let Ok(sub) = dir.strip_prefix(&base) {
                found.insert(format!("/{}", sub.display()));
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
    found.into_iter().collect()
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(super::unescape(r"/run/a\040b"), "/run/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
