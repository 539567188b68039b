//! cgroup v2: a single unified hierarchy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::fsutil::{poll_until, read_keyed, read_pids, read_u64, remove_tree, write};
use super::{normalize, Cgroup, CgroupError, CgroupStats};

/// Controllers we delegate down to the container's cgroup when available.
const WANTED_CONTROLLERS: [&str; 6] = ["cpu", "cpuset", "io", "memory", "pids", "hugetlb"];

#[derive(Debug)]
pub struct CgroupV2 {
    path: String,
    dir: PathBuf,
}

/// OCI cpu.shares (2..262144, default 1024) to cgroup v2 cpu.weight
/// (1..10000, default 100), the conversion runc/crun/systemd agree on.
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// OCI blkio weight (10..1000) to io.weight (1..10000).
pub(crate) fn blkio_weight_to_io(w: u16) -> u64 {
    let w = u64::from(w.clamp(10, 1000));
    1 + ((w - 10) * 9999) / 990
}

impl CgroupV2 {
    pub(crate) fn create(root: &Path, path: &str) -> Result<Self, CgroupError> {
        let rel = normalize(path)?;
        // Every ancestor must delegate the controllers to its children
        // (cgroup.subtree_control) before the leaf gets the interface files.
        let mut cur = root.to_path_buf();
        for part in rel.components() {
            enable_controllers(&cur)?;
            cur.push(part);
            if !cur.exists() {
                std::fs::create_dir(&cur).map_err(|source| CgroupError::Create {
                    path: cur.clone(),
                    source,
                })?;
            }
        }
        Ok(Self {
            path: path.to_string(),
            dir: cur,
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn unsupported(&self, what: &str) -> CgroupError {
        CgroupError::Unsupported {
            path: self.path.clone(),
            what: what.to_string(),
        }
    }

    fn apply_memory(&self, m: &oci_spec::runtime::LinuxMemory) -> Result<(), CgroupError> {
        let as_v2 = |v: i64| {
            if v < 0 {
                "max".to_string()
            } else {
                v.to_string()
            }
        };
        if let Some(l) = m.limit() {
            write(&self.file("memory.max"), &as_v2(l))?;
        }
        if let Some(s) = m.swap() {
            // OCI swap is memory+swap; v2 limits swap alone.
            let swap_file = self.file("memory.swap.max");
            let value = match (s, m.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => {
                    if s < l {
                        return Err(self
                            .unsupported(&format!("memory.swap {s} lower than memory.limit {l}")));
                    }
                    (s - l).to_string()
                }
                _ => return Err(self.unsupported("memory.swap without memory.limit")),
            };
            if swap_file.exists() {
                write(&swap_file, &value)?;
            } else if value != "0" && value != "max" {
                return Err(self.unsupported("memory.swap (no swap accounting)"));
            }
        }
        if let Some(r) = m.reservation() {
            write(&self.file("memory.low"), &as_v2(r))?;
        }
        if m.swappiness().is_some() {
            return Err(self.unsupported("memory.swappiness"));
        }
        if m.disable_oom_killer() == Some(true) {
            return Err(self.unsupported("disabling the OOM killer"));
        }
        Ok(())
    }

    fn apply_cpu(&self, c: &oci_spec::runtime::LinuxCpu) -> Result<(), CgroupError> {
        if let Some(s) = c.shares().filter(|s| *s != 0) {
            write(&self.file("cpu.weight"), &shares_to_weight(s).to_string())?;
        }
        if c.quota().is_some() || c.period().is_some() {
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let period = c.period().filter(|p| *p != 0).unwrap_or(100_000);
            write(&self.file("cpu.max"), &format!("{quota} {period}"))?;
        }
        if let Some(idle) = c.idle() {
            write(&self.file("cpu.idle"), &idle.to_string())?;
        }
        if c.realtime_period().is_some() || c.realtime_runtime().is_some() {
            return Err(self.unsupported("realtime cpu scheduling"));
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            write(&self.file("cpuset.cpus"), cpus)?;
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            write(&self.file("cpuset.mems"), mems)?;
        }
        Ok(())
    }

    fn apply_io(&self, b: &oci_spec::runtime::LinuxBlockIo) -> Result<(), CgroupError> {
        if let Some(w) = b.weight() {
            write(
                &self.file("io.weight"),
                &format!("default {}", blkio_weight_to_io(w)),
            )?;
        }
        let throttles = [
            ("rbps", b.throttle_read_bps_device()),
            ("wbps", b.throttle_write_bps_device()),
            ("riops", b.throttle_read_iops_device()),
            ("wiops", b.throttle_write_iops_device()),
        ];
        for (key, devs) in throttles {
            for d in devs.iter().flatten() {
                let v = format!("{}:{} {key}={}", d.major(), d.minor(), d.rate());
                write(&self.file("io.max"), &v)?;
            }
        }
        for d in b.weight_device().iter().flatten() {
            if let Some(w) = d.weight() {
                let v = format!("{}:{} {}", d.major(), d.minor(), blkio_weight_to_io(w));
                write(&self.file("io.weight"), &v)?;
            }
        }
        Ok(())
    }
}

fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<String> = available
        .split_whitespace()
        .filter(|c| WANTED_CONTROLLERS.contains(c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&dir.join("cgroup.subtree_control"), &missing.join(" "))
}

impl Cgroup for CgroupV2 {
    fn path(&self) -> &str {
        &self.path
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.file("cgroup.procs"), &pid.to_string())
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
            write(&self.file("pids.max"), &v)?;
        }
        if let Some(b) = r.block_io() {
            self.apply_io(b)?;
        }
        for h in r.hugepage_limits().iter().flatten() {
            let f = self.file(&format!("hugetlb.{}.max", h.page_size()));
            write(&f, &h.limit().to_string())?;
        }
        // Device rules need an eBPF program on v2; not implemented. Like the
        // CRI default rules they only restrict what the container's own
        // /dev (built from linux.devices) already limits, so skip them.
        if r.network().is_some() {
            return Err(self.unsupported("network class/priority (v1 net_cls/net_prio only)"));
        }
        if r.rdma().as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(self.unsupported("rdma limits"));
        }
        for (key, value) in r.unified().iter().flatten() {
            if key.contains('/') || key.starts_with('.') || key.is_empty() {
                return Err(self.unsupported(&format!("unified key {key:?}")));
            }
            write(&self.file(key), value)?;
        }
        Ok(())
    }

    fn oom_kill_count(&self) -> u64 {
        read_keyed(&self.file("memory.events"), "oom_kill").unwrap_or(0)
    }

    fn stats(&self) -> CgroupStats {
        CgroupStats {
            memory_usage_bytes: read_u64(&self.file("memory.current")).unwrap_or(0),
            cpu_usage_ns: read_keyed(&self.file("cpu.stat"), "usage_usec").unwrap_or(0) * 1000,
            pids: read_u64(&self.file("pids.current")).unwrap_or(0),
        }
    }

    fn pids(&self) -> Vec<i32> {
        read_pids(&self.file("cgroup.procs"))
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        if !self.dir.exists() {
            return Ok(());
        }
        // "populated 0" covers sub-cgroups too; plain procs is the fallback.
        let empty = || match read_keyed(&self.file("cgroup.events"), "populated") {
            Some(p) => p == 0,
            None => read_pids(&self.file("cgroup.procs")).is_empty(),
        };
        let kill_file = self.file("cgroup.kill");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if empty() {
                return Ok(());
            }
            if kill_file.exists() {
                write(&kill_file, "1")?;
            } else {
                // Pre-5.14 kernels: freeze, kill what is listed, thaw.
                let freeze = self.file("cgroup.freeze");
                let frozen = freeze.exists() && write(&freeze, "1").is_ok();
                if frozen {
                    poll_until(Duration::from_secs(1), || {
                        read_keyed(&self.file("cgroup.events"), "frozen") == Some(1)
                    });
                }
                for pid in self.pids() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                if frozen {
                    write(&freeze, "0")?;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if poll_until(left.min(Duration::from_secs(2)), empty) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout {
                    path: self.path.clone(),
                    pids: self.pids(),
                });
            }
        }
    }

    fn remove(&self) -> Result<(), CgroupError> {
        remove_tree(&self.dir)
    }
}
