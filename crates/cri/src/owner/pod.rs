//! The pod an owner holds: its sandbox (through the runtime seam) and its
//! containers, and every operation the kubelet asks of them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tonic::Status;
use vmrun_pod::logs::{self, LogTarget};
use vmrun_pod::native::CGROUP_PARENT;
use vmrun_pod::plan::PodPlan;
use vmrun_pod::runtime::{Launch, Runtime, RuntimeError, Sandbox};
use vmrun_pod::spec::ImageDefaults;

use super::containers::{Container, Phase};
use super::exec::{exec_sync, ExecError, ExecResult};
use super::network::PodNetwork;
use super::{OwnerSettings, SETTINGS_FILE};
use crate::api;
use crate::config::RuntimeKind;
use crate::status::{container_not_found, runtime_status};
use crate::translate;

/// How long log copying may go on after a container's main process ended
/// (a process it left behind in a shared pid namespace keeps the pipe open).
const LOG_DRAIN: Duration = Duration::from_secs(2);
/// An ExecSync without a timeout (0) still ends some day.
const NO_EXEC_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// CRI's PodSandboxState values.
pub mod sandbox_state {
    pub const READY: i32 = 0;
    pub const NOTREADY: i32 = 1;
}

pub struct Owner {
    pub id: String,
    pub settings: OwnerSettings,
    pub config: api::PodSandboxConfig,
    pub plan: PodPlan,
    pub dir: PathBuf,
    store: vmrun_image::ImageStore,
    sandbox: Mutex<Option<Arc<dyn Sandbox>>>,
    /// Attached until StopPodSandbox detaches it.
    network: Mutex<Option<Arc<PodNetwork>>>,
    /// The pod's IPs, kept after the network is detached (CRI reports them
    /// for a NOTREADY sandbox too).
    pub ips: Vec<std::net::IpAddr>,
    containers: Mutex<BTreeMap<String, Arc<Container>>>,
    /// The pod cgroup's last CPU sample (time, usage), for usage_nano_cores.
    sandbox_cpu: Mutex<Option<(i64, u64)>>,
    removed: tokio::sync::watch::Sender<bool>,
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

impl Owner {
    /// Reads the pod's files and makes its sandbox.
    pub async fn create(dir: &Path) -> anyhow::Result<Self> {
        let (settings, config) = OwnerSettings::read(dir)?;
        let plan = translate::pod_plan(&settings.sandbox_id, &settings.handler, &config)?;
        let store = vmrun_image::ImageStore::open(&settings.image_root, Default::default())
            .with_context(|| {
                format!("opening the image store {}", settings.image_root.display())
            })?;
        let sandbox: Arc<dyn Sandbox> = match settings.runtime {
            RuntimeKind::Native => {
                let runtime = settings.native.clone();
                let pod = plan.clone();
                tokio::task::spawn_blocking(move || runtime.create_sandbox(&pod))
                    .await
                    .context("sandbox creation panicked")??
            }
            RuntimeKind::Wasm => {
                let native = &settings.native;
                let runtime = vmrun_pod::wasm::WasmRuntime::beside_current_exe(
                    native.state_root.clone(),
                    &settings.image_root,
                    native.pids_limit,
                )
                .context("locating vmrun-cri-shim")?;
                let pod = plan.clone();
                tokio::task::spawn_blocking(move || runtime.create_sandbox(&pod))
                    .await
                    .context("sandbox creation panicked")??
            }
            RuntimeKind::Vm => {
                let runtime = settings.vm.clone().with_context(|| {
                    format!("{}: the vm handler's settings are missing", SETTINGS_FILE)
                })?;
                let pod = plan.clone();
                tokio::task::spawn_blocking(move || runtime.create_sandbox(&pod))
                    .await
                    .context("sandbox creation panicked")??
            }
        };
        let network = match (&settings.network, sandbox.network_holder_pid()) {
            (Some(net), Some(pid)) => {
                let (net, id, dir, cfg) = (
                    net.clone(),
                    settings.sandbox_id.clone(),
                    dir.to_path_buf(),
                    config.clone(),
                );
                let attached = tokio::task::spawn_blocking(move || {
                    PodNetwork::attach(&net, &dir, pid, |netns| {
                        super::network::attachment(&id, netns, &cfg)
                    })
                })
                .await
                .context("network setup panicked")?;
                let joined = match attached {
                    Ok(n) => {
                        // A pod VM joins its guest to the interface CNI made.
                        let (joining, netns) = (sandbox.clone(), n.netns_path().to_path_buf());
                        match tokio::task::spawn_blocking(move || joining.network_attached(&netns))
                            .await
                        {
                            Ok(Ok(())) => Ok(n),
                            Ok(Err(e)) => {
                                let _ = n.detach();
                                Err(anyhow::Error::from(e))
                            }
                            Err(e) => {
                                let _ = n.detach();
                                Err(anyhow::anyhow!("joining the pod network panicked: {e}"))
                            }
                        }
                    }
                    Err(e) => Err(e.into()),
                };
                match joined {
                    Ok(n) => Some(Arc::new(n)),
                    Err(e) => {
                        let doomed = sandbox.clone();
                        let _ = tokio::task::spawn_blocking(move || doomed.destroy()).await;
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        Ok(Self {
            id: settings.sandbox_id.clone(),
            settings,
            config,
            plan,
            dir: dir.to_path_buf(),
            store,
            ips: network.as_ref().map(|n| n.ips.clone()).unwrap_or_default(),
            network: Mutex::new(network),
            sandbox: Mutex::new(Some(sandbox)),
            containers: Mutex::new(BTreeMap::new()),
            sandbox_cpu: Mutex::new(None),
            removed: tokio::sync::watch::channel(false).0,
        })
    }

    /// Resolves once the pod has been removed: the owner's end.
    pub async fn removed(&self) {
        let mut rx = self.removed.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    fn sandbox(&self) -> Option<Arc<dyn Sandbox>> {
        self.sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn ready(&self) -> bool {
        self.sandbox().is_some()
    }

    fn list(&self) -> Vec<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn containers(&self) -> Vec<Arc<Container>> {
        self.list()
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, Status> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| container_not_found(id))
    }

    /// The directory of a container's writable layer (the native runtime's layout).
    fn upper_dir(&self, c: &Container) -> PathBuf {
        vmrun_pod::state::pod_dir(&self.settings.native.state_root, &self.plan.name)
            .join("containers")
            .join(format!("{}-{}", c.id, c.attempt()))
            .join("upper")
    }

    pub fn cgroup_of(&self, c: &Container) -> String {
        format!("{CGROUP_PARENT}/{}/{}", self.id, c.id)
    }

    pub fn log_path(&self, c: &Container) -> Option<PathBuf> {
        c.request.log_path.clone()
    }

    pub async fn create_container(&self, config: api::ContainerConfig) -> Result<String, Status> {
        if !self.ready() {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready (stopped): no new containers",
                self.id
            )));
        }
        let meta = config.metadata.clone().unwrap_or_default();
        let taken = self.list().into_iter().any(|c| {
            c.config
                .metadata
                .as_ref()
                .is_some_and(|m| m.name == meta.name && m.attempt == meta.attempt)
        });
        if taken {
            return Err(Status::already_exists(format!(
                "container {:?} attempt {} already exists in pod sandbox {}",
                meta.name, meta.attempt, self.id
            )));
        }
        let id = crate::ids::new_id().map_err(|e| internal("making an id", e))?;
        let request = translate::container_request(&id, &config, &self.config.log_directory)?;
        let image = self
            .store
            .get(&request.image)
            .map_err(|e| internal("reading the image store", e))?
            .filter(|img| img.layers.iter().all(|l| l.is_dir()))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "image {:?} not found: pull it first (PullImage)",
                    request.image
                ))
            })?;
        if self.settings.runtime == RuntimeKind::Wasm {
            // Refused here, naming the image, rather than at StartContainer.
            let c = &request.plan;
            let argv = vmrun_pod::command::resolve_argv(
                c.command.as_deref(),
                c.args.as_deref(),
                &image.config.entrypoint,
                &image.config.cmd,
                &c.env,
            );
            vmrun_pod::wasm::image::find_entry(
                &request.image,
                &image.layers,
                argv.first().map(String::as_str).unwrap_or(""),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let block_image = if self.settings.runtime == RuntimeKind::Vm {
            // The guest reads the image from a disk: built now (once per
            // image), so a bad image fails CreateContainer, not Start.
            let (store, img) = (self.store.clone(), image.clone());
            let built = tokio::task::spawn_blocking(move || store.block_image(&img))
                .await
                .map_err(|e| internal("building the image's disk", e))?;
            Some(built.map_err(|e| {
                Status::failed_precondition(format!("image {:?}: {e}", request.image))
            })?)
        } else {
            None
        };
        let container = Arc::new(Container::new(id.clone(), config, request, image));
        *container
            .block_image
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = block_image;
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), container);
        Ok(id)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), Status> {
        let c = self.container(id)?;
        let sandbox = self.sandbox().ok_or_else(|| {
            Status::failed_precondition(format!("pod sandbox {} is stopped", self.id))
        })?;
        {
            let mut s = c.lock();
            if s.phase != Phase::Created {
                return Err(Status::failed_precondition(format!(
                    "container {id} is {:?}, not created: it cannot be started",
                    s.phase
                )));
            }
            s.phase = Phase::Starting;
        }
        let log_path = c
            .request
            .log_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/null"));
        let target = match LogTarget::create(&log_path, None) {
            Ok(t) => t,
            Err(e) => {
                let message = format!("log file {}: {e}", log_path.display());
                c.start_failed(message.clone());
                return Err(Status::internal(message));
            }
        };
        let target = target.with_tap(c.io.tap());
        let stdin = match c.io.stdin_for_start().await {
            Ok(stdin) => stdin,
            Err(e) => {
                c.start_failed(format!("stdin pipe: {e}"));
                return Err(internal("stdin pipe", e));
            }
        };
        let pipes = match logs::output_pipes(target.clone()) {
            Ok(p) => p,
            Err(e) => {
                c.start_failed(format!("pipes: {e}"));
                return Err(internal("pipes", e));
            }
        };
        let cfg = &c.image.config;
        let mut plan = c.request.plan.clone();
        plan.resources = translate::resources_of(&c.lock().resources)?;
        let mut image_env = cfg.env.clone();
        if c.io.tty && !image_env.iter().any(|e| e.starts_with("TERM=")) {
            // containerd's default for a terminal; the image's and the
            // container's own env still win.
            image_env.insert(0, "TERM=xterm".into());
        }
        let launch = Launch {
            container: plan,
            attempt: c.attempt(),
            image: ImageDefaults {
                entrypoint: cfg.entrypoint.clone(),
                cmd: cfg.cmd.clone(),
                env: image_env,
                working_dir: cfg.working_dir.clone(),
                user: c.request.user_name.clone().or_else(|| cfg.user.clone()),
            },
            layers: c.image.layers.clone(),
            block_image: c
                .block_image
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            stdout: pipes.stdout,
            stderr: pipes.stderr,
            stdin,
            tty: c.io.tty,
        };
        let started = tokio::task::spawn_blocking(move || sandbox.start(launch)).await;
        let running = match started {
            Ok(Ok(running)) => running,
            Ok(Err(e)) => {
                c.start_failed(e.to_string());
                return Err(runtime_status(e));
            }
            Err(e) => {
                c.start_failed(format!("start panicked: {e}"));
                return Err(internal("starting the container", e));
            }
        };
        c.started(running.clone(), target);
        let watched = c.clone();
        tokio::spawn(async move {
            let waiter = running.clone();
            let exit = match tokio::task::spawn_blocking(move || waiter.wait()).await {
                Ok(Ok(exit)) => Ok(exit),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("waiting panicked: {e}")),
            };
            // Output written just before the exit is in the log before the
            // kubelet sees the container exited.
            for pump in pipes.pumps {
                let _ = tokio::time::timeout(LOG_DRAIN, pump).await;
            }
            watched.finished(exit);
            // Nothing reads it any more; a terminal's input relay ends with it.
            watched.io.close_stdin().await;
        });
        Ok(())
    }

    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), Status> {
        let c = self.container(id)?;
        c.stop(Duration::from_secs(timeout_s.max(0) as u64))
            .await
            .map_err(Status::deadline_exceeded)
    }

    /// Kills a container still running and frees what it holds; an unknown id is
    /// already removed (the kubelet retries removals).
    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        let Ok(c) = self.container(id) else {
            return Ok(());
        };
        c.stop(Duration::ZERO)
            .await
            .map_err(Status::deadline_exceeded)?;
        let running = c.lock().running.take();
        if let Some(running) = running {
            tokio::task::spawn_blocking(move || running.remove())
                .await
                .map_err(|e| internal("removing the container", e))?
                .map_err(runtime_status)?;
        }
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout_s: i64,
    ) -> Result<ExecResult, Status> {
        let c = self.container(id)?;
        if cmd.is_empty() {
            return Err(Status::invalid_argument("cmd: is empty"));
        }
        let running = c
            .running()
            .ok_or_else(|| Status::failed_precondition(format!("container {id} is not running")))?;
        let target = running.exec_target();
        if target["runtime"] == "wasm" {
            return Err(Status::unimplemented(vmrun_pod::wasm::NO_EXEC));
        }
        if target["runtime"] != "native" {
            // The vm runtime runs it through the guest agent.
            let sandbox = self.sandbox().ok_or_else(|| {
                Status::failed_precondition(format!("pod sandbox {} is stopped", self.id))
            })?;
            let timeout = match timeout_s {
                t if t > 0 => Duration::from_secs(t as u64),
                _ => NO_EXEC_TIMEOUT,
            };
            let out =
                tokio::task::spawn_blocking(move || sandbox.exec(running.as_ref(), &cmd, timeout))
                    .await
                    .map_err(|e| internal("exec", e))?
                    .map_err(|e| match e.to_string() {
                        m if m.contains("timed out") => Status::deadline_exceeded(m),
                        m => Status::unknown(m),
                    })?;
            let separate = out.separate.unwrap_or(vmrun_pod::runtime::SeparateOutput {
                stdout: out.output,
                stderr: Vec::new(),
            });
            return Ok(ExecResult {
                stdout: separate.stdout,
                stderr: separate.stderr,
                exit_code: out.exit.code,
            });
        }
        let timeout = (timeout_s > 0).then(|| Duration::from_secs(timeout_s as u64));
        tokio::task::spawn_blocking(move || exec_sync(&target, &cmd, timeout))
            .await
            .map_err(|e| internal("exec", e))?
            .map_err(|e| match e {
                ExecError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
                ExecError::Start(_) | ExecError::Wait { .. } => Status::unknown(e.to_string()),
            })
    }

    pub fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let c = self.container(id)?;
        let s = c.lock();
        if s.phase != Phase::Running {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running: its log is closed"
            )));
        }
        if let (Some(target), Some(path)) = (&s.log, &c.request.log_path) {
            target
                .reopen(path)
                .map_err(|e| internal(&format!("reopening {}", path.display()), e))?;
        }
        Ok(())
    }

    pub async fn update_resources(
        &self,
        id: &str,
        resources: api::LinuxContainerResources,
    ) -> Result<(), Status> {
        let c = self.container(id)?;
        // Validated the way CreateContainer validates them.
        translate::resources_of(&resources)?;
        let phase = c.phase();
        if phase == Phase::Exited {
            return Err(Status::failed_precondition(format!(
                "container {id} has exited"
            )));
        }
        if let Some(running) = c.running() {
            let linux = update_of(&resources)?;
            tokio::task::spawn_blocking(move || running.update_resources(&linux))
                .await
                .map_err(|e| internal("updating the container's resources", e))?
                .map_err(runtime_status)?;
        }
        // Kept for a container not started yet, and for its stats' limit.
        c.lock().resources = resources;
        Ok(())
    }

    /// StopPodSandbox: every container killed, the sandbox torn down. Idempotent.
    pub async fn stop(&self) -> Result<(), Status> {
        for c in self.list() {
            c.stop(Duration::ZERO)
                .await
                .map_err(Status::deadline_exceeded)?;
        }
        let network = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(network) = network {
            // Detached while the pause process still holds the namespace.
            tokio::task::spawn_blocking(move || network.detach())
                .await
                .map_err(|e| internal("detaching the pod network", e))?
                .map_err(|e| Status::unknown(e.to_string()))?;
            *self.network.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let sandbox = self
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(sandbox) = sandbox {
            tokio::task::spawn_blocking(move || sandbox.destroy())
                .await
                .map_err(|e| internal("tearing the sandbox down", e))?
                .map_err(runtime_status)?;
        }
        Ok(())
    }

    /// RemovePodSandbox: stopped, containers removed, the pod's directory
    /// gone; then the owner ends.
    pub async fn remove(&self) -> Result<(), Status> {
        self.stop().await?;
        for c in self.list() {
            self.remove_container(&c.id).await?;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(internal(&format!("removing {}", self.dir.display()), e))
            }
            _ => {}
        }
        self.removed.send_replace(true);
        Ok(())
    }

    pub async fn container_stats(&self, c: &Container) -> api::ContainerStats {
        let usage = match c.running() {
            Some(running) => blocking_usage(&c.id, move || running.usage()).await,
            None => None,
        };
        let (cpu, memory) = {
            let mut s = c.lock();
            let limit = (s.resources.memory_limit_in_bytes > 0)
                .then_some(s.resources.memory_limit_in_bytes as u64);
            let (cpu, memory, _) = super::stats::usage(usage, limit, &mut s.cpu_sample);
            (cpu, memory)
        };
        // The runtime's count (a vm container's is the guest's); once the
        // container is gone, what its native layer left on the host.
        let layer = match c.running() {
            Some(running) => blocking_usage(&c.id, move || running.writable_layer()).await,
            None => None,
        };
        let layer = match layer {
            Some(layer) => layer,
            None => {
                let upper = self.upper_dir(c);
                tokio::task::spawn_blocking(move || vmrun_container::dir_usage(&upper))
                    .await
                    .unwrap_or_default()
            }
        };
        api::ContainerStats {
            attributes: Some(api::ContainerAttributes {
                id: c.id.clone(),
                metadata: c.config.metadata.clone(),
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
            }),
            cpu,
            memory,
            writable_layer: Some(super::stats::filesystem_usage(
                &self.settings.native.state_root,
                layer,
            )),
            swap: None,
            io: None,
        }
    }

    pub async fn sandbox_stats(&self) -> api::PodSandboxStats {
        let sandbox = self
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let usage = match sandbox {
            Some(sandbox) => blocking_usage(&self.id, move || sandbox.usage()).await,
            None => None,
        };
        let (cpu, memory, pids) = super::stats::usage(
            usage,
            None,
            &mut self.sandbox_cpu.lock().unwrap_or_else(|p| p.into_inner()),
        );
        let mut containers = Vec::new();
        for c in self.list().iter().filter(|c| c.phase() == Phase::Running) {
            containers.push(self.container_stats(c).await);
        }
        api::PodSandboxStats {
            attributes: Some(api::PodSandboxAttributes {
                id: self.id.clone(),
                metadata: self.config.metadata.clone(),
                labels: self.config.labels.clone(),
                annotations: self.config.annotations.clone(),
            }),
            linux: Some(api::LinuxPodSandboxStats {
                cpu,
                memory,
                network: None,
                process: Some(api::ProcessUsage {
                    timestamp: crate::now_ns(),
                    process_count: Some(api::UInt64Value { value: pids }),
                }),
                containers,
                io: None,
            }),
            windows: None,
        }
    }

    /// The `info` map of verbose status replies, as crictl inspect shows it.
    pub fn verbose_info(&self) -> HashMap<String, String> {
        let info = serde_json::json!({
            "runtime": self.settings.runtime.as_str(),
            "handler": self.settings.handler,
            "ownerPid": std::process::id(),
            "directory": self.dir,
            "netns": self.sandbox().and_then(|s| s.network_holder_pid()).map(|pid| format!("/proc/{pid}/ns/net")),
            "guestForwarder": self.sandbox().and_then(|s| s.guest_forwarder()),
        });
        HashMap::from([("info".to_string(), info.to_string())])
    }
}

/// A runtime's usage counters, read off the async threads (a pod VM's come
/// from its guest agent); a failure is logged and reported as unknown, as
/// for a container that exited between the listing and the read.
async fn blocking_usage<T: Send + 'static>(
    what: &str,
    read: impl FnOnce() -> Result<Option<T>, RuntimeError> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(usage)) => usage,
        Ok(Err(e)) => {
            tracing::debug!(%what, "usage: {e}");
            None
        }
        Err(e) => {
            tracing::debug!(%what, "usage: {e}");
            None
        }
    }
}

/// CRI's resources as the OCI `LinuxResources` a runtime applies: only what
/// the request sets (CRI's zero values mean "leave as is").
fn update_of(
    resources: &api::LinuxContainerResources,
) -> Result<oci_spec::runtime::LinuxResources, Status> {
    let mut cpu = serde_json::Map::new();
    if resources.cpu_shares > 0 {
        cpu.insert("shares".into(), resources.cpu_shares.into());
    }
    if resources.cpu_quota != 0 {
        cpu.insert("quota".into(), resources.cpu_quota.into());
    }
    if resources.cpu_period > 0 {
        cpu.insert("period".into(), resources.cpu_period.into());
    }
    if !resources.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), resources.cpuset_cpus.clone().into());
    }
    if !resources.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), resources.cpuset_mems.clone().into());
    }
    let mut linux = serde_json::json!({ "cpu": cpu });
    if resources.memory_limit_in_bytes > 0 {
        linux["memory"] = serde_json::json!({ "limit": resources.memory_limit_in_bytes });
    }
    serde_json::from_value(linux).map_err(|e| Status::invalid_argument(format!("resources: {e}")))
}
