//! The native runtime: the pod as namespace + cgroup containers on the host,
//! built by `vmrun-container` (the same library the guest agent uses).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::Signal;
use oci_spec::runtime::LinuxResources;
use serde_json::json;
use vmrun_container::{cgroups, Console, LinuxSyscall, Rootfs, Stdio};

use crate::cpu_placement;
use crate::plan::{PodPlan, VolumeSource};
use crate::runtime::{
    CgroupStats, ExecOutput, ExitInfo, Launch, PodStream, Running, Runtime, RuntimeError, Sandbox,
    WindowSize,
};
use crate::spec::{container_spec, SpecContext};
use crate::terminal::Terminal;

/// Parent of every pod's cgroup, in each controller.
pub const CGROUP_PARENT: &str = "/vmrun";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NativeRuntime {
    pub state_root: PathBuf,
    /// Per-container pids limit (the kubelet's podPidsLimit, applied per container).
    pub pids_limit: Option<i64>,
    /// The host's /proc view, when configured (pods may still opt out).
    #[serde(default)]
    pub proc_view: Option<ProcViewSetup>,
}

/// Where the host's /proc view daemon is and where it mounts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcViewSetup {
    /// The `vmrun-procview` binary, started when no daemon serves yet.
    pub binary: PathBuf,
    pub mountpoint: PathBuf,
}

impl NativeRuntime {
    /// The view's mount point for `pod`, starting the host's daemon if
    /// needed; None when the pod opts out or none is configured. A daemon
    /// that cannot start is a warning, not a failed pod: the containers
    /// then read the host's /proc, as under runc.
    fn proc_view_for(&self, pod: &PodPlan) -> Result<Option<PathBuf>, RuntimeError> {
        let wanted = crate::spec::proc_view_wanted(pod).map_err(RuntimeError::Sandbox)?;
        let Some(setup) = self.proc_view.as_ref().filter(|_| wanted) else {
            return Ok(None);
        };
        match vmrun_procview::ensure_running(&setup.binary, &setup.mountpoint) {
            Ok(()) => Ok(Some(setup.mountpoint.clone())),
            Err(e) => {
                tracing::warn!(
                    "pod {}: no /proc view, containers see the host's /proc: {e}",
                    pod.name
                );
                Ok(None)
            }
        }
    }
}

impl Runtime for NativeRuntime {
    fn name(&self) -> &'static str {
        "native"
    }

    fn create_sandbox(&self, pod: &PodPlan) -> Result<Arc<dyn Sandbox>, RuntimeError> {
        Ok(Arc::new(self.create_native_sandbox(pod)?))
    }
}

impl NativeRuntime {
    /// The sandbox itself, for runtimes that build on it (wasm: its engine
    /// process joins this sandbox's namespaces, cgroup and volumes).
    pub(crate) fn create_native_sandbox(
        &self,
        pod: &PodPlan,
    ) -> Result<NativeSandbox, RuntimeError> {
        let dir = crate::state::pod_dir(&self.state_root, &pod.name);
        let proc_view = self.proc_view_for(pod)?;
        let mut sandbox = NativeSandbox {
            state_root: self.state_root.clone(),
            proc_view,
            pod: pod.clone(),
            dir: dir.clone(),
            cgroup: format!("{CGROUP_PARENT}/{}", pod.uid),
            pids_limit: self.pids_limit,
            volume_dirs: BTreeMap::new(),
            etc_files: Vec::new(),
            shm: None,
            mounts: Mutex::new(Vec::new()),
            pause: None,
            running: Mutex::new(Vec::new()),
            cgroup2: Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
        };
        // On any failure, undo what was made so far: bad input leaves nothing behind.
        if let Err(e) = sandbox.prepare() {
            let _ = sandbox.teardown();
            return Err(e);
        }
        Ok(sandbox)
    }
}

pub(crate) struct NativeSandbox {
    /// The runtime's state root, which hostPath volumes may not reach.
    state_root: PathBuf,
    pod: PodPlan,
    dir: PathBuf,
    cgroup: String,
    pids_limit: Option<i64>,
    volume_dirs: BTreeMap<String, PathBuf>,
    etc_files: Vec<(String, PathBuf)>,
    shm: Option<PathBuf>,
    /// Host mounts this pod made (tmpfs for memory emptyDirs and /dev/shm), to unmount.
    mounts: Mutex<Vec<PathBuf>>,
    pause: Option<vmrun_container::Sandbox>,
    running: Mutex<Vec<Arc<NativeContainer>>>,
    cgroup2: bool,
    proc_view: Option<PathBuf>,
}

fn sandbox_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Sandbox(format!("{what}: {e}"))
}

impl NativeSandbox {
    /// The pod's directory under the state root.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pod's cgroup path (parent of its containers' cgroups).
    pub(crate) fn cgroup(&self) -> &str {
        &self.cgroup
    }

    /// Where a volume's files are on the host.
    pub(crate) fn volume_dir(&self, volume: &str) -> Option<&Path> {
        self.volume_dirs.get(volume).map(PathBuf::as_path)
    }

    /// The pod's network namespace, when it has its own.
    pub(crate) fn netns_path(&self) -> Option<PathBuf> {
        self.pause
            .as_ref()
            .filter(|_| !self.pod.host_network)
            .map(|p| p.namespace_path("net"))
    }

    pub(crate) fn pod(&self) -> &PodPlan {
        &self.pod
    }

    fn prepare(&mut self) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| sandbox_err(self.dir.display(), e))?;
        self.prepare_volumes()?;
        self.prepare_etc()?;
        let pod = &self.pod;
        let needs_pause =
            !pod.host_network || !pod.host_ipc || (pod.share_process_namespace && !pod.host_pid);
        if needs_pause {
            let config = vmrun_container::SandboxConfig {
                id: format!("{}-pause", pod.name),
                hostname: (!pod.host_network).then(|| pod.hostname.clone()),
                new_network: !pod.host_network,
                new_ipc: !pod.host_ipc,
                new_uts: !pod.host_network,
                new_pid: pod.share_process_namespace && !pod.host_pid,
                cgroup_path: Some(format!("{}/pause", self.cgroup)),
            };
            let pause = vmrun_container::create_sandbox(&config, &LinuxSyscall)
                .map_err(|e| RuntimeError::Sandbox(e.to_string()))?;
            self.pause = Some(pause);
        }
        Ok(())
    }

    fn mount_tmpfs(&self, dir: &Path, size: Option<u64>) -> Result<(), RuntimeError> {
        let data = match size {
            Some(bytes) => format!("mode=1777,size={bytes}"),
            None => "mode=1777".to_string(),
        };
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|e| sandbox_err(format!("mounting tmpfs on {}", dir.display()), e))?;
        self.mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.to_path_buf());
        Ok(())
    }

    fn prepare_volumes(&mut self) -> Result<(), RuntimeError> {
        let root = self.dir.join("volumes");
        crate::plan::check_host_paths_outside(&self.pod, &[&self.state_root])
            .map_err(|e| RuntimeError::Sandbox(e.to_string()))?;
        for volume in self.pod.volumes.clone() {
            let dir = root.join(&volume.name);
            let path = match &volume.source {
                VolumeSource::EmptyDir { memory, size_limit } => {
                    create_dir(&dir, 0o777)?;
                    if *memory {
                        self.mount_tmpfs(&dir, *size_limit)?;
                    }
                    dir
                }
                VolumeSource::HostPath { path, kind } => {
                    check_host_path(&volume.name, Path::new(path), kind)?;
                    PathBuf::from(path)
                }
                VolumeSource::Files(files) => {
                    create_dir(&dir, 0o755)?;
                    for f in files {
                        let target = dir.join(&f.path);
                        if let Some(parent) = target.parent() {
                            create_dir(parent, 0o755)?;
                        }
                        let mut file = std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .mode(f.mode)
                            .open(&target)
                            .map_err(|e| sandbox_err(target.display(), e))?;
                        std::io::Write::write_all(&mut file, &f.data)
                            .map_err(|e| sandbox_err(target.display(), e))?;
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(f.mode))
                            .map_err(|e| sandbox_err(target.display(), e))?;
                    }
                    dir
                }
            };
            self.volume_dirs.insert(volume.name.clone(), path);
        }
        Ok(())
    }

    fn prepare_etc(&mut self) -> Result<(), RuntimeError> {
        let etc = self.dir.join("etc");
        create_dir(&etc, 0o755)?;
        let pod = &self.pod;
        for (name, content) in etc_contents(pod) {
            let path = etc.join(name);
            std::fs::write(&path, content).map_err(|e| sandbox_err(path.display(), e))?;
            self.etc_files.push((format!("/etc/{name}"), path));
        }
        if pod.host_ipc {
            self.shm = Some(PathBuf::from("/dev/shm"));
        } else {
            let shm = self.dir.join("shm");
            create_dir(&shm, 0o1777)?;
            self.mount_tmpfs(&shm, Some(64 << 20))?;
            self.shm = Some(shm);
        }
        Ok(())
    }

    pub(crate) fn teardown(&self) -> Result<(), RuntimeError> {
        let mut errors = Vec::new();
        let running: Vec<_> =
            std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        for c in running {
            if let Err(e) = c.remove() {
                errors.push(e.to_string());
            }
        }
        if let Some(pause) = &self.pause {
            if let Err(e) = pause.destroy() {
                errors.push(format!("pause process: {e}"));
            }
        }
        let mounts: Vec<_> =
            std::mem::take(&mut *self.mounts.lock().unwrap_or_else(|p| p.into_inner()));
        for m in mounts.iter().rev() {
            if let Err(e) = umount2(m, MntFlags::MNT_DETACH) {
                errors.push(format!("unmounting {}: {e}", m.display()));
            }
        }
        if let Err(e) = cgroups::remove_path(&self.cgroup) {
            errors.push(format!("cgroup {}: {e}", self.cgroup));
        }
        // Logs and the pod record stay for `vmrun logs`/`ps` until `vmrun rm`.
        for sub in ["volumes", "containers", "shm", "etc"] {
            let path = self.dir.join(sub);
            if let Err(e) = remove_tree(&path) {
                errors.push(format!("{}: {e}", path.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Destroy(errors.join("; ")))
        }
    }

    /// With the /proc view, a container limited to fewer CPUs than the host
    /// is pinned to as many (see `cpu_placement`).
    fn cpuset_for(&self, c: &crate::plan::ContainerPlan) -> Option<String> {
        self.proc_view.as_ref()?;
        let online = cpu_placement::online_cpus();
        let n = cpu_placement::cpus_for_limit(c.resources.cpu_limit_milli, online.len())?;
        let root = Path::new(cgroups::DEFAULT_ROOT);
        let parent = if self.cgroup2 {
            root.join(CGROUP_PARENT.trim_start_matches('/'))
        } else {
            root.join("cpuset")
                .join(CGROUP_PARENT.trim_start_matches('/'))
        };
        Some(cpu_placement::pick(
            n,
            &online,
            &cpu_placement::in_use(&parent, &online),
        ))
    }

    fn spec_context(&self) -> SpecContext<'_> {
        SpecContext {
            pod: &self.pod,
            sandbox_ns_dir: self
                .pause
                .as_ref()
                .map(|p| PathBuf::from(format!("/proc/{}/ns", p.pid()))),
            cgroup_path: String::new(),
            pids_limit: self.pids_limit,
            volume_dirs: &self.volume_dirs,
            shm_dir: self.shm.as_deref(),
            etc_files: &self.etc_files,
            cgroup2: self.cgroup2,
            layers: &[],
            proc_view: self.proc_view.as_deref(),
            cpuset: None,
        }
    }
}

/// The pod's /etc/hosts, /etc/hostname and /etc/resolv.conf, by file name.
/// The host's own with hostNetwork, else a loopback-only hosts file.
pub(crate) fn etc_contents(pod: &PodPlan) -> [(&'static str, String); 3] {
    let (hosts, hostname) = if pod.host_network {
        (
            std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )
    } else {
        (
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
                pod.hostname
            ),
            pod.hostname.clone(),
        )
    };
    let resolv = match &pod.resolv_conf {
        Some(text) => text.clone(),
        None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    [
        ("hosts", hosts),
        ("hostname", format!("{hostname}\n")),
        ("resolv.conf", resolv),
    ]
}

pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn create_dir(dir: &Path, mode: u32) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(dir).map_err(|e| sandbox_err(dir.display(), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| sandbox_err(dir.display(), e))
}

/// hostPath `type` semantics, checked before anything is mounted.
pub(crate) fn check_host_path(volume: &str, path: &Path, kind: &str) -> Result<(), RuntimeError> {
    let err = |msg: String| {
        RuntimeError::Sandbox(format!(
            "volume {volume:?}: hostPath {}: {msg}",
            path.display()
        ))
    };
    let meta = std::fs::metadata(path);
    use std::os::unix::fs::FileTypeExt;
    match kind {
        "DirectoryOrCreate" => {
            if meta.is_err() {
                std::fs::create_dir_all(path).map_err(|e| err(e.to_string()))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| err(e.to_string()))?;
            } else if !meta.as_ref().is_ok_and(|m| m.is_dir()) {
                return Err(err("exists and is not a directory".into()));
            }
        }
        "FileOrCreate" => {
            if meta.is_err() {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o644)
                    .open(path)
                    .map_err(|e| err(e.to_string()))?;
            } else if !meta.as_ref().is_ok_and(|m| m.is_file()) {
                return Err(err("exists and is not a file".into()));
            }
        }
        _ => {
            let meta = meta.map_err(|e| err(e.to_string()))?;
            let ft = meta.file_type();
            let ok = match kind {
                "" => true,
                "Directory" => ft.is_dir(),
                "File" => ft.is_file(),
                "Socket" => ft.is_socket(),
                "CharDevice" => ft.is_char_device(),
                "BlockDevice" => ft.is_block_device(),
                _ => false,
            };
            if !ok {
                return Err(err(format!("is not a {kind}")));
            }
        }
    }
    Ok(())
}

impl Sandbox for NativeSandbox {
    fn start(&self, launch: Launch) -> Result<Arc<dyn Running>, RuntimeError> {
        let c = &launch.container;
        let start_err = |message: String| RuntimeError::Start {
            container: c.name.clone(),
            message,
        };
        let dir = self
            .dir
            .join("containers")
            .join(format!("{}-{}", c.name, launch.attempt));
        remove_tree(&dir).map_err(|e| start_err(format!("{}: {e}", dir.display())))?;
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| start_err(format!("{}: {e}", d.display())))?;
        }
        for m in &c.mounts {
            if let Some(host) = &m.host_path {
                // containerd creates a missing bind source as a directory.
                if !host.exists() {
                    std::fs::create_dir_all(host)
                        .map_err(|e| start_err(format!("mount source {}: {e}", host.display())))?;
                }
                continue;
            }
            if let (Some(sub), Some(root)) = (&m.sub_path, self.volume_dirs.get(&m.volume)) {
                // Kubernetes creates a missing subPath as a directory.
                let path = root.join(sub);
                if !path.exists() {
                    std::fs::create_dir_all(&path)
                        .map_err(|e| start_err(format!("subPath {}: {e}", path.display())))?;
                }
            }
        }
        let cgroup_path = format!("{}/{}", self.cgroup, c.name);
        let mut ctx = self.spec_context();
        ctx.cgroup_path = cgroup_path.clone();
        ctx.layers = &launch.layers;
        ctx.cpuset = self.cpuset_for(c);
        let mut spec =
            container_spec(&ctx, c, &launch.image).map_err(|e| start_err(e.to_string()))?;
        // The overlay is mounted here, inside the container's mount namespace only.
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs)
            .map_err(|e| start_err(format!("{}: {e}", rootfs.display())))?;
        if let Some(root) = spec.root_mut() {
            root.set_path(rootfs);
        }
        let mut process = serde_json::to_value(spec.process()).unwrap_or_default();
        // An exec'd process gets a terminal only when it asks for one.
        if let Some(p) = process.as_object_mut() {
            p.remove("terminal");
        }
        if launch.tty {
            if let Some(p) = spec.process_mut() {
                p.set_terminal(Some(true));
            }
        }
        // Processes exec'd into the container get its filter too.
        let seccomp = serde_json::to_value(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
            .unwrap_or_default();
        let mut lower = launch.layers.clone();
        if lower.is_empty() {
            // overlayfs needs one lower dir; an image with no layers gets an empty one.
            let empty = dir.join("empty");
            std::fs::create_dir_all(&empty).map_err(|e| start_err(e.to_string()))?;
            lower.push(empty);
        }
        let (stdio, console, terminal) =
            container_stdio(launch.stdin, launch.stdout, launch.stderr, launch.tty);
        let config = vmrun_container::ContainerConfig {
            id: format!("{}-{}-{}", self.pod.name, c.name, launch.attempt),
            spec,
            rootfs: Rootfs::Overlay { lower, upper, work },
            stdio,
            console,
        };
        let mut created =
            vmrun_container::create(config, &LinuxSyscall).map_err(|e| start_err(e.to_string()))?;
        let terminal = match terminal {
            // Relayed from before the exec, so the first output is not held up.
            Some((stdin, stdout)) => {
                let relayed = created
                    .take_terminal()
                    .ok_or_else(|| "the container's init sent no terminal".to_string())
                    .and_then(|master| Terminal::from_master(master).map_err(|e| e.to_string()))
                    .and_then(|terminal| {
                        terminal
                            .relay(stdin, stdout)
                            .map(|()| terminal)
                            .map_err(|e| format!("relaying the container's terminal: {e}"))
                    });
                match relayed {
                    Ok(terminal) => Some(terminal),
                    Err(e) => {
                        created.abort();
                        return Err(start_err(e));
                    }
                }
            }
            None => None,
        };
        let container = created.start().map_err(|e| start_err(e.to_string()))?;
        let running = Arc::new(NativeContainer {
            name: c.name.clone(),
            container,
            dir,
            cgroup: cgroup_path,
            process,
            seccomp,
            terminal,
        });
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
        exec_in(&target.exec_target(), argv, timeout).map_err(|message| RuntimeError::Exec {
            container: target.name().to_string(),
            message,
        })
    }

    fn connect(&self, port: u16, timeout: Duration) -> Result<Box<dyn PodStream>, RuntimeError> {
        let err = move |message: String| RuntimeError::Connect { port, message };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let Some(pause) = self.pause.as_ref().filter(|_| !self.pod.host_network) else {
            return TcpStream::connect_timeout(&addr, timeout)
                .map(|s| Box::new(s) as Box<dyn PodStream>)
                .map_err(|e| err(e.to_string()));
        };
        let netns = std::fs::File::open(pause.namespace_path("net"))
            .map_err(|e| err(format!("pod network namespace: {e}")))?;
        // A network namespace is per thread: a short-lived thread enters the pod's,
        // connects, and hands back the socket, which stays in that namespace.
        std::thread::spawn(move || {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| err(format!("entering the pod network: {e}")))?;
            TcpStream::connect_timeout(&addr, timeout)
                .map(|s| Box::new(s) as Box<dyn PodStream>)
                .map_err(|e| err(e.to_string()))
        })
        .join()
        .map_err(|_| RuntimeError::Connect {
            port,
            message: "connect thread panicked".into(),
        })?
    }

    fn destroy(&self) -> Result<(), RuntimeError> {
        self.teardown()
    }

    fn network_holder_pid(&self) -> Option<i32> {
        self.pause
            .as_ref()
            .filter(|_| !self.pod.host_network)
            .map(|p| p.pid())
    }

    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError> {
        Ok(cgroups::open_existing(&self.cgroup)
            .ok()
            .map(|cgroup| cgroup.stats()))
    }
}

/// A terminal's pieces until the container exists: the caller's stdin and
/// stdout the terminal relays.
type PendingTerminal = (Option<OwnedFd>, OwnedFd);

/// The container's stdio from a launch's: the caller's pipes as they are,
/// or with `tty` a terminal the init opens on the container's devpts (the
/// caller's stderr then goes unused: a terminal has one output).
fn container_stdio(
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    tty: bool,
) -> (Stdio, Console, Option<PendingTerminal>) {
    if !tty {
        let stdio = Stdio {
            stdin,
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        return (stdio, Console::Passed, None);
    }
    drop(stderr);
    (
        Stdio::default(),
        Console::FromContainer,
        Some((stdin, stdout)),
    )
}

struct NativeContainer {
    name: String,
    container: vmrun_container::Container,
    dir: PathBuf,
    cgroup: String,
    process: serde_json::Value,
    /// `linux.seccomp` of the container's spec (null without one).
    seccomp: serde_json::Value,
    /// With [`Launch::tty`]: the master and its relays.
    terminal: Option<Terminal>,
}

impl Running for NativeContainer {
    fn name(&self) -> &str {
        &self.name
    }
    fn pid(&self) -> i32 {
        self.container.pid()
    }
    fn signal(&self, signal: Signal) -> Result<(), RuntimeError> {
        self.container
            .signal(signal)
            .map_err(|e| RuntimeError::Control {
                container: self.name.clone(),
                message: e.to_string(),
            })
    }
    fn wait(&self) -> Result<ExitInfo, RuntimeError> {
        let status = self.container.wait().map_err(|e| RuntimeError::Control {
            container: self.name.clone(),
            message: e.to_string(),
        })?;
        Ok(ExitInfo {
            code: status.code,
            signal: status.signal,
            oom_killed: status.signal == Some(libc::SIGKILL) && self.container.oom_killed(),
        })
    }
    fn remove(&self) -> Result<(), RuntimeError> {
        self.container
            .destroy()
            .map_err(|e| RuntimeError::Control {
                container: self.name.clone(),
                message: e.to_string(),
            })?;
        if let Some(terminal) = &self.terminal {
            terminal.close();
        }
        remove_tree(&self.dir).map_err(|e| RuntimeError::Control {
            container: self.name.clone(),
            message: format!("{}: {e}", self.dir.display()),
        })
    }
    fn exec_target(&self) -> serde_json::Value {
        json!({
            "runtime": "native",
            "pid": self.pid(),
            "cgroup": self.cgroup,
            "process": self.process,
            "seccomp": self.seccomp,
        })
    }
    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError> {
        Ok(cgroups::open_existing(&self.cgroup)
            .ok()
            .map(|cgroup| cgroup.stats()))
    }
    fn writable_layer(&self) -> Result<Option<vmrun_container::DirUsage>, RuntimeError> {
        Ok(Some(vmrun_container::dir_usage(&self.dir.join("upper"))))
    }
    fn update_resources(&self, resources: &LinuxResources) -> Result<(), RuntimeError> {
        let err = |message: String| RuntimeError::Control {
            container: self.name.clone(),
            message,
        };
        cgroups::open_existing(&self.cgroup)
            .map_err(|e| err(format!("its cgroup: {e}")))?
            .apply(resources)
            .map_err(|e| err(format!("updating its cgroup: {e}")))
    }
    fn resize(&self, size: WindowSize) -> Result<(), RuntimeError> {
        let err = |message: String| RuntimeError::Control {
            container: self.name.clone(),
            message,
        };
        let terminal = self
            .terminal
            .as_ref()
            .ok_or_else(|| err("it has no terminal to resize (started without tty)".into()))?;
        terminal
            .resize(size)
            .map_err(|e| err(format!("resizing its terminal: {e}")))
    }
}

/// Runs `argv` in the container described by an exec target, capturing output.
/// Also what `vmrun exec` uses from another process.
pub fn exec_in(
    target: &serde_json::Value,
    argv: &[String],
    timeout: Duration,
) -> Result<ExecOutput, String> {
    let (out_r, out_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let err_w = out_w.try_clone().map_err(|e| format!("pipe: {e}"))?;
    let process = spawn_exec(
        target,
        argv,
        Stdio {
            stdin: None,
            stdout: Some(out_w),
            stderr: Some(err_w),
        },
    )?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut file = std::fs::File::from(out_r);
        // Bounded, so a chatty probe cannot eat the supervisor's memory.
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, 1 << 20), &mut out);
        out
    });
    if !wait_exit(process.pid(), timeout).map_err(|e| format!("waiting for {argv:?}: {e}"))? {
        let _ = process.signal(Signal::SIGKILL);
        let _ = process.wait();
        return Err(format!("{argv:?} timed out after {timeout:?}"));
    }
    let status = process
        .wait()
        .map_err(|e| format!("waiting for {argv:?}: {e}"))?;
    let status = ExitInfo {
        code: status.code,
        signal: status.signal,
        oom_killed: false,
    };
    let output = reader.join().unwrap_or_default();
    Ok(ExecOutput {
        exit: status,
        output,
        separate: None,
    })
}

/// Starts `argv` inside the container of an exec target with the given stdio.
pub fn spawn_exec(
    target: &serde_json::Value,
    argv: &[String],
    stdio: Stdio,
) -> Result<vmrun_container::ExecProcess, String> {
    let pid = target["pid"].as_i64().ok_or("exec target without a pid")? as i32;
    let cgroup = target["cgroup"].as_str().map(str::to_string);
    let mut process: oci_spec::runtime::Process = serde_json::from_value(target["process"].clone())
        .map_err(|e| format!("exec target: {e}"))?;
    process.set_args(Some(argv.to_vec()));
    let seccomp: Option<oci_spec::runtime::LinuxSeccomp> =
        serde_json::from_value(target["seccomp"].clone())
            .map_err(|e| format!("exec target: seccomp: {e}"))?;
    vmrun_container::exec(
        pid,
        &process,
        seccomp.as_ref(),
        cgroup.as_deref(),
        stdio,
        &LinuxSyscall,
    )
    .map_err(|e| e.to_string())
}

/// A pidfd for `pid`: pollable for its exit without reaping it.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh pidfd returned above and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Waits until the process of `pidfd` exits (true) or `timeout` passes (false).
pub fn poll_exit(pidfd: &OwnedFd, timeout: Option<Duration>) -> std::io::Result<bool> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    loop {
        let wait = match deadline {
            None => nix::poll::PollTimeout::NONE,
            Some(d) => {
                let left = d
                    .saturating_duration_since(std::time::Instant::now())
                    .as_millis();
                nix::poll::PollTimeout::try_from(left.min(i32::MAX as u128) as i32)
                    .unwrap_or(nix::poll::PollTimeout::MAX)
            }
        };
        match nix::poll::poll(&mut fds, wait) {
            Ok(n) => return Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits up to `timeout` for process `pid` to exit, without reaping it: true when it did.
fn wait_exit(pid: i32, timeout: Duration) -> std::io::Result<bool> {
    poll_exit(&pidfd_open(pid)?, Some(timeout))
}
