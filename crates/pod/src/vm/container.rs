//! A container inside the pod VM, as [`Running`]: every operation is an
//! agent call; its output is pumped from the agent into the log pipes.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::Signal;
use oci_spec::runtime::LinuxResources;
use tokio::runtime::Handle;
use tonic::transport::Channel;
use vmrun_proto::v1;
use vmrun_proto::AgentClient;

use super::sandbox::{call, status_msg, VmSandbox};
use super::stdin::{StdinFeeder, StdinTarget};
use super::vmm_process::VmmProcess;
use crate::runtime::{
    CgroupStats, ExecOutput, ExitInfo, Running, RuntimeError, SeparateOutput, WindowSize,
};

/// Output kept from an exec (probes, hooks), like the native runtime.
const EXEC_OUTPUT_LIMIT: usize = 1 << 20;
/// How long a failed wait gives the VMM to finish exiting.
const VMM_EXIT_GRACE: Duration = Duration::from_secs(2);

/// The caller's ends of a container's stdio ([`crate::runtime::Launch`]'s).
pub(super) struct ContainerStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

pub(super) struct VmContainer {
    name: String,
    id: String,
    pid: i32,
    process: serde_json::Value,
    vsock: std::path::PathBuf,
    agent: AgentClient<Channel>,
    rt: Handle,
    vmm: Arc<VmmProcess>,
    /// Copies the container's output into its log pipes until both close.
    pump: Mutex<Option<JoinHandle<()>>>,
    /// With [`Launch::stdin`](crate::runtime::Launch): the caller's pipe fed
    /// into the container.
    stdin: Option<StdinFeeder>,
}

impl VmContainer {
    pub(super) fn new(
        name: String,
        id: String,
        pid: i32,
        process: serde_json::Value,
        sandbox: &VmSandbox,
        stdio: ContainerStdio,
    ) -> std::io::Result<Self> {
        let ContainerStdio {
            stdin,
            stdout,
            stderr,
        } = stdio;
        let stdin = stdin
            .map(|fd| {
                let target = StdinTarget {
                    rt: sandbox.rt.clone(),
                    agent: sandbox.agent.clone(),
                    vmm: sandbox.vmm.clone(),
                    container_id: id.clone(),
                };
                StdinFeeder::spawn(target, fd)
            })
            .transpose()?;
        let pump = spawn_pump(
            sandbox.rt.clone(),
            sandbox.agent.clone(),
            id.clone(),
            File::from(stdout),
            File::from(stderr),
        );
        Ok(VmContainer {
            name,
            id,
            pid,
            process,
            vsock: sandbox.vmm.vsock_addr(),
            agent: sandbox.agent.clone(),
            rt: sandbox.rt.clone(),
            vmm: sandbox.vmm.clone(),
            pump: Mutex::new(Some(pump)),
            stdin,
        })
    }

    fn control_err(&self, message: String) -> RuntimeError {
        RuntimeError::Control {
            container: self.name.clone(),
            message,
        }
    }

    fn finish_pump(&self) {
        let pump = self.pump.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(pump) = pump {
            let _ = pump.join();
        }
    }
}

/// Streams `ReadOutput` of the container's init into the two log pipes.
fn spawn_pump(
    rt: Handle,
    mut agent: AgentClient<Channel>,
    container_id: String,
    mut stdout: File,
    mut stderr: File,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let result: Result<(), tonic::Status> = rt.block_on(async {
            let request = v1::ReadOutputRequest {
                container_id: container_id.clone(),
                exec_id: String::new(),
            };
            let mut stream = agent.read_output(request).await?.into_inner();
            while let Some(chunk) = stream.message().await? {
                let out = if chunk.stream == v1::output_chunk::Stream::Stderr as i32 {
                    &mut stderr
                } else {
                    &mut stdout
                };
                // A closed log pipe means the pod is going away: stop quietly.
                if out.write_all(&chunk.data).is_err() {
                    break;
                }
            }
            Ok(())
        });
        if let Err(status) = result {
            tracing::debug!(container = %container_id, "output stream ended: {status}");
        }
    })
}

impl Running for VmContainer {
    fn name(&self) -> &str {
        &self.name
    }

    fn pid(&self) -> i32 {
        self.pid
    }

    fn signal(&self, signal: Signal) -> Result<(), RuntimeError> {
        let mut agent = self.agent.clone();
        let request = v1::SignalProcessRequest {
            container_id: self.id.clone(),
            exec_id: String::new(),
            signal: signal as i32,
        };
        call(&self.rt, &self.vmm, "signal", agent.signal_process(request))
            .map(|_| ())
            .map_err(|e| self.control_err(e))
    }

    fn wait(&self) -> Result<ExitInfo, RuntimeError> {
        let mut agent = self.agent.clone();
        let request = v1::WaitProcessRequest {
            container_id: self.id.clone(),
            exec_id: String::new(),
        };
        // No timeout: a container may run for as long as it likes.
        let result = self.rt.block_on(agent.wait_process(request));
        // The exit is only reported once all output is in the logs.
        self.finish_pump();
        match result {
            Ok(done) => {
                let done = done.into_inner();
                Ok(ExitInfo {
                    code: done.exit_code,
                    signal: (done.signal != 0).then_some(done.signal),
                    oom_killed: done.oom_killed,
                })
            }
            // A dropped agent connection usually means the VMM is exiting:
            // give it a moment to be reaped, so the error names its end.
            Err(status) => Err(self.control_err(match self.vmm.wait_exit(VMM_EXIT_GRACE) {
                Some(exit) => format!("the pod VM died: {}", self.vmm.exit_reason(Some(exit))),
                None => status_msg("waiting in the guest", &status),
            })),
        }
    }

    fn remove(&self) -> Result<(), RuntimeError> {
        if let Some(stdin) = &self.stdin {
            stdin.stop();
        }
        if self.vmm.try_exit().is_some() {
            self.finish_pump();
            return Ok(()); // the guest, and the container with it, is gone
        }
        let mut agent = self.agent.clone();
        let request = v1::RemoveContainerRequest {
            container_id: self.id.clone(),
        };
        let removed = call(
            &self.rt,
            &self.vmm,
            "remove",
            agent.remove_container(request),
        );
        self.finish_pump();
        removed.map(|_| ()).map_err(|e| self.control_err(e))
    }

    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError> {
        let mut agent = self.agent.clone();
        let request = v1::StatsRequest {
            container_id: self.id.clone(),
        };
        let stats = call(&self.rt, &self.vmm, "stats", agent.stats(request))
            .map_err(|e| self.control_err(e))?;
        Ok(Some(CgroupStats {
            memory_usage_bytes: stats.memory_usage_bytes,
            cpu_usage_ns: stats.cpu_usage_ns,
            pids: stats.pids,
        }))
    }

    fn writable_layer(&self) -> Result<Option<vmrun_container::DirUsage>, RuntimeError> {
        let mut agent = self.agent.clone();
        let request = v1::StatsRequest {
            container_id: self.id.clone(),
        };
        let stats = call(&self.rt, &self.vmm, "stats", agent.stats(request))
            .map_err(|e| self.control_err(e))?;
        Ok(stats.writable_layer.map(|l| vmrun_container::DirUsage {
            bytes: l.bytes,
            inodes: l.inodes,
        }))
    }

    fn update_resources(&self, resources: &LinuxResources) -> Result<(), RuntimeError> {
        let mut agent = self.agent.clone();
        let request = v1::UpdateResourcesRequest {
            container_id: self.id.clone(),
            linux_resources_json: serde_json::to_vec(resources)
                .map_err(|e| self.control_err(format!("resources: {e}")))?,
        };
        call(
            &self.rt,
            &self.vmm,
            "updating resources",
            agent.update_resources(request),
        )
        .map(|_| ())
        .map_err(|e| self.control_err(e))
    }

    fn resize(&self, size: WindowSize) -> Result<(), RuntimeError> {
        let mut agent = self.agent.clone();
        let request = v1::ResizeTtyRequest {
            container_id: self.id.clone(),
            exec_id: String::new(),
            rows: size.rows.into(),
            cols: size.cols.into(),
        };
        call(
            &self.rt,
            &self.vmm,
            "resizing its terminal",
            agent.resize_tty(request),
        )
        .map(|_| ())
        .map_err(|e| self.control_err(e))
    }

    fn exec_target(&self) -> serde_json::Value {
        serde_json::json!({
            "runtime": "vm",
            "vsock": self.vsock,
            "container_id": self.id,
            "process": self.process,
        })
    }
}

/// Runs a process in a container and collects its output (stdout and stderr
/// together) and exit, killing it after `timeout`.
pub(super) fn exec_collect(
    rt: &Handle,
    vmm: &VmmProcess,
    mut agent: AgentClient<Channel>,
    container_id: &str,
    exec_id: &str,
    process: &serde_json::Value,
    timeout: Duration,
) -> Result<ExecOutput, String> {
    let argv = process["args"].clone();
    let request = v1::ExecProcessRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        process_json: serde_json::to_vec(process).map_err(|e| e.to_string())?,
        stdin: false,
    };
    call(rt, vmm, "exec in the guest", agent.exec_process(request))?;
    let ids = (container_id.to_string(), exec_id.to_string());
    let collect = async {
        let mut output = Vec::new();
        let mut separate = SeparateOutput::default();
        let request = v1::ReadOutputRequest {
            container_id: ids.0.clone(),
            exec_id: ids.1.clone(),
        };
        let mut stream = agent.clone().read_output(request).await?.into_inner();
        while let Some(chunk) = stream.message().await? {
            let room = EXEC_OUTPUT_LIMIT.saturating_sub(output.len());
            let data = &chunk.data[..chunk.data.len().min(room)];
            output.extend_from_slice(data);
            match v1::output_chunk::Stream::try_from(chunk.stream) {
                Ok(v1::output_chunk::Stream::Stderr) => separate.stderr.extend_from_slice(data),
                _ => separate.stdout.extend_from_slice(data),
            }
        }
        let request = v1::WaitProcessRequest {
            container_id: ids.0.clone(),
            exec_id: ids.1.clone(),
        };
        let done = agent.clone().wait_process(request).await?.into_inner();
        Ok::<_, tonic::Status>((output, separate, done))
    };
    match rt.block_on(tokio::time::timeout(timeout, collect)) {
        Ok(Ok((output, separate, done))) => Ok(ExecOutput {
            separate: Some(separate),
            exit: ExitInfo {
                code: done.exit_code,
                signal: (done.signal != 0).then_some(done.signal),
                oom_killed: false,
            },
            output,
        }),
        Ok(Err(status)) => Err(status_msg(&format!("{argv}"), &status)),
        Err(_) => {
            let request = v1::SignalProcessRequest {
                container_id: ids.0.clone(),
                exec_id: ids.1.clone(),
                signal: Signal::SIGKILL as i32,
            };
            let _ = call(rt, vmm, "kill", agent.signal_process(request));
            Err(format!("{argv} timed out after {timeout:?}"))
        }
    }
}
