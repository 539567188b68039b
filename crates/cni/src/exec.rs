//! Running one plugin binary: environment, config on stdin, output collected,
//! and killed when it runs past its time.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

    let status = wait_with_timeout(&mut child, binary, timeout);
    if let Some(input) = input {
        let _ = input.join();
    }
    let stdout = stdout.map(join_reader).unwrap_or_default();
    let stderr = stderr.map(join_reader).unwrap_or_default();
    Ok(PluginOutput {
        status: status?,
        stdout,
        stderr,
    })
}

fn spawn_reader<R: Read + Send + 'static>(mut pipe: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut data = Vec::new();
        let _ = pipe.read_to_end(&mut data);
        data
    })
}

fn join_reader(handle: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}

fn wait_with_timeout(
    child: &mut Child,
    binary: &Path,
    timeout: Duration,
) -> Result<ExitStatus, ExecError> {
    let deadline = Instant::now() + timeout;
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
    if let Ok(pid) = i32::try_from(child.id()) {
        // The child leads its own group (process_group(0)), so -pid is it and
        // everything it started.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
