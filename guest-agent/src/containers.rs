//! The containers of the guest: create/start/exec/signal/wait/remove on top
//! of the synchronous container library, whose blocking calls run on
//! tokio's blocking pool.
//!
//! Every started process gets a blocking-pool thread parked in its `wait()`
//! from the start: it reaps the process as soon as it exits (a PID-namespace
//! init cannot finish exiting before that) and publishes the status that
//! `WaitProcess` callers await.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::signal::Signal;
use oci_spec::runtime::{Process, Spec};
use tonic::Status;
use vmrun_container::{
    cgroups, Console, Container, ContainerConfig, Created, ExecProcess, LinuxSyscall, Stdio,
};
use vmrun_proto::v1::{create_container_request::Rootfs as RootfsSource, ImageDisk};

use crate::oom::OomMonitor;
use crate::process::{make_stdio, tty_io, ExitCell, ExitInfo, ProcessIo, PtyHome, StdioError};
use crate::sandbox::PAUSE_CGROUP;

/// The status reported for a container that was removed before it ran, or
/// whose start failed: as if SIGKILLed.
const KILLED: ExitInfo = ExitInfo {
    code: 128 + libc::SIGKILL,
    signal: libc::SIGKILL,
    oom_killed: false,
};

/// Errors of every container RPC. Messages name the container (and exec)
/// and what failed inside the guest.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("process {exec:?} of container {id:?} not found")]
    ExecNotFound { id: String, exec: String },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("container {id:?} is {state}: {wanted}")]
    State {
        id: String,
        state: &'static str,
        wanted: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Create(#[from] vmrun_container::CreateError),
    #[error(transparent)]
    Start(#[from] vmrun_container::StartError),
    #[error(transparent)]
    Exec(#[from] vmrun_container::ExecError),
    #[error(transparent)]
    Signal(#[from] vmrun_container::SignalError),
    #[error(transparent)]
    Destroy(#[from] vmrun_container::DestroyError),
    #[error("container {id:?}: cgroup: {source}")]
    Cgroup {
        id: String,
        source: vmrun_container::cgroups::CgroupError,
    },
    #[error(transparent)]
    Stdio(#[from] StdioError),
    #[error("{0}: the agent's worker thread failed")]
    Worker(String),
}

impl From<ContainerError> for Status {
    fn from(e: ContainerError) -> Self {
        use vmrun_container::{CreateError, DestroyError, ExecError, SignalError, StartError};
        let msg = e.to_string();
        match e {
            ContainerError::NotFound(_) | ContainerError::ExecNotFound { .. } => {
                Status::not_found(msg)
            }
            ContainerError::Exists(_) => Status::already_exists(msg),
            ContainerError::Invalid { .. }
            | ContainerError::Create(CreateError::InvalidSpec { .. })
            | ContainerError::Exec(ExecError::InvalidProcess { .. }) => {
                Status::invalid_argument(msg)
            }
            ContainerError::State { .. } | ContainerError::Signal(SignalError::Exited(_)) => {
                Status::failed_precondition(msg)
            }
            // The executable is missing or not executable: the spec's fault.
            ContainerError::Start(StartError::Exec { .. })
            | ContainerError::Exec(ExecError::Failed { .. }) => Status::failed_precondition(msg),
            ContainerError::Destroy(DestroyError::Busy { .. }) => Status::unavailable(msg),
            ContainerError::Stdio(e) => e.into(),
            _ => Status::internal(msg),
        }
    }
}

enum Phase {
    Created(Created),
    Starting,
    Running(Arc<Container>),
    /// Start failed (the library cleaned up; StartContainer returned why).
    Failed,
    Removed,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Created(_) => "created",
            Phase::Starting => "starting",
            Phase::Running(_) => "running",
            Phase::Failed => "failed to start",
            Phase::Removed => "removed",
        }
    }
}

struct ExecEntry {
    process: Arc<ExecProcess>,
    io: Arc<ProcessIo>,
    exit: Arc<ExitCell>,
}

struct ContainerEntry {
    id: String,
    dir: PathBuf,
    cgroup_path: String,
    phase: Mutex<Phase>,
    io: Arc<ProcessIo>,
    exit: Arc<ExitCell>,
    execs: Mutex<HashMap<String, Arc<ExecEntry>>>,
    /// The spec's `linux.seccomp`: exec'd processes get it too.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs blocking container-library work off the async runtime.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ContainerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ContainerError::Worker(what.to_string()))
}

/// A process's exit status as the protocol reports it.
fn exit_info(s: vmrun_container::ExitStatus, oom_killed: bool) -> ExitInfo {
    ExitInfo {
        code: s.code,
        signal: s.signal.unwrap_or(0),
        oom_killed,
    }
}

/// Ids become directory and cgroup names.
pub(crate) fn check_id(kind: &str, id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != PAUSE_CGROUP
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::Invalid {
            what: format!("{kind} id {id:?}"),
            reason: format!(
                "use 1-128 of [A-Za-z0-9._-], not starting with '.', and not {PAUSE_CGROUP:?}"
            ),
        })
    }
}

/// A relative path without `..`.
pub(crate) fn check_relative(what: &str, p: &str) -> Result<(), ContainerError> {
    if Path::new(p)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && !p.is_empty()
    {
        Ok(())
    } else {
        Err(ContainerError::Invalid {
            what: what.to_string(),
            reason: format!("{p:?} must be a relative path without \"..\""),
        })
    }
}

/// How long a disk the host attached after boot may take to show its size.
const DISK_ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
const DISK_POLL: Duration = Duration::from_millis(2);

/// A disk the host put in a spare slot after boot (CRI adds a pod's images
/// as its containers arrive) has size 0 until the guest's virtio-blk driver
/// handled the configuration-change interrupt; waits until sysfs shows a
/// size. Devices sysfs does not know (not a plain `/dev/NAME` disk) are
/// left to `mount` to judge.
fn wait_for_disk_size(device: &str, timeout: Duration) -> Result<(), String> {
    let Some(name) = device.strip_prefix("/dev/").filter(|n| !n.contains('/')) else {
        return Ok(());
    };
    let size_file = Path::new("/sys/class/block").join(name).join("size");
    let started = std::time::Instant::now();
    loop {
        match std::fs::read_to_string(&size_file) {
            Ok(text) if text.trim() != "0" => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", size_file.display())),
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "the disk is still empty (size 0) after {timeout:?}: the host did not attach it"
            ));
        }
        std::thread::sleep(DISK_POLL);
    }
}

pub(crate) struct Containers {
    containers_dir: PathBuf,
    images_dir: PathBuf,
    cgroup_parent: String,
    map: Mutex<HashMap<String, Arc<ContainerEntry>>>,
    /// Image disks mounted so far: device -> mount point. They stay mounted
    /// until the guest stops (several containers share an image).
    images: Mutex<HashMap<String, PathBuf>>,
    /// Serialises creates so an id is checked and claimed atomically.
    create_lock: tokio::sync::Mutex<()>,
    /// OOM kills seen per container, published to `OomEvents` streams.
    pub(crate) oom: Arc<OomMonitor>,
}

impl Containers {
    pub(crate) fn new(state_dir: &Path, cgroup_parent: &str) -> Self {
        Self {
            containers_dir: state_dir.join("containers"),
            images_dir: state_dir.join("images"),
            cgroup_parent: cgroup_parent.to_string(),
            map: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            oom: Arc::new(OomMonitor::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<ContainerEntry>, ContainerError> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    pub(crate) fn ids(&self) -> Vec<String> {
        lock(&self.map).keys().cloned().collect()
    }

    /// Mounts the image disk read-only (once) and returns its mount point.
    fn mount_image(&self, disk: &ImageDisk) -> Result<PathBuf, ContainerError> {
        let mut images = lock(&self.images);
        if let Some(mp) = images.get(&disk.device) {
            return Ok(mp.clone());
        }
        let what = format!("image disk {}", disk.device);
        if !disk.device.starts_with("/dev/") {
            return Err(ContainerError::Invalid {
                what,
                reason: "the device must be a /dev path".into(),
            });
        }
        let fstype = if disk.fstype.is_empty() {
            "erofs"
        } else {
            disk.fstype.as_str()
        };
        wait_for_disk_size(&disk.device, DISK_ATTACH_TIMEOUT).map_err(|reason| {
            ContainerError::Invalid {
                what: what.clone(),
                reason,
            }
        })?;
        let mp = self
            .images_dir
            .join(disk.device.trim_start_matches("/dev/").replace('/', "_"));
        std::fs::create_dir_all(&mp).map_err(|source| ContainerError::Io {
            what: format!("{what}: create {}", mp.display()),
            source,
        })?;
        mount(
            Some(disk.device.as_str()),
            &mp,
            Some(fstype),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            None::<&str>,
        )
        .map_err(|e| ContainerError::Io {
            what: format!("{what}: mount {fstype} read-only on {}", mp.display()),
            source: e.into(),
        })?;
        images.insert(disk.device.clone(), mp.clone());
        Ok(mp)
    }

    /// The overlay's lower directories, bottom first.
    fn lower_dirs(
        &self,
        id: &str,
        source: Option<RootfsSource>,
    ) -> Result<Vec<PathBuf>, ContainerError> {
        match source {
            Some(RootfsSource::Image(disk)) => {
                for l in &disk.layers {
                    check_relative(&format!("container {id:?}: image layer"), l)?;
                }
                let mp = self.mount_image(&disk)?;
                Ok(disk.layers.iter().map(|l| mp.join(l)).collect())
            }
            Some(RootfsSource::LayerDirs(dirs)) => {
                Ok(dirs.lower.iter().map(PathBuf::from).collect())
            }
            None => Err(ContainerError::Invalid {
                what: format!("container {id:?}"),
                reason: "no rootfs (image or layer_dirs) given".into(),
            }),
        }
    }

    pub(crate) async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        source: Option<RootfsSource>,
        stdin: bool,
    ) -> Result<i32, ContainerError> {
        check_id("container", id)?;
        let _claim = self.create_lock.lock().await;
        if lock(&self.map).contains_key(id) {
            return Err(ContainerError::Exists(format!("container {id:?}")));
        }
        let mut spec: Spec =
            serde_json::from_slice(spec_json).map_err(|e| ContainerError::Invalid {
                what: format!("container {id:?}: OCI spec"),
                reason: e.to_string(),
            })?;
        drop_proc_view_if_absent(&mut spec);
        // Mounting an image disk is one quick mount(2), done inline.
        let mut lower = self.lower_dirs(id, source)?;

        let dir = self.containers_dir.join(id);
        let io_err = |what: String| move |source| ContainerError::Io { what, source };
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        let _ = std::fs::remove_dir_all(&dir);
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
        }
        if lower.is_empty() {
            // overlayfs needs a lower dir; an image without layers gets an empty one.
            let empty = dir.join("empty");
            std::fs::create_dir_all(&empty)
                .map_err(io_err(format!("create {}", empty.display())))?;
            lower.push(empty);
        }
        // The host cannot know guest paths: the overlay goes on our mount point.
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(rootfs);
        spec.set_root(Some(root));
        let mut linux = spec.linux().clone().unwrap_or_default();
        let cgroup_path = match linux.cgroups_path() {
            Some(p) => p.to_string_lossy().into_owned(),
            None => format!("{}/{id}", self.cgroup_parent),
        };
        linux.set_cgroups_path(Some(PathBuf::from(&cgroup_path)));
        let seccomp = linux.seccomp().clone();
        spec.set_linux(Some(linux));

        let terminal = spec
            .process()
            .as_ref()
            .is_some_and(|p| p.terminal() == Some(true));
        // A terminal is opened by the init on the container's own devpts,
        // so it has a name there; pipes are made here.
        let (stdio, console, io) = if terminal {
            (Stdio::default(), Console::FromContainer, None)
        } else {
            let (stdio, io) = make_stdio(stdin, None)?;
            (stdio, Console::Passed, Some(io))
        };
        let config = ContainerConfig {
            id: id.to_string(),
            spec,
            rootfs: vmrun_container::Rootfs::Overlay { lower, upper, work },
            stdio,
            console,
        };
        let created = blocking("create container", move || {
            vmrun_container::create(config, &LinuxSyscall).map(|mut created| {
                let master = created.take_terminal();
                (created, master)
            })
        })
        .await?;
        let (created, io) = match (created, io) {
            (Ok((c, _)), Some(io)) => (c, io),
            (Ok((c, Some(master))), None) => match tty_io(master, stdin) {
                Ok(io) => (c, io),
                Err(e) => {
                    c.abort();
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e.into());
                }
            },
            (Ok((c, None)), None) => {
                c.abort();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ContainerError::Create(
                    vmrun_container::CreateError::Setup {
                        id: id.to_string(),
                        reason: "the container's init sent no terminal".into(),
                    },
                ));
            }
            (Err(e), _) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        let pid = created.pid();
        let entry = ContainerEntry {
            id: id.to_string(),
            dir,
            cgroup_path,
            phase: Mutex::new(Phase::Created(created)),
            io: Arc::new(io),
            exit: Arc::new(ExitCell::new()),
            execs: Mutex::new(HashMap::new()),
            seccomp,
        };
        lock(&self.map).insert(id.to_string(), Arc::new(entry));
        tracing::info!(container = id, pid, "container created");
        Ok(pid)
    }

    pub(crate) async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let entry = self.get(id)?;
        let created = {
            let mut phase = lock(&entry.phase);
            match std::mem::replace(&mut *phase, Phase::Starting) {
                Phase::Created(c) => c,
                other => {
                    let state = other.name();
                    *phase = other;
                    return Err(ContainerError::State {
                        id: id.to_string(),
                        state,
                        wanted: "only a created container can be started",
                    });
                }
            }
        };
        match blocking("start container", move || created.start()).await {
            Ok(Ok(container)) => {
                let container = Arc::new(container);
                // A fresh cgroup counts 0, but a reused path may not.
                self.oom.baseline(id, container.cgroup().oom_kill_count());
                *lock(&entry.phase) = Phase::Running(container.clone());
                let exit = entry.exit.clone();
                let oom = self.oom.clone();
                let id = id.to_string();
                tokio::task::spawn_blocking(move || {
                    let info = match container.wait() {
                        Ok(s) => exit_info(s, container.oom_killed()),
                        Err(e) => {
                            tracing::warn!(container = %id, "wait: {e}");
                            KILLED
                        }
                    };
                    // Before WaitProcess can report the exit, so a host
                    // that sees `oom_killed` has the event too.
                    oom.observe(&id, container.cgroup().oom_kill_count());
                    tracing::info!(container = %id, code = info.code, "container exited");
                    exit.set(info);
                });
                Ok(())
            }
            Ok(Err(e)) => {
                *lock(&entry.phase) = Phase::Failed;
                entry.exit.set(KILLED);
                Err(e.into())
            }
            Err(e) => {
                *lock(&entry.phase) = Phase::Failed;
                entry.exit.set(KILLED);
                Err(e)
            }
        }
    }

    fn running(&self, entry: &ContainerEntry) -> Result<Arc<Container>, ContainerError> {
        match &*lock(&entry.phase) {
            Phase::Running(c) => Ok(c.clone()),
            other => Err(ContainerError::State {
                id: entry.id.clone(),
                state: other.name(),
                wanted: "the container must be running",
            }),
        }
    }

    fn exec_entry(entry: &ContainerEntry, exec_id: &str) -> Result<Arc<ExecEntry>, ContainerError> {
        lock(&entry.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                id: entry.id.clone(),
                exec: exec_id.to_string(),
            })
    }

    pub(crate) async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdin: bool,
    ) -> Result<i32, ContainerError> {
        let entry = self.get(id)?;
        check_id("exec", exec_id)?;
        let container = self.running(&entry)?;
        if lock(&entry.execs).contains_key(exec_id) {
            return Err(ContainerError::Exists(format!(
                "process {exec_id:?} of container {id:?}"
            )));
        }
        let process: Process =
            serde_json::from_slice(process_json).map_err(|e| ContainerError::Invalid {
                what: format!("exec {exec_id:?} in container {id:?}: OCI process"),
                reason: e.to_string(),
            })?;
        let target = container.pid();
        let home = PtyHome { pid: target };
        let (stdio, io) = make_stdio(stdin, (process.terminal() == Some(true)).then_some(home))?;
        let cgroup = container.cgroup().path().to_string();
        let seccomp = entry.seccomp.clone();
        let process = blocking("exec", move || {
            vmrun_container::exec(
                target,
                &process,
                seccomp.as_ref(),
                Some(&cgroup),
                stdio,
                &LinuxSyscall,
            )
        })
        .await??;
        let process = Arc::new(process);
        let pid = process.pid();
        let exec = Arc::new(ExecEntry {
            process: process.clone(),
            io: Arc::new(io),
            exit: Arc::new(ExitCell::new()),
        });
        let exit = exec.exit.clone();
        tokio::task::spawn_blocking(move || {
            let info = match process.wait() {
                Ok(s) => exit_info(s, false),
                Err(_) => KILLED,
            };
            exit.set(info);
        });
        {
            let mut execs = lock(&entry.execs);
            if execs.contains_key(exec_id) {
                // Lost a race with a concurrent exec of the same id.
                let _ = exec.process.signal(Signal::SIGKILL);
                return Err(ContainerError::Exists(format!(
                    "process {exec_id:?} of container {id:?}"
                )));
            }
            execs.insert(exec_id.to_string(), exec);
        }
        Ok(pid)
    }

    pub(crate) fn signal(&self, id: &str, exec_id: &str, sig: i32) -> Result<(), ContainerError> {
        let entry = self.get(id)?;
        let sig = Signal::try_from(sig).map_err(|_| ContainerError::Invalid {
            what: format!("signal for container {id:?}"),
            reason: format!("{sig} is not a signal number"),
        })?;
        if exec_id.is_empty() {
            Ok(self.running(&entry)?.signal(sig)?)
        } else {
            Ok(Self::exec_entry(&entry, exec_id)?.process.signal(sig)?)
        }
    }

    /// The process's exit status once it has ended (in any phase: a
    /// container that is removed or fails to start reports SIGKILL).
    pub(crate) async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo, ContainerError> {
        let entry = self.get(id)?;
        let exit = if exec_id.is_empty() {
            entry.exit.clone()
        } else {
            Self::exec_entry(&entry, exec_id)?.exit.clone()
        };
        exit.wait()
            .await
            .ok_or_else(|| ContainerError::Worker(format!("wait for container {id:?}")))
    }

    pub(crate) fn process_io(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<ProcessIo>, String), ContainerError> {
        let entry = self.get(id)?;
        if exec_id.is_empty() {
            Ok((entry.io.clone(), format!("container {id:?}")))
        } else {
            let exec = Self::exec_entry(&entry, exec_id)?;
            Ok((
                exec.io.clone(),
                format!("process {exec_id:?} of container {id:?}"),
            ))
        }
    }

    /// Kills the container (and so its exec'd processes, which share its
    /// cgroup), removes its cgroup and files. Unknown ids are fine: the host
    /// may retry a removal.
    pub(crate) async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let Ok(entry) = self.get(id) else {
            return Ok(());
        };
        let phase = std::mem::replace(&mut *lock(&entry.phase), Phase::Removed);
        match phase {
            Phase::Created(created) => {
                blocking("abort container", move || created.abort()).await?;
                entry.exit.set(KILLED);
            }
            Phase::Running(container) => {
                // Kills since the last poll; the cgroup goes next.
                self.oom.observe(id, container.cgroup().oom_kill_count());
                let c = container.clone();
                if let Err(e) = blocking("destroy container", move || c.destroy()).await? {
                    *lock(&entry.phase) = Phase::Running(container);
                    return Err(e.into());
                }
            }
            Phase::Starting => {
                *lock(&entry.phase) = Phase::Starting;
                return Err(ContainerError::State {
                    id: id.to_string(),
                    state: "starting",
                    wanted: "retry the removal once StartContainer returned",
                });
            }
            Phase::Failed | Phase::Removed => {}
        }
        if let Err(e) = std::fs::remove_dir_all(&entry.dir) {
            tracing::warn!(container = id, "remove {}: {e}", entry.dir.display());
        }
        lock(&self.map).remove(id);
        self.oom.forget(id);
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    /// Usage of one container's cgroup, or of all containers (and the pause
    /// process) for an empty id.
    /// The cgroup's counters, its OOM kills, and (for a container, not the
    /// pod) what its writable layer holds.
    pub(crate) fn stats(
        &self,
        id: &str,
    ) -> Result<(cgroups::CgroupStats, u64, Option<vmrun_container::DirUsage>), ContainerError>
    {
        let (path, upper) = if id.is_empty() {
            (self.cgroup_parent.clone(), None)
        } else {
            let entry = self.get(id)?;
            (entry.cgroup_path.clone(), Some(entry.dir.join("upper")))
        };
        let cg = cgroups::open_existing(&path).map_err(|source| ContainerError::Cgroup {
            id: id.to_string(),
            source,
        })?;
        let layer = upper.map(|upper| vmrun_container::dir_usage(&upper));
        Ok((cg.stats(), cg.oom_kill_count(), layer))
    }

    /// Removes every container, logging failures. For shutdown; returns
    /// what failed.
    pub(crate) async fn remove_all(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for id in self.ids() {
            if let Err(e) = self.remove(&id).await {
                tracing::warn!(container = %id, "remove at shutdown: {e}");
                failed.push(e.to_string());
            }
        }
        failed
    }

    /// The running containers (including exited ones not removed yet:
    /// their cgroup is still there).
    pub(crate) fn running_containers(&self) -> Vec<(String, Arc<Container>)> {
        let entries: Vec<_> = lock(&self.map).values().cloned().collect();
        entries
            .into_iter()
            .filter_map(|e| match &*lock(&e.phase) {
                Phase::Running(c) => Some((e.id.clone(), c.clone())),
                _ => None,
            })
            .collect()
    }

    /// The cgroup path of a container whose cgroup exists: created,
    /// starting or running (until removed).
    pub(crate) fn live_cgroup(&self, id: &str) -> Result<String, ContainerError> {
        let entry = self.get(id)?;
        let phase = lock(&entry.phase);
        match &*phase {
            Phase::Created(_) | Phase::Starting | Phase::Running(_) => {
                Ok(entry.cgroup_path.clone())
            }
            other => Err(ContainerError::State {
                id: id.to_string(),
                state: other.name(),
                wanted: "its cgroup is gone",
            }),
        }
    }

    /// Unmounts the image disks. For shutdown, after `remove_all`; returns
    /// what failed.
    pub(crate) fn unmount_images(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for (device, mp) in lock(&self.images).drain() {
            if let Err(e) = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH) {
                let e = format!("unmount image {device} from {}: {e}", mp.display());
                tracing::warn!("{e}");
                failed.push(e);
            }
        }
        failed
    }
}

/// The host asks for the guest's /proc view by bind-mounting its files; a
/// guest that could not start it (a kernel without FUSE) drops those mounts
/// instead of failing the container, which then reads the kernel's own.
pub(crate) fn drop_proc_view_if_absent(spec: &mut Spec) {
    let view = Path::new(vmrun_procview::DEFAULT_MOUNTPOINT);
    let Some(mounts) = spec.mounts().clone() else {
        return;
    };
    let from_view =
        |m: &oci_spec::runtime::Mount| m.source().as_deref().is_some_and(|s| s.starts_with(view));
    if !mounts.iter().any(from_view) || vmrun_procview::is_served(view) {
        return;
    }
    tracing::warn!(
        "the /proc view is not served in this guest: containers read the kernel's /proc"
    );
    spec.set_mounts(Some(mounts.into_iter().filter(|m| !from_view(m)).collect()));
}
