//! The pod's on-disk record, read by `vmrun ps`, `logs`, `exec`, `stop` and `rm`
//! from other processes. Written atomically (temp file + rename) on every change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::plan::PodPlan;
use crate::runtime::ExitInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodPhase {
    Pending,
    Running,
    Stopping,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerPhase {
    Waiting,
    Running,
    Terminated,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub name: String,
    pub init: bool,
    pub phase: ContainerPhase,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub attempt: u32,
    pub ready: bool,
    pub last_exit: Option<ExitInfo>,
    pub reason: Option<String>,
    /// What `vmrun exec` needs to enter the container (runtime specific).
    pub exec_target: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub runtime: String,
    pub phase: PodPhase,
    pub supervisor_pid: u32,
    pub created: String,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    /// The pod's addresses on the CNI network (none: loopback only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<String>,
    pub containers: BTreeMap<String, ContainerRecord>,
}

impl PodRecord {
    /// The record of a pod about to start, supervised by this process.
    pub fn pending(plan: &PodPlan, runtime: &str) -> PodRecord {
        let containers = plan
            .init_containers
            .iter()
            .map(|c| (c, true))
            .chain(plan.containers.iter().map(|c| (c, false)))
            .map(|(c, init)| {
                (
                    c.name.clone(),
                    ContainerRecord {
                        name: c.name.clone(),
                        init,
                        phase: ContainerPhase::Waiting,
                        pid: None,
                        restarts: 0,
                        attempt: 0,
                        ready: false,
                        last_exit: None,
                        reason: None,
                        exec_target: None,
                    },
                )
            })
            .collect();
        PodRecord {
            name: plan.name.clone(),
            namespace: plan.namespace.clone(),
            uid: plan.uid.clone(),
            runtime: runtime.to_string(),
            phase: PodPhase::Pending,
            supervisor_pid: std::process::id(),
            created: chrono::Utc::now().to_rfc3339(),
            exit_code: None,
            message: None,
            pod_ips: Vec::new(),
            containers,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("pod {name:?} not found (see `vmrun ps`)")]
    NotFound { name: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: corrupt pod record: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
}

/// The directory of every pod: `<state root>/pods/<name>`.
pub fn pod_dir(state_root: &Path, name: &str) -> PathBuf {
    state_root.join("pods").join(name)
}

pub fn record_path(pod_dir: &Path) -> PathBuf {
    pod_dir.join("pod.json")
}

pub fn read(pod_dir: &Path) -> Result<PodRecord, StateError> {
    let path = record_path(pod_dir);
    let text = std::fs::read(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            StateError::NotFound {
                name: pod_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            }
        } else {
            StateError::Io {
                path: path.display().to_string(),
                source,
            }
        }
    })?;
    serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
        path: path.display().to_string(),
        source,
    })
}

pub fn list(state_root: &Path) -> Result<Vec<PodRecord>, StateError> {
    let dir = state_root.join("pods");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StateError::Io {
                path: dir.display().to_string(),
                source,
            })
        }
    };
    let mut pods = Vec::new();
    for entry in entries.flatten() {
        match read(&entry.path()) {
            Ok(p) => pods.push(p),
            // A pod directory being created has no record yet.
            Err(StateError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pods)
}

/// Whether process `pid` has exited and waits to be reaped (state Z or X in
/// `/proc/PID/stat`, after the command name, which may hold any byte).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// Whether the supervisor recorded in a pod record is still alive (a
/// zombie, killed but not yet reaped by its parent, is not).
pub fn supervisor_alive(record: &PodRecord) -> bool {
    record.supervisor_pid != 0
        && nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(record.supervisor_pid as i32),
            None,
        )
        .is_ok()
        && !is_zombie(record.supervisor_pid)
        && matches!(
            record.phase,
            PodPhase::Pending | PodPhase::Running | PodPhase::Stopping
        )
}

/// The live, shared pod record of the supervisor; every change is persisted.
pub struct StateStore {
    dir: PathBuf,
    record: Mutex<PodRecord>,
    changed: Condvar,
}

impl StateStore {
    pub fn create(dir: PathBuf, record: PodRecord) -> Result<Self, StateError> {
        let store = Self {
            dir,
            record: Mutex::new(record),
            changed: Condvar::new(),
        };
        store.update(|_| {})?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot(&self) -> PodRecord {
        self.record
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn update(&self, change: impl FnOnce(&mut PodRecord)) -> Result<(), StateError> {
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut record);
        self.changed.notify_all();
        let path = record_path(&self.dir);
        let tmp = self.dir.join("pod.json.tmp");
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_vec_pretty(&*record).expect("pod records always serialize");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// Blocks until the record satisfies `ready`, and returns that record.
    pub fn wait_for(&self, ready: impl Fn(&PodRecord) -> bool) -> PodRecord {
        let guard = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self
            .changed
            .wait_while(guard, |r| !ready(r))
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }

    pub fn container(&self, name: &str, change: impl FnOnce(&mut ContainerRecord)) {
        // State writes are best effort once the pod runs: a full disk must not kill it.
        let _ = self.update(|r| {
            if let Some(c) = r.containers.get_mut(name) {
                change(c);
            }
        });
    }
}
