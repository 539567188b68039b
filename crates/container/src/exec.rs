//! `exec`: run another process inside a running container (kubectl exec,
//! probes, hooks). Works from any process: everything is found through
//! /proc/<pid>/ns/* and the cgroup path.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxSeccomp, Process};

use crate::cgroups::{self, Cgroup, CgroupError};
use crate::channel::{Channel, TAG_ERROR};
use crate::container::{stdio_fds, Stdio};
use crate::fds::{close_fds_except, install_stdio};
use crate::namespaces::{open_ns, JoinNs, NamespaceError};
use crate::path_lookup::errno_text;
use crate::process_setup::{self, ProcessPlan};
use crate::reaper::{Child, ExitStatus, SignalError, WaitError};
use crate::rootfs::SetupError;
use crate::spawn::{spawn, SpawnError, SpawnRequest};
use crate::syscall::Syscall;
use crate::terminal;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("exec in pid {pid}: invalid process: {reason}")]
    InvalidProcess { pid: i32, reason: String },
    #[error("exec in pid {pid}: target process not found")]
    NoSuchProcess { pid: i32 },
    #[error("exec in pid {pid}: {source}")]
    Namespace { pid: i32, source: NamespaceError },
    #[error("exec in pid {pid}: cgroup: {source}")]
    Cgroup { pid: i32, source: CgroupError },
    #[error("exec in pid {pid}: {what}: {source}")]
    Io {
        pid: i32,
        what: String,
        source: std::io::Error,
    },
    #[error("exec in pid {pid}: {reason}")]
    Spawn { pid: i32, reason: String },
    /// Setup or execve failed, e.g. `exec "foo": executable file not found in $PATH`.
    #[error("exec in pid {pid}: {reason}")]
    Failed { pid: i32, reason: String },
}

/// Namespaces an exec'd process joins, in setns order (mount last).
const NAMESPACES: [(&str, CloneFlags); 6] = [
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

fn ns_inode(p: &std::path::Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Opens every namespace of `pid` that differs from ours.
fn target_namespaces(pid: i32) -> Result<Vec<JoinNs>, NamespaceError> {
    let mut out = Vec::new();
    for (name, flag) in NAMESPACES {
        let theirs = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
        let ours = PathBuf::from(format!("/proc/self/ns/{name}"));
        if ns_inode(&theirs).is_some() && ns_inode(&theirs) == ns_inode(&ours) {
            continue;
        }
        out.push(open_ns(theirs, flag)?);
    }
    Ok(out)
}

fn exec_body(chan: &Channel, stdio: [i32; 3], plan: &ProcessPlan, sys: &dyn Syscall) -> SetupError {
    if let Err(e) = install_stdio(stdio).and_then(|_| close_fds_except(&[chan.raw()])) {
        return SetupError(format!("set up stdio: {}", errno_text(&e)));
    }
    if plan.terminal {
        if let Err(e) = terminal::make_controlling() {
            return SetupError(format!(
                "make stdin the controlling terminal: {}",
                errno_text(&e)
            ));
        }
    }
    if let Err(e) = process_setup::apply(plan, sys, false) {
        return e;
    }
    process_setup::exec(plan, sys)
}

/// A process started by [`exec`].
#[derive(Debug)]
pub struct ExecProcess {
    child: Child,
}

impl ExecProcess {
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    pub fn signal(&self, sig: Signal) -> Result<(), SignalError> {
        self.child.signal(sig)
    }

    pub fn wait(&self) -> Result<ExitStatus, WaitError> {
        self.child.wait()
    }
}

impl Drop for ExecProcess {
    /// Dropping detaches: a still-running process is reaped in the
    /// background so it does not stay a zombie.
    fn drop(&mut self) {
        if self.child.exit_status().is_none() {
            let child = Child::new(self.child.pid());
            let _ = std::thread::Builder::new()
                .name("vmrun-exec-reaper".into())
                .spawn(move || {
                    let _ = child.wait();
                });
        }
    }
}

/// Runs `process` inside the namespaces and cgroup of the running
/// container whose init is `target_pid`, under the container's seccomp
/// profile (`linux.seccomp` of its spec) when it has one, as runc does.
pub fn exec(
    target_pid: i32,
    process: &Process,
    seccomp: Option<&LinuxSeccomp>,
    cgroup_path: Option<&str>,
    stdio: Stdio,
    sys: &dyn Syscall,
) -> Result<ExecProcess, ExecError> {
    let pid = target_pid;
    let mut plan =
        process_setup::plan(process).map_err(|reason| ExecError::InvalidProcess { pid, reason })?;
    if let Some(profile) = seccomp {
        plan.seccomp = crate::seccomp::compile(profile).map_err(|e| ExecError::InvalidProcess {
            pid,
            reason: e.to_string(),
        })?;
    }
    if plan.terminal {
        terminal::check_stdio(&stdio)
            .map_err(|reason| ExecError::InvalidProcess { pid, reason })?;
    }
    if !PathBuf::from(format!("/proc/{pid}")).exists() {
        return Err(ExecError::NoSuchProcess { pid });
    }
    let join = target_namespaces(pid).map_err(|source| ExecError::Namespace { pid, source })?;
    let cgroup: Option<Box<dyn Cgroup>> = match cgroup_path {
        Some(p) => {
            Some(cgroups::open_existing(p).map_err(|source| ExecError::Cgroup { pid, source })?)
        }
        None => None,
    };
    let stdio = stdio_fds(stdio).map_err(|source| ExecError::Io {
        pid,
        what: "open /dev/null".into(),
        source,
    })?;
    let req = SpawnRequest {
        cgroup: cgroup.as_deref(),
        join: &join,
        unshare: CloneFlags::empty(),
        keep_fds: stdio.fds.to_vec(),
    };
    let spawned = spawn(&req, sys, &mut |chan| {
        exec_body(chan, stdio.fds, &plan, sys)
    });
    drop(stdio);
    let spawned = spawned.map_err(|e| match e {
        SpawnError::Setup(reason) => ExecError::Failed { pid, reason },
        other => ExecError::Spawn {
            pid,
            reason: other.to_string(),
        },
    })?;
    let child = Child::new(spawned.pid);
    if let Some(adj) = plan.oom_score_adj {
        if let Err(reason) = process_setup::write_oom_score_adj(sys, spawned.pid, adj) {
            let _ = child.kill_and_reap();
            return Err(ExecError::Failed { pid, reason });
        }
    }
    match spawned.chan.recv() {
        Ok(None) => Ok(ExecProcess { child }),
        Ok(Some((TAG_ERROR, msg))) => {
            let _ = child.kill_and_reap();
            Err(ExecError::Failed {
                pid,
                reason: String::from_utf8_lossy(&msg).into_owned(),
            })
        }
        Ok(Some(_)) | Err(_) => {
            let _ = child.kill_and_reap();
            Err(ExecError::Failed {
                pid,
                reason: "unexpected message from the exec'd process".into(),
            })
        }
    }
}
