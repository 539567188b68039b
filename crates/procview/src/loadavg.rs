//! Per-container load averages, as the kernel computes its own: every 5 s,
//! the number of runnable tasks in the cgroup folds into exponentially
//! decaying 1, 5 and 15 minute averages. A cgroup is sampled from the first
//! time one of its processes reads the view until none has for 15 minutes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const INTERVAL: Duration = Duration::from_secs(5);
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy)]
struct Entry {
    load: [f64; 3],
    last_read: Instant,
}

/// Shared between the filesystem (which reads and registers) and the
/// sampling thread.
#[derive(Debug, Clone, Default)]
pub struct Loads {
    inner: Arc<Mutex<HashMap<PathBuf, Entry>>>,
}

/// One step of the kernel's fixed-point `calc_load`, in floating point.
pub fn fold(load: [f64; 3], runnable: u32, interval: Duration) -> [f64; 3] {
    let secs = interval.as_secs_f64();
    let mut out = load;
    for (i, window) in [60.0, 300.0, 900.0].iter().enumerate() {
        let e = (-secs / window).exp();
        out[i] = load[i] * e + f64::from(runnable) * (1.0 - e);
    }
    out
}

impl Loads {
    /// The averages of `cgroup` (0 the first time), marking it read.
    pub fn read(&self, cgroup: &Path) -> [f64; 3] {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(cgroup.to_path_buf()).or_insert(Entry {
            load: [0.0; 3],
            last_read: Instant::now(),
        });
        e.last_read = Instant::now();
        e.load
    }

    /// Folds one sample of every tracked cgroup; `count` says how many of
    /// its tasks are runnable (None: the cgroup is gone, forget it).
    pub fn sample(&self, count: impl Fn(&Path) -> Option<u32>) {
        let keys: Vec<PathBuf> = {
            let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, e| e.last_read.elapsed() < FORGET_AFTER);
            map.keys().cloned().collect()
        };
        for key in keys {
            let n = count(&key);
            let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match n {
                Some(n) => {
                    if let Some(e) = map.get_mut(&key) {
                        e.load = fold(e.load, n, INTERVAL);
                    }
                }
                None => {
                    map.remove(&key);
                }
            }
        }
    }

    /// Samples every [`INTERVAL`] on a thread of its own, for the life of the process.
    pub fn spawn_sampler(&self, proc_root: PathBuf) {
        let loads = self.clone();
        std::thread::Builder::new()
            .name("loadavg".into())
            .spawn(move || loop {
                std::thread::sleep(INTERVAL);
                loads.sample(|dir| runnable_tasks(&proc_root, dir));
            })
            .map(drop)
            .unwrap_or_else(|e| eprintln!("vmrun-procview: no load sampler: {e}"));
    }
}

/// Threads of the cgroup `dir` that are running or in uninterruptible sleep
/// (what the kernel's load counts), or None when the cgroup is gone.
fn runnable_tasks(proc_root: &Path, dir: &Path) -> Option<u32> {
    let threads = std::fs::read_to_string(dir.join("cgroup.threads"))
        .or_else(|_| std::fs::read_to_string(dir.join("tasks")))
        .ok()?;
    let n = threads
        .lines()
        .filter(|tid| {
            std::fs::read_to_string(proc_root.join(tid).join("stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace()
                        .next()
                        .map(|st| st == "R" || st == "D")
                })
                .unwrap_or(false)
        })
        .count();
    Some(n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_busy_task_approaches_one() {
        let mut load = [0.0; 3];
        for _ in 0..12 {
            load = fold(load, 1, INTERVAL);
        }
        // One minute of one runnable task: 1 - e^-1 of the way to 1.
        assert!((load[0] - (1.0 - (-1.0f64).exp())).abs() < 1e-9, "{load:?}");
        assert!(load[1] < load[0] && load[2] < load[1]);
    }

    #[test]
    fn sampling_tracks_read_cgroups_and_forgets_gone_ones() {
        let loads = Loads::default();
        assert_eq!(loads.read(Path::new("/a")), [0.0; 3]);
        loads.read(Path::new("/b"));
        loads.sample(|p| (p == Path::new("/a")).then_some(2));
        assert!(loads.read(Path::new("/a"))[0] > 0.0);
        let map = loads.inner.lock().unwrap();
        assert!(
            !map.contains_key(Path::new("/b")),
            "a gone cgroup is forgotten"
        );
    }
}
