//! The owner's gRPC face: the RuntimeService calls about its one pod, with
//! CRI's own messages (the daemon forwards them as they came). Calls about
//! the node (Version, Status, RunPodSandbox, streaming) are the daemon's and
//! answer `Unimplemented` here.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::containers::{Container, Phase};
use super::pod::{sandbox_state, Owner};
use crate::api;
use crate::api::runtime_service_server::RuntimeService;
use crate::filters::{labels_match, sandbox_matches};

pub struct OwnerService {
    owner: Arc<Owner>,
}

impl OwnerService {
    pub fn new(owner: Arc<Owner>) -> Self {
        Self { owner }
    }

    fn check_sandbox(&self, id: &str) -> Result<(), Status> {
        if id == self.owner.id {
            Ok(())
        } else {
            Err(crate::status::sandbox_not_found(id))
        }
    }

    fn pod_sandbox(&self) -> api::PodSandbox {
        let o = &self.owner;
        api::PodSandbox {
            id: o.id.clone(),
            metadata: o.config.metadata.clone(),
            state: self.sandbox_state(),
            created_at: o.settings.created_at,
            labels: o.config.labels.clone(),
            annotations: o.config.annotations.clone(),
            runtime_handler: o.settings.handler.clone(),
        }
    }

    fn sandbox_state(&self) -> i32 {
        if self.owner.ready() {
            sandbox_state::READY
        } else {
            sandbox_state::NOTREADY
        }
    }

    fn pod_sandbox_status(&self) -> api::PodSandboxStatus {
        let o = &self.owner;
        let ns = o
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        api::PodSandboxStatus {
            id: o.id.clone(),
            metadata: o.config.metadata.clone(),
            state: self.sandbox_state(),
            created_at: o.settings.created_at,
            network: Some(api::PodSandboxNetworkStatus {
                ip: o.ips.first().map(|ip| ip.to_string()).unwrap_or_default(),
                additional_ips: o
                    .ips
                    .iter()
                    .skip(1)
                    .map(|ip| api::PodIp { ip: ip.to_string() })
                    .collect(),
            }),
            linux: Some(api::LinuxPodSandboxStatus {
                namespaces: Some(api::Namespace { options: ns }),
            }),
            labels: o.config.labels.clone(),
            annotations: o.config.annotations.clone(),
            runtime_handler: o.settings.handler.clone(),
        }
    }
}

fn image_spec(c: &Container) -> Option<api::ImageSpec> {
    let mut spec = c.config.image.clone().unwrap_or_default();
    spec.image = c.image.id.clone();
    Some(spec)
}

/// What the kubelet compares against the pod spec's image: a repo digest
/// when the image has one, else its id (containerd does the same).
fn image_ref(c: &Container) -> String {
    c.image
        .references
        .iter()
        .find_map(|r| {
            let repo = r.rsplit_once(':').map_or(r.as_str(), |(repo, tag)| {
                if tag.contains('/') {
                    r.as_str()
                } else {
                    repo
                }
            });
            (!c.image.manifest_digest.is_empty())
                .then(|| format!("{repo}@{}", c.image.manifest_digest))
        })
        .unwrap_or_else(|| c.image.id.clone())
}

fn container_view(owner: &Owner, c: &Container) -> api::Container {
    api::Container {
        id: c.id.clone(),
        pod_sandbox_id: owner.id.clone(),
        metadata: c.config.metadata.clone(),
        image: image_spec(c),
        image_ref: image_ref(c),
        state: c.cri_state(),
        created_at: c.created_at,
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        image_id: c.image.id.clone(),
    }
}

fn container_status(owner: &Owner, c: &Container) -> api::ContainerStatus {
    let s = c.lock();
    api::ContainerStatus {
        id: c.id.clone(),
        metadata: c.config.metadata.clone(),
        state: match s.phase {
            Phase::Created | Phase::Starting => super::containers::state::CREATED,
            Phase::Running => super::containers::state::RUNNING,
            Phase::Exited => super::containers::state::EXITED,
        },
        created_at: c.created_at,
        started_at: s.started_at,
        finished_at: s.finished_at,
        exit_code: s.exit_code,
        image: image_spec(c),
        image_ref: image_ref(c),
        reason: s.reason.clone(),
        message: s.message.clone(),
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        mounts: c.config.mounts.clone(),
        log_path: owner
            .log_path(c)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        resources: Some(api::ContainerResources {
            linux: Some(s.resources.clone()),
            windows: None,
        }),
        image_id: c.image.id.clone(),
        user: None,
        stop_signal: 0,
    }
}

fn container_matches(owner: &Owner, c: &Container, f: &api::ContainerFilter) -> bool {
    (f.id.is_empty() || c.id.starts_with(&f.id))
        && (f.pod_sandbox_id.is_empty() || owner.id.starts_with(&f.pod_sandbox_id))
        && f.state.as_ref().is_none_or(|s| s.state == c.cri_state())
        && labels_match(&c.config.labels, &f.label_selector)
}

#[tonic::async_trait]
impl RuntimeService for OwnerService {
    async fn stop_pod_sandbox(
        &self,
        request: Request<api::StopPodSandboxRequest>,
    ) -> Result<Response<api::StopPodSandboxResponse>, Status> {
        self.check_sandbox(&request.get_ref().pod_sandbox_id)?;
        self.owner.stop().await?;
        Ok(Response::new(api::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<api::RemovePodSandboxRequest>,
    ) -> Result<Response<api::RemovePodSandboxResponse>, Status> {
        self.check_sandbox(&request.get_ref().pod_sandbox_id)?;
        self.owner.remove().await?;
        Ok(Response::new(api::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<api::PodSandboxStatusRequest>,
    ) -> Result<Response<api::PodSandboxStatusResponse>, Status> {
        let r = request.into_inner();
        self.check_sandbox(&r.pod_sandbox_id)?;
        let containers_statuses = self
            .owner
            .containers()
            .iter()
            .map(|c| container_status(&self.owner, c))
            .collect();
        Ok(Response::new(api::PodSandboxStatusResponse {
            status: Some(self.pod_sandbox_status()),
            info: if r.verbose {
                self.owner.verbose_info()
            } else {
                HashMap::new()
            },
            containers_statuses,
            timestamp: crate::now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<api::ListPodSandboxRequest>,
    ) -> Result<Response<api::ListPodSandboxResponse>, Status> {
        let sandbox = self.pod_sandbox();
        let keep = request
            .into_inner()
            .filter
            .is_none_or(|f| sandbox_matches(&sandbox, &f));
        Ok(Response::new(api::ListPodSandboxResponse {
            items: if keep { vec![sandbox] } else { vec![] },
        }))
    }

    async fn create_container(
        &self,
        request: Request<api::CreateContainerRequest>,
    ) -> Result<Response<api::CreateContainerResponse>, Status> {
        let r = request.into_inner();
        self.check_sandbox(&r.pod_sandbox_id)?;
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config: is required"))?;
        let container_id = self.owner.create_container(config).await?;
        Ok(Response::new(api::CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        request: Request<api::StartContainerRequest>,
    ) -> Result<Response<api::StartContainerResponse>, Status> {
        self.owner
            .start_container(&request.get_ref().container_id)
            .await?;
        Ok(Response::new(api::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<api::StopContainerRequest>,
    ) -> Result<Response<api::StopContainerResponse>, Status> {
        let r = request.into_inner();
        self.owner
            .stop_container(&r.container_id, r.timeout)
            .await?;
        Ok(Response::new(api::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<api::RemoveContainerRequest>,
    ) -> Result<Response<api::RemoveContainerResponse>, Status> {
        self.owner
            .remove_container(&request.get_ref().container_id)
            .await?;
        Ok(Response::new(api::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<api::ListContainersRequest>,
    ) -> Result<Response<api::ListContainersResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let containers = self
            .owner
            .containers()
            .iter()
            .filter(|c| container_matches(&self.owner, c, &filter))
            .map(|c| container_view(&self.owner, c))
            .collect();
        Ok(Response::new(api::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<api::ContainerStatusRequest>,
    ) -> Result<Response<api::ContainerStatusResponse>, Status> {
        let r = request.into_inner();
        let c = self.owner.container(&r.container_id)?;
        let mut info = HashMap::new();
        if r.verbose {
            let running = c.running();
            let detail = serde_json::json!({
                "sandboxID": self.owner.id,
                "pid": running.as_ref().map(|run| run.pid()),
                // What the daemon's streaming server needs to exec in it.
                "execTarget": running.as_ref().map(|run| run.exec_target()),
                "runtime": self.owner.settings.runtime.as_str(),
                "cgroup": self.owner.cgroup_of(&c),
                // What Attach checks before handing out a URL.
                "stdin": c.io.stdin,
                "stdinOnce": c.io.stdin_once,
                "stdinClosed": c.io.stdin_closed(),
                "tty": c.io.tty,
            });
            info.insert("info".to_string(), detail.to_string());
        }
        Ok(Response::new(api::ContainerStatusResponse {
            status: Some(container_status(&self.owner, &c)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<api::UpdateContainerResourcesRequest>,
    ) -> Result<Response<api::UpdateContainerResourcesResponse>, Status> {
        let r = request.into_inner();
        let linux = r.linux.ok_or_else(|| {
            Status::invalid_argument("linux: is required (vmrun runs Linux containers only)")
        })?;
        self.owner.update_resources(&r.container_id, linux).await?;
        Ok(Response::new(api::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<api::ReopenContainerLogRequest>,
    ) -> Result<Response<api::ReopenContainerLogResponse>, Status> {
        self.owner.reopen_log(&request.get_ref().container_id)?;
        Ok(Response::new(api::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<api::ExecSyncRequest>,
    ) -> Result<Response<api::ExecSyncResponse>, Status> {
        let r = request.into_inner();
        let out = self
            .owner
            .exec_sync(&r.container_id, r.cmd, r.timeout)
            .await?;
        Ok(Response::new(api::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        }))
    }

    async fn container_stats(
        &self,
        request: Request<api::ContainerStatsRequest>,
    ) -> Result<Response<api::ContainerStatsResponse>, Status> {
        let c = self.owner.container(&request.get_ref().container_id)?;
        Ok(Response::new(api::ContainerStatsResponse {
            stats: Some(self.owner.container_stats(&c).await),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<api::ListContainerStatsRequest>,
    ) -> Result<Response<api::ListContainerStatsResponse>, Status> {
        let f = request.into_inner().filter.unwrap_or_default();
        let filter = api::ContainerFilter {
            id: f.id,
            state: None,
            pod_sandbox_id: f.pod_sandbox_id,
            label_selector: f.label_selector,
        };
        let mut stats = Vec::new();
        for c in self
            .owner
            .containers()
            .iter()
            .filter(|c| c.phase() == Phase::Running)
            .filter(|c| container_matches(&self.owner, c, &filter))
        {
            stats.push(self.owner.container_stats(c).await);
        }
        Ok(Response::new(api::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<api::PodSandboxStatsRequest>,
    ) -> Result<Response<api::PodSandboxStatsResponse>, Status> {
        self.check_sandbox(&request.get_ref().pod_sandbox_id)?;
        Ok(Response::new(api::PodSandboxStatsResponse {
            stats: Some(self.owner.sandbox_stats().await),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<api::ListPodSandboxStatsRequest>,
    ) -> Result<Response<api::ListPodSandboxStatsResponse>, Status> {
        let f = request.into_inner().filter.unwrap_or_default();
        let sandbox = self.pod_sandbox();
        let keep = (f.id.is_empty() || sandbox.id.starts_with(&f.id))
            && labels_match(&sandbox.labels, &f.label_selector);
        let mut stats = Vec::new();
        if keep {
            stats.push(self.owner.sandbox_stats().await);
        }
        Ok(Response::new(api::ListPodSandboxStatsResponse { stats }))
    }
}
