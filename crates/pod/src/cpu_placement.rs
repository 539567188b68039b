//! With the /proc view on, a container with a CPU limit below the host's
//! CPUs gets a cpuset of that many CPUs (its limit rounded up), so that
//! `nproc`, Go's GOMAXPROCS, the JVM and anything else asking
//! `sched_getaffinity` see the CPUs the container may really use, as its
//! /proc/cpuinfo says. The CFS quota still caps its time; the cpuset only
//! says where. CPUs are taken least-used first across the host's vmrun
//! containers, so two 1-CPU pods on a 2-CPU host do not share one CPU.

use std::collections::BTreeMap;
use std::path::Path;

/// How many CPUs a `limit_milli` CPU limit is worth, when fewer than the host has.
pub fn cpus_for_limit(limit_milli: Option<u64>, host_cpus: usize) -> Option<usize> {
    let n = limit_milli?.div_ceil(1000).max(1) as usize;
    (n < host_cpus).then_some(n)
}

/// `n` CPUs of `online`, the least used (by `in_use`: CPU -> containers
/// pinned to it) first, lowest number breaking ties; as a kernel CPU list.
pub fn pick(n: usize, online: &[u32], in_use: &BTreeMap<u32, usize>) -> String {
    let mut cpus: Vec<u32> = online.to_vec();
    cpus.sort_by_key(|c| (in_use.get(c).copied().unwrap_or(0), *c));
    let mut chosen: Vec<u32> = cpus.into_iter().take(n).collect();
    chosen.sort_unstable();
    format_list(&chosen)
}

/// CPUs as a kernel CPU list, one by one: `1,3`.
pub fn format_list(cpus: &[u32]) -> String {
    cpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// How many containers under `parent` (the cpuset directory of vmrun's
/// cgroups, e.g. /sys/fs/cgroup/cpuset/vmrun) are pinned to each CPU: the
/// cpusets of pod/container cgroups narrower than the host.
pub fn in_use(parent: &Path, online: &[u32]) -> BTreeMap<u32, usize> {
    let mut out = BTreeMap::new();
    let Ok(pods) = std::fs::read_dir(parent) else {
        return out;
    };
    for pod in pods.flatten().filter(|e| e.path().is_dir()) {
        let Ok(containers) = std::fs::read_dir(pod.path()) else {
            continue;
        };
        for c in containers.flatten().filter(|e| e.path().is_dir()) {
            let text = std::fs::read_to_string(c.path().join("cpuset.cpus")).unwrap_or_default();
            let cpus = vmrun_procview::view::parse_cpu_list(&text);
            if cpus.is_empty() || cpus.len() >= online.len() {
                continue;
            }
            for cpu in cpus {
                *out.entry(cpu).or_default() += 1;
            }
        }
    }
    out
}

/// The host's online CPUs.
pub fn online_cpus() -> Vec<u32> {
    vmrun_procview::view::Roots::default().online_cpus()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_worth_its_rounded_up_cpus_below_the_host() {
        assert_eq!(cpus_for_limit(Some(200), 2), Some(1));
        assert_eq!(cpus_for_limit(Some(1000), 2), Some(1));
        assert_eq!(cpus_for_limit(Some(1500), 4), Some(2));
        assert_eq!(
            cpus_for_limit(Some(2000), 2),
            None,
            "the whole host: no cpuset"
        );
        assert_eq!(cpus_for_limit(None, 2), None);
    }

    #[test]
    fn least_used_cpus_first() {
        let online = [0, 1, 2, 3];
        let mut used = BTreeMap::new();
        assert_eq!(pick(1, &online, &used), "0");
        used.insert(0, 2);
        used.insert(1, 1);
        assert_eq!(pick(1, &online, &used), "2");
        assert_eq!(pick(3, &online, &used), "1,2,3");
    }

    #[test]
    fn in_use_counts_narrow_cpusets_only() {
        let t = tempfile::tempdir().unwrap();
        let put = |p: &str, s: &str| {
            let d = t.path().join(p);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cpuset.cpus"), s).unwrap();
        };
        put("pod1/a", "1\n");
        put("pod1/b", "0-1\n");
        put("pod2/c", "1\n");
        let used = in_use(t.path(), &[0, 1]);
        assert_eq!(used.get(&1), Some(&2));
        assert_eq!(used.get(&0), None);
    }
}
