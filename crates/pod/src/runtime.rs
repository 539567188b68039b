//! The seam between the pod controller (policy: restarts, probes, hooks, stop
//! order) and a runtime (mechanism: native namespaces, a microVM, wasm).
//!
//! Calls are blocking; the controller runs them on tokio's blocking pool.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oci_spec::runtime::LinuxResources;
pub use vmrun_container::cgroups::CgroupStats;

use crate::plan::{ContainerPlan, PodPlan};
use crate::spec::ImageDefaults;

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitInfo {
    /// The exit code, or 128 + signal number.
    pub code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.code == 0
    }
    /// Kubernetes' reason for a terminated container.
    pub fn reason(&self) -> &'static str {
        if self.oom_killed {
            "OOMKilled"
        } else if self.code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }
}

/// A byte stream to a TCP port inside the pod, for probes and hooks: a TCP
/// socket in the pod's network namespace (native), or a stream the guest
/// agent forwards to it (vm).
pub trait PodStream: Read + Write + Send {
    /// Read and write timeouts for everything after connecting.
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()>;
}

impl PodStream for TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl PodStream for UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

/// What a runtime needs to start one container.
pub struct Launch {
    pub container: ContainerPlan,
    pub attempt: u32,
    pub image: ImageDefaults,
    /// Unpacked image layers, bottom first.
    pub layers: Vec<PathBuf>,
    /// The image as a read-only block image (EROFS of the layers), for a
    /// runtime whose sandbox reads images from disks and did not get this
    /// one when it was made (a CRI pod VM learns its images container by
    /// container). None elsewhere.
    pub block_image: Option<PathBuf>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The container's stdin (CRI `stdin`): the read end of a pipe the
    /// caller keeps writing to; closing the caller's end is the container's
    /// end of input. None gives it /dev/null.
    pub stdin: Option<OwnedFd>,
    /// A terminal for the container (CRI `tty`): the runtime makes a pty
    /// whose slave is the container's stdin, stdout, stderr and controlling
    /// terminal. What the container writes arrives on `stdout` (nothing on
    /// `stderr`), `stdin` is typed into it (its end sends the terminal's EOF
    /// character), and [`Running::resize`] sets its window size.
    pub tty: bool,
}

impl Launch {
    /// For a runtime that cannot give a container a stdin or a terminal
    /// yet: refuses a launch asking for either, naming the runtime.
    pub fn refuse_stdin_and_tty(&self, runtime: &str) -> Result<(), RuntimeError> {
        let asked = match (self.tty, self.stdin.is_some()) {
            (false, false) => return Ok(()),
            (true, _) => "a terminal (tty)",
            (false, true) => "a stdin to attach to",
        };
        Err(RuntimeError::Start {
            container: self.container.name.clone(),
            message: format!("the {runtime} runtime cannot give a container {asked} yet"),
        })
    }
}

/// The window size of a container's terminal, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// Output of a command run inside a container (probes, hooks).
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit: ExitInfo,
    /// stdout and stderr as they came, interleaved.
    pub output: Vec<u8>,
    /// stdout and stderr apart, where the runtime receives them apart
    /// (the vm runtime; CRI's ExecSync reports them so).
    pub separate: Option<SeparateOutput>,
}

#[derive(Debug, Clone, Default)]
pub struct SeparateOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime {runtime:?} is not available yet: {why}")]
    Unavailable { runtime: String, why: String },
    #[error("pod sandbox: {0}")]
    Sandbox(String),
    #[error("container {container:?}: {message}")]
    Start { container: String, message: String },
    #[error("exec in {container:?}: {message}")]
    Exec { container: String, message: String },
    #[error("connect to port {port}: {message}")]
    Connect { port: u16, message: String },
    #[error("container {container:?}: {message}")]
    Control { container: String, message: String },
    #[error("removing the pod: {0}")]
    Destroy(String),
}

pub trait Runtime: Send + Sync {
    fn name(&self) -> &'static str;
    /// Creates the pod's sandbox: shared namespaces, volumes, cgroup.
    fn create_sandbox(&self, pod: &PodPlan) -> Result<Arc<dyn Sandbox>, RuntimeError>;
}

pub trait Sandbox: Send + Sync {
    /// Creates and starts a container; returns once its command has been executed.
    fn start(&self, launch: Launch) -> Result<Arc<dyn Running>, RuntimeError>;
    /// Runs `argv` inside a running container, capturing stdout and stderr together.
    fn exec(
        &self,
        target: &dyn Running,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError>;
    /// A TCP connection to `port` on the pod's loopback, for probes and hooks.
    fn connect(&self, port: u16, timeout: Duration) -> Result<Box<dyn PodStream>, RuntimeError>;
    /// Removes everything the sandbox made; idempotent.
    fn destroy(&self) -> Result<(), RuntimeError>;
    /// The host process whose network namespace is the pod's (a native pod's
    /// pause process), for CNI to attach it; None with hostNetwork, or when
    /// the pod's network lives elsewhere (a VM).
    /// Where a client outside the sandbox's process reaches its pod's TCP
    /// ports when the pod's network namespace cannot (a pod VM: the hybrid
    /// vsock socket of its guest agent's forwarder). None: connect in the
    /// pod's network namespace.
    fn guest_forwarder(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// CNI has configured the pod's interface in the network namespace
    /// pinned at `netns` (that of [`Sandbox::network_holder_pid`]): a
    /// sandbox whose containers do not live in that namespace themselves
    /// (a pod VM) joins them to it now.
    fn network_attached(&self, _netns: &std::path::Path) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn network_holder_pid(&self) -> Option<i32> {
        None
    }
    /// Why the sandbox itself is gone before [`Sandbox::destroy`] (a pod VM
    /// whose VMM died), else `None`: its containers cannot be restarted then.
    fn lost(&self) -> Option<String> {
        None
    }
    /// What the whole pod uses now, as the host counts it: the pod's cgroup
    /// (native, wasm), or its VMM process (vm: the guest's memory as the
    /// host has backed it, every vCPU's time). None when not known.
    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError>;
}

pub trait Running: Send + Sync {
    fn name(&self) -> &str;
    fn pid(&self) -> i32;
    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<(), RuntimeError>;
    /// Blocks until the container's main process ends.
    fn wait(&self) -> Result<ExitInfo, RuntimeError>;
    /// Kills what is left and frees the container's resources; idempotent.
    fn remove(&self) -> Result<(), RuntimeError>;
    /// What `vmrun exec` from another process needs to enter this container.
    fn exec_target(&self) -> serde_json::Value;
    /// CPU, memory and process counts of the container's own cgroup now
    /// (inside the guest for a vm container); None where the container has
    /// no cgroup of its own (a pod's wasm containers share their engine's).
    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError>;
    /// What the container's writable layer holds now (its overlay upper
    /// directory, in the guest for a vm container); None where it has none
    /// of its own (wasm containers write only to their volumes).
    fn writable_layer(&self) -> Result<Option<vmrun_container::DirUsage>, RuntimeError> {
        Ok(None)
    }
    /// Applies new limits to the running container's cgroup (CRI
    /// UpdateContainerResources).
    fn update_resources(&self, resources: &LinuxResources) -> Result<(), RuntimeError>;
    /// Sets the window size of the container's terminal ([`Launch::tty`]).
    fn resize(&self, size: WindowSize) -> Result<(), RuntimeError> {
        let _ = size;
        Err(RuntimeError::Control {
            container: self.name().to_string(),
            message: "it has no terminal to resize (started without tty)".into(),
        })
    }
}
