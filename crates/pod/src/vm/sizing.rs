//! How big a pod's microVM is: derived from its containers' limits, plus a
//! fixed overhead for the guest kernel, the agent and the page cache.
//!
//! Guest memory is only a ceiling: the host backs pages the guest touches, so
//! an oversized VM costs page tables, not RAM. Each container's own limit is
//! still enforced by its cgroup inside the guest.

use crate::plan::PodPlan;

/// Guest kernel, agent, pause process, page cache for the image disks.
pub const OVERHEAD_MIB: u64 = 128;
/// What a container without a memory limit adds to the VM.
pub const UNLIMITED_CONTAINER_MIB: u64 = 256;
/// What a container without a cpu limit adds, in millicores.
pub const UNLIMITED_CONTAINER_MILLI: u64 = 1000;
/// A pod VM made before its containers are known (CRI) without pod limits:
/// as much memory as a Kata Containers VM gets by default. A ceiling only.
pub const UNKNOWN_POD_MIB: u64 = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u8,
    pub memory_mib: u64,
}

/// Sizes the VM for `pod` on a host with `host_cpus` CPUs.
///
/// Init containers run one at a time before the app containers, so the VM
/// needs the larger of the biggest init container and the sum of the app
/// containers (Kubernetes' effective pod request rule, applied to limits).
pub fn vm_size(pod: &PodPlan, host_cpus: usize) -> VmSize {
    let host_cpus = host_cpus.clamp(1, usize::from(u8::MAX)) as u64;
    if pod.all_containers().next().is_none() {
        // CRI: the containers come later; the pod's limits say what they
        // may take together, else the VM gets a generous ceiling.
        let limits = pod.pod_limits.clone().unwrap_or_default();
        let memory = limits
            .memory_limit
            .map_or(UNKNOWN_POD_MIB, |bytes| bytes.div_ceil(1 << 20));
        let cpus = limits
            .cpu_limit_milli
            .map_or(host_cpus, |milli| milli.div_ceil(1000).max(1));
        return VmSize {
            vcpus: cpus.min(host_cpus) as u8,
            memory_mib: OVERHEAD_MIB + memory,
        };
    }
    let memory_mib = |c: &crate::plan::ContainerPlan| {
        c.resources
            .memory_limit
            .map_or(UNLIMITED_CONTAINER_MIB, |bytes| bytes.div_ceil(1 << 20))
    };
    let milli = |c: &crate::plan::ContainerPlan| {
        c.resources
            .cpu_limit_milli
            .unwrap_or(UNLIMITED_CONTAINER_MILLI)
    };
    let app_mem: u64 = pod.containers.iter().map(memory_mib).sum();
    let init_mem = pod
        .init_containers
        .iter()
        .map(memory_mib)
        .max()
        .unwrap_or(0);
    let app_milli: u64 = pod.containers.iter().map(milli).sum();
    let init_milli = pod.init_containers.iter().map(milli).max().unwrap_or(0);
    let cpus = app_milli.max(init_milli).div_ceil(1000).max(1);
    VmSize {
        vcpus: cpus.min(host_cpus) as u8,
        memory_mib: OVERHEAD_MIB + app_mem.max(init_mem),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod whose containers have these (memory, cpu) limits, e.g. ("64Mi", "500m").
    fn pod(init: &[(Option<&str>, Option<&str>)], app: &[(Option<&str>, Option<&str>)]) -> PodPlan {
        let list = |cs: &[(Option<&str>, Option<&str>)], prefix: &str| {
            let mut yaml = String::new();
            for (i, (mem, cpu)) in cs.iter().enumerate() {
                yaml += &format!("  - name: {prefix}{i}\n    image: busybox\n");
                if mem.is_some() || cpu.is_some() {
                    yaml += "    resources:\n      limits:\n";
                    if let Some(m) = mem {
                        yaml += &format!("        memory: {m}\n");
                    }
                    if let Some(c) = cpu {
                        yaml += &format!("        cpu: {c}\n");
                    }
                }
            }
            yaml
        };
        let mut yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n".to_string();
        if !init.is_empty() {
            yaml += "  initContainers:\n";
            yaml += &list(init, "i");
        }
        yaml += "  containers:\n";
        yaml += &list(app, "c");
        let manifest = crate::manifest::parse("t.yaml", &yaml).unwrap();
        crate::plan::plan(&manifest, "uid", "node").unwrap()
    }

    #[test]
    fn limits_add_up_with_overhead() {
        let p = pod(
            &[],
            &[(Some("64Mi"), Some("500m")), (Some("100Mi"), Some("700m"))],
        );
        assert_eq!(
            vm_size(&p, 8),
            VmSize {
                vcpus: 2,
                memory_mib: OVERHEAD_MIB + 164
            }
        );
    }

    #[test]
    fn unlimited_containers_get_a_default_share() {
        let p = pod(&[], &[(None, None)]);
        assert_eq!(
            vm_size(&p, 8),
            VmSize {
                vcpus: 1,
                memory_mib: OVERHEAD_MIB + UNLIMITED_CONTAINER_MIB
            }
        );
    }

    #[test]
    fn init_containers_count_one_at_a_time() {
        let p = pod(
            &[(Some("512Mi"), Some("3")), (Some("64Mi"), None)],
            &[(Some("16Mi"), Some("100m"))],
        );
        assert_eq!(
            vm_size(&p, 8),
            VmSize {
                vcpus: 3,
                memory_mib: OVERHEAD_MIB + 512
            }
        );
    }

    #[test]
    fn vcpus_never_exceed_the_host() {
        let p = pod(&[], &[(None, Some("16"))]);
        assert_eq!(vm_size(&p, 2).vcpus, 2);
        // Odd byte counts round up to whole MiB.
        let p = pod(&[], &[(Some("1048577"), Some("1m"))]);
        assert_eq!(vm_size(&p, 2).memory_mib, OVERHEAD_MIB + 2);
    }

    /// CRI makes the VM before any container: the pod's limits size it,
    /// else a generous ceiling with every host CPU.
    #[test]
    fn a_pod_without_containers_yet_is_sized_from_its_limits() {
        let mut p = pod(&[], &[(None, None)]);
        p.containers.clear();
        assert_eq!(
            vm_size(&p, 4),
            VmSize {
                vcpus: 4,
                memory_mib: OVERHEAD_MIB + UNKNOWN_POD_MIB
            }
        );
        p.pod_limits = Some(crate::plan::Resources {
            memory_limit: Some(300 << 20),
            cpu_limit_milli: Some(1500),
            ..Default::default()
        });
        assert_eq!(
            vm_size(&p, 4),
            VmSize {
                vcpus: 2,
                memory_mib: OVERHEAD_MIB + 300
            }
        );
    }
}
