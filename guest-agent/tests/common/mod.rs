//! Serving the agent in-process on unix sockets (non-PID-1 mode), a fake
//! VMM in front of them, and a busybox rootfs for container tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};
use vmrun_agent::{AgentConfig, AgentService};
use vmrun_proto::v1::create_container_request::Rootfs;
use vmrun_proto::v1::{
    CreateContainerRequest, CreateSandboxRequest, CreateSandboxResponse, LayerDirs,
    StartContainerRequest, WaitProcessRequest, WaitProcessResponse,
};
use vmrun_proto::AgentClient;

pub struct Agent {
    pub tmp: tempfile::TempDir,
    pub socket: PathBuf,
    /// The port-forward listener (what vsock port 1025 is in a guest).
    pub forward: PathBuf,
    pub cgroup_parent: String,
    pub server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Agent {
    pub fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
}

/// Starts an agent on `<tmp>/agent.sock` (gRPC) and `<tmp>/forward.sock`
/// (port forwarding) with its state and cgroups private to the test.
pub fn start_agent(name: &str) -> Agent {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("vmrun-agent-{name}-"))
        .tempdir()
        .unwrap();
    let cgroup_parent = format!("/vmrun-agent-test-{}-{name}", std::process::id());
    let socket = tmp.path().join("agent.sock");
    let service = AgentService::new(AgentConfig {
        state_dir: tmp.path().join("state"),
        cgroup_parent: cgroup_parent.clone(),
        boot_timestamp_ns: vmrun_agent::boottime_ns(),
    });
    let forward = tmp.path().join("forward.sock");
    let listener = UnixListener::bind(&forward).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(service.clone().serve_port_forward(incoming));
    let listener = UnixListener::bind(&socket).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let server = tokio::spawn(service.serve(incoming));
    Agent {
        tmp,
        socket,
        forward,
        cgroup_parent,
        server,
    }
}

/// A fake VMM on `<tmp>/vmm-vsock.sock` for `agent`: answers
/// `CONNECT 1024` / `CONNECT 1025` with `OK` and splices the connection to
/// the agent's gRPC / port-forward socket, as the VMM splices it to the
/// guest's vsock listeners; closes without a reply for any other port.
pub fn fake_vmm(agent: &Agent) -> PathBuf {
    let path = agent.tmp.path().join("vmm-vsock.sock");
    let vmm = UnixListener::bind(&path).unwrap();
    let routes = [
        (vmrun_proto::AGENT_VSOCK_PORT, agent.socket.clone()),
        (vmrun_proto::PORT_FORWARD_VSOCK_PORT, agent.forward.clone()),
    ];
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = vmm.accept().await {
            let routes = routes.clone();
            tokio::spawn(async move {
                use vmrun_proto::port_forward::{read_line, Line};
                let Ok(Line::Complete(line)) = read_line(&mut conn, 64).await else {
                    return;
                };
                let line = String::from_utf8(line).unwrap();
                let port: u32 = line.strip_prefix("CONNECT ").unwrap().parse().unwrap();
                let Some((_, target)) = routes.iter().find(|(p, _)| *p == port) else {
                    return;
                };
                let Ok(mut upstream) = UnixStream::connect(target).await else {
                    return;
                };
                conn.write_all(b"OK 1073741824\n").await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
            });
        }
    });
    path
}

/// A client speaking gRPC straight over the unix socket.
pub async fn unix_client(socket: &Path) -> AgentClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://agent.test")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap();
    AgentClient::new(channel)
}

pub fn require_root(test: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test}: needs root (namespaces, mounts, cgroups)"
    );
    assert!(
        Path::new("/usr/bin/busybox").exists(),
        "{test}: needs /usr/bin/busybox (apt-get install busybox-static)"
    );
}

/// bin/busybox plus a symlink per applet.
pub fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for d in ["proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/usr/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/usr/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

const CAPS: &[&str] = vmrun_container::DEFAULT_CAPABILITIES;

/// A CRI-like spec joining the sandbox's namespaces at `ns_dir` and
/// bind-mounting its /etc/hosts. `root.path` is a placeholder: the agent
/// sets it.
pub fn spec(args: &[&str], ns_dir: &str, hosts: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "ignored-by-the-agent", "readonly": false},
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid","noexec","nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid","strictatime","mode=755","size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid","noexec","nodev","ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind","ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "mount"}, {"type": "cgroup"},
                {"type": "network", "path": format!("{ns_dir}/net")},
                {"type": "ipc", "path": format!("{ns_dir}/ipc")},
                {"type": "uts", "path": format!("{ns_dir}/uts")}
            ],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    })
}

/// Checks nothing of the agent's cgroups is left in any hierarchy.
pub fn assert_no_cgroups(parent: &str) {
    for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let p = entry.path().join(parent.trim_start_matches('/'));
        assert!(!p.exists(), "cgroup left behind: {}", p.display());
    }
}

/// A sandbox with its own network, IPC and UTS namespaces (and so a
/// /dev/shm mount and a pause process).
pub async fn create_sandbox(client: &mut AgentClient<Channel>, id: &str) -> CreateSandboxResponse {
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: id.into(),
            hostname: id.into(),
            hosts: format!("127.0.0.1 localhost {id}\n").into_bytes(),
            new_network: true,
            new_ipc: true,
            new_uts: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

pub fn create_req(id: &str, spec: &Value, lower: &Path, stdin: bool) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(spec).unwrap(),
        rootfs: Some(Rootfs::LayerDirs(LayerDirs {
            lower: vec![lower.to_string_lossy().into_owned()],
        })),
        stdin,
    }
}

/// Creates and starts a container; returns its init's pid.
pub async fn run_container(
    client: &mut AgentClient<Channel>,
    id: &str,
    spec: &Value,
    lower: &Path,
) -> i32 {
    let pid = client
        .create_container(create_req(id, spec, lower, false))
        .await
        .unwrap()
        .into_inner()
        .pid;
    client
        .start_container(StartContainerRequest {
            container_id: id.into(),
        })
        .await
        .unwrap();
    pid
}

pub async fn wait_process(
    client: &mut AgentClient<Channel>,
    id: &str,
    exec_id: &str,
) -> WaitProcessResponse {
    client
        .wait_process(WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// An OCI `process` for ExecProcess.
pub fn process(args: &[&str]) -> Value {
    json!({"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
}

/// Kills what a failing test left running. A panic drops the test's
/// future, and so this guard, before its runtime, whose drop waits for the
/// agent's waiter threads: without the kill, a failed assertion would hang
/// the test instead of failing it.
pub struct KillOnPanic {
    cgroup_parent: String,
    shm: PathBuf,
}

pub fn kill_on_panic(agent: &Agent) -> KillOnPanic {
    KillOnPanic {
        cgroup_parent: agent.cgroup_parent.clone(),
        shm: agent.state_dir().join("pod/shm"),
    }
}

fn kill_procs_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            kill_procs_under(&path);
        } else if path.file_name().is_some_and(|n| n == "cgroup.procs") {
            for pid in std::fs::read_to_string(&path).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            kill_procs_under(
                &entry
                    .path()
                    .join(self.cgroup_parent.trim_start_matches('/')),
            );
        }
        let _ = nix::mount::umount2(&self.shm, nix::mount::MntFlags::MNT_DETACH);
        // Retries while the killed processes finish exiting.
        let _ = vmrun_container::cgroups::remove_path(&self.cgroup_parent);
    }
}
