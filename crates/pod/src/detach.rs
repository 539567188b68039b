//! Starting the long-lived per-pod processes (`vmrun-supervisor` for
//! `vmrun run -d`, `vmrun-cri-shim` for CRI pods): detached from the
//! caller, with a pipe on which they say when the pod exists.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// The descriptor number the child finds the ready pipe's write end at.
pub const READY_FD: i32 = 3;

/// Spawns `cmd` in a session of its own (it outlives the caller and its
/// terminal) with the write end of a fresh pipe as descriptor
/// [`READY_FD`]; returns the child and the pipe's read end, which sees EOF
/// once the child has closed its end (or exited).
pub fn spawn_with_ready_pipe(cmd: &mut Command) -> std::io::Result<(Child, OwnedFd)> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let ready_raw = ready_w.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (setsid, dup2) on fds that stay open until then.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(ready_raw, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(ready_w);
    Ok((child, ready_r))
}
