//! The files of the view, rendered from the host's own file (for the lines a
//! cgroup has no say in) and the reader's [`ContainerView`]. Pure functions:
//! each is unit-tested on fixed input.

use std::fmt::Write;

use crate::view::{format_first_cpus, ContainerView};

/// A meminfo `key:` value of the host, in bytes.
fn host_bytes(host: &str, key: &str) -> u64 {
    host.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

/// The container's swap (total, used) in bytes: its swap limit, at most the
/// host's swap.
fn swap(host: &str, v: &ContainerView) -> (u64, u64) {
    let host_swap = host_bytes(host, "SwapTotal");
    let total = v.memory.swap_limit.map_or(host_swap, |s| s.min(host_swap));
    (total, v.memory.swap_usage.min(total))
}

/// `/proc/meminfo`: totals from the container's limit, usage from its
/// cgroup; lines a cgroup does not account stay the host's.
pub fn meminfo(host: &str, v: &ContainerView) -> String {
    let m = &v.memory;
    let host_total = host_bytes(host, "MemTotal");
    let Some(limit) = m.limit.filter(|l| *l < host_total) else {
        return host.to_string();
    };
    let kb = |bytes: u64| bytes / 1024;
    let free = limit.saturating_sub(m.usage);
    let available = (free + m.active_file + m.inactive_file + m.slab_reclaimable).min(limit);
    let (swap_total, swap_used) = swap(host, v);
    let swap_free = swap_total - swap_used;
    let ours: [(&str, u64); 19] = [
        ("MemTotal", limit),
        ("MemFree", free),
        ("MemAvailable", available),
        ("Buffers", 0),
        ("Cached", m.file),
        ("SwapCached", 0),
        ("Active", m.active_anon + m.active_file),
        ("Inactive", m.inactive_anon + m.inactive_file),
        ("Active(anon)", m.active_anon),
        ("Inactive(anon)", m.inactive_anon),
        ("Active(file)", m.active_file),
        ("Inactive(file)", m.inactive_file),
        ("Unevictable", m.unevictable),
        ("SwapTotal", swap_total),
        ("SwapFree", swap_free),
        ("AnonPages", m.anon),
        ("Shmem", m.shmem),
        ("SReclaimable", m.slab_reclaimable),
        ("SUnreclaim", m.slab_unreclaimable),
    ];
    let mut out = String::with_capacity(host.len());
    for line in host.lines() {
        let key = line.split(':').next().unwrap_or("");
        let value = match key {
            "Slab" => Some(m.slab_reclaimable + m.slab_unreclaimable),
            _ => ours.iter().find(|(k, _)| *k == key).map(|(_, v)| *v),
        };
        match value {
            // The kernel's layout: key and colon in 16 columns, value in 8.
            Some(bytes) => {
                let _ = writeln!(out, "{:<16}{:>8} kB", format!("{key}:"), kb(bytes));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `/proc/cpuinfo`: the host's blocks of the container's CPUs, numbered from 0.
pub fn cpuinfo(host: &str, v: &ContainerView) -> String {
    let n = v.cpus.len();
    let mut out = String::with_capacity(host.len());
    let mut index = 0usize;
    for block in host.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let processor = block.lines().find_map(|l| {
            let (k, val) = l.split_once(':')?;
            (k.trim() == "processor").then(|| val.trim().parse::<u32>().ok())?
        });
        if !processor.is_some_and(|p| v.cpus.contains(&p)) {
            continue;
        }
        for line in block.lines() {
            let key = line.split(':').next().unwrap_or("").trim();
            match key {
                "processor" => {
                    let _ = writeln!(out, "processor\t: {index}");
                }
                "siblings" | "cpu cores" => {
                    let (k, _) = line.split_once(':').unwrap_or((line, ""));
                    let _ = writeln!(out, "{k}: {n}");
                }
                "core id" | "apicid" | "initial apicid" => {
                    let (k, _) = line.split_once(':').unwrap_or((line, ""));
                    let _ = writeln!(out, "{k}: {index}");
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out.push('\n');
        index += 1;
    }
    out
}

/// `/proc/stat`: one `cpuN` line per container CPU, with the cgroup's CPU
/// time spread over them and the rest of its lifetime idle.
pub fn stat(host: &str, v: &ContainerView, hz: u64) -> String {
    let n = v.cpus.len().max(1) as u64;
    let ticks = |us: u64| us * hz / 1_000_000;
    let user = ticks(v.cpu_user_us);
    let system = ticks(v.cpu_system_us);
    let lifetime = (v.uptime_secs * hz as f64) as u64;
    let per_user = user / n;
    let per_system = system / n;
    let per_idle = lifetime.saturating_sub(per_user + per_system);
    let line =
        |name: &str, u: u64, s: u64, idle: u64| format!("{name} {u} 0 {s} {idle} 0 0 0 0 0 0\n");
    let mut out = line("cpu ", per_user * n, per_system * n, per_idle * n);
    for i in 0..n {
        out.push_str(&line(&format!("cpu{i}"), per_user, per_system, per_idle));
    }
    for l in host.lines().filter(|l| !l.starts_with("cpu")) {
        if l.starts_with("procs_running") {
            let _ = writeln!(out, "procs_running {}", v.running.max(1));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// `/proc/loadavg` from the sampler's averages.
pub fn loadavg(host: &str, v: &ContainerView, load: [f64; 3]) -> String {
    let last_pid = host.split_whitespace().nth(4).unwrap_or("0");
    format!(
        "{:.2} {:.2} {:.2} {}/{} {last_pid}\n",
        load[0],
        load[1],
        load[2],
        v.running.max(1),
        v.tasks.max(1)
    )
}

/// `/proc/uptime`: since the container started; idle is the CPU time of its
/// CPUs it did not use.
pub fn uptime(v: &ContainerView) -> String {
    let busy = (v.cpu_user_us + v.cpu_system_us) as f64 / 1e6;
    let idle = (v.uptime_secs * v.cpus.len().max(1) as f64 - busy).max(0.0);
    format!("{:.2} {:.2}\n", v.uptime_secs, idle)
}

/// `/proc/swaps`: one virtual entry when the container may swap.
pub fn swaps(host_meminfo: &str, v: &ContainerView) -> String {
    let mut out = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n".to_string();
    let (total, used) = swap(host_meminfo, v);
    if total > 0 {
        let _ = writeln!(
            out,
            "none\t\t\t\t\tvirtual\t\t{}\t\t{}\t\t0",
            total / 1024,
            used / 1024
        );
    }
    out
}

/// `/sys/devices/system/cpu/online`: the container's CPUs, numbered from 0
/// as in its cpuinfo.
pub fn cpu_online(v: &ContainerView) -> String {
    format!("{}\n", format_first_cpus(v.cpus.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Memory;

    const HOST_MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   22000000 kB\nBuffers:           10000 kB\nCached:          1000000 kB\nSwapCached:            0 kB\nSwapTotal:             0 kB\nSwapFree:              0 kB\nShmem:              1000 kB\nSlab:             100000 kB\nSReclaimable:      50000 kB\nSUnreclaim:        50000 kB\nHugePages_Total:       0\n";

    fn view(limit: Option<u64>, cpus: &[u32]) -> ContainerView {
        ContainerView {
            cpus: cpus.to_vec(),
            memory: Memory {
                limit,
                usage: 16 << 20,
                file: 4 << 20,
                inactive_file: 4 << 20,
                anon: 12 << 20,
                ..Memory::default()
            },
            uptime_secs: 10.0,
            cpu_user_us: 2_000_000,
            cpu_system_us: 1_000_000,
            tasks: 3,
            running: 1,
            ..ContainerView::default()
        }
    }

    fn kb(text: &str, key: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing in {text}"))
    }

    #[test]
    fn meminfo_shows_the_limit_and_the_cgroup_usage() {
        let out = meminfo(HOST_MEMINFO, &view(Some(64 << 20), &[0]));
        assert_eq!(kb(&out, "MemTotal:"), 65536);
        assert_eq!(kb(&out, "MemFree:"), 65536 - 16384);
        assert_eq!(kb(&out, "MemAvailable:"), 65536 - 16384 + 4096);
        assert_eq!(kb(&out, "Cached:"), 4096);
        assert_eq!(kb(&out, "Buffers:"), 0);
        assert_eq!(kb(&out, "SReclaimable:"), 0);
        assert!(out.contains("HugePages_Total:       0"), "{out}");
        assert!(out.starts_with("MemTotal:          65536 kB\n"), "{out}");
    }

    #[test]
    fn meminfo_without_a_limit_is_the_hosts() {
        assert_eq!(meminfo(HOST_MEMINFO, &view(None, &[0])), HOST_MEMINFO);
        let bigger = view(Some(1 << 50), &[0]);
        assert_eq!(meminfo(HOST_MEMINFO, &bigger), HOST_MEMINFO);
    }

    #[test]
    fn cpuinfo_keeps_the_containers_cpus_numbered_from_zero() {
        let host = "processor\t: 0\nmodel name\t: X\nsiblings\t: 2\ncore id\t\t: 0\n\nprocessor\t: 1\nmodel name\t: X\nsiblings\t: 2\ncore id\t\t: 1\n\n";
        let out = cpuinfo(host, &view(None, &[1]));
        assert_eq!(
            out,
            "processor\t: 0\nmodel name\t: X\nsiblings\t: 1\ncore id\t\t: 0\n\n"
        );
        assert_eq!(
            cpuinfo(host, &view(None, &[0, 1]))
                .matches("processor")
                .count(),
            2
        );
    }

    #[test]
    fn stat_has_one_line_per_cpu_and_host_counters() {
        let host = "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\ncpu1 1 2 3 4 5 6 7 8 9 10\nintr 5\nctxt 9\nbtime 100\nprocs_running 7\n";
        let out = stat(host, &view(None, &[1]), 100);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "cpu  200 0 100 700 0 0 0 0 0 0");
        assert_eq!(lines[1], "cpu0 200 0 100 700 0 0 0 0 0 0");
        assert!(!out.contains("cpu1"), "{out}");
        assert!(
            out.contains("btime 100\n") && out.contains("procs_running 1\n"),
            "{out}"
        );
    }

    #[test]
    fn uptime_loadavg_swaps_and_online() {
        let v = view(Some(64 << 20), &[0, 1]);
        assert_eq!(uptime(&v), "10.00 17.00\n");
        assert_eq!(
            loadavg("0.5 0.4 0.3 2/300 4242\n", &v, [0.25, 0.5, 1.0]),
            "0.25 0.50 1.00 1/3 4242\n"
        );
        assert_eq!(
            swaps(HOST_MEMINFO, &v),
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        );
        assert_eq!(cpu_online(&v), "0-1\n");
    }
}
