//! What one container may use and uses, read from its cgroup: the inputs of
//! every file the view renders. Found from the reading process's pid, so one
//! filesystem serves every container on the host without being told about
//! them (and has nothing to lose when it restarts).
//!
//! Everything is read under two roots (`/proc` and `/sys/fs/cgroup` on a
//! real system) so unit tests run against directories they build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the kernel's files are: `/proc`, `/sys/fs/cgroup`, `/sys/devices/system/cpu`.
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc: PathBuf,
    pub cgroup: PathBuf,
    pub cpu: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            proc: PathBuf::from("/proc"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            cpu: PathBuf::from("/sys/devices/system/cpu"),
        }
    }
}

/// Memory of a cgroup, in bytes, normalised over cgroup v1 and v2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// The tightest `memory.max`/`memory.limit_in_bytes` of the cgroup and its ancestors.
    pub limit: Option<u64>,
    /// Swap the cgroup may use on top of `limit`.
    pub swap_limit: Option<u64>,
    pub usage: u64,
    pub swap_usage: u64,
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
    pub active_anon: u64,
    pub inactive_anon: u64,
    pub active_file: u64,
    pub inactive_file: u64,
    pub unevictable: u64,
    pub slab_reclaimable: u64,
    pub slab_unreclaimable: u64,
}

/// The cgroup directories of one process, per controller (v1) or one (v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupDirs {
    V2(PathBuf),
    /// controller name -> directory, e.g. "memory" -> /sys/fs/cgroup/memory/vmrun/pod/c
    V1(BTreeMap<String, PathBuf>),
}

/// Which parts of a [`ContainerView`] a file needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub memory: bool,
    /// CPUs from the cpuset and quota.
    pub cpus: bool,
    pub cpu_time: bool,
    /// Processes: count, running, uptime.
    pub tasks: bool,
}

impl Needs {
    pub const ALL: Needs = Needs {
        memory: true,
        cpus: true,
        cpu_time: true,
        tasks: true,
    };
}

/// Everything the rendered files need about the reader's container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerView {
    /// Host CPU numbers the container may use, as many as its quota allows.
    pub cpus: Vec<u32>,
    pub memory: Memory,
    /// CPU time the cgroup used, in microseconds.
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    /// Seconds since the container's oldest process started (the host's
    /// uptime when the reader is in no container).
    pub uptime_secs: f64,
    /// Processes in the cgroup, and how many of them are running now.
    pub tasks: u32,
    pub running: u32,
    /// The cgroup the reader is in, as a key for the load sampler.
    pub cgroup_key: Option<PathBuf>,
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn read_u64(p: &Path) -> Option<u64> {
    read(p)?.trim().parse().ok()
}

/// A `key value` file (memory.stat, cpu.stat, cpuacct.stat).
fn read_keyed(p: &Path) -> BTreeMap<String, u64> {
    read(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A kernel CPU list such as `0-3,6`.
pub fn parse_cpu_list(s: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    out.extend(a..=b.min(a.saturating_add(4096)));
                }
            }
            None => out.extend(part.parse::<u32>().ok()),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The inverse of [`parse_cpu_list`] for `0..n`: `0` or `0-3`.
pub fn format_first_cpus(n: usize) -> String {
    match n {
        0 | 1 => "0".to_string(),
        n => format!("0-{}", n - 1),
    }
}

impl Roots {
    /// The cgroup directories of `pid` from `/proc/<pid>/cgroup`. Paths there
    /// are relative to the reader's cgroup namespace: this daemon runs in the
    /// root one, so they are whole.
    pub fn cgroup_dirs(&self, pid: u32) -> Option<CgroupDirs> {
        let text = read(&self.proc.join(pid.to_string()).join("cgroup"))?;
        let rel = |p: &str| PathBuf::from(p.trim_start_matches('/'));
        if self.cgroup.join("cgroup.controllers").exists() {
            let line = text.lines().find(|l| l.starts_with("0::"))?;
            return Some(CgroupDirs::V2(self.cgroup.join(rel(&line[3..]))));
        }
        let mut dirs = BTreeMap::new();
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            for c in controllers.split(',').filter(|c| !c.is_empty()) {
                dirs.insert(c.to_string(), self.cgroup.join(c).join(rel(path)));
            }
        }
        Some(CgroupDirs::V1(dirs))
    }

    /// The online CPUs under the `cpu` root (at least CPU 0).
    pub fn online_cpus(&self) -> Vec<u32> {
        let cpus = parse_cpu_list(&read(&self.cpu.join("online")).unwrap_or_default());
        if cpus.is_empty() {
            vec![0]
        } else {
            cpus
        }
    }

    /// Host uptime in seconds.
    fn host_uptime(&self) -> f64 {
        read(&self.proc.join("uptime"))
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The view of the container `pid` is in.
    pub fn view_of(&self, pid: u32) -> ContainerView {
        self.view_for(pid, Needs::ALL)
    }

    /// [`Roots::view_of`], reading only what `needs` asks for (the rest is
    /// left default): every file read is a syscall round on the reader's
    /// critical path.
    pub fn view_for(&self, pid: u32, needs: Needs) -> ContainerView {
        let host_cpus = if needs.cpus {
            self.online_cpus()
        } else {
            Vec::new()
        };
        let host_uptime = if needs.tasks { self.host_uptime() } else { 0.0 };
        let Some(dirs) = self.cgroup_dirs(pid) else {
            return ContainerView {
                cpus: host_cpus,
                uptime_secs: host_uptime,
                ..ContainerView::default()
            };
        };
        let (cpuset_dir, quota_dir, mem_dir, procs_dir) = match &dirs {
            CgroupDirs::V2(d) => (Some(d), Some(d), Some(d), Some(d)),
            CgroupDirs::V1(m) => (
                m.get("cpuset"),
                m.get("cpu"),
                m.get("memory"),
                m.get("pids").or_else(|| m.get("memory")),
            ),
        };
        let v2 = matches!(dirs, CgroupDirs::V2(_));
        let mut cpus = cpuset_dir
            .filter(|_| needs.cpus)
            .and_then(|d| {
                let names: &[&str] = if v2 {
                    &["cpuset.cpus.effective"]
                } else {
                    &["cpuset.effective_cpus", "cpuset.cpus"]
                };
                names
                    .iter()
                    .find_map(|n| read(&d.join(n)))
                    .map(|s| parse_cpu_list(&s))
            })
            .filter(|c| !c.is_empty())
            .unwrap_or(host_cpus);
        let quota = quota_dir.filter(|_| needs.cpus);
        if let Some(n) = quota.and_then(|d| quota_cpus(&self.cgroup, d, v2)) {
            cpus.truncate(n.max(1));
        }
        let memory = mem_dir
            .filter(|_| needs.memory)
            .map(|d| memory_of(&self.cgroup, d, v2))
            .unwrap_or_default();
        let (cpu_user_us, cpu_system_us) = match &dirs {
            _ if !needs.cpu_time => (0, 0),
            CgroupDirs::V2(d) => {
                let s = read_keyed(&d.join("cpu.stat"));
                (
                    s.get("user_usec").copied().unwrap_or(0),
                    s.get("system_usec").copied().unwrap_or(0),
                )
            }
            CgroupDirs::V1(m) => {
                // cpuacct.stat counts USER_HZ ticks.
                let s = m
                    .get("cpuacct")
                    .map(|d| read_keyed(&d.join("cpuacct.stat")))
                    .unwrap_or_default();
                let tick_us = 1_000_000 / clock_ticks();
                (
                    s.get("user").copied().unwrap_or(0) * tick_us,
                    s.get("system").copied().unwrap_or(0) * tick_us,
                )
            }
        };
        let pids = procs_dir
            .filter(|_| needs.tasks)
            .and_then(|d| read(&d.join("cgroup.procs")))
            .unwrap_or_default();
        let mut tasks = 0;
        let mut running = 0;
        let mut oldest: Option<u64> = None;
        for p in pids.lines().filter(|l| !l.is_empty()) {
            let Some(stat) = read(&self.proc.join(p).join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state is the first,
            // starttime (clock ticks since boot) the 20th.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            tasks += 1;
            if fields.first() == Some(&"R") {
                running += 1;
            }
            if let Some(start) = fields.get(19).and_then(|s| s.parse::<u64>().ok()) {
                oldest = Some(oldest.map_or(start, |o| o.min(start)));
            }
        }
        let uptime_secs = match oldest {
            Some(start) if tasks > 0 => {
                (host_uptime - start as f64 / clock_ticks() as f64).max(0.0)
            }
            _ => host_uptime,
        };
        ContainerView {
            cpus,
            memory,
            cpu_user_us,
            cpu_system_us,
            uptime_secs,
            tasks,
            running,
            cgroup_key: procs_dir.cloned(),
        }
    }
}

/// The kernel's USER_HZ, the unit of /proc/stat and cpuacct.stat.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// The directories from `dir` up to (not including) the cgroup root. A v1
/// hierarchy's own root is included: its files say "no limit".
fn ancestors<'a>(root: &'a Path, dir: &'a Path) -> impl Iterator<Item = &'a Path> + 'a {
    dir.ancestors()
        .take_while(move |d| d.starts_with(root) && *d != root)
}

/// CPUs the tightest CFS quota of `dir` and its ancestors allows, rounded up.
fn quota_cpus(root: &Path, dir: &Path, v2: bool) -> Option<usize> {
    let mut best: Option<f64> = None;
    for d in ancestors(root, dir) {
        let (quota, period) = if v2 {
            let s = read(&d.join("cpu.max")).unwrap_or_default();
            let mut f = s.split_whitespace();
            let q = f.next().and_then(|q| q.parse::<f64>().ok());
            let p = f.next().and_then(|p| p.parse::<f64>().ok());
            (q, p)
        } else {
            let q = read(&d.join("cpu.cfs_quota_us")).and_then(|s| s.trim().parse::<f64>().ok());
            let p = read(&d.join("cpu.cfs_period_us")).and_then(|s| s.trim().parse::<f64>().ok());
            (q.filter(|q| *q > 0.0), p)
        };
        if let (Some(q), Some(p)) = (quota, period) {
            if p > 0.0 {
                let cpus = q / p;
                best = Some(best.map_or(cpus, |b| b.min(cpus)));
            }
        }
    }
    best.map(|c| c.ceil() as usize)
}

/// A limit as the kernel writes it: `max` or a number near u64::MAX for none.
fn limit_value(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return None;
    }
    // v1 writes PAGE_COUNTER_MAX pages, rounded: anything above 2^62 is "none".
    s.parse::<u64>().ok().filter(|v| *v < (1u64 << 62))
}

fn memory_of(root: &Path, dir: &Path, v2: bool) -> Memory {
    let stat = read_keyed(&dir.join("memory.stat"));
    let get = |k: &str| stat.get(k).copied().unwrap_or(0);
    if v2 {
        let mut limit: Option<u64> = None;
        let mut swap_limit: Option<u64> = None;
        for d in ancestors(root, dir) {
            if let Some(l) = read(&d.join("memory.max")).and_then(|s| limit_value(&s)) {
                limit = Some(limit.map_or(l, |x| x.min(l)));
            }
            if let Some(l) = read(&d.join("memory.swap.max")).and_then(|s| limit_value(&s)) {
                swap_limit = Some(swap_limit.map_or(l, |x| x.min(l)));
            }
        }
        Memory {
            limit,
            swap_limit,
            usage: read_u64(&dir.join("memory.current")).unwrap_or(0),
            swap_usage: read_u64(&dir.join("memory.swap.current")).unwrap_or(0),
            anon: get("anon"),
            file: get("file"),
            shmem: get("shmem"),
            active_anon: get("active_anon"),
            inactive_anon: get("inactive_anon"),
            active_file: get("active_file"),
            inactive_file: get("inactive_file"),
            unevictable: get("unevictable"),
            slab_reclaimable: get("slab_reclaimable"),
            slab_unreclaimable: get("slab_unreclaimable"),
        }
    } else {
        // v1's memory.stat already folds the ancestors' limits in
        // (hierarchical_*), and counts this cgroup's pages as total_*.
        let total = |k: &str| {
            stat.get(&format!("total_{k}"))
                .or_else(|| stat.get(k))
                .copied()
                .unwrap_or(0)
        };
        let limit = stat
            .get("hierarchical_memory_limit")
            .copied()
            .filter(|v| *v < (1u64 << 62));
        let memsw = stat
            .get("hierarchical_memsw_limit")
            .copied()
            .filter(|v| *v < (1u64 << 62));
        let usage = read_u64(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
        let memsw_usage = read_u64(&dir.join("memory.memsw.usage_in_bytes")).unwrap_or(usage);
        Memory {
            limit,
            swap_limit: match (memsw, limit) {
                (Some(sw), Some(l)) => Some(sw.saturating_sub(l)),
                _ => None,
            },
            usage,
            swap_usage: memsw_usage.saturating_sub(usage),
            anon: total("rss"),
            file: total("cache"),
            shmem: total("shmem"),
            active_anon: total("active_anon"),
            inactive_anon: total("inactive_anon"),
            active_file: total("active_file"),
            inactive_file: total("inactive_file"),
            unevictable: total("unevictable"),
            slab_reclaimable: 0,
            slab_unreclaimable: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    /// Empty /proc, cgroup and cpu roots in a temporary directory (kept
    /// while the first value lives).
    fn temp_roots() -> (tempfile::TempDir, Roots) {
        let t = tempfile::tempdir().unwrap();
        let roots = Roots {
            proc: t.path().join("proc"),
            cgroup: t.path().join("cg"),
            cpu: t.path().join("cpu"),
        };
        (t, roots)
    }

    /// A /proc with one process `pid`, started `start` ticks after boot.
    fn proc_with(dir: &Path, pid: u32, cgroup: &str, start: u64) {
        write(&dir.join("uptime"), "1000.00 1800.00\n");
        write(&dir.join(format!("{pid}/cgroup")), cgroup);
        let rest: Vec<String> = (0..19).map(|i| i.to_string()).collect();
        write(
            &dir.join(format!("{pid}/stat")),
            &format!("{pid} (sh) R {} {start} 0 0\n", rest[1..].join(" ")),
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,6\n"), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("1"), vec![1]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
        assert_eq!(format_first_cpus(1), "0");
        assert_eq!(format_first_cpus(4), "0-3");
    }

    #[test]
    fn v1_view_reads_quota_cpuset_memory_and_start() {
        let (_t, roots) = temp_roots();
        write(&roots.cpu.join("online"), "0-3\n");
        let hz = clock_ticks();
        proc_with(
            &roots.proc,
            42,
            "5:memory:/vmrun/p/c\n4:cpu,cpuacct:/vmrun/p/c\n3:cpuset:/vmrun/p/c\n2:pids:/vmrun/p/c\n",
            990 * hz,
        );
        let cg = |c: &str, f: &str| roots.cgroup.join(c).join("vmrun/p/c").join(f);
        write(&cg("cpu", "cpu.cfs_quota_us"), "150000\n");
        write(&cg("cpu", "cpu.cfs_period_us"), "100000\n");
        write(&cg("cpuacct", "cpuacct.stat"), "user 30\nsystem 10\n");
        write(&cg("cpuset", "cpuset.effective_cpus"), "1-3\n");
        write(&cg("pids", "cgroup.procs"), "42\n");
        write(
            &cg("memory", "memory.stat"),
            &format!(
                "cache 4096\nrss 8192\nhierarchical_memory_limit {}\ntotal_cache 4096\ntotal_rss 8192\ntotal_inactive_file 4096\n",
                64u64 << 20
            ),
        );
        write(&cg("memory", "memory.usage_in_bytes"), "12288\n");
        let v = roots.view_of(42);
        assert_eq!(v.cpus, vec![1, 2], "1.5 CPUs of quota round up to 2");
        assert_eq!(v.memory.limit, Some(64 << 20));
        assert_eq!(v.memory.usage, 12288);
        assert_eq!(v.memory.file, 4096);
        assert_eq!(v.memory.anon, 8192);
        assert_eq!(v.cpu_user_us, 30 * 1_000_000 / hz);
        assert_eq!((v.tasks, v.running), (1, 1));
        assert!((v.uptime_secs - 10.0).abs() < 0.01, "{}", v.uptime_secs);
    }

    #[test]
    fn v2_view_takes_the_tightest_ancestor_limit() {
        let (_t, roots) = temp_roots();
        write(&roots.cpu.join("online"), "0-1\n");
        write(&roots.cgroup.join("cgroup.controllers"), "cpu memory\n");
        proc_with(&roots.proc, 7, "0::/pod/c\n", 0);
        let pod = roots.cgroup.join("pod");
        write(&pod.join("memory.max"), &format!("{}\n", 32u64 << 20));
        write(&pod.join("cpu.max"), "max 100000\n");
        write(&pod.join("c/memory.max"), &format!("{}\n", 64u64 << 20));
        write(&pod.join("c/memory.current"), "1000\n");
        write(&pod.join("c/cpu.max"), "20000 100000\n");
        write(&pod.join("c/cpuset.cpus.effective"), "0-1\n");
        write(&pod.join("c/cgroup.procs"), "7\n");
        write(
            &pod.join("c/cpu.stat"),
            "usage_usec 5\nuser_usec 3\nsystem_usec 2\n",
        );
        let v = roots.view_of(7);
        assert_eq!(v.memory.limit, Some(32 << 20), "the pod's limit is tighter");
        assert_eq!(v.cpus, vec![0], "200m is one CPU");
        assert_eq!((v.cpu_user_us, v.cpu_system_us), (3, 2));
    }

    #[test]
    fn a_process_in_no_container_sees_the_host() {
        let (_t, roots) = temp_roots();
        write(&roots.cpu.join("online"), "0-1\n");
        write(&roots.proc.join("uptime"), "55.5 100\n");
        let v = roots.view_of(99);
        assert_eq!(v.cpus, vec![0, 1]);
        assert_eq!(v.memory.limit, None);
        assert_eq!(v.uptime_secs, 55.5);
    }
}
