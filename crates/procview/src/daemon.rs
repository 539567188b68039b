//! Starting the one daemon of a host on demand: the first pod that wants the
//! view starts `vmrun-procview start`, which returns once the mount answers;
//! pods after it find the mount served and start nothing.

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{fork, setsid, ForkResult};

use crate::keeper::{is_served, serve};
use crate::view::Roots;

/// Where the view is mounted on a host unless configured otherwise.
pub const DEFAULT_MOUNTPOINT: &str = "/run/vmrun/procview";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{binary} could not serve the /proc view on {mountpoint}: {message}")]
    Failed {
        binary: PathBuf,
        mountpoint: PathBuf,
        message: String,
    },
}

/// Makes sure the view is served at `mountpoint`, starting `binary` (a
/// `vmrun-procview`) when it is not. Safe to call from concurrent pod starts:
/// they serialise on a lock file beside the mount point.
pub fn ensure_running(binary: &Path, mountpoint: &Path) -> Result<(), StartError> {
    if is_served(mountpoint) {
        return Ok(());
    }
    let lock_path = mountpoint.with_extension("lock");
    let lock_err = |source| StartError::Lock {
        path: lock_path.clone(),
        source,
    };
    if let Some(parent) = lock_path.parent() {
        std::fs::create_dir_all(parent).map_err(lock_err)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(lock_err)?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| lock_err(std::io::Error::from(e)))?;
    if is_served(mountpoint) {
        return Ok(());
    }
    let out = Command::new(binary)
        .arg("start")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| StartError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    if out.status.success() && is_served(mountpoint) {
        return Ok(());
    }
    let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(StartError::Failed {
        binary: binary.to_path_buf(),
        mountpoint: mountpoint.to_path_buf(),
        message: if message.is_empty() {
            format!("it exited with {}", out.status)
        } else {
            message
        },
    })
}

/// `vmrun-procview start`: forks the keeper into a session of its own and
/// returns once it serves the mount (Ok), or with the reason it could not.
/// The keeper's later messages go to `log`. The caller must have a single
/// thread (the keeper is forked and goes on running Rust code): the binary's
/// `main`, or the guest agent as PID 1 before it starts its server.
pub fn start_detached(mountpoint: &Path, log: &Path) -> Result<(), String> {
    let (rx, tx) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (mut rx, tx) = (std::fs::File::from(rx), std::fs::File::from(tx));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    // SAFETY: callers are single-threaded (see above), so the child may go
    // on running Rust code after fork.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { .. } => {
            drop(tx);
            // One line: the keeper's workers inherit the pipe, so it never
            // reaches end of file while the daemon runs.
            let mut answer = String::new();
            let _ = std::io::BufReader::new(&mut rx).read_line(&mut answer);
            match answer.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if answer.is_empty() => Err("the keeper exited before mounting".into()),
                None => Err(answer.trim().to_string()),
            }
        }
        ForkResult::Child => {
            drop(rx);
            let _ = setsid();
            // Hold no directory of whoever started it (a test's temporary
            // directory, a pod's state) busy.
            let _ = std::env::set_current_dir("/");
            let null = std::fs::File::open("/dev/null").ok();
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            unsafe {
                if let Some(n) = &null {
                    libc::dup2(n.as_raw_fd(), 0);
                    libc::dup2(n.as_raw_fd(), 1);
                }
                libc::dup2(log_file.as_raw_fd(), 2);
            }
            let mut tx = Some(tx);
            let result = serve(mountpoint, Roots::default(), || {
                if let Some(mut t) = tx.take() {
                    let _ = t.write_all(b"ok\n");
                }
            });
            let code = match result {
                Ok(()) => 0,
                Err(e) => {
                    if let Some(mut t) = tx.take() {
                        let _ = writeln!(t, "{e}");
                    }
                    eprintln!("vmrun-procview: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
    }
}
