//! The daemon's RuntimeService: validates each request, answers the node's
//! own calls, and hands each pod's calls to the pod's owner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vmrun_pod::native::NativeRuntime;

use super::cleanup;
use super::registry::{Pod, Registry};
use super::ServeOptions;
use vmrun_pod::vm::VmRuntime;

/// Images a CRI pod VM can take: its disks arrive with its containers
/// (one per distinct image), in empty slots it boots with.
const VM_IMAGE_SLOTS: u8 = 8;
use crate::api;
use crate::api::runtime_service_client::RuntimeServiceClient;
use crate::api::runtime_service_server::RuntimeService;
use crate::config::RuntimeKind;
use crate::owner::{NetworkSettings, OwnerSettings};
use crate::translate;

pub struct RuntimeServiceImpl {
    opts: Arc<ServeOptions>,
    registry: Arc<Registry>,
    /// The pod CIDR the kubelet last gave (UpdateRuntimeConfig).
    pod_cidr: Mutex<String>,
    /// Serves the URLs Exec, Attach and PortForward hand out.
    streams: Arc<vmrun_streaming::Server>,
}

type Reply<T> = Result<Response<T>, Status>;

/// CRI's CgroupDriver value for cgroupfs.
const CGROUP_DRIVER_CGROUPFS: i32 = 1;

/// How long a failed call waits for a dying owner to be seen gone.
const OWNER_END_GRACE: Duration = Duration::from_secs(1);

/// Runs one call on a pod's owner; a pod whose owner is gone (before the
/// call or during it) answers `Unavailable` naming it.
macro_rules! forward {
    ($pod:expr, $method:ident, $req:expr) => {{
        let pod = &$pod;
        let mut owner = pod.owner()?;
        match owner.$method($req).await {
            // Only a failure of the connection can be the owner's death;
            // the owner's own answers are passed on at once.
            Err(e) if lost_owner(&e) && pod.ended_within(OWNER_END_GRACE).await => Err(pod.gone()),
            other => other,
        }
    }};
}

/// Whether a failed call's status is the connection's (tonic's transport
/// errors), not an answer the owner gave.
fn lost_owner(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
    )
}

/// Runs a container's call on its pod's owner, the id resolved in full.
macro_rules! forward_to_container {
    ($self:ident, $request:ident, $method:ident) => {{
        let mut r = $request.into_inner();
        let (id, pod) = $self.registry.container(&r.container_id)?;
        r.container_id = id;
        forward!(pod, $method, r)
    }};
}

impl RuntimeServiceImpl {
    pub fn new(
        opts: Arc<ServeOptions>,
        registry: Arc<Registry>,
        streams: Arc<vmrun_streaming::Server>,
    ) -> Self {
        Self {
            opts,
            registry,
            pod_cidr: Mutex::new(String::new()),
            streams,
        }
    }

    /// The full id of a container that is running (exec and attach need one).
    async fn running_container(&self, id: &str) -> Result<String, Status> {
        let (id, pod) = self.registry.container(id)?;
        let status = forward!(
            pod,
            container_status,
            api::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            }
        )?;
        let running = status
            .into_inner()
            .status
            .is_some_and(|s| s.state == crate::owner::container_state::RUNNING);
        if !running {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running"
            )));
        }
        Ok(id)
    }

    /// The full id of a running container that can take this attach
    /// (stdin and tty as it was created with); the owner checks again when
    /// the client connects.
    async fn attachable_container(&self, r: &api::AttachRequest) -> Result<String, Status> {
        let (id, pod) = self.registry.container(&r.container_id)?;
        let reply = forward!(
            pod,
            container_status,
            api::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: true,
            }
        )?
        .into_inner();
        let running = reply
            .status
            .as_ref()
            .is_some_and(|s| s.state == crate::owner::container_state::RUNNING);
        if !running {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running: there is nothing to attach to"
            )));
        }
        let info = crate::owner::verbose_info(&reply.info);
        let flag = |key: &str| info[key].as_bool().unwrap_or(false);
        let refused = crate::owner::attach::refusal(
            &id,
            flag("stdin"),
            flag("tty"),
            flag("stdinClosed"),
            r.stdin,
            r.tty,
        );
        match refused {
            Some(why) => Err(Status::failed_precondition(why)),
            None => Ok(id),
        }
    }

    fn not_ready_sandbox(pod: &Pod) -> api::PodSandbox {
        api::PodSandbox {
            id: pod.id.clone(),
            metadata: pod.config.metadata.clone(),
            state: crate::owner::sandbox_state::NOTREADY,
            created_at: pod.settings.created_at,
            labels: pod.config.labels.clone(),
            annotations: pod.config.annotations.clone(),
            runtime_handler: pod.settings.handler.clone(),
        }
    }

    /// The node's CNI setup when its configuration loads, else why not.
    fn network(&self) -> Result<NetworkSettings, String> {
        let cri = &self.opts.cri;
        vmrun_cni::load_default(&cri.cni_conf_dir).map_err(|e| e.to_string())?;
        Ok(NetworkSettings {
            conf_dir: cri.cni_conf_dir.clone(),
            bin_dirs: cri.cni_bin_dirs.clone(),
            cache_dir: self.opts.state.join("cri").join("cni-cache"),
        })
    }

    fn network_condition(&self) -> api::RuntimeCondition {
        let (status, reason, message) = match self.network() {
            Ok(_) => (true, String::new(), String::new()),
            Err(why) => (false, "NetworkPluginNotReady".to_string(), why),
        };
        api::RuntimeCondition {
            r#type: "NetworkReady".into(),
            status,
            reason,
            message,
        }
    }

    /// What every live owner answers to a list call, joined; an owner that
    /// fails is skipped with a warning (the others' pods are still listed).
    async fn ask_every_owner<T, F, Fut>(&self, ask: F) -> Vec<T>
    where
        F: Fn(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, Status>>,
    {
        let answers = self
            .each_pod(|pod| {
                let asked = pod.client.clone().map(&ask);
                async move {
                    match asked {
                        Some(answer) => answer.await,
                        None => Ok(Vec::new()),
                    }
                }
            })
            .await;
        let mut all = Vec::new();
        for answer in answers {
            match answer {
                Ok(mut more) => all.append(&mut more),
                Err((pod, e)) => tracing::warn!("pod sandbox {}: {}", pod.id, e.message()),
            }
        }
        all
    }

    /// Every pod's answer to a list call, pods whose owner is gone included.
    async fn each_pod<T, F, Fut>(&self, ask: F) -> Vec<Result<T, (Arc<Pod>, Status)>>
    where
        F: Fn(Arc<Pod>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        join_all(self.registry.pods().into_iter().map(|pod| {
            let fut = ask(pod.clone());
            async move { fut.await.map_err(|e| (pod, e)) }
        }))
        .await
    }
}

#[tonic::async_trait]
impl RuntimeService for RuntimeServiceImpl {
    async fn version(&self, _request: Request<api::VersionRequest>) -> Reply<api::VersionResponse> {
        Ok(Response::new(api::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "vmrun".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: vmrun_cri_api::RUNTIME_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<api::RunPodSandboxRequest>,
    ) -> Reply<api::RunPodSandboxResponse> {
        let r = request.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config: is required"))?;
        let runtime = self
            .opts
            .cri
            .runtime_for(&r.runtime_handler)
            .map_err(Status::invalid_argument)?;
        if runtime == RuntimeKind::Vm {
            // Named before anything is made: a node without the guest.
            self.opts.vm_assets.check().map_err(|e| {
                Status::failed_precondition(format!(
                    "runtime handler {:?} (vm): {e}",
                    r.runtime_handler
                ))
            })?;
        }
        let id =
            crate::ids::new_id().map_err(|e| Status::internal(format!("making an id: {e}")))?;
        // Validated here, before anything is made, so a bad config leaves nothing.
        translate::pod_plan(&id, &r.runtime_handler, &config)?;
        let settings = OwnerSettings {
            sandbox_id: id.clone(),
            handler: r.runtime_handler.clone(),
            runtime,
            native: NativeRuntime {
                state_root: self.opts.sandboxes_dir().join(&id),
                pids_limit: self.opts.pids_limit,
                proc_view: self.opts.proc_view.clone(),
            },
            vm: (runtime == RuntimeKind::Vm).then(|| VmRuntime {
                state_root: self.opts.sandboxes_dir().join(&id),
                assets: self.opts.vm_assets.clone(),
                image_disks: Default::default(),
                pids_limit: self.opts.pids_limit,
                max_vcpus: self.opts.vm_max_vcpus,
                boot_timeout: VmRuntime::boot_timeout_from_env(),
                spare_disks: VM_IMAGE_SLOTS,
                pod_network: self.network().is_ok(),
                jail: Default::default(),
            }),
            image_root: self.opts.image_root.clone(),
            // Without a network configuration a pod gets loopback only, and
            // Status tells the kubelet the network is not ready.
            network: self.network().ok(),
            created_at: crate::now_ns(),
        };
        let pod = self
            .registry
            .start_pod(&self.opts.shim, settings, config)
            .await?;
        Ok(Response::new(api::RunPodSandboxResponse {
            pod_sandbox_id: pod.id.clone(),
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<api::StopPodSandboxRequest>,
    ) -> Reply<api::StopPodSandboxResponse> {
        let mut r = request.into_inner();
        // Stopping what is not there succeeds: the kubelet retries stops.
        let Ok(pod) = self.registry.pod(&r.pod_sandbox_id) else {
            return Ok(Response::new(api::StopPodSandboxResponse {}));
        };
        r.pod_sandbox_id = pod.id.clone();
        if pod.client.is_some() {
            match forward!(pod, stop_pod_sandbox, r) {
                Err(_) if pod.owner_ended() => {}
                other => return other,
            }
        }
        cleanup::orphan(&pod).map_err(Status::internal)?;
        Ok(Response::new(api::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<api::RemovePodSandboxRequest>,
    ) -> Reply<api::RemovePodSandboxResponse> {
        let mut r = request.into_inner();
        // Removing what is not there succeeds: the kubelet retries removals.
        let Ok(pod) = self.registry.pod(&r.pod_sandbox_id) else {
            return Ok(Response::new(api::RemovePodSandboxResponse {}));
        };
        r.pod_sandbox_id = pod.id.clone();
        let served = match pod.client.is_some() {
            true => match forward!(pod, remove_pod_sandbox, r) {
                Err(_) if pod.owner_ended() => false,
                other => other.map(|_| true)?,
            },
            false => false,
        };
        if served {
            let waited = pod.clone();
            // Removed means gone: the owner's process too.
            let _ = tokio::task::spawn_blocking(move || waited.wait_owner_exit()).await;
        } else {
            cleanup::orphan(&pod).map_err(Status::internal)?;
            std::fs::remove_dir_all(&pod.dir)
                .map_err(|e| Status::internal(format!("removing {}: {e}", pod.dir.display())))?;
        }
        self.registry.forget_pod(&pod.id);
        Ok(Response::new(api::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<api::PodSandboxStatusRequest>,
    ) -> Reply<api::PodSandboxStatusResponse> {
        let mut r = request.into_inner();
        let pod = self.registry.pod(&r.pod_sandbox_id)?;
        r.pod_sandbox_id = pod.id.clone();
        if pod.client.is_some() {
            match forward!(pod, pod_sandbox_status, r) {
                Err(_) if pod.owner_ended() => {}
                other => return other,
            }
        }
        {
            let s = Self::not_ready_sandbox(&pod);
            return Ok(Response::new(api::PodSandboxStatusResponse {
                status: Some(api::PodSandboxStatus {
                    id: s.id,
                    metadata: s.metadata,
                    state: s.state,
                    created_at: s.created_at,
                    network: Some(Default::default()),
                    linux: None,
                    labels: s.labels,
                    annotations: s.annotations,
                    runtime_handler: s.runtime_handler,
                }),
                info: HashMap::new(),
                containers_statuses: Vec::new(),
                timestamp: crate::now_ns(),
            }));
        }
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<api::ListPodSandboxRequest>,
    ) -> Reply<api::ListPodSandboxResponse> {
        let r = request.into_inner();
        let answers = self
            .each_pod(|pod| {
                let r = r.clone();
                async move {
                    match pod.client.clone() {
                        Some(mut owner) => Ok(owner.list_pod_sandbox(r).await?.into_inner().items),
                        None => Ok(vec![Self::not_ready_sandbox(&pod)]),
                    }
                }
            })
            .await;
        let mut items = Vec::new();
        for answer in answers {
            match answer {
                Ok(mut more) => items.append(&mut more),
                Err((pod, e)) => {
                    tracing::warn!("pod sandbox {}: {}", pod.id, e.message());
                    items.push(Self::not_ready_sandbox(&pod));
                }
            }
        }
        if let Some(f) = &r.filter {
            // Filters also apply to pods served from their files.
            items.retain(|s| crate::filters::sandbox_matches(s, f));
        }
        items.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        Ok(Response::new(api::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<api::CreateContainerRequest>,
    ) -> Reply<api::CreateContainerResponse> {
        let mut r = request.into_inner();
        let pod = self.registry.pod(&r.pod_sandbox_id)?;
        r.pod_sandbox_id = pod.id.clone();
        let created = forward!(pod, create_container, r)?;
        self.registry
            .add_container(created.get_ref().container_id.clone(), &pod.id);
        Ok(created)
    }

    async fn start_container(
        &self,
        request: Request<api::StartContainerRequest>,
    ) -> Reply<api::StartContainerResponse> {
        forward_to_container!(self, request, start_container)
    }

    async fn stop_container(
        &self,
        request: Request<api::StopContainerRequest>,
    ) -> Reply<api::StopContainerResponse> {
        // Stopping what is not there succeeds, as removing it does.
        if self
            .registry
            .container(&request.get_ref().container_id)
            .is_err()
        {
            return Ok(Response::new(api::StopContainerResponse {}));
        }
        forward_to_container!(self, request, stop_container)
    }

    async fn remove_container(
        &self,
        request: Request<api::RemoveContainerRequest>,
    ) -> Reply<api::RemoveContainerResponse> {
        let mut r = request.into_inner();
        let Ok((id, pod)) = self.registry.container(&r.container_id) else {
            return Ok(Response::new(api::RemoveContainerResponse {}));
        };
        r.container_id = id.clone();
        let removed = forward!(pod, remove_container, r)?;
        self.registry.forget_container(&id);
        Ok(removed)
    }

    async fn list_containers(
        &self,
        request: Request<api::ListContainersRequest>,
    ) -> Reply<api::ListContainersResponse> {
        let r = request.into_inner();
        let mut containers = self
            .ask_every_owner(|mut owner| {
                let r = r.clone();
                async move { Ok(owner.list_containers(r).await?.into_inner().containers) }
            })
            .await;
        containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(Response::new(api::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<api::ContainerStatusRequest>,
    ) -> Reply<api::ContainerStatusResponse> {
        forward_to_container!(self, request, container_status)
    }

    async fn update_container_resources(
        &self,
        request: Request<api::UpdateContainerResourcesRequest>,
    ) -> Reply<api::UpdateContainerResourcesResponse> {
        forward_to_container!(self, request, update_container_resources)
    }

    async fn reopen_container_log(
        &self,
        request: Request<api::ReopenContainerLogRequest>,
    ) -> Reply<api::ReopenContainerLogResponse> {
        forward_to_container!(self, request, reopen_container_log)
    }

    async fn exec_sync(
        &self,
        request: Request<api::ExecSyncRequest>,
    ) -> Reply<api::ExecSyncResponse> {
        forward_to_container!(self, request, exec_sync)
    }

    async fn exec(&self, request: Request<api::ExecRequest>) -> Reply<api::ExecResponse> {
        let r = request.into_inner();
        let container_id = self.running_container(&r.container_id).await?;
        let url = self
            .streams
            .get_exec(vmrun_streaming::ExecRequest {
                container_id,
                cmd: r.cmd,
                tty: r.tty,
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(api::ExecResponse { url }))
    }

    async fn attach(&self, request: Request<api::AttachRequest>) -> Reply<api::AttachResponse> {
        let r = request.into_inner();
        let container_id = self.attachable_container(&r).await?;
        let url = self
            .streams
            .get_attach(vmrun_streaming::AttachRequest {
                container_id,
                tty: r.tty,
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(api::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<api::PortForwardRequest>,
    ) -> Reply<api::PortForwardResponse> {
        let r = request.into_inner();
        let pod = self.registry.pod(&r.pod_sandbox_id)?;
        let mut ports = Vec::new();
        for p in r.port {
            ports.push(
                u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                    Status::invalid_argument(format!("port {p} is not a TCP port"))
                })?,
            );
        }
        let url = self
            .streams
            .get_port_forward(vmrun_streaming::PortForwardRequest {
                pod_sandbox_id: pod.id.clone(),
                ports,
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(api::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<api::ContainerStatsRequest>,
    ) -> Reply<api::ContainerStatsResponse> {
        forward_to_container!(self, request, container_stats)
    }

    async fn list_container_stats(
        &self,
        request: Request<api::ListContainerStatsRequest>,
    ) -> Reply<api::ListContainerStatsResponse> {
        let r = request.into_inner();
        let stats = self
            .ask_every_owner(|mut owner| {
                let r = r.clone();
                async move { Ok(owner.list_container_stats(r).await?.into_inner().stats) }
            })
            .await;
        Ok(Response::new(api::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<api::PodSandboxStatsRequest>,
    ) -> Reply<api::PodSandboxStatsResponse> {
        let mut r = request.into_inner();
        let pod = self.registry.pod(&r.pod_sandbox_id)?;
        r.pod_sandbox_id = pod.id.clone();
        forward!(pod, pod_sandbox_stats, r)
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<api::ListPodSandboxStatsRequest>,
    ) -> Reply<api::ListPodSandboxStatsResponse> {
        let r = request.into_inner();
        let stats = self
            .ask_every_owner(|mut owner| {
                let r = r.clone();
                async move { Ok(owner.list_pod_sandbox_stats(r).await?.into_inner().stats) }
            })
            .await;
        Ok(Response::new(api::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        request: Request<api::UpdateRuntimeConfigRequest>,
    ) -> Reply<api::UpdateRuntimeConfigResponse> {
        let cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        // Kept and reported in verbose Status; the CNI configuration on disk
        // decides addresses (as with containerd without a CNI template).
        *self.pod_cidr.lock().unwrap_or_else(|p| p.into_inner()) = cidr;
        Ok(Response::new(api::UpdateRuntimeConfigResponse {}))
    }

    async fn status(&self, request: Request<api::StatusRequest>) -> Reply<api::StatusResponse> {
        let verbose = request.get_ref().verbose;
        let conditions = vec![
            api::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            self.network_condition(),
        ];
        let runtime_handlers = self
            .opts
            .cri
            .runtimes
            .keys()
            .map(|name| api::RuntimeHandler {
                name: name.clone(),
                features: Some(api::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect();
        let mut info = HashMap::new();
        if verbose {
            let detail = serde_json::json!({
                "socket": self.opts.cri.socket,
                "state": self.opts.state,
                "imageRoot": self.opts.image_root,
                "cniConfDir": self.opts.cri.cni_conf_dir,
                "podCIDR": *self.pod_cidr.lock().unwrap_or_else(|p| p.into_inner()),
                "pods": self.registry.len(),
                "handlers": self.opts.cri.runtimes,
            });
            info.insert("config".to_string(), detail.to_string());
        }
        Ok(Response::new(api::StatusResponse {
            status: Some(api::RuntimeStatus { conditions }),
            info,
            runtime_handlers,
            features: Some(api::RuntimeFeatures {
                supplemental_groups_policy: false,
                user_namespaces_host_network: false,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _request: Request<api::RuntimeConfigRequest>,
    ) -> Reply<api::RuntimeConfigResponse> {
        Ok(Response::new(api::RuntimeConfigResponse {
            linux: Some(api::LinuxRuntimeConfiguration {
                cgroup_driver: CGROUP_DRIVER_CGROUPFS,
            }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<api::CheckpointContainerRequest>,
    ) -> Reply<api::CheckpointContainerResponse> {
        Err(Status::unimplemented(
            "CheckpointContainer: vmrun does not checkpoint containers",
        ))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<api::ListMetricDescriptorsRequest>,
    ) -> Reply<api::ListMetricDescriptorsResponse> {
        Err(Status::unimplemented(
            "ListMetricDescriptors: vmrun reports stats through ListContainerStats and ListPodSandboxStats",
        ))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<api::ListPodSandboxMetricsRequest>,
    ) -> Reply<api::ListPodSandboxMetricsResponse> {
        Err(Status::unimplemented(
            "ListPodSandboxMetrics: vmrun reports stats through ListContainerStats and ListPodSandboxStats",
        ))
    }
}
