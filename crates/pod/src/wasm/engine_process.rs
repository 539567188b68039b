//! The pod's wasm engine process (`vmrun-wasm`), seen from the controller:
//! spawned into the pod's network namespace and cgroup, told to start and
//! signal containers over the [`protocol`](super::protocol) channel, its
//! events read by one thread that wakes whoever waits on a container.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmrun_container::cgroups::Cgroup;

use super::protocol::{self, Event, Request, StartRequest, ENGINE_SOCKET_FD};
use crate::runtime::ExitInfo;

/// How the engine is started.
#[derive(Debug)]
pub(crate) struct EngineLaunch {
    pub binary: PathBuf,
    pub cache_dir: PathBuf,
    /// Pooling allocator slots: enough for every container and restarts.
    pub instances: u32,
    /// Largest linear memory any container may have.
    pub max_memory: u64,
    /// The pod's network namespace to start in (None: the host's).
    pub netns: Option<PathBuf>,
    /// The engine's own cgroup, its resources applied.
    pub cgroup: Box<dyn Cgroup>,
    /// The engine's stderr (its own errors and panics).
    pub log: PathBuf,
    /// The pod's directory: on the engine's command line, so `ps` tells
    /// whose engine it is.
    pub pod_dir: PathBuf,
}

#[derive(Debug, Clone)]
enum Slot {
    Starting,
    Running,
    StartFailed(String),
    Exited(ExitInfo),
}

pub(crate) struct EngineProcess {
    pid: i32,
    sock: OwnedFd,
    slots: Mutex<HashMap<u64, Slot>>,
    changed: Condvar,
    child: Mutex<Option<Child>>,
    cgroup: Box<dyn Cgroup>,
    /// Why the engine is gone, once it is.
    gone: Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    #[error("starting the wasm engine {binary}: {message}")]
    Spawn { binary: String, message: String },
    #[error("the pod's wasm engine is gone: {0}")]
    Gone(String),
    #[error("talking to the wasm engine: {0}")]
    Channel(#[from] protocol::ChannelError),
    #[error("{0}")]
    StartFailed(String),
    #[error("the wasm engine did not answer within {0:?}")]
    Timeout(Duration),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EngineProcess {
    pub(crate) fn spawn(launch: EngineLaunch) -> Result<Arc<EngineProcess>, EngineError> {
        let spawn_err = |message: String| EngineError::Spawn {
            binary: launch.binary.display().to_string(),
            message,
        };
        if !launch.binary.is_file() {
            return Err(spawn_err(
                "no such file (it is installed beside vmrun)".into(),
            ));
        }
        let (ours, theirs) = protocol::channel_pair().map_err(|e| spawn_err(e.to_string()))?;
        let netns = match &launch.netns {
            Some(path) => Some(
                std::fs::File::open(path)
                    .map_err(|e| spawn_err(format!("pod network {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let log = std::fs::File::create(&launch.log)
            .map_err(|e| spawn_err(format!("{}: {e}", launch.log.display())))?;
        let mut cmd = Command::new(&launch.binary);
        cmd.arg("--pod")
            .arg(&launch.pod_dir)
            .arg("--cache")
            .arg(&launch.cache_dir)
            .arg("--instances")
            .arg(launch.instances.to_string())
            .arg("--max-memory")
            .arg(launch.max_memory.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let engine_fd = theirs.as_raw_fd();
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (dup2, fcntl, setns) on fds that are
        // open in the parent for the duration of `spawn`.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if engine_fd == ENGINE_SOCKET_FD {
                    // Already in place: only drop close-on-exec.
                    if libc::fcntl(engine_fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(engine_fd, ENGINE_SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| spawn_err(e.to_string()))?;
        drop(theirs);
        let pid = child.id() as i32;
        // Until it reads its first request the engine runs nothing of the pod's.
        if let Err(e) = launch.cgroup.add_pid(pid) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(spawn_err(format!("joining the pod's cgroup: {e}")));
        }
        let engine = Arc::new(EngineProcess {
            pid,
            sock: ours,
            slots: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            child: Mutex::new(Some(child)),
            cgroup: launch.cgroup,
            gone: Mutex::new(None),
        });
        let reader = engine.clone();
        std::thread::Builder::new()
            .name("wasm-events".into())
            .spawn(move || reader.read_events())
            .map_err(|e| spawn_err(format!("event thread: {e}")))?;
        Ok(engine)
    }

    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    pub(crate) fn gone(&self) -> Option<String> {
        lock(&self.gone).clone()
    }

    /// Starts a container and waits until it runs or failed to.
    pub(crate) fn start(
        &self,
        request: StartRequest,
        stdout: &OwnedFd,
        stderr: &OwnedFd,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        let id = request.id;
        if let Some(why) = self.gone() {
            return Err(EngineError::Gone(why));
        }
        lock(&self.slots).insert(id, Slot::Starting);
        if let Err(e) = protocol::send(
            self.sock.as_fd(),
            &Request::Start(request),
            &[stdout.as_fd(), stderr.as_fd()],
        ) {
            lock(&self.slots).remove(&id);
            return Err(e.into());
        }
        let deadline = Instant::now() + timeout;
        let mut slots = lock(&self.slots);
        loop {
            match slots.get(&id) {
                Some(Slot::Starting) => {}
                Some(Slot::StartFailed(message)) => {
                    let message = message.clone();
                    slots.remove(&id);
                    return Err(EngineError::StartFailed(message));
                }
                // Exited already counts as started: its exit is waited for next.
                Some(_) => return Ok(()),
                None => return Err(EngineError::Gone("the container was forgotten".into())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EngineError::Timeout(timeout));
            }
            slots = self
                .changed
                .wait_timeout(slots, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(crate) fn signal(&self, id: u64, signal: i32) -> Result<(), EngineError> {
        if matches!(lock(&self.slots).get(&id), Some(Slot::Exited(_)) | None) {
            return Ok(());
        }
        if let Some(why) = self.gone() {
            return Err(EngineError::Gone(why));
        }
        protocol::send(self.sock.as_fd(), &Request::Signal { id, signal }, &[])?;
        Ok(())
    }

    /// Blocks until container `id` exits (or `timeout` passes: None).
    pub(crate) fn wait(&self, id: u64, timeout: Option<Duration>) -> Option<ExitInfo> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut slots = lock(&self.slots);
        loop {
            match slots.get(&id) {
                Some(Slot::Exited(exit)) => return Some(*exit),
                Some(Slot::StartFailed(_)) | None => {
                    return Some(ExitInfo {
                        code: 128 + libc::SIGKILL,
                        signal: Some(libc::SIGKILL),
                        oom_killed: false,
                    })
                }
                _ => {}
            }
            slots = match deadline {
                None => self.changed.wait(slots).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.changed
                        .wait_timeout(slots, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Forgets an exited container.
    pub(crate) fn forget(&self, id: u64) {
        lock(&self.slots).remove(&id);
    }

    /// Kills the engine and everything it runs, and reaps it; idempotent.
    pub(crate) fn kill(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.cgroup.kill_all();
    }

    pub(crate) fn remove_cgroup(&self) -> Result<(), String> {
        self.cgroup.remove().map_err(|e| e.to_string())
    }

    fn read_events(&self) {
        let why = loop {
            match protocol::recv::<Event>(self.sock.as_fd()) {
                Ok((event, _)) => self.apply(event),
                Err(protocol::ChannelError::Closed) => break self.exit_reason(),
                Err(e) => {
                    // A malformed event means the engine cannot be trusted to
                    // report exits any more: end it.
                    tracing::warn!("wasm engine {}: {e}", self.pid);
                    self.kill();
                    break format!("it sent a malformed event ({e})");
                }
            }
        };
        let oom = self.cgroup.oom_kill_count() > 0;
        let mut slots = lock(&self.slots);
        for slot in slots.values_mut() {
            match slot {
                Slot::Starting => *slot = Slot::StartFailed(format!("the wasm engine {why}")),
                Slot::Running => {
                    *slot = Slot::Exited(ExitInfo {
                        code: 128 + libc::SIGKILL,
                        signal: Some(libc::SIGKILL),
                        oom_killed: oom,
                    })
                }
                _ => {}
            }
        }
        *lock(&self.gone) = Some(why);
        self.changed.notify_all();
    }

    fn apply(&self, event: Event) {
        let mut slots = lock(&self.slots);
        match event {
            Event::Started { id } => {
                if let Some(slot @ Slot::Starting) = slots.get_mut(&id) {
                    *slot = Slot::Running;
                }
            }
            Event::StartFailed { id, message } => {
                if slots.contains_key(&id) {
                    slots.insert(id, Slot::StartFailed(message));
                }
            }
            Event::Exited {
                id,
                code,
                signal,
                oom_killed,
            } => {
                if slots.contains_key(&id) {
                    slots.insert(
                        id,
                        Slot::Exited(ExitInfo {
                            code,
                            signal,
                            oom_killed,
                        }),
                    );
                }
            }
        }
        self.changed.notify_all();
    }

    /// Reaps the engine after its channel closed and says how it ended.
    fn exit_reason(&self) -> String {
        let Some(mut child) = lock(&self.child).take() else {
            return "was stopped".into();
        };
        match child.wait() {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (_, Some(sig)) if self.cgroup.oom_kill_count() > 0 => {
                        format!("was killed by the kernel's OOM killer (signal {sig}): the pod's memory limit")
                    }
                    (_, Some(sig)) => format!("was killed by signal {sig}"),
                    (Some(code), _) => format!("exited with status {code}"),
                    _ => "exited".into(),
                }
            }
            Err(e) => format!("exited ({e})"),
        }
    }
}

/// The engine's log, for error messages that need its last words.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}
