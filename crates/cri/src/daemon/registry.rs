//! The daemon's index of pods: their owners' connections, and which pod
//! each container belongs to. Rebuilt from the pods' directories at start,
//! so nothing here is the only record of anything.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;

use crate::api;
use crate::api::runtime_service_client::RuntimeServiceClient;
use crate::ids::{self, Resolved};
use crate::owner::{OwnerSettings, LOG_FILE, SOCKET_FILE};

/// How long an owner may take to make its sandbox.
const OWNER_START: Duration = Duration::from_secs(120);
/// How long an owner may take to end once its pod is removed.
const OWNER_EXIT: Duration = Duration::from_secs(10);

/// One pod as the daemon knows it.
pub struct Pod {
    pub id: String,
    pub dir: PathBuf,
    /// None when its owner is gone (crashed, killed): the pod is then served
    /// from its files, NOTREADY, until the kubelet stops and removes it.
    pub client: Option<RuntimeServiceClient<Channel>>,
    pub settings: OwnerSettings,
    pub config: api::PodSandboxConfig,
    /// The owner's pid, to wait for its end after RemovePodSandbox.
    pub owner_pid: Option<i32>,
    /// A pidfd of the owner, taken while it was known to run: tells its
    /// end apart from a recycled pid.
    pub owner_pidfd: Option<OwnedFd>,
}

impl Pod {
    fn new(
        id: String,
        dir: PathBuf,
        client: Option<RuntimeServiceClient<Channel>>,
        settings: OwnerSettings,
        config: api::PodSandboxConfig,
        owner_pid: Option<i32>,
        owner_pidfd: Option<OwnedFd>,
    ) -> Self {
        Self {
            id,
            dir,
            client,
            settings,
            config,
            owner_pid,
            owner_pidfd,
        }
    }

    /// Whether the owner is known to have ended (killed, crashed) while
    /// the pod is still on record.
    pub fn owner_ended(&self) -> bool {
        self.owner_pidfd.as_ref().is_some_and(|pidfd| {
            vmrun_pod::native::poll_exit(pidfd, Some(Duration::ZERO)).unwrap_or(false)
        })
    }

    /// The same pod with no owner to serve it: served from its files.
    fn orphaned(&self) -> Self {
        Self {
            id: self.id.clone(),
            dir: self.dir.clone(),
            client: None,
            settings: self.settings.clone(),
            config: self.config.clone(),
            owner_pid: None,
            owner_pidfd: None,
        }
    }

    /// Waits (bounded) until the owner process has exited.
    pub fn wait_owner_exit(&self) {
        let Some(pid) = self.owner_pid else { return };
        if let Ok(pidfd) = vmrun_pod::native::pidfd_open(pid) {
            let _ = vmrun_pod::native::poll_exit(&pidfd, Some(OWNER_EXIT));
        }
    }

    pub fn owner(&self) -> Result<RuntimeServiceClient<Channel>, Status> {
        self.client.clone().ok_or_else(|| self.gone())
    }

    /// The answer for a pod whose owner is gone.
    pub fn gone(&self) -> Status {
        Status::unavailable(format!(
            "pod sandbox {}: its owner process is gone; stop and remove the pod",
            self.id
        ))
    }

    /// After a failed call: whether the owner ended (or ends within
    /// `grace`: a killed process may still be exiting), so the failure was
    /// its death, not the call's.
    pub async fn ended_within(&self, grace: Duration) -> bool {
        let Some(pidfd) = self.owner_pidfd.as_ref().and_then(|fd| fd.try_clone().ok()) else {
            return false;
        };
        tokio::task::spawn_blocking(move || {
            vmrun_pod::native::poll_exit(&pidfd, Some(grace)).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }
}

#[derive(Default)]
struct Index {
    pods: HashMap<String, Arc<Pod>>,
    containers: HashMap<String, String>,
}

pub struct Registry {
    root: PathBuf,
    index: Mutex<Index>,
}

impl Registry {
    /// Finds the pods under `root` and connects to their owners.
    pub async fn recover(root: PathBuf) -> Self {
        let registry = Self {
            root: root.clone(),
            index: Mutex::new(Index::default()),
        };
        let Ok(entries) = std::fs::read_dir(&root) else {
            return registry;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !ids::is_id(&name) {
                continue;
            }
            let dir = entry.path();
            let (settings, config) = match OwnerSettings::read(&dir) {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!("{}: not a pod ({e:#}); leaving it", dir.display());
                    continue;
                }
            };
            let client = crate::unix::runtime_client(&dir.join(SOCKET_FILE))
                .await
                .ok();
            let owner_pid = match client.clone() {
                Some(client) => owner_pid(client, &name).await,
                None => {
                    tracing::warn!("pod sandbox {name}: its owner is gone; serving it as NOTREADY");
                    None
                }
            };
            let pod = Arc::new(Pod::new(
                name.clone(),
                dir,
                client,
                settings,
                config,
                owner_pid,
                // It answered just now, so the pid is still its own.
                owner_pid.and_then(|pid| vmrun_pod::native::pidfd_open(pid).ok()),
            ));
            registry.reindex_containers(&pod).await;
            registry.lock().pods.insert(name, pod);
        }
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let mut index = self.lock();
        let ids: Vec<String> = index.pods.keys().cloned().collect();
        ids.iter().map(|id| checked(&mut index, id)).collect()
    }

    async fn reindex_containers(&self, pod: &Pod) {
        let Some(mut client) = pod.client.clone() else {
            return;
        };
        let Ok(list) = client
            .list_containers(api::ListContainersRequest { filter: None })
            .await
        else {
            return;
        };
        let mut index = self.lock();
        for c in list.into_inner().containers {
            index.containers.insert(c.id, pod.id.clone());
        }
    }

    /// The pod `id` names (in full or by a unique prefix).
    pub fn pod(&self, id: &str) -> Result<Arc<Pod>, Status> {
        let mut index = self.lock();
        match ids::resolve(id, index.pods.keys()) {
            Resolved::One(full) => {
                let full = full.clone();
                Ok(checked(&mut index, &full))
            }
            Resolved::None => Err(crate::status::sandbox_not_found(id)),
            Resolved::Ambiguous => Err(Status::invalid_argument(format!(
                "pod sandbox id prefix {id:?} matches more than one pod"
            ))),
        }
    }

    /// The full id of a container and its pod.
    pub fn container(&self, id: &str) -> Result<(String, Arc<Pod>), Status> {
        let mut index = self.lock();
        let full = match ids::resolve(id, index.containers.keys()) {
            Resolved::One(full) => full.clone(),
            Resolved::None => return Err(crate::status::container_not_found(id)),
            Resolved::Ambiguous => {
                return Err(Status::invalid_argument(format!(
                    "container id prefix {id:?} matches more than one container"
                )))
            }
        };
        let pod_id = index.containers[&full].clone();
        if !index.pods.contains_key(&pod_id) {
            return Err(crate::status::container_not_found(id));
        }
        Ok((full, checked(&mut index, &pod_id)))
    }

    pub fn add_container(&self, id: String, pod: &str) {
        self.lock().containers.insert(id, pod.to_string());
    }

    pub fn forget_container(&self, id: &str) {
        self.lock().containers.remove(id);
    }

    pub fn forget_pod(&self, id: &str) {
        let mut index = self.lock();
        index.pods.remove(id);
        index.containers.retain(|_, pod| pod != id);
    }

    /// Makes the pod's directory and starts its owner; returns once the
    /// sandbox exists, or with the owner's reason, leaving nothing behind.
    pub async fn start_pod(
        &self,
        shim: &Path,
        settings: OwnerSettings,
        config: api::PodSandboxConfig,
    ) -> Result<Arc<Pod>, Status> {
        let dir = self.root.join(&settings.sandbox_id);
        let fail = |what: String| {
            let _ = std::fs::remove_dir_all(&dir);
            Status::internal(what)
        };
        std::fs::create_dir_all(&dir)
            .and_then(|_| settings.write(&dir, &config))
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let (shim, spawn_dir) = (shim.to_path_buf(), dir.clone());
        let started = tokio::task::spawn_blocking(move || spawn_owner(&shim, &spawn_dir))
            .await
            .map_err(|e| fail(format!("starting the pod owner: {e}")))?;
        let (owner_pid, owner_pidfd) = match started {
            Ok(owner) => owner,
            Err(why) => {
                // The owner undid its own work; its directory goes with the pod.
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Status::unknown(why));
            }
        };
        let client = crate::unix::runtime_client(&dir.join(SOCKET_FILE))
            .await
            .map_err(|e| fail(format!("connecting to the pod owner: {e}")))?;
        let pod = Arc::new(Pod::new(
            settings.sandbox_id.clone(),
            dir,
            Some(client),
            settings,
            config,
            Some(owner_pid),
            owner_pidfd,
        ));
        self.lock().pods.insert(pod.id.clone(), pod.clone());
        Ok(pod)
    }
}

/// The pod `id` of the index, as an orphan from now on if its owner has
/// ended since it was last looked at (it is then served from its files,
/// NOTREADY, and StopPodSandbox/RemovePodSandbox undo what it left).
fn checked(index: &mut Index, id: &str) -> Arc<Pod> {
    let pod = index.pods[id].clone();
    if pod.client.is_none() || !pod.owner_ended() {
        return pod;
    }
    tracing::warn!("pod sandbox {id}: its owner process ended; serving the pod as NOTREADY");
    let orphan = Arc::new(pod.orphaned());
    index.pods.insert(id.to_string(), orphan.clone());
    orphan
}

/// Starts `vmrun-cri-shim` detached (its own session, so it outlives the
/// daemon and the daemon's terminal) and reads its word on the ready pipe.
fn spawn_owner(shim: &Path, dir: &Path) -> Result<(i32, Option<OwnedFd>), String> {
    if !shim.is_file() {
        return Err(format!(
            "{} not found (build the workspace: cargo build)",
            shim.display()
        ));
    }
    let log = std::fs::File::create(dir.join(LOG_FILE))
        .map_err(|e| format!("{}: {e}", dir.join(LOG_FILE).display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(shim);
    cmd.arg(dir)
        .arg("--ready-fd")
        .arg(vmrun_pod::detach::READY_FD.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    let (mut child, ready_r) = vmrun_pod::detach::spawn_with_ready_pipe(&mut cmd)
        .map_err(|e| format!("starting {}: {e}", shim.display()))?;
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&ready_r),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout = nix::poll::PollTimeout::try_from(OWNER_START.as_millis() as i32)
        .unwrap_or(nix::poll::PollTimeout::MAX);
    let polled = nix::poll::poll(&mut fds, timeout);
    if !matches!(polled, Ok(n) if n > 0) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "the pod owner did not make the sandbox within {OWNER_START:?}"
        ));
    }
    let mut answer = String::new();
    let _ = std::fs::File::from(ready_r).read_to_string(&mut answer);
    let answer = answer.trim();
    if answer == "ok" {
        let pid = child.id() as i32;
        // Before the reaper can free the pid: this pidfd is the owner's.
        let pidfd = vmrun_pod::native::pidfd_open(pid).ok();
        // The owner runs on; reap it when it ends so no zombie stays.
        std::thread::spawn(move || child.wait());
        return Ok((pid, pidfd));
    }
    let _ = child.wait();
    if answer.is_empty() {
        let log = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
        return Err(format!(
            "the pod owner exited before the sandbox was made: {}",
            log.trim()
        ));
    }
    Err(answer.to_string())
}

/// The pid a running owner reports in its verbose status.
async fn owner_pid(mut client: RuntimeServiceClient<Channel>, id: &str) -> Option<i32> {
    let status = client
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        })
        .await
        .ok()?
        .into_inner();
    crate::owner::verbose_info(&status.info)["ownerPid"]
        .as_i64()
        .map(|p| p as i32)
}
