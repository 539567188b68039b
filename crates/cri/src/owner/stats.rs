//! Container and pod stats in CRI's terms, from the runtime's usage counters
//! and the writable layers.

use std::path::Path;

use vmrun_pod::runtime::CgroupStats;

use crate::api;

fn value(v: u64) -> Option<api::UInt64Value> {
    Some(api::UInt64Value { value: v })
}

/// CPU and memory in CRI's terms from a cgroup's counters (`None`: not
/// known); `last` is the previous CPU sample (time, usage), replaced by
/// this one, for the usage rate.
pub fn usage(
    stats: Option<CgroupStats>,
    memory_limit: Option<u64>,
    last: &mut Option<(i64, u64)>,
) -> (Option<api::CpuUsage>, Option<api::MemoryUsage>, u64) {
    let now = crate::now_ns();
    let Some(stats) = stats else {
        return (None, None, 0);
    };
    let nano_cores = match *last {
        Some((t, used)) if now > t && stats.cpu_usage_ns >= used => {
            let cores = (stats.cpu_usage_ns - used) as u128 * 1_000_000_000 / (now - t) as u128;
            value(cores as u64)
        }
        _ => None,
    };
    *last = Some((now, stats.cpu_usage_ns));
    let cpu = api::CpuUsage {
        timestamp: now,
        usage_core_nano_seconds: value(stats.cpu_usage_ns),
        usage_nano_cores: nano_cores,
        psi: None,
    };
    let working_set = stats.memory_usage_bytes;
    let memory = api::MemoryUsage {
        timestamp: now,
        working_set_bytes: value(working_set),
        available_bytes: memory_limit
            .map(|l| l.saturating_sub(working_set))
            .and_then(value),
        usage_bytes: value(stats.memory_usage_bytes),
        rss_bytes: None,
        page_faults: None,
        major_page_faults: None,
        psi: None,
    };
    (Some(cpu), Some(memory), stats.pids)
}

/// A filesystem's usage in CRI's terms: `used` counted under `mountpoint`.
pub fn filesystem_usage(
    mountpoint: &Path,
    used: vmrun_container::DirUsage,
) -> api::FilesystemUsage {
    let (bytes, inodes) = (used.bytes, used.inodes);
    api::FilesystemUsage {
        timestamp: crate::now_ns(),
        fs_id: Some(api::FilesystemIdentifier {
            mountpoint: mountpoint.display().to_string(),
        }),
        used_bytes: value(bytes),
        inodes_used: value(inodes),
    }
}
