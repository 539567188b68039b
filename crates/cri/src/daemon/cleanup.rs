//! Tearing down a pod whose owner is gone: what the owner would have
//! undone, found from the host's own records (cgroups, the mount table).

use std::path::{Path, PathBuf};

use vmrun_container::cgroups;
use vmrun_pod::native::CGROUP_PARENT;

use super::registry::Pod;

/// Detaches the pod's network, kills every process of its cgroup tree and
/// removes it, then unmounts what is mounted under its directory.
pub fn orphan(pod: &Pod) -> Result<(), String> {
    orphan_files(&pod.id, &pod.dir, &pod.settings, &pod.config)
}

/// [`orphan`] from the pod's files alone, and the directory removed: for
/// a pod nobody serves any more (a test's daemon that died with its pods).
pub fn remove_leftover_pod(dir: &Path) -> Result<(), String> {
    let (settings, config) =
        crate::owner::OwnerSettings::read(dir).map_err(|e| format!("{e:#}"))?;
    orphan_files(&settings.sandbox_id, dir, &settings, &config)?;
    std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

fn orphan_files(
    id: &str,
    dir: &Path,
    settings: &crate::owner::OwnerSettings,
    config: &crate::api::PodSandboxConfig,
) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Some(net) = &settings.network {
        if let Err(e) = crate::owner::detach_orphan(net, dir, |netns| {
            crate::owner::network::attachment(id, netns, config)
        }) {
            errors.push(e.to_string());
        }
    }
    let pod_cgroup = format!("{CGROUP_PARENT}/{id}");
    // Leaves first, so that each cgroup is empty when it is removed.
    let mut paths = cgroup_tree(&pod_cgroup);
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
