//! The `vmrun.agent.v1.Agent` gRPC service.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use vmrun_proto::v1::agent_server::{Agent, AgentServer};
use vmrun_proto::v1::*;

use crate::containers::Containers;
use crate::oom::{OomEventStream, OomEventsError};
use crate::process::OutputStream;
use crate::sandbox::PodSandbox;

/// How long in-flight calls may take to finish once Shutdown was asked for
/// (their containers are dead by then, so this only bounds a stuck client).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Agent-owned files: `pod/` (etc files, volumes, shm), `containers/`
    /// (overlay upper/work dirs), `images/` (image disk mount points).
    pub state_dir: PathBuf,
    /// Cgroup under which containers (`<parent>/<id>`) and the pause process
    /// (`<parent>/pause`) go.
    pub cgroup_parent: String,
    /// CLOCK_BOOTTIME when the agent started, reported by Health.
    pub boot_timestamp_ns: u64,
}

impl AgentConfig {
    /// The layout inside a guest.
    pub fn guest(boot_timestamp_ns: u64) -> Self {
        Self {
            state_dir: PathBuf::from("/run/vmrun"),
            cgroup_parent: "/vmrun".into(),
            boot_timestamp_ns,
        }
    }

    fn pod_dir(&self) -> PathBuf {
        self.state_dir.join("pod")
    }
}

struct Inner {
    cfg: AgentConfig,
    /// Shared with the OOM poller (which holds it weakly).
    containers: Arc<Containers>,
    sandbox: tokio::sync::Mutex<Option<PodSandbox>>,
    shutdown: watch::Sender<bool>,
}

/// The service; cheap to clone (shared state).
#[derive(Clone)]
pub struct AgentService {
    inner: Arc<Inner>,
}

/// Logs a failed call (the guest's log is where one looks first) and turns
/// it into the status the host sees.
fn fail(rpc: &str, e: impl Into<Status> + std::fmt::Display) -> Status {
    tracing::warn!("{rpc}: {e}");
    e.into()
}

impl AgentService {
    pub fn new(cfg: AgentConfig) -> Self {
        let containers = Arc::new(Containers::new(&cfg.state_dir, &cfg.cgroup_parent));
        Self {
            inner: Arc::new(Inner {
                cfg,
                containers,
                sandbox: tokio::sync::Mutex::new(None),
                shutdown: watch::channel(false).0,
            }),
        }
    }

    /// Resolves once a Shutdown call has torn everything down.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.inner.shutdown.subscribe();
        // The sender lives in `self`; an error cannot happen while we hold it.
        let _ = rx.wait_for(|requested| *requested).await;
    }

    /// Removes every container, the sandbox and the image mounts. Returns
    /// what could not be cleaned up (also logged).
    pub async fn teardown(&self) -> Vec<String> {
        let mut failed = self.inner.containers.remove_all().await;
        if let Some(mut sandbox) = self.inner.sandbox.lock().await.take() {
            match tokio::task::spawn_blocking(move || sandbox.destroy()).await {
                Ok(errors) => failed.extend(errors),
                Err(_) => failed.push("destroy the sandbox: the worker thread failed".into()),
            }
        }
        failed.extend(self.inner.containers.unmount_images());
        // What is still mounted in the pod's directory: size-limited emptyDirs.
        failed.extend(crate::files::unmount_below(&self.inner.cfg.pod_dir()));
        let parent = &self.inner.cfg.cgroup_parent;
        if let Err(e) = vmrun_container::cgroups::remove_path(parent) {
            tracing::warn!("remove cgroup {parent}: {e}");
            failed.push(format!("remove cgroup {parent}: {e}"));
        }
        failed
    }

    /// Tears everything down and stops the server, whose exit powers the
    /// guest off when the agent is PID 1 (see `main.rs`). The caller's
    /// response still goes out: the server drains open calls first.
    async fn stop(&self) -> Vec<String> {
        let failed = self.teardown().await;
        nix::unistd::sync();
        self.inner.shutdown.send_replace(true);
        failed
    }

    /// Serves the service on `incoming` until Shutdown (then lets in-flight
    /// calls finish, for at most a few seconds).
    pub async fn serve<I, IO, IE>(self, incoming: I) -> Result<(), tonic::transport::Error>
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stop = self.clone();
        let server = tonic::transport::Server::builder()
            .add_service(AgentServer::new(self.clone()))
            .serve_with_incoming_shutdown(incoming, async move { stop.shutdown_requested().await });
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => r,
            _ = async { self.shutdown_requested().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                tracing::warn!("calls still open {SHUTDOWN_GRACE:?} after Shutdown; stopping anyway");
                Ok(())
            }
        }
    }
}

impl AgentService {
    /// Serves the port-forward protocol (`vmrun_proto::port_forward`) on
    /// `incoming` until Shutdown: each connection becomes a TCP connection
    /// to 127.0.0.1 in the pod's network namespace. Connections already
    /// forwarding are left alone.
    pub async fn serve_port_forward<I, IO, IE>(self, incoming: I)
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        IE: std::fmt::Display,
    {
        tokio::pin!(incoming);
        loop {
            let next = tokio::select! {
                next = incoming.next() => next,
                _ = self.shutdown_requested() => return,
            };
            match next {
                None => return,
                Some(Ok(conn)) => {
                    let service = self.clone();
                    tokio::spawn(async move {
                        crate::forward::serve_connection(conn, service.pod_netns()).await
                    });
                }
                Some(Err(e)) => {
                    // E.g. out of file descriptors: do not spin.
                    tracing::warn!("port forward: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The network namespace forwarded connections go to: the sandbox's
    /// own, or none (the guest's) without a sandbox or with a shared one.
    async fn pod_netns(&self) -> Option<Arc<File>> {
        self.inner.sandbox.lock().await.as_ref()?.netns()
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(crate::sysinfo::health(
            self.inner.cfg.boot_timestamp_ns,
        )))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        self.stop().await;
        Ok(Response::new(ShutdownResponse {}))
    }

    async fn test_exit(
        &self,
        request: Request<TestExitRequest>,
    ) -> Result<Response<TestExitResponse>, Status> {
        let code = request.into_inner().code;
        tracing::warn!(code, "exiting at the host's request (the test hook)");
        std::process::exit(code)
    }

    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let req = request.into_inner();
        let mut slot = self.inner.sandbox.lock().await;
        if let Some(existing) = slot.as_ref() {
            let e = crate::sandbox::CreateSandboxError::Exists {
                id: req.sandbox_id,
                existing: existing.id.clone(),
            };
            return Err(fail("CreateSandbox", e));
        }
        let pod_dir = self.inner.cfg.pod_dir();
        let parent = self.inner.cfg.cgroup_parent.clone();
        let created =
            tokio::task::spawn_blocking(move || PodSandbox::create(&pod_dir, &parent, &req))
                .await
                .map_err(|_| Status::internal("create sandbox: the worker thread failed"))?;
        let (sandbox, response) = created.map_err(|e| fail("CreateSandbox", e))?;
        *slot = Some(sandbox);
        Ok(Response::new(response))
    }

    async fn copy_file(
        &self,
        request: Request<CopyFileRequest>,
    ) -> Result<Response<CopyFileResponse>, Status> {
        let req = request.into_inner();
        let path = crate::files::copy_file(&self.inner.cfg.pod_dir(), &req)
            .map_err(|e| fail("CopyFile", e))?;
        Ok(Response::new(CopyFileResponse {
            guest_path: path.to_string_lossy().into_owned(),
        }))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let req = request.into_inner();
        let pid = self
            .inner
            .containers
            .create(&req.container_id, &req.oci_spec_json, req.rootfs, req.stdin)
            .await
            .map_err(|e| fail("CreateContainer", e))?;
        Ok(Response::new(CreateContainerResponse { pid }))
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        let req = request.into_inner();
        self.inner
            .containers
            .start(&req.container_id)
            .await
            .map_err(|e| fail("StartContainer", e))?;
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let req = request.into_inner();
        let pid = self
            .inner
            .containers
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.process_json,
                req.stdin,
            )
            .await
            .map_err(|e| fail("ExecProcess", e))?;
        Ok(Response::new(ExecProcessResponse { pid }))
    }

    async fn signal_process(
        &self,
        request: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        let req = request.into_inner();
        self.inner
            .containers
            .signal(&req.container_id, &req.exec_id, req.signal)?;
        Ok(Response::new(SignalProcessResponse {}))
    }

    async fn wait_process(
        &self,
        request: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let req = request.into_inner();
        let exit = self
            .inner
            .containers
            .wait(&req.container_id, &req.exec_id)
            .await?;
        Ok(Response::new(WaitProcessResponse {
            exit_code: exit.code,
            signal: exit.signal,
            oom_killed: exit.oom_killed,
        }))
    }

    type ReadOutputStream = OutputStream;

    async fn read_output(
        &self,
        request: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let req = request.into_inner();
        let (io, what) = self
            .inner
            .containers
            .process_io(&req.container_id, &req.exec_id)?;
        Ok(Response::new(io.read_output(&what)?))
    }

    async fn write_stdin(
        &self,
        request: Request<WriteStdinRequest>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        let req = request.into_inner();
        let (io, what) = self
            .inner
            .containers
            .process_io(&req.container_id, &req.exec_id)?;
        io.write_stdin(&what, &req.data, req.close).await?;
        Ok(Response::new(WriteStdinResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        let req = request.into_inner();
        self.inner
            .containers
            .remove(&req.container_id)
            .await
            .map_err(|e| fail("RemoveContainer", e))?;
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let req = request.into_inner();
        let containers = self.inner.containers.clone();
        let id = req.container_id.clone();
        // Walking the writable layer reads the disk: off the reactor.
        let (s, oom_kills, layer) = tokio::task::spawn_blocking(move || containers.stats(&id))
            .await
            .map_err(|e| Status::internal(format!("Stats: {e}")))??;
        Ok(Response::new(StatsResponse {
            cpu_usage_ns: s.cpu_usage_ns,
            memory_usage_bytes: s.memory_usage_bytes,
            pids: s.pids,
            oom_kills,
            writable_layer: layer.map(|l| vmrun_proto::v1::LayerUsage {
                bytes: l.bytes,
                inodes: l.inodes,
            }),
        }))
    }

    async fn resize_tty(
        &self,
        request: Request<ResizeTtyRequest>,
    ) -> Result<Response<ResizeTtyResponse>, Status> {
        let req = request.into_inner();
        self.inner
            .containers
            .resize_tty(&req.container_id, &req.exec_id, req.rows, req.cols)
            .map_err(|e| fail("ResizeTty", e))?;
        Ok(Response::new(ResizeTtyResponse {}))
    }

    async fn update_resources(
        &self,
        request: Request<UpdateResourcesRequest>,
    ) -> Result<Response<UpdateResourcesResponse>, Status> {
        let req = request.into_inner();
        self.inner
            .containers
            .update_resources(&req.container_id, &req.linux_resources_json)
            .await
            .map_err(|e| fail("UpdateResources", e))?;
        Ok(Response::new(UpdateResourcesResponse {}))
    }

    type OomEventsStream = OomEventStream;

    async fn oom_events(
        &self,
        request: Request<OomEventsRequest>,
    ) -> Result<Response<Self::OomEventsStream>, Status> {
        let req = request.into_inner();
        if !req.sandbox_id.is_empty() {
            let sandbox = self.inner.sandbox.lock().await;
            let current = sandbox.as_ref().map(|s| s.id.as_str());
            if current != Some(req.sandbox_id.as_str()) {
                let e = OomEventsError::SandboxNotFound {
                    wanted: req.sandbox_id,
                    has: current.map_or("no sandbox".into(), |id| format!("sandbox {id:?}")),
                };
                return Err(fail("OomEvents", e));
            }
        }
        let service = self.clone();
        let stop = async move { service.shutdown_requested().await };
        Ok(Response::new(self.inner.containers.oom_events(stop)))
    }

    async fn configure_network(
        &self,
        request: Request<ConfigureNetworkRequest>,
    ) -> Result<Response<ConfigureNetworkResponse>, Status> {
        let req = request.into_inner();
        crate::network::configure(&req)
            .await
            .map_err(|e| fail("ConfigureNetwork", e))?;
        tracing::info!(
            interfaces = req.interfaces.len(),
            routes = req.routes.len(),
            "network configured"
        );
        Ok(Response::new(ConfigureNetworkResponse {}))
    }

    async fn destroy_sandbox(
        &self,
        request: Request<DestroySandboxRequest>,
    ) -> Result<Response<DestroySandboxResponse>, Status> {
        let req = request.into_inner();
        {
            let sandbox = self.inner.sandbox.lock().await;
            crate::sandbox::check_destroy(&req.sandbox_id, sandbox.as_ref())
                .map_err(|e| fail("DestroySandbox", e))?;
        }
        tracing::info!(sandbox = %req.sandbox_id, "destroy sandbox requested; powering off after");
        let mut removed_containers = self.inner.containers.ids();
        removed_containers.sort();
        let cleanup_errors = self.stop().await;
        Ok(Response::new(DestroySandboxResponse {
            removed_containers,
            cleanup_errors,
        }))
    }
}
