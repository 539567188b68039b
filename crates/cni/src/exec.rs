//! Running one plugin binary: environment, config on stdin, output collected,
//! and killed when it runs past its time.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a finished plugin left.
#[derive(Debug)]
pub struct PluginOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a plugin could not be run to the end.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for {binary}: {source}")]
    Wait {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{binary} did not finish within {timeout:?} and was killed")]
    TimedOut { binary: PathBuf, timeout: Duration },
}

/// Runs `binary` with `env` added to the runtime's own environment (plugins
/// such as portmap need PATH for iptables), `stdin` written to it, and kills
/// its whole process group after `timeout`.
pub fn run_plugin(
    binary: &Path,
    env: &[(&str, String)],
    stdin: &[u8],
    timeout: Duration,
) -> Result<PluginOutput, ExecError> {
    let mut command = Command::new(binary);
    command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own group: on timeout anything it forked dies with it, and no
        // grandchild keeps our pipes open.
        .process_group(0);
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;

    // Threads for all three pipes: a plugin that fills stdout before reading
    // all of stdin must not deadlock against us.
    let input = child.stdin.take().map(|mut pipe| {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            // A plugin may exit without reading its config (e.g. on a
            // version error); its exit status tells what happened.
            let _ = pipe.write_all(&data);
        })
    });
    let stdout = child.stdout.take().map(spawn_reader);
    let stderr = child.stderr.take().map(spawn_reader);

    let deadline = Instant::now() + timeout;
    let status = wait_until(&mut child, binary, deadline, timeout)?;
    // The input thread ends once the plugin is gone (EPIPE), so it is not
    // waited for. The output is complete when the pipes close, which a
    // process the plugin left behind could delay forever: wait for that only
    // until the deadline (with a short grace), take what came, and end the
    // leftovers of its group.
    drop(input);
    let grace = deadline.max(Instant::now() + Duration::from_millis(100));
    let (stdout, stdout_done) = stdout.map(|r| collect(r, grace)).unwrap_or_default();
    let (stderr, stderr_done) = stderr.map(|r| collect(r, grace)).unwrap_or_default();
    if !(stdout_done && stderr_done) {
        tracing::warn!(
            "{} exited but something it started kept its output open; killing its process group",
            binary.display()
        );
        kill_leftovers(&child);
    }
    Ok(PluginOutput {
        status,
        stdout,
        stderr,
    })
}

/// Reads `pipe` on a thread, passing each chunk on as it arrives, so that
/// output written before a hang is not lost.
fn spawn_reader<R: Read + Send + 'static>(mut pipe: R) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    if sender.send(chunk[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    receiver
}

/// What the reader got until end of file or `until`, and whether it reached
/// end of file.
fn collect(receiver: mpsc::Receiver<Vec<u8>>, until: Instant) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => return (data, true),
            Err(mpsc::RecvTimeoutError::Timeout) => return (data, false),
        }
    }
}

fn wait_until(
    child: &mut Child,
    binary: &Path,
    deadline: Instant,
    timeout: Duration,
) -> Result<ExitStatus, ExecError> {
    // Plugins usually finish in milliseconds: poll fast first, then back off.
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(source) => {
                kill_group(child);
                return Err(ExecError::Wait {
                    binary: binary.to_path_buf(),
                    source,
                });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            kill_group(child);
            return Err(ExecError::TimedOut {
                binary: binary.to_path_buf(),
                timeout,
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

fn kill_group(child: &mut Child) {
    kill_leftovers(child);
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGKILL to the plugin's process group. The plugin leads its own group
/// (process_group(0)); a group id is not reused while any member lives, so
/// even after the plugin was reaped this reaches only what it started.
fn kill_leftovers(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
