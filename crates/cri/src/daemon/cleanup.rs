//! Tearing down a pod whose owner is gone: what the owner would have
//! undone, found from the host's own records (cgroups, the mount table).

use std::path::Path;

use vmrun_pod::native::CGROUP_PARENT;

use super::registry::Pod;

/// Detaches the pod's network, then removes what its processes left
/// (`vmrun_pod::leftovers`: a pod VM's VMM, the cgroup tree, mounts).
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
    // The pod's processes (a pod VM's VMM too), cgroups and mounts.
    if let Err(e) = vmrun_pod::leftovers::remove(dir, &format!("{CGROUP_PARENT}/{id}")) {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
