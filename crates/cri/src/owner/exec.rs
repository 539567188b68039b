//! ExecSync: a command in a running container, stdout and stderr apart.

use std::io::Read;
use std::time::Duration;

use vmrun_container::Stdio;

/// The kubelet caps ExecSync output at 16 MiB per stream.
const MAX_OUTPUT: u64 = 16 << 20;

pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Start(String),
    #[error("command {cmd:?} timed out after {timeout:?}")]
    Timeout { cmd: Vec<String>, timeout: Duration },
    #[error("waiting for {cmd:?}: {message}")]
    Wait { cmd: Vec<String>, message: String },
}

/// Runs `cmd` in the container of `target` (a native exec target), killing
/// it after `timeout` when one is given.
pub fn exec_sync(
    target: &serde_json::Value,
    cmd: &[String],
    timeout: Option<Duration>,
) -> Result<ExecResult, ExecError> {
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ExecError::Start(format!("pipe: {e}")))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let process = vmrun_pod::native::spawn_exec(
        target,
        cmd,
        Stdio {
            stdin: None,
            stdout: Some(out_w),
            stderr: Some(err_w),
        },
    )
    .map_err(ExecError::Start)?;
    let drain = |fd: std::os::fd::OwnedFd| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = std::fs::File::from(fd)
                .take(MAX_OUTPUT)
                .read_to_end(&mut out);
            out
        })
    };
    let (stdout, stderr) = (drain(out_r), drain(err_r));
    let wait_err = |message: String| ExecError::Wait {
        cmd: cmd.to_vec(),
        message,
    };
    let pidfd =
        vmrun_pod::native::pidfd_open(process.pid()).map_err(|e| wait_err(e.to_string()))?;
    let exited =
        vmrun_pod::native::poll_exit(&pidfd, timeout).map_err(|e| wait_err(e.to_string()))?;
    if !exited {
        let _ = process.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = process.wait();
        return Err(ExecError::Timeout {
            cmd: cmd.to_vec(),
            timeout: timeout.unwrap_or_default(),
        });
    }
    let status = process.wait().map_err(|e| wait_err(e.to_string()))?;
    Ok(ExecResult {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        exit_code: status.code,
    })
}
