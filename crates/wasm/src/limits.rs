//! Per-container limits inside the shared engine: memory (linear memories
//! and tables) through wasmtime's resource limiter, CPU through a budget
//! checked at every epoch tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Caps what a store's memories and tables may grow to, in bytes, and
/// remembers that the cap was hit (the container is then `OOMKilled`).
#[derive(Debug)]
pub struct MemoryLimiter {
    limit: Option<u64>,
    used: u64,
    hit: Arc<AtomicBool>,
}

/// Bytes a table element counts for (a reference).
const TABLE_ELEMENT_BYTES: u64 = 8;

impl MemoryLimiter {
    pub fn new(limit: Option<u64>) -> MemoryLimiter {
        MemoryLimiter {
            limit,
            used: 0,
            hit: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set once a grow was refused for the limit.
    pub fn hit_flag(&self) -> Arc<AtomicBool> {
        self.hit.clone()
    }

    fn grow(&mut self, what: &str, more: u64) -> wasmtime::Result<bool> {
        let Some(limit) = self.limit else {
            self.used += more;
            return Ok(true);
        };
        if self.used + more > limit {
            self.hit.store(true, Ordering::SeqCst);
            // An error, not `false`: the container ends here, as a process
            // over its cgroup's memory limit does.
            wasmtime::bail!(
                "out of memory: growing {what} by {more} bytes would use {} of the container's memory limit of {limit} bytes",
                self.used + more
            );
        }
        self.used += more;
        Ok(true)
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow("a linear memory", desired.saturating_sub(current) as u64)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current) as u64 * TABLE_ELEMENT_BYTES;
        self.grow("a table", more)
    }
}

/// The CFS period the CPU share is measured over.
pub const CPU_PERIOD: Duration = Duration::from_millis(100);

/// A container's CPU share: at most `milli`/1000 of a CPU per period,
/// measured as the CPU time of the thread that runs its store.
#[derive(Debug)]
pub struct CpuBudget {
    quota: Option<Duration>,
    period_start: Instant,
    cpu_at_start: Duration,
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl CpuBudget {
    pub fn new(milli: Option<u64>) -> CpuBudget {
        CpuBudget {
            quota: milli.map(|m| CPU_PERIOD * m.min(1_000_000) as u32 / 1000),
            period_start: Instant::now(),
            cpu_at_start: thread_cpu_time(),
        }
    }

    /// At a tick: how long to pause when the period's quota is spent.
    pub fn check(&mut self, now: Instant, cpu: Duration) -> Option<Duration> {
        let quota = self.quota?;
        let elapsed = now.duration_since(self.period_start);
        if elapsed >= CPU_PERIOD {
            self.period_start = now;
            self.cpu_at_start = cpu;
            return None;
        }
        if quota < CPU_PERIOD && cpu.saturating_sub(self.cpu_at_start) >= quota {
            return Some(CPU_PERIOD - elapsed);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn growth_past_the_limit_fails_and_is_remembered() {
        let mut l = MemoryLimiter::new(Some(10 << 20));
        assert!(l.memory_growing(0, 8 << 20, None).unwrap());
        let hit = l.hit_flag();
        assert!(!hit.load(Ordering::SeqCst));
        let err = l.memory_growing(8 << 20, 12 << 20, None).unwrap_err();
        assert!(err.to_string().contains("memory limit"), "{err}");
        assert!(hit.load(Ordering::SeqCst));
    }

    #[test]
    fn a_spent_quota_pauses_until_the_period_ends() {
        let mut b = CpuBudget::new(Some(200));
        let start = b.period_start;
        let cpu0 = b.cpu_at_start;
        assert_eq!(
            b.check(
                start + Duration::from_millis(10),
                cpu0 + Duration::from_millis(10)
            ),
            None
        );
        let pause = b
            .check(
                start + Duration::from_millis(30),
                cpu0 + Duration::from_millis(25),
            )
            .unwrap();
        assert_eq!(pause, Duration::from_millis(70));
        // A new period starts with a fresh quota.
        assert_eq!(
            b.check(
                start + Duration::from_millis(100),
                cpu0 + Duration::from_millis(25)
            ),
            None
        );
        assert!(CpuBudget::new(None)
            .check(Instant::now(), Duration::from_secs(9))
            .is_none());
    }
}
