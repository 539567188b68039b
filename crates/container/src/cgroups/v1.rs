//! cgroup v1: one hierarchy (directory) per controller or controller group,
//! e.g. `/sys/fs/cgroup/memory`, `/sys/fs/cgroup/cpu,cpuacct`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::fsutil::{poll_until, read, read_keyed, read_pids, read_u64, remove_tree, write};
use super::{normalize, Cgroup, CgroupError, CgroupStats};

/// One mounted v1 hierarchy.
#[derive(Debug, Clone)]
pub(crate) struct Hierarchy {
    pub controllers: Vec<String>,
    pub dir: PathBuf,
}

/// Lists the v1 hierarchies under `root`: directories holding `cgroup.procs`
/// but no `cgroup.controllers` (that would be a v2 mount such as a hybrid
/// host's `unified/`). Symlinked aliases (`cpu` -> `cpu,cpuacct`) are listed
/// once.
pub(crate) fn hierarchies(root: &Path) -> Result<Vec<Hierarchy>, CgroupError> {
    let entries = std::fs::read_dir(root).map_err(|source| CgroupError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("cgroup.procs").exists() || dir.join("cgroup.controllers").exists() {
            continue;
        }
        let real = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if !seen.insert(real.clone()) {
            continue;
        }
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let controllers = name
            .split(',')
            .map(|c| c.strip_prefix("name=").unwrap_or(c).to_string())
            .collect();
        out.push(Hierarchy { controllers, dir });
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    if out.is_empty() {
        return Err(CgroupError::NoHierarchy(root.to_path_buf()));
    }
    Ok(out)
}

#[derive(Debug)]
pub struct CgroupV1 {
    path: String,
    /// (controllers of the hierarchy, this cgroup's directory in it)
    dirs: Vec<(Vec<String>, PathBuf)>,
}

impl CgroupV1 {
    pub(crate) fn create(root: &Path, path: &str) -> Result<Self, CgroupError> {
        let rel = normalize(path)?;
        let mut dirs = Vec::new();
        for h in hierarchies(root)? {
            let dir = h.dir.join(&rel);
            std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Create {
                path: dir.clone(),
                source,
            })?;
            if h.controllers.iter().any(|c| c == "cpuset") {
                inherit_cpuset(&h.dir, &rel)?;
            }
            dirs.push((h.controllers, dir));
        }
        Ok(Self {
            path: path.to_string(),
            dirs,
        })
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| c.iter().any(|x| x == controller))
            .map(|(_, d)| d.as_path())
    }

    fn require(&self, controller: &str) -> Result<&Path, CgroupError> {
        self.dir(controller)
            .ok_or_else(|| CgroupError::Unsupported {
                path: self.path.clone(),
                what: format!("the {controller} controller"),
            })
    }

    /// The directory whose cgroup.procs is authoritative for "what runs here".
    fn procs_file(&self) -> Option<PathBuf> {
        self.dir("pids")
            .or_else(|| self.dir("freezer"))
            .or_else(|| self.dirs.first().map(|(_, d)| d.as_path()))
            .map(|d| d.join("cgroup.procs"))
    }

    fn unsupported(&self, what: &str) -> CgroupError {
        CgroupError::Unsupported {
            path: self.path.clone(),
            what: what.to_string(),
        }
    }

    fn apply_memory(&self, m: &oci_spec::runtime::LinuxMemory) -> Result<(), CgroupError> {
        let dir = self.require("memory")?;
        let limit_file = dir.join("memory.limit_in_bytes");
        let memsw_file = dir.join("memory.memsw.limit_in_bytes");
        let as_v1 = |v: i64| {
            if v < 0 {
                "-1".to_string()
            } else {
                v.to_string()
            }
        };
        match (m.limit(), m.swap()) {
            (limit, Some(swap)) if memsw_file.exists() => {
                // memory.limit_in_bytes must stay <= memsw.limit_in_bytes at
                // every step, so the order depends on growing vs shrinking.
                let current_memsw = read_u64(&memsw_file).unwrap_or(u64::MAX);
                let growing = swap < 0 || (swap as u64) > current_memsw;
                if growing {
                    write(&memsw_file, &as_v1(swap))?;
                }
                if let Some(l) = limit {
                    write(&limit_file, &as_v1(l))?;
                }
                if !growing {
                    write(&memsw_file, &as_v1(swap))?;
                }
            }
            (limit, swap) => {
                // Without swap accounting, "swap == limit" (no swap) and
                // "unlimited swap" are the only requests that hold anyway.
                if let Some(s) = swap {
                    if s >= 0 && Some(s) != limit {
                        return Err(self.unsupported("memory.swap (no memsw accounting)"));
                    }
                }
                if let Some(l) = limit {
                    write(&limit_file, &as_v1(l))?;
                }
            }
        }
        if let Some(r) = m.reservation() {
            write(&dir.join("memory.soft_limit_in_bytes"), &as_v1(r))?;
        }
        if let Some(s) = m.swappiness() {
            if s > 100 {
                return Err(self.unsupported(&format!("memory.swappiness {s} (must be 0-100)")));
            }
            write(&dir.join("memory.swappiness"), &s.to_string())?;
        }
        if let Some(d) = m.disable_oom_killer() {
            write(&dir.join("memory.oom_control"), if d { "1" } else { "0" })?;
        }
        Ok(())
    }

    fn apply_cpu(&self, c: &oci_spec::runtime::LinuxCpu) -> Result<(), CgroupError> {
        let needs_cpu = c.shares().is_some()
            || c.quota().is_some()
            || c.period().is_some()
            || c.realtime_period().is_some()
            || c.realtime_runtime().is_some();
        if needs_cpu {
            let dir = self.require("cpu")?;
            if let Some(s) = c.shares().filter(|s| *s != 0) {
                write(&dir.join("cpu.shares"), &s.to_string())?;
            }
            // The period first: the kernel validates quota against it.
            if let Some(p) = c.period().filter(|p| *p != 0) {
                write(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
            }
            if let Some(q) = c.quota().filter(|q| *q != 0) {
                let v = if q < 0 {
                    "-1".to_string()
                } else {
                    q.to_string()
                };
                write(&dir.join("cpu.cfs_quota_us"), &v)?;
            }
            if let Some(p) = c.realtime_period().filter(|p| *p != 0) {
                write(&dir.join("cpu.rt_period_us"), &p.to_string())?;
            }
            if let Some(r) = c.realtime_runtime().filter(|r| *r != 0) {
                write(&dir.join("cpu.rt_runtime_us"), &r.to_string())?;
            }
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            write(&self.require("cpuset")?.join("cpuset.cpus"), cpus)?;
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            write(&self.require("cpuset")?.join("cpuset.mems"), mems)?;
        }
        Ok(())
    }

    fn apply_block_io(&self, b: &oci_spec::runtime::LinuxBlockIo) -> Result<(), CgroupError> {
        let dir = self.require("blkio")?;
        if let Some(w) = b.weight() {
            let f = ["blkio.weight", "blkio.bfq.weight"]
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.exists())
                .ok_or_else(|| self.unsupported("blkio.weight"))?;
            write(&f, &w.to_string())?;
        }
        let throttles = [
            (
                "blkio.throttle.read_bps_device",
                b.throttle_read_bps_device(),
            ),
            (
                "blkio.throttle.write_bps_device",
                b.throttle_write_bps_device(),
            ),
            (
                "blkio.throttle.read_iops_device",
                b.throttle_read_iops_device(),
            ),
            (
                "blkio.throttle.write_iops_device",
                b.throttle_write_iops_device(),
            ),
        ];
        for (file, devs) in throttles {
            for d in devs.iter().flatten() {
                let v = format!("{}:{} {}", d.major(), d.minor(), d.rate());
                write(&dir.join(file), &v)?;
            }
        }
        for d in b.weight_device().iter().flatten() {
            if let Some(w) = d.weight() {
                let v = format!("{}:{} {}", d.major(), d.minor(), w);
                write(&dir.join("blkio.weight_device"), &v)?;
            }
        }
        Ok(())
    }

    fn apply_devices(
        &self,
        rules: &[oci_spec::runtime::LinuxDeviceCgroup],
    ) -> Result<(), CgroupError> {
        let dir = self.require("devices")?;
        for r in rules {
            let num = |n: Option<i64>| n.map_or("*".to_string(), |n| n.to_string());
            let typ = r.typ().map_or("a", |t| match t {
                oci_spec::runtime::LinuxDeviceType::A => "a",
                oci_spec::runtime::LinuxDeviceType::B => "b",
                _ => "c",
            });
            let access = r.access().as_deref().unwrap_or("rwm");
            let rule = if typ == "a" {
                "a".to_string()
            } else {
                format!("{typ} {}:{} {access}", num(r.major()), num(r.minor()))
            };
            let file = if r.allow() {
                "devices.allow"
            } else {
                "devices.deny"
            };
            write(&dir.join(file), &rule)?;
        }
        Ok(())
    }
}

/// cpuset.cpus and cpuset.mems of a new v1 cpuset cgroup start empty, and a
/// task cannot join a cgroup with empty ones: copy them down from the parent
/// for every level of `rel` that is still empty.
fn inherit_cpuset(hierarchy: &Path, rel: &Path) -> Result<(), CgroupError> {
    let mut parent = hierarchy.to_path_buf();
    for part in rel.components() {
        let child = parent.join(part);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let mine = std::fs::read_to_string(child.join(file)).unwrap_or_default();
            if mine.trim().is_empty() {
                let theirs = read(&parent.join(file))?;
                write(&child.join(file), theirs.trim())?;
            }
        }
        parent = child;
    }
    Ok(())
}

impl Cgroup for CgroupV1 {
    fn path(&self) -> &str {
        &self.path
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(m) = r.memory() {
            self.apply_memory(m)?;
        }
        if let Some(c) = r.cpu() {
            self.apply_cpu(c)?;
        }
        if let Some(p) = r.pids() {
            let v = if p.limit() > 0 {
                p.limit().to_string()
            } else {
                "max".to_string()
            };
            write(&self.require("pids")?.join("pids.max"), &v)?;
        }
        if let Some(b) = r.block_io() {
            self.apply_block_io(b)?;
        }
        for h in r.hugepage_limits().iter().flatten() {
            let dir = self.require("hugetlb")?;
            let f = dir.join(format!("hugetlb.{}.limit_in_bytes", h.page_size()));
            write(&f, &h.limit().to_string())?;
        }
        if let Some(devs) = r.devices().as_deref().filter(|d| !d.is_empty()) {
            self.apply_devices(devs)?;
        }
        if let Some(n) = r.network() {
            if let Some(id) = n.class_id() {
                write(
                    &self.require("net_cls")?.join("net_cls.classid"),
                    &id.to_string(),
                )?;
            }
            for p in n.priorities().iter().flatten() {
                let v = format!("{} {}", p.name(), p.priority());
                write(&self.require("net_prio")?.join("net_prio.ifpriomap"), &v)?;
            }
        }
        if r.unified().as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(self.unsupported("linux.resources.unified (cgroup v2 only)"));
        }
        if r.rdma().as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(self.unsupported("rdma limits"));
        }
        Ok(())
    }

    fn oom_kill_count(&self) -> u64 {
        self.dir("memory")
            .and_then(|d| read_keyed(&d.join("memory.oom_control"), "oom_kill"))
            .unwrap_or(0)
    }

    fn stats(&self) -> CgroupStats {
        let num = |ctl: &str, file: &str| {
            self.dir(ctl)
                .and_then(|d| read_u64(&d.join(file)))
                .unwrap_or(0)
        };
        CgroupStats {
            memory_usage_bytes: num("memory", "memory.usage_in_bytes"),
            cpu_usage_ns: num("cpuacct", "cpuacct.usage"),
            pids: num("pids", "pids.current"),
        }
    }

    fn pids(&self) -> Vec<i32> {
        self.procs_file().map(|f| read_pids(&f)).unwrap_or_default()
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let Some(procs) = self.procs_file() else {
            return Ok(());
        };
        if !procs.exists() {
            return Ok(());
        }
        let freezer_state = self.dir("freezer").map(|d| d.join("freezer.state"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if read_pids(&procs).is_empty() {
                return Ok(());
            }
            // Freezing first stops a fork bomb from outrunning the kill loop;
            // frozen tasks die as soon as they are thawed.
            if let Some(f) = freezer_state.as_ref() {
                if write(f, "FROZEN").is_ok() {
                    poll_until(Duration::from_secs(1), || {
                        std::fs::read_to_string(f).is_ok_and(|s| s.trim() == "FROZEN")
                    });
                }
            }
            for pid in read_pids(&procs) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // Thaw even if FROZEN was never reached (a task stuck in
            // uninterruptible sleep): killed tasks must be allowed to run to exit.
            if let Some(f) = freezer_state.as_ref() {
                write(f, "THAWED")?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if poll_until(left.min(Duration::from_secs(2)), || {
                read_pids(&procs).is_empty()
            }) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout {
                    path: self.path.clone(),
                    pids: read_pids(&procs),
                });
            }
        }
    }

    fn remove(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for (_, dir) in &self.dirs {
            if let Err(e) = remove_tree(dir) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
