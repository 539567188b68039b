//! Driving `vmrun serve` as a CRI client does: a daemon of its own per test
//! (own socket, state and config), tonic clients on its socket, kubelet-like
//! configs, and leak checks once pods are removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vmrun_cri_api::v1 as api;
use vmrun_cri_api::v1::image_service_client::ImageServiceClient;
use vmrun_cri_api::v1::runtime_service_client::RuntimeServiceClient;

use crate::pod::{shared_image_root, vmrun_bin, Vmrun};

/// One `vmrun serve` with its own state directory.
pub struct CriServer {
    pub vmrun: Vmrun,
    pub socket: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl CriServer {
    /// Starts the (debug) daemon and waits until its socket answers.
    pub async fn start() -> Self {
        Self::start_with(vmrun_bin(), None).await
    }

    /// Starts the daemon with `conflist` as the node's only CNI network.
    pub async fn start_with_network(conflist: &str) -> Self {
        Self::start_with(vmrun_bin(), Some(conflist)).await
    }

    /// Starts the daemon with the vm handler's guest configured (the test
    /// guest; one vCPU per pod VM inside L1), and `conflist` as the node's
    /// CNI network if given.
    pub async fn start_for_vm(conflist: Option<&str>) -> Self {
        Self::start_in(Vmrun::for_runtime("vm"), vmrun_bin(), conflist).await
    }

    /// Starts the release daemon (benchmarks).
    pub async fn start_release() -> Self {
        Self::start_with(crate::pod::vmrun_release_bin(), None).await
    }

    /// [`CriServer::start_release`] with `conflist` as the node's only CNI network.
    pub async fn start_release_with_network(conflist: &str) -> Self {
        Self::start_with(crate::pod::vmrun_release_bin(), Some(conflist)).await
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn start_with(bin: &Path, conflist: Option<&str>) -> Self {
        Self::start_in(Vmrun::new(), bin, conflist).await
    }

    async fn start_in(vmrun: Vmrun, bin: &Path, conflist: Option<&str>) -> Self {
        let socket = vmrun.state.path().join("cri.sock");
        let cni = vmrun
            .state
            .path()
            .join(if conflist.is_some() { "cni" } else { "no-cni" });
        if let Some(list) = conflist {
            std::fs::create_dir_all(&cni).expect("cni dir");
            std::fs::write(cni.join("10-test.conflist"), list).expect("conflist");
        }
        let mut config = std::fs::read_to_string(&vmrun.config).expect("config");
        config += &format!("[cri]\nsocket = {socket:?}\ncni_conf_dir = {cni:?}\n");
        std::fs::write(&vmrun.config, config).expect("config");
        let mut server = Self {
            vmrun,
            socket,
            bin: bin.to_path_buf(),
            child: None,
        };
        server.restart().await;
        server
    }

    /// The directory pods live in.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.vmrun.state.path().join("cri").join("sandboxes")
    }

    /// (Re)starts the daemon process (after [`CriServer::kill`]).
    pub async fn restart(&mut self) {
        let log = std::fs::File::create(self.vmrun.state.path().join("serve.log")).expect("log");
        let child = std::process::Command::new(&self.bin)
            .arg("--config")
            .arg(&self.vmrun.config)
            .arg("--root")
            .arg(shared_image_root())
            .arg("--state")
            .arg(self.vmrun.state.path())
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting vmrun serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut client) = self.try_runtime().await {
                if client.version(api::VersionRequest::default()).await.is_ok() {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("vmrun serve exited ({status}): {}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "vmrun serve did not answer on {} within 30 s: {}",
                self.socket.display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the daemon (pods stay with their owners).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.vmrun.state.path().join("serve.log")).unwrap_or_default()
    }

    async fn try_runtime(&self) -> Result<RuntimeServiceClient<Channel>, tonic::transport::Error> {
        vmrun_cri::unix::runtime_client(&self.socket).await
    }

    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.try_runtime()
            .await
            .expect("connecting to the CRI socket")
    }

    pub async fn images(&self) -> ImageServiceClient<Channel> {
        let channel = vmrun_cri::unix::connect(&self.socket)
            .await
            .expect("connecting to the CRI socket");
        ImageServiceClient::new(channel)
    }

    /// Pulls `image` and returns its image ref (id).
    pub async fn pull(&self, image: &str) -> String {
        self.images()
            .await
            .pull_image(api::PullImageRequest {
                image: Some(api::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage {image}: {e}"))
            .into_inner()
            .image_ref
    }

    /// What a removed pod may not leave: its directory, cgroups, owner and
    /// container processes, mounts under the state directory.
    pub fn leftovers(&self, sandbox_id: &str) -> Vec<String> {
        // Other pods of this daemon may still run: only this pod's mounts count.
        let mut found: Vec<String> = self
            .vmrun
            .leftovers(sandbox_id, sandbox_id)
            .into_iter()
            .filter(|l| !l.starts_with("mount:") || l.contains(sandbox_id))
            .collect();
        let dir = self.sandboxes_dir().join(sandbox_id);
        if dir.exists() {
            found.push(format!("directory: {}", dir.display()));
        }
        found
    }
}

impl Drop for CriServer {
    fn drop(&mut self) {
        self.kill();
        // Pods a failed test left: their owners and containers go too.
        for (pid, _, cmd) in crate::pod::process_table() {
            if cmd.contains("vmrun-cri-shim")
                && cmd.contains(&*self.vmrun.state.path().to_string_lossy())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // ...and what they held: pause and container processes, cgroups,
        // mounts, CNI attachments (a stale address on a test bridge would
        // break the next run's network tests).
        for dir in std::fs::read_dir(self.sandboxes_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Err(e) = vmrun_cri::daemon::remove_leftover_pod(&dir.path()) {
                eprintln!("cleaning up {}: {e}", dir.path().display());
            }
        }
    }
}

/// A sandbox config as the kubelet builds it for a Pod `name` in `default`.
pub fn kubelet_sandbox_config(name: &str, uid: &str, log_dir: &Path) -> api::PodSandboxConfig {
    let labels = HashMap::from([
        ("io.kubernetes.pod.name".to_string(), name.to_string()),
        (
            "io.kubernetes.pod.namespace".to_string(),
            "default".to_string(),
        ),
        ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
        ("app".to_string(), name.to_string()),
    ]);
    let annotations = HashMap::from([
        (
            "kubernetes.io/config.source".to_string(),
            "file".to_string(),
        ),
        (
            "kubernetes.io/config.seen".to_string(),
            "2026-12-06T00:00:00Z".to_string(),
        ),
    ]);
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: "default".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_dir.display().to_string(),
        dns_config: Some(api::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: vec![],
        labels,
        annotations,
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: 0,
                    pid: 1,
                    ipc: 0,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sysctls: HashMap::new(),
            overhead: None,
            resources: None,
        }),
        windows: None,
    }
}

/// A container config as the kubelet builds it: labels, log path `NAME/ATTEMPT.log`.
pub fn kubelet_container_config(
    name: &str,
    image: &str,
    command: &[&str],
    pod: &api::PodSandboxConfig,
) -> api::ContainerConfig {
    let pod_meta = pod.metadata.clone().unwrap_or_default();
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: image.to_string(),
            user_specified_image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        labels: HashMap::from([
            ("io.kubernetes.container.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.name".to_string(), pod_meta.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                pod_meta.namespace.clone(),
            ),
            ("io.kubernetes.pod.uid".to_string(), pod_meta.uid.clone()),
        ]),
        annotations: HashMap::from([
            (
                "io.kubernetes.container.restartCount".to_string(),
                "0".to_string(),
            ),
            (
                "io.kubernetes.container.terminationMessagePath".to_string(),
                "/dev/termination-log".to_string(),
            ),
        ]),
        log_path: format!("{name}/0.log"),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(api::LinuxContainerResources {
                cpu_shares: 2,
                oom_score_adj: 1000,
                ..Default::default()
            }),
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: 0,
                    pid: 1,
                    ipc: 0,
                    ..Default::default()
                }),
                masked_paths: vec!["/proc/kcore".into()],
                readonly_paths: vec!["/proc/sys".into()],
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// Polls ContainerStatus until `done` holds, up to `timeout`.
pub async fn wait_container(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
    timeout: Duration,
    done: impl Fn(&api::ContainerStatus) -> bool,
) -> api::ContainerStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client
            .container_status(api::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
            .into_inner()
            .status
            .expect("a status");
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} never reached the expected state: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CRI's ContainerState values.
pub const CONTAINER_CREATED: i32 = 0;
pub const CONTAINER_RUNNING: i32 = 1;
pub const CONTAINER_EXITED: i32 = 2;
pub const SANDBOX_READY: i32 = 0;
pub const SANDBOX_NOTREADY: i32 = 1;
