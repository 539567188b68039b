//! `CreateSandbox`: the pod's shared namespaces (held by the container
//! library's pause process), its /etc files, /dev/shm and sysctls; and the
//! checks of `DestroySandbox` (whose teardown is the service's, shared with
//! `Shutdown`).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use tonic::Status;
use vmrun_container::{LinuxSyscall, SandboxConfig};
use vmrun_proto::v1::{CreateSandboxRequest, CreateSandboxResponse};

/// Default size of the pod's /dev/shm, as Docker and containerd use.
const DEFAULT_SHM_BYTES: u64 = 64 << 20;

/// Name of the pause process's cgroup under the agent's cgroup parent (and
/// so not usable as a container id).
pub(crate) const PAUSE_CGROUP: &str = "pause";

#[derive(Debug, thiserror::Error)]
pub enum CreateSandboxError {
    #[error("create sandbox {id}: sandbox {existing} already exists in this guest")]
    Exists { id: String, existing: String },
    #[error("create sandbox {id}: {reason}")]
    Invalid { id: String, reason: String },
    #[error("create sandbox {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        source: std::io::Error,
    },
    #[error("create sandbox {id}: pause process: {source}")]
    Pause {
        id: String,
        source: vmrun_container::SandboxError,
    },
    #[error("create sandbox {id}: sysctl {key}={value}: {source}")]
    Sysctl {
        id: String,
        key: String,
        value: String,
        source: std::io::Error,
    },
}

impl From<CreateSandboxError> for Status {
    fn from(e: CreateSandboxError) -> Self {
        match e {
            CreateSandboxError::Exists { .. } => Status::already_exists(e.to_string()),
            CreateSandboxError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DestroySandboxError {
    #[error("destroy sandbox: no sandbox id given")]
    NoId,
    #[error("destroy sandbox {id}: not found; this guest's sandbox is {existing}")]
    NotFound { id: String, existing: String },
}

impl From<DestroySandboxError> for Status {
    fn from(e: DestroySandboxError) -> Self {
        match e {
            DestroySandboxError::NoId => Status::invalid_argument(e.to_string()),
            DestroySandboxError::NotFound { .. } => Status::not_found(e.to_string()),
        }
    }
}

/// `DestroySandbox` may go ahead for `id`: the guest has that sandbox, or
/// none at all (creating it failed, or it was never asked for: the
/// containers still have to go).
pub(crate) fn check_destroy(
    id: &str,
    existing: Option<&PodSandbox>,
) -> Result<(), DestroySandboxError> {
    if id.is_empty() {
        return Err(DestroySandboxError::NoId);
    }
    match existing {
        Some(s) if s.id != id => Err(DestroySandboxError::NotFound {
            id: id.to_string(),
            existing: s.id.clone(),
        }),
        _ => Ok(()),
    }
}

#[derive(Debug)]
pub(crate) struct PodSandbox {
    pub id: String,
    pause: Option<vmrun_container::Sandbox>,
    /// The /dev/shm tmpfs this sandbox mounted.
    shm: Option<PathBuf>,
    /// The pod's own network namespace (`new_network`), opened while the
    /// pause process surely was the one we forked; the port-forward
    /// listener connects from inside it.
    netns: Option<Arc<File>>,
}

/// `net.ipv4.ip_forward` -> `/proc/sys/net/ipv4/ip_forward`; `None` for
/// anything that could name another file.
pub(crate) fn sysctl_path(key: &str) -> Option<PathBuf> {
    let ok = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    ok.then(|| Path::new("/proc/sys").join(key.replace('.', "/")))
}

/// Writes the sysctls from a short-lived thread that entered the pause
/// process's namespaces: /proc/sys/net and the IPC sysctls show the
/// namespaces of the thread that opens them, and a thread may setns into
/// network, IPC and UTS namespaces without affecting the rest of the agent.
fn apply_sysctls(
    id: &str,
    ns_dir: Option<&Path>,
    sysctls: &HashMap<String, String>,
) -> Result<(), CreateSandboxError> {
    let mut writes = Vec::new();
    for (key, value) in sysctls {
        let path = sysctl_path(key).ok_or_else(|| CreateSandboxError::Invalid {
            id: id.to_string(),
            reason: format!("invalid sysctl name {key:?}"),
        })?;
        writes.push((key.clone(), value.clone(), path));
    }
    if writes.is_empty() {
        return Ok(());
    }
    let ns_dir = ns_dir.map(Path::to_path_buf);
    let id = id.to_string();
    let worker = std::thread::spawn(move || {
        let fail = |key: &str, value: &str, source| CreateSandboxError::Sysctl {
            id: id.clone(),
            key: key.to_string(),
            value: value.to_string(),
            source,
        };
        if let Some(dir) = &ns_dir {
            for (name, flag) in [
                ("net", CloneFlags::CLONE_NEWNET),
                ("ipc", CloneFlags::CLONE_NEWIPC),
                ("uts", CloneFlags::CLONE_NEWUTS),
            ] {
                let enter = std::fs::File::open(dir.join(name))
                    .and_then(|f| Ok(nix::sched::setns(f.as_fd(), flag)?));
                if let Err(e) = enter {
                    return Err(fail("(enter namespaces)", name, e));
                }
            }
        }
        for (key, value, path) in &writes {
            std::fs::write(path, value).map_err(|e| fail(key, value, e))?;
        }
        Ok(())
    });
    worker.join().unwrap_or_else(|_| {
        Err(CreateSandboxError::Invalid {
            id: String::new(),
            reason: "the sysctl thread panicked".into(),
        })
    })
}

fn write_etc(
    id: &str,
    etc: &Path,
    req: &CreateSandboxRequest,
) -> Result<HashMap<String, String>, CreateSandboxError> {
    let io = |what: String| {
        let id = id.to_string();
        move |source| CreateSandboxError::Io { id, what, source }
    };
    std::fs::create_dir_all(etc).map_err(io(format!("create {}", etc.display())))?;
    let hostname = format!("{}\n", req.hostname);
    let mut files = HashMap::new();
    for (name, data) in [
        ("hosts", req.hosts.as_slice()),
        ("hostname", hostname.as_bytes()),
        ("resolv.conf", req.resolv_conf.as_slice()),
    ] {
        let path = etc.join(name);
        std::fs::write(&path, data).map_err(io(format!("write {}", path.display())))?;
        files.insert(name.to_string(), path.to_string_lossy().into_owned());
    }
    Ok(files)
}

fn mount_shm(id: &str, dir: &Path, size: u64) -> Result<(), CreateSandboxError> {
    let io = |what: &str, source| CreateSandboxError::Io {
        id: id.to_string(),
        what: format!("{what} {}", dir.display()),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create", e))?;
    let size = if size == 0 { DEFAULT_SHM_BYTES } else { size };
    let data = format!("mode=1777,size={size}");
    mount(
        Some("shm"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(|e| io("mount tmpfs on", e.into()))
}

impl PodSandbox {
    /// Blocking: forks the pause process.
    pub(crate) fn create(
        pod_dir: &Path,
        cgroup_parent: &str,
        req: &CreateSandboxRequest,
    ) -> Result<(PodSandbox, CreateSandboxResponse), CreateSandboxError> {
        let id = req.sandbox_id.clone();
        if id.is_empty() {
            return Err(CreateSandboxError::Invalid {
                id,
                reason: "empty sandbox id".into(),
            });
        }
        let etc_files = write_etc(&id, &pod_dir.join("etc"), req)?;
        let mut sandbox = PodSandbox {
            id: id.clone(),
            pause: None,
            shm: None,
            netns: None,
        };
        if req.new_ipc {
            let shm = pod_dir.join("shm");
            mount_shm(&id, &shm, req.shm_size_bytes)?;
            sandbox.shm = Some(shm);
        }
        if req.new_network || req.new_ipc || req.new_uts || req.new_pid {
            let config = SandboxConfig {
                id: format!("{id}-pause"),
                hostname: (!req.hostname.is_empty()).then(|| req.hostname.clone()),
                new_network: req.new_network,
                new_ipc: req.new_ipc,
                new_uts: req.new_uts,
                new_pid: req.new_pid,
                cgroup_path: Some(format!("{cgroup_parent}/{PAUSE_CGROUP}")),
            };
            match vmrun_container::create_sandbox(&config, &LinuxSyscall) {
                Ok(p) => sandbox.pause = Some(p),
                Err(source) => {
                    sandbox.destroy();
                    return Err(CreateSandboxError::Pause { id, source });
                }
            }
        }
        let ns_dir = sandbox
            .pause
            .as_ref()
            .map(|p| PathBuf::from(format!("/proc/{}/ns", p.pid())));
        if let (true, Some(dir)) = (req.new_network, &ns_dir) {
            let path = dir.join("net");
            match File::open(&path) {
                Ok(f) => sandbox.netns = Some(Arc::new(f)),
                Err(source) => {
                    sandbox.destroy();
                    return Err(CreateSandboxError::Io {
                        id,
                        what: format!("open {}", path.display()),
                        source,
                    });
                }
            }
        }
        if let Err(e) = apply_sysctls(&id, ns_dir.as_deref(), &req.sysctls) {
            sandbox.destroy();
            return Err(e);
        }
        let response = CreateSandboxResponse {
            namespace_dir: ns_dir
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sandbox_dir: pod_dir.to_string_lossy().into_owned(),
            etc_files,
            shm_dir: sandbox
                .shm
                .as_ref()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        tracing::info!(sandbox = %id, "sandbox created");
        Ok((sandbox, response))
    }

    /// The pod's network namespace, if it has its own (else the guest's
    /// is the pod's).
    pub(crate) fn netns(&self) -> Option<Arc<File>> {
        self.netns.clone()
    }

    /// Kills the pause process and unmounts /dev/shm. Destroy the
    /// containers first. Blocking; errors are logged (the guest is going
    /// away anyway) and returned.
    pub(crate) fn destroy(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        self.netns = None;
        if let Some(pause) = self.pause.take() {
            if let Err(e) = pause.destroy() {
                failed.push(format!("sandbox {}: pause process: {e}", self.id));
            }
        }
        if let Some(shm) = self.shm.take() {
            if let Err(e) = umount2(&shm, MntFlags::MNT_DETACH) {
                failed.push(format!(
                    "sandbox {}: unmount {}: {e}",
                    self.id,
                    shm.display()
                ));
            }
        }
        for e in &failed {
            tracing::warn!("{e}");
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destroy_needs_the_guests_sandbox_id() {
        assert!(matches!(
            check_destroy("", None),
            Err(DestroySandboxError::NoId)
        ));
        // Nothing was created (or creating failed): tear down anyway.
        check_destroy("pod", None).unwrap();
        let sandbox = PodSandbox {
            id: "pod".into(),
            pause: None,
            shm: None,
            netns: None,
        };
        check_destroy("pod", Some(&sandbox)).unwrap();
        let e = check_destroy("other", Some(&sandbox)).unwrap_err();
        assert_eq!(
            Status::from(e).message(),
            "destroy sandbox other: not found; this guest's sandbox is pod"
        );
    }

    #[test]
    fn sysctl_names_map_to_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_unprivileged_port_start"),
            Some(PathBuf::from(
                "/proc/sys/net/ipv4/ip_unprivileged_port_start"
            ))
        );
        assert_eq!(
            sysctl_path("kernel.shm_rmid_forced"),
            Some(PathBuf::from("/proc/sys/kernel/shm_rmid_forced"))
        );
        for bad in ["", "net..x", "../x", "net/ipv4", "kernel.x y", ".net"] {
            assert_eq!(sysctl_path(bad), None, "{bad}");
        }
    }
}
