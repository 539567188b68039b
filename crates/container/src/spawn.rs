//! Making the container process from a multi-threaded caller.
//!
//! ```text
//! caller --fork()--> C1 (single-threaded helper)
//!                     | close inherited fds, reset signals
//!                     | join cgroup (still in the host mount ns)
//!                     | setns() into joined namespaces, unshare() new ones
//!                     | clone(CLONE_PARENT|SIGCHLD) --> C2 (the container init)
//!                     | report C2's pid, _exit
//! caller: reap C1; C2 is the caller's child, in the new PID namespace.
//! ```
//!
//! C1 is needed because a new PID namespace only applies to children of the
//! process that unshared it, and a multi-threaded process cannot setns into
//! a mount namespace. `CLONE_PARENT` makes C2 a sibling of C1, so the caller
//! can `waitpid` it. The children never log, lock or allocate through
//! anything that could be held by another thread at fork time (glibc's
//! malloc is fork-safe).

use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::cgroups::Cgroup;
use crate::channel::{self, Channel, TAG_ERROR, TAG_PID};
use crate::fds::close_fds_except;
use crate::namespaces::JoinNs;
use crate::path_lookup::errno_text;
use crate::rootfs::SetupError;
use crate::syscall::Syscall;

pub(crate) struct SpawnRequest<'a> {
    pub cgroup: Option<&'a dyn Cgroup>,
    pub join: &'a [JoinNs],
    pub unshare: CloneFlags,
    /// Descriptors the child body needs besides the channel (stdio).
    pub keep_fds: Vec<RawFd>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("create the setup channel: {0}")]
    Channel(std::io::Error),
    #[error("fork: {0}")]
    Fork(std::io::Error),
    #[error("{0}")]
    Setup(String),
    #[error("the namespace helper process died without reporting ({0})")]
    HelperDied(String),
}

pub(crate) struct Spawned {
    pub pid: i32,
    pub chan: Channel,
}

pub(crate) fn describe_status(s: WaitStatus) -> String {
    match s {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
        other => format!("{other:?}"),
    }
}

/// Resets every signal disposition to default and unblocks all signals, so
/// the container does not inherit e.g. the Rust runtime's ignored SIGPIPE.
fn reset_signals() {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL has no preconditions; invalid signal
        // numbers just fail with EINVAL, which is ignored.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an empty, initialised sigset_t is passed by valid pointer.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn child_exit(code: i32) -> ! {
    // SAFETY: _exit ends the forked process without running atexit handlers
    // or destructors that belong to the parent's state.
    unsafe { libc::_exit(code) }
}

fn report(chan: &Channel, msg: &str) {
    let _ = chan.send(TAG_ERROR, msg.as_bytes());
}

/// C1's work. Never returns.
fn helper_main(
    req: &SpawnRequest<'_>,
    chan: &Channel,
    sys: &dyn Syscall,
    body: &mut dyn FnMut(&Channel) -> SetupError,
) -> ! {
    reset_signals();
    let mut keep = req.keep_fds.clone();
    keep.push(chan.raw());
    keep.extend(req.join.iter().map(|j| j.fd.as_raw_fd()));
    if let Err(e) = close_fds_except(&keep) {
        report(
            chan,
            &format!("close inherited descriptors: {}", errno_text(&e)),
        );
        child_exit(1);
    }
    if let Some(cg) = req.cgroup {
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        if let Err(e) = cg.add_pid(me) {
            report(chan, &format!("join cgroup {}: {e}", cg.path()));
            child_exit(1);
        }
    }
    for j in req.join {
        if let Err(e) = sys.setns(j.fd.as_fd(), j.flag) {
            report(
                chan,
                &format!("join namespace {}: {}", j.path.display(), errno_text(&e)),
            );
            child_exit(1);
        }
    }
    if !req.unshare.is_empty() {
        if let Err(e) = sys.unshare(req.unshare) {
            report(
                chan,
                &format!("unshare {:?}: {}", req.unshare, errno_text(&e)),
            );
            child_exit(1);
        }
    }
    let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: raw clone without CLONE_VM and with a null stack has fork
    // semantics: the child gets a copy of this single-threaded process.
    // Both sides only continue with code that is valid after fork.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        report(
            chan,
            &format!("clone the container process: {}", errno_text(&e)),
        );
        child_exit(1);
    }
    if pid == 0 {
        let err = body(chan);
        report(chan, &err.0);
        child_exit(1);
    }
    let code = if chan.send(TAG_PID, pid.to_string().as_bytes()).is_ok() {
        0
    } else {
        1
    };
    child_exit(code)
}

/// Forks C1, which creates C2 and runs `body` in it. `body` only returns
/// on failure (it execs, or loops forever for the sandbox). Returns C2's pid
/// and the parent's end of the channel.
pub(crate) fn spawn(
    req: &SpawnRequest<'_>,
    sys: &dyn Syscall,
    body: &mut dyn FnMut(&Channel) -> SetupError,
) -> Result<Spawned, SpawnError> {
    let (parent_end, child_end) = channel::pair().map_err(SpawnError::Channel)?;
    // SAFETY: fork in a possibly multi-threaded process: the child only runs
    // helper_main, which uses raw syscalls, plain allocation (glibc malloc is
    // fork-safe) and the lock-free `sys`, then _exits.
    let c1 = unsafe { libc::fork() };
    if c1 < 0 {
        return Err(SpawnError::Fork(std::io::Error::last_os_error()));
    }
    if c1 == 0 {
        drop(parent_end);
        helper_main(req, &child_end, sys, body);
    }
    drop(child_end);
    // C1 exits right after reporting, so once it is reaped its report (if
    // any) is queued. C2's own messages may be queued before it: C2 runs
    // concurrently with C1's send. Keep those for the caller, in order.
    let status = loop {
        match waitpid(Pid::from_raw(c1), None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let mut pid = None;
    let mut first_error = None;
    for (tag, payload) in parent_end.drain() {
        match tag {
            TAG_PID if pid.is_none() => {
                pid = String::from_utf8_lossy(&payload).parse::<i32>().ok();
            }
            TAG_ERROR if first_error.is_none() => {
                first_error = Some(String::from_utf8_lossy(&payload).into_owned());
                parent_end.requeue((tag, payload));
            }
            _ => parent_end.requeue((tag, payload)),
        }
    }
    match (pid, first_error) {
        (Some(pid), _) => Ok(Spawned {
            pid,
            chan: parent_end,
        }),
        (None, Some(msg)) => Err(SpawnError::Setup(msg)),
        (None, None) => Err(SpawnError::HelperDied(match status {
            Ok(s) => describe_status(s),
            Err(e) => e.to_string(),
        })),
    }
}
