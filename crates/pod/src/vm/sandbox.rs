//! A pod's microVM as a [`Sandbox`]: boots the VM, waits for the agent, and
//! has the agent build the sandbox, volumes and containers inside.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tonic::transport::Channel;
use vmrun_proto::v1;
use vmrun_proto::AgentClient;

use super::container::{self, ContainerStdio, VmContainer};
use super::disks::{guest_disk, DiskPlan, MAX_DISKS};
use super::host_mounts;
use super::sizing::vm_size;
use super::vmm_process::{VmFiles, VmmProcess};
use super::VmRuntime;
use crate::plan::{PodPlan, VolumeSource};
use crate::runtime::{CgroupStats, ExecOutput, Launch, PodStream, Running, RuntimeError, Sandbox};
use crate::spec::{container_spec, SpecContext};

/// How long one control call to the agent may take (not `WaitProcess`).
pub(super) const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest gets to power off after `Shutdown` before the VMM is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Interval of the boot-time readiness poll.
const BOOT_POLL: Duration = Duration::from_millis(5);

pub(super) struct VmSandbox {
    pod: PodPlan,
    pub(super) vmm: Arc<VmmProcess>,
    pub(super) agent: AgentClient<Channel>,
    pub(super) rt: Handle,
    /// Guest block device of each image, by image reference.
    disks: BTreeMap<String, String>,
    /// Guest block device of each block image attached after boot.
    late_disks: Mutex<BTreeMap<PathBuf, String>>,
    /// Guest block device of each hostPath volume, by volume name.
    host_devices: BTreeMap<String, String>,
    ns_dir: Option<PathBuf>,
    volume_dirs: BTreeMap<String, PathBuf>,
    etc_files: Vec<(String, PathBuf)>,
    shm: Option<PathBuf>,
    pids_limit: Option<i64>,
    running: Mutex<Vec<Arc<VmContainer>>>,
    exec_ids: AtomicU64,
    destroyed: AtomicBool,
    /// Whether containers get the guest's /proc view (the agent serves it).
    proc_view: bool,
    /// On the pod's CNI network: the VMM's namespace holds the guest NIC's
    /// tap, and the containers share the guest's own network namespace
    /// (where that NIC is).
    networked: bool,
    vcpus: u8,
    /// Guest CPUs each container (by name) is pinned to, with the view.
    pinned: Mutex<BTreeMap<String, Vec<u32>>>,
}

pub(super) fn status_msg(what: &str, status: &tonic::Status) -> String {
    format!("{what}: {} ({:?})", status.message(), status.code())
}

impl VmSandbox {
    pub(super) fn create(
        runtime: &VmRuntime,
        pod: &PodPlan,
        rt: Handle,
    ) -> Result<Self, RuntimeError> {
        let sandbox_err = RuntimeError::Sandbox;
        let proc_view = crate::spec::proc_view_wanted(pod).map_err(sandbox_err)?;
        let disks = DiskPlan::for_pod(pod, &runtime.image_disks)?;
        let dir = crate::state::pod_dir(&runtime.state_root, &pod.name).join("vm");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| sandbox_err(format!("{}: {e}", dir.display())))?;
        let mut cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(max) = runtime.max_vcpus {
            cpus = cpus.min(usize::from(max.max(1)));
        }
        let size = vm_size(pod, cpus);
        let networked = runtime.pod_network && !pod.host_network;
        // Spare slots take what the boot disks leave of the guest's names.
        let spare_disks = runtime
            .spare_disks
            .min(u8::try_from(MAX_DISKS.saturating_sub(disks.disks.len())).unwrap_or(0));
        tracing::info!(pod = %pod.name, vcpus = size.vcpus, memory_mib = size.memory_mib, disks = disks.disks.len(), spare_disks, "starting the pod VM");
        let vmm = Arc::new(
            VmmProcess::spawn(
                &runtime.assets,
                size,
                &disks.disks,
                spare_disks,
                networked,
                &runtime.jail,
                VmFiles::new(&dir),
            )
            .map_err(sandbox_err)?,
        );
        let agent = match rt.block_on(wait_for_agent(&vmm, runtime.boot_timeout)) {
            Ok(agent) => agent,
            Err(e) => {
                vmm.kill();
                return Err(sandbox_err(e));
            }
        };
        let mut sandbox = VmSandbox {
            proc_view,
            networked,
            vcpus: size.vcpus,
            pinned: Mutex::new(BTreeMap::new()),
            pod: pod.clone(),
            vmm,
            agent,
            rt,
            disks: disks.images,
            late_disks: Mutex::new(BTreeMap::new()),
            host_devices: disks.volumes,
            ns_dir: None,
            volume_dirs: BTreeMap::new(),
            etc_files: Vec::new(),
            shm: None,
            pids_limit: runtime.pids_limit,
            running: Mutex::new(Vec::new()),
            exec_ids: AtomicU64::new(0),
            destroyed: AtomicBool::new(false),
        };
        if let Err(e) = sandbox.prepare() {
            let _ = sandbox.teardown();
            return Err(e);
        }
        Ok(sandbox)
    }

    /// Runs one agent call with the control timeout.
    pub(super) fn call<T, F>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        call(&self.rt, &self.vmm, what, f)
    }

    fn prepare(&mut self) -> Result<(), RuntimeError> {
        let err = RuntimeError::Sandbox;
        let pod = self.pod.clone();
        let etc: BTreeMap<&str, String> = crate::native::etc_contents(&pod).into_iter().collect();
        let request = v1::CreateSandboxRequest {
            sandbox_id: pod.name.clone(),
            hostname: pod.hostname.clone(),
            hosts: etc["hosts"].clone().into_bytes(),
            resolv_conf: etc["resolv.conf"].clone().into_bytes(),
            sysctls: pod.sysctls.iter().cloned().collect(),
            // hostNetwork/hostIPC/hostPID mean the guest's own namespaces:
            // the VM is the pod's host.
            new_network: !pod.host_network && !self.networked,
            new_ipc: !pod.host_ipc,
            new_uts: !pod.host_network,
            new_pid: pod.share_process_namespace && !pod.host_pid,
            shm_size_bytes: 64 << 20,
        };
        let mut agent = self.agent.clone();
        let created = self
            .call(
                "creating the sandbox in the guest",
                agent.create_sandbox(request),
            )
            .map_err(err)?;
        if !created.namespace_dir.is_empty() {
            self.ns_dir = Some(PathBuf::from(&created.namespace_dir));
        }
        for (name, path) in &created.etc_files {
            self.etc_files
                .push((format!("/etc/{name}"), PathBuf::from(path)));
        }
        self.shm = (!created.shm_dir.is_empty()).then(|| PathBuf::from(&created.shm_dir));
        for volume in &pod.volumes {
            if let Some(device) = self.host_devices.get(&volume.name) {
                // Mounted into containers as the device node itself.
                self.volume_dirs
                    .insert(volume.name.clone(), PathBuf::from(device));
                continue;
            }
            let base = format!("volumes/{}", volume.name);
            // Every emptyDir lives in guest memory; a sizeLimit becomes the
            // size of a tmpfs of its own (medium Memory or not).
            let tmpfs_size = match &volume.source {
                VolumeSource::EmptyDir { size_limit, .. } => *size_limit,
                _ => None,
            };
            let dir = self.make_dir(&base, 0o777, tmpfs_size)?;
            if let VolumeSource::Files(files) = &volume.source {
                for f in files {
                    self.copy_file(&format!("{base}/{}", f.path), f.mode, f.data.clone())?;
                }
                // Like a kubelet-written volume: readable, not world-writable.
                self.make_dir(&base, 0o755, None)?;
            }
            self.volume_dirs.insert(volume.name.clone(), dir);
        }
        Ok(())
    }

    /// Makes a directory under the guest's sandbox directory, with a tmpfs
    /// of `tmpfs_size` bytes on it if given.
    fn make_dir(
        &self,
        path: &str,
        mode: u32,
        tmpfs_size: Option<u64>,
    ) -> Result<PathBuf, RuntimeError> {
        self.send_copy_file(v1::CopyFileRequest {
            path: path.to_string(),
            mode,
            directory: true,
            tmpfs_size_bytes: tmpfs_size,
            ..Default::default()
        })
    }

    /// Writes a file under the guest's sandbox directory.
    fn copy_file(&self, path: &str, mode: u32, data: Vec<u8>) -> Result<PathBuf, RuntimeError> {
        self.send_copy_file(v1::CopyFileRequest {
            path: path.to_string(),
            mode,
            data,
            ..Default::default()
        })
    }

    fn send_copy_file(&self, request: v1::CopyFileRequest) -> Result<PathBuf, RuntimeError> {
        let mut agent = self.agent.clone();
        let path = request.path.clone();
        let done = self
            .call(
                &format!("writing {path} in the guest"),
                agent.copy_file(request),
            )
            .map_err(RuntimeError::Sandbox)?;
        Ok(PathBuf::from(done.guest_path))
    }

    /// As on native (`cpu_placement`): with the view, a container limited to
    /// fewer CPUs than the VM has is pinned to as many guest CPUs, the ones
    /// its pod's other containers use least; a restart keeps its CPUs.
    fn cpuset_for(&self, c: &crate::plan::ContainerPlan) -> Option<String> {
        if !self.proc_view {
            return None;
        }
        let online: Vec<u32> = (0..u32::from(self.vcpus)).collect();
        let n = crate::cpu_placement::cpus_for_limit(c.resources.cpu_limit_milli, online.len())?;
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        let mut in_use = BTreeMap::new();
        for cpu in pinned
            .iter()
            .filter(|(name, _)| **name != c.name)
            .flat_map(|(_, cpus)| cpus)
        {
            *in_use.entry(*cpu).or_default() += 1;
        }
        let list = pinned.get(&c.name).map_or_else(
            || crate::cpu_placement::pick(n, &online, &in_use),
            |cpus| crate::cpu_placement::format_list(cpus),
        );
        pinned.insert(c.name.clone(), vmrun_procview::view::parse_cpu_list(&list));
        Some(list)
    }

    fn spec_context<'a>(&'a self, layers: &'a [PathBuf]) -> SpecContext<'a> {
        SpecContext {
            pod: &self.pod,
            sandbox_ns_dir: self.ns_dir.clone(),
            cgroup_path: String::new(),
            pids_limit: self.pids_limit,
            volume_dirs: &self.volume_dirs,
            shm_dir: self.shm.as_deref(),
            etc_files: &self.etc_files,
            // The guest kernel mounts only cgroup v2.
            cgroup2: true,
            layers,
            proc_view: self
                .proc_view
                .then_some(Path::new(vmrun_procview::DEFAULT_MOUNTPOINT)),
            cpuset: None,
        }
    }

    fn teardown(&self) -> Result<(), RuntimeError> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let running: Vec<_> =
            std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        let alive = self.vmm.try_exit().is_none();
        if alive {
            for c in &running {
                let _ = c.remove();
            }
            let mut agent = self.agent.clone();
            // The agent answers, then powers the guest off; the VMM exits 0.
            let _ = self.call(
                "shutting the guest down",
                agent.shutdown(v1::ShutdownRequest {}),
            );
            if self.vmm.wait_exit(SHUTDOWN_GRACE).is_none() {
                tracing::warn!(pod = %self.pod.name, "the guest did not power off in {SHUTDOWN_GRACE:?}; killing its VMM");
            }
        }
        self.vmm.kill();
        // The VM's logs stay beside the container logs until `vmrun rm`.
        let _ = std::fs::remove_file(&self.vmm.files.vsock);
        Ok(())
    }

    /// Copies host path `host` to `dest` under the guest's sandbox
    /// directory; the copy's guest path.
    fn copy_host_path(&self, dest: &str, host: &Path, budget: &mut u64) -> Result<PathBuf, String> {
        let entries = host_mounts::entries(host, budget).map_err(|e| e.to_string())?;
        let mut top = None;
        for entry in entries {
            let (path, made) = match entry {
                host_mounts::Entry::Dir { path, mode } => {
                    let guest = join(dest, &path);
                    (path, self.make_dir(&guest, mode, None))
                }
                host_mounts::Entry::File { path, mode, data } => {
                    let guest = join(dest, &path);
                    (path, self.copy_file(&guest, mode, data))
                }
            };
            let made = made.map_err(|e| e.to_string())?;
            if path.is_empty() {
                top = Some(made);
            }
        }
        top.ok_or_else(|| format!("host path {}: nothing was copied", host.display()))
    }

    /// The guest device of an image: one it booted with, else its block
    /// image attached now to a spare slot (once per block image).
    fn image_device(&self, image: &str, block_image: Option<&Path>) -> Result<String, String> {
        if let Some(device) = self.disks.get(image) {
            return Ok(device.clone());
        }
        let path = block_image.ok_or_else(|| format!("image {image:?} has no disk in this VM"))?;
        let mut late = self.late_disks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(device) = late.get(path) {
            return Ok(device.clone());
        }
        let index = self
            .vmm
            .attach_disk(path, true)
            .map_err(|e| format!("image {image:?}: {e}"))?;
        let device = guest_disk(index).map_err(|e| e.to_string())?;
        tracing::info!(pod = %self.pod.name, image, %device, "attached the image's disk");
        late.insert(path.to_path_buf(), device.clone());
        Ok(device)
    }

    fn next_exec_id(&self) -> String {
        format!("exec-{}", self.exec_ids.fetch_add(1, Ordering::Relaxed))
    }
}

/// Runs one agent call with the control timeout, naming the VM's end if it died.
pub(super) fn call<T, F>(rt: &Handle, vmm: &VmmProcess, what: &str, f: F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match rt.block_on(tokio::time::timeout(RPC_TIMEOUT, f)) {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => match vmm.try_exit() {
            Some(exit) => Err(format!(
                "{what}: the VM is gone: {}",
                vmm.exit_reason(Some(exit))
            )),
            None => Err(status_msg(what, &status)),
        },
        Err(_) => Err(format!(
            "{what}: the guest agent did not answer in {RPC_TIMEOUT:?}"
        )),
    }
}

/// Polls the hybrid vsock until the agent answers `Health`, the VMM exits,
/// or `timeout` passes.
async fn wait_for_agent(
    vmm: &VmmProcess,
    timeout: Duration,
) -> Result<AgentClient<Channel>, String> {
    let started = Instant::now();
    let port = vmrun_proto::AGENT_VSOCK_PORT;
    loop {
        if let Some(exit) = vmm.try_exit() {
            return Err(format!(
                "the VM stopped before its agent answered: {}",
                vmm.exit_reason(Some(exit))
            ));
        }
        match vmrun_proto::connect_hybrid_vsock(&vmm.vsock_addr(), port).await {
            Ok(mut agent) => match agent.health(v1::HealthRequest {}).await {
                Ok(health) => {
                    let h = health.into_inner();
                    if h.protocol_version != vmrun_proto::PROTOCOL_VERSION {
                        return Err(format!(
                            "guest agent {} speaks protocol {}, this host {}: rebuild the guest (scripts/build-guest)",
                            h.agent_version, h.protocol_version, vmrun_proto::PROTOCOL_VERSION
                        ));
                    }
                    tracing::info!(agent = %h.agent_version, kernel = %h.kernel_release, after = ?started.elapsed(), "guest agent ready");
                    return Ok(agent);
                }
                Err(status) => tracing::debug!("agent health: {status}"),
            },
            Err(e) if e.is_retryable() => {}
            Err(e) => tracing::debug!("agent connect: {e}"),
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "the guest agent did not answer within {timeout:?} ({})",
                vmm.exit_reason(None)
            ));
        }
        tokio::time::sleep(BOOT_POLL).await;
    }
}

impl Sandbox for VmSandbox {
    fn start(&self, launch: Launch) -> Result<Arc<dyn Running>, RuntimeError> {
        let c = &launch.container;
        let start_err = |message: String| RuntimeError::Start {
            container: c.name.clone(),
            message,
        };
        let id = format!("{}-{}", c.name, launch.attempt);
        for m in &c.mounts {
            if let Some(sub) = &m.sub_path {
                // Kubernetes creates a missing subPath as a directory.
                self.make_dir(&format!("volumes/{}/{sub}", m.volume), 0o755, None)
                    .map_err(|e| start_err(e.to_string()))?;
            }
        }
        // CRI mounts name host paths: the guest gets copies (host_mounts.rs).
        let mut c = c.clone();
        let mut budget = host_mounts::MAX_COPY_BYTES;
        for (index, m) in c.mounts.iter_mut().enumerate() {
            if let Some(host) = &m.host_path {
                let guest = self
                    .copy_host_path(&format!("host-mounts/{id}/{index}"), host, &mut budget)
                    .map_err(|e| start_err(format!("mount {}: {e}", m.path)))?;
                m.host_path = Some(guest);
            }
        }
        let c = &c;
        let mut ctx = self.spec_context(&launch.layers);
        ctx.cgroup_path = format!("/vmrun/{id}");
        ctx.cpuset = self.cpuset_for(c);
        let mut spec =
            container_spec(&ctx, c, &launch.image).map_err(|e| start_err(e.to_string()))?;
        // What execs into the container start from: no terminal unless asked.
        let process = serde_json::to_value(spec.process()).unwrap_or_default();
        if launch.tty {
            // The agent gives a terminal process a pty of its own (slave as
            // stdio and controlling terminal), its output on stdout only.
            let mut process = spec.process().clone().unwrap_or_default();
            process.set_terminal(Some(true));
            spec.set_process(Some(process));
        }
        let spec_json = serde_json::to_vec(&spec).map_err(|e| start_err(e.to_string()))?;
        let device = self
            .image_device(&c.image, launch.block_image.as_deref())
            .map_err(start_err)?;
        let request = v1::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec_json: spec_json,
            rootfs: Some(v1::create_container_request::Rootfs::Image(v1::ImageDisk {
                device: device.clone(),
                fstype: "erofs".into(),
                layers: (0..launch.layers.len())
                    .map(|i| format!("{BLOCK_LAYERS_DIR}/{i}"))
                    .collect(),
            })),
            stdin: launch.stdin.is_some(),
        };
        let mut agent = self.agent.clone();
        let created = self
            .call(
                "creating the container in the guest",
                agent.create_container(request),
            )
            .map_err(start_err)?;
        let made = VmContainer::new(
            c.name.clone(),
            id.clone(),
            created.pid,
            process,
            self,
            ContainerStdio {
                stdin: launch.stdin,
                stdout: launch.stdout,
                stderr: launch.stderr,
            },
        );
        let running = match made {
            Ok(made) => Arc::new(made),
            Err(e) => {
                let mut agent = self.agent.clone();
                let request = v1::RemoveContainerRequest {
                    container_id: id.clone(),
                };
                let _ = self.call("removing the container", agent.remove_container(request));
                return Err(start_err(format!("relaying its stdin: {e}")));
            }
        };
        let mut agent = self.agent.clone();
        let started = self.call(
            "starting the container in the guest",
            agent.start_container(v1::StartContainerRequest {
                container_id: id.clone(),
            }),
        );
        if let Err(e) = started {
            let _ = running.remove();
            return Err(start_err(e));
        }
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(running.clone());
        Ok(running)
    }

    fn exec(
        &self,
        target: &dyn Running,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let exec_err = |message: String| RuntimeError::Exec {
            container: target.name().to_string(),
            message,
        };
        let t = target.exec_target();
        let container_id = t["container_id"].as_str().unwrap_or_default().to_string();
        let mut process = t["process"].clone();
        process["args"] = serde_json::json!(argv);
        container::exec_collect(
            &self.rt,
            &self.vmm,
            self.agent.clone(),
            &container_id,
            &self.next_exec_id(),
            &process,
            timeout,
        )
        .map_err(exec_err)
    }

    fn connect(&self, port: u16, timeout: Duration) -> Result<Box<dyn PodStream>, RuntimeError> {
        // The agent connects to 127.0.0.1:<port> in the pod's network
        // namespace and forwards the stream over vsock.
        vmrun_proto::connect_guest_tcp_blocking(&self.vmm.vsock_addr(), port, timeout)
            .map(|stream| Box::new(stream) as Box<dyn PodStream>)
            .map_err(|e| RuntimeError::Connect {
                port,
                message: e.to_string(),
            })
    }

    fn destroy(&self) -> Result<(), RuntimeError> {
        self.teardown()
    }

    fn guest_forwarder(&self) -> Option<PathBuf> {
        Some(self.vmm.vsock_addr())
    }

    fn network_holder_pid(&self) -> Option<i32> {
        self.networked.then(|| self.vmm.pid() as i32)
    }

    fn network_attached(&self, netns: &Path) -> Result<(), RuntimeError> {
        let err = |e: String| RuntimeError::Sandbox(format!("pod network: {e}"));
        let request = super::network::wire(netns).map_err(|e| err(e.to_string()))?;
        let mut agent = self.agent.clone();
        self.call(
            "configuring the guest's network",
            agent.configure_network(request),
        )
        .map_err(err)?;
        Ok(())
    }

    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError> {
        if self.vmm.try_exit().is_some() {
            return Ok(None);
        }
        let (cpu_usage_ns, memory_usage_bytes) = self
            .vmm
            .host_usage()
            .map_err(|e| RuntimeError::Sandbox(format!("the VMM's usage: {e}")))?;
        let running: Vec<_> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Processes are the guest's: those of the containers still there
        // (a removed one answers NotFound and counts none).
        let pids = running
            .iter()
            .filter_map(|c| c.usage().ok().flatten())
            .map(|u| u.pids)
            .sum();
        Ok(Some(CgroupStats {
            memory_usage_bytes,
            cpu_usage_ns,
            pids,
        }))
    }

    fn lost(&self) -> Option<String> {
        if self.destroyed.load(Ordering::SeqCst) {
            return None;
        }
        let exit = self.vmm.try_exit()?;
        Some(format!(
            "the pod VM died: {}",
            self.vmm.exit_reason(Some(exit))
        ))
    }
}

fn join(dest: &str, rel: &str) -> String {
    if rel.is_empty() {
        dest.to_string()
    } else {
        format!("{dest}/{rel}")
    }
}

/// The layer directory inside image disks (`vmrun_image::BLOCK_LAYERS_DIR`).
const BLOCK_LAYERS_DIR: &str = "layers";
