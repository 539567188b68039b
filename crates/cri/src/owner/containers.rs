//! One CRI container of the pod: created, running, exited, with what the
//! kubelet reads back (timestamps, exit code, reason).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::watch;
use vmrun_pod::logs::LogTarget;
use vmrun_pod::runtime::{ExitInfo, Running};

use super::attach::ContainerIo;
use crate::api;
use crate::translate::ContainerRequest;

/// CRI's ContainerState values.
pub mod state {
    pub const CREATED: i32 = 0;
    pub const RUNNING: i32 = 1;
    pub const EXITED: i32 = 2;
}

/// Signals a container's process off the async threads: a pod VM's
/// container is signalled through a blocking call to its guest agent.
/// A process already gone is not an error: stopping is idempotent.
async fn signal(running: &Arc<dyn Running>, signal: Signal) {
    let running = running.clone();
    let _ = tokio::task::spawn_blocking(move || running.signal(signal)).await;
}

/// containerd's exit code for a container whose process never started.
const START_ERROR_CODE: i32 = 128;

/// How long a killed container may take to be reported exited.
const KILL_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Created,
    Starting,
    Running,
    Exited,
}

pub struct RunState {
    pub phase: Phase,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub running: Option<Arc<dyn Running>>,
    pub log: Option<LogTarget>,
    pub resources: api::LinuxContainerResources,
    /// The last CPU sample (time ns, usage ns), for usage_nano_cores.
    pub cpu_sample: Option<(i64, u64)>,
}

pub struct Container {
    pub id: String,
    pub config: api::ContainerConfig,
    pub request: ContainerRequest,
    pub image: vmrun_image::Image,
    /// The image's disk, for a pod VM.
    pub block_image: Mutex<Option<std::path::PathBuf>>,
    pub created_at: i64,
    pub state: Mutex<RunState>,
    /// Its stdin and live output, for Attach.
    pub io: Arc<ContainerIo>,
    exited: watch::Sender<bool>,
}

impl Container {
    pub fn new(
        id: String,
        config: api::ContainerConfig,
        request: ContainerRequest,
        image: vmrun_image::Image,
    ) -> Self {
        let resources = config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .unwrap_or_default();
        Self {
            io: Arc::new(ContainerIo::new(&config)),
            id,
            config,
            request,
            image,
            block_image: Mutex::new(None),
            created_at: crate::now_ns(),
            state: Mutex::new(RunState {
                phase: Phase::Created,
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
                running: None,
                log: None,
                resources,
                cpu_sample: None,
            }),
            exited: watch::channel(false).0,
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    pub fn cri_state(&self) -> i32 {
        match self.phase() {
            Phase::Created | Phase::Starting => state::CREATED,
            Phase::Running => state::RUNNING,
            Phase::Exited => state::EXITED,
        }
    }

    pub fn attempt(&self) -> u32 {
        self.config.metadata.as_ref().map_or(0, |m| m.attempt)
    }

    pub fn running(&self) -> Option<Arc<dyn Running>> {
        let s = self.lock();
        (s.phase == Phase::Running)
            .then(|| s.running.clone())
            .flatten()
    }

    /// The start failed: exited without ever running, as containerd reports it.
    pub fn start_failed(&self, message: String) {
        let mut s = self.lock();
        s.phase = Phase::Exited;
        s.finished_at = crate::now_ns();
        s.exit_code = START_ERROR_CODE;
        s.reason = "StartError".into();
        s.message = message;
        drop(s);
        self.exited.send_replace(true);
    }

    pub fn started(&self, running: Arc<dyn Running>, log: LogTarget) {
        let mut s = self.lock();
        s.phase = Phase::Running;
        s.started_at = crate::now_ns();
        s.running = Some(running);
        s.log = Some(log);
    }

    pub fn finished(&self, exit: Result<ExitInfo, String>) {
        let mut s = self.lock();
        s.phase = Phase::Exited;
        s.finished_at = crate::now_ns();
        match exit {
            Ok(exit) => {
                s.exit_code = exit.code;
                s.reason = exit.reason().to_string();
                if exit.oom_killed {
                    s.message = "the container's memory limit was reached".into();
                }
            }
            Err(message) => {
                s.exit_code = 255;
                s.reason = "Error".into();
                s.message = message;
            }
        }
        drop(s);
        self.exited.send_replace(true);
    }

    /// Becomes true once the main process is reported exited (or never started).
    pub fn exited(&self) -> watch::Receiver<bool> {
        self.exited.subscribe()
    }

    /// Waits up to `timeout` for the main process to be reported exited.
    pub async fn wait_exited(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|exited| *exited))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// SIGTERM, `grace` to exit, then SIGKILL: StopContainer.
    pub async fn stop(&self, grace: Duration) -> Result<(), String> {
        let Some(running) = self.running() else {
            return Ok(());
        };
        if !grace.is_zero() {
            signal(&running, Signal::SIGTERM).await;
            if self.wait_exited(grace).await {
                return Ok(());
            }
        }
        signal(&running, Signal::SIGKILL).await;
        if self.wait_exited(KILL_WAIT).await {
            Ok(())
        } else {
            Err(format!(
                "container {}: still running {KILL_WAIT:?} after SIGKILL",
                self.id
            ))
        }
    }
}
