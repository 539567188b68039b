//! The pod's "pause" process: a tiny long-lived process holding the pod's
//! shared namespaces (network, ipc, uts, pid). No exec: after the fork it sets
//! the hostname, brings `lo` up and then only waits for signals, reaping
//! zombies (it is PID 1 of the pod's PID namespace when `new_pid`).

use std::path::PathBuf;

use nix::sched::CloneFlags;

use crate::cgroups::{Cgroup, CgroupError};
use crate::channel::{Channel, TAG_ERROR, TAG_READY};
use crate::container::{open_cgroup, stdio_fds, Stdio};
use crate::fds::{close_fds_except, install_stdio};
use crate::path_lookup::errno_text;
use crate::reaper::{Child, WaitError};
use crate::rootfs::SetupError;
use crate::spawn::{spawn, SpawnError, SpawnRequest};
use crate::syscall::Syscall;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    pub id: String,
    pub hostname: Option<String>,
    pub new_network: bool,
    pub new_ipc: bool,
    pub new_uts: bool,
    pub new_pid: bool,
    /// The pause process's own cgroup. Use a leaf such as
    /// "/vmrun/<pod>/pause": on cgroup v2 a cgroup with processes cannot also
    /// have child cgroups with controllers (the containers').
    pub cgroup_path: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {id}: invalid config: {reason}")]
    InvalidConfig { id: String, reason: String },
    #[error("sandbox {id}: cgroup: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("sandbox {id}: {reason}")]
    Spawn { id: String, reason: String },
    #[error("sandbox {id}: setup failed: {reason}")]
    Setup { id: String, reason: String },
    #[error("sandbox {id}: {source}")]
    Wait { id: String, source: WaitError },
    #[error(
        "sandbox {id}: the pause process {pid} (init of the pod PID namespace) cannot exit until \
         every process of that namespace is reaped; destroy or wait() the pod's containers and \
         exec'd processes first"
    )]
    Busy { id: String, pid: i32 },
}

#[derive(Debug)]
pub struct Sandbox {
    id: String,
    child: Child,
    cgroup: Option<Box<dyn Cgroup>>,
}

/// Sleeps until a signal arrives; reaps children on SIGCHLD, exits on
/// SIGTERM/SIGINT. Never returns.
fn pause_forever() -> ! {
    // SAFETY: all calls operate on a local, initialised sigset_t; waitpid
    // and _exit have no memory-safety preconditions.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        // Blocked signals are queued even for a PID-namespace init, and
        // sigwaitinfo picks them up without needing handlers.
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            let sig = libc::sigwaitinfo(&set, std::ptr::null_mut());
            match sig {
                libc::SIGCHLD => {
                    while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
                }
                libc::SIGTERM | libc::SIGINT => libc::_exit(0),
                _ => {}
            }
        }
    }
}

fn pause_body(
    chan: &Channel,
    stdio: [i32; 3],
    cfg: &SandboxConfig,
    sys: &dyn Syscall,
) -> SetupError {
    if let Err(e) = install_stdio(stdio).and_then(|_| close_fds_except(&[chan.raw()])) {
        return SetupError(format!("set up stdio: {}", errno_text(&e)));
    }
    // Do not pin whatever directory the caller happened to be in.
    if let Err(e) = sys.chdir(std::path::Path::new("/")) {
        return SetupError(format!("chdir /: {}", errno_text(&e)));
    }
    if let Some(h) = cfg.hostname.as_deref().filter(|_| cfg.new_uts) {
        if let Err(e) = sys.sethostname(h) {
            return SetupError(format!("sethostname {h:?}: {}", errno_text(&e)));
        }
    }
    if cfg.new_network {
        if let Err(e) = sys.set_interface_up("lo") {
            return SetupError(format!("bring up lo: {}", errno_text(&e)));
        }
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"vmrun-pause".as_ptr(), 0, 0, 0) };
    if let Err(e) = chan.send(TAG_READY, b"") {
        return SetupError(format!("report ready: {}", errno_text(&e)));
    }
    pause_forever()
}

pub fn create_sandbox(cfg: &SandboxConfig, sys: &dyn Syscall) -> Result<Sandbox, SandboxError> {
    let id = cfg.id.clone();
    if cfg.hostname.is_some() && !cfg.new_uts {
        return Err(SandboxError::InvalidConfig {
            id,
            reason: "a hostname needs new_uts".into(),
        });
    }
    let mut unshare = CloneFlags::empty();
    for (on, flag) in [
        (cfg.new_network, CloneFlags::CLONE_NEWNET),
        (cfg.new_ipc, CloneFlags::CLONE_NEWIPC),
        (cfg.new_uts, CloneFlags::CLONE_NEWUTS),
        (cfg.new_pid, CloneFlags::CLONE_NEWPID),
    ] {
        if on {
            unshare.insert(flag);
        }
    }
    let cgroup = match &cfg.cgroup_path {
        Some(p) => Some(open_cgroup(p, None).map_err(|source| SandboxError::Cgroup {
            id: id.clone(),
            source,
        })?),
        None => None,
    };
    let cleanup = |cg: &Option<Box<dyn Cgroup>>| {
        if let Some(cg) = cg {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
    };
    let stdio = match stdio_fds(Stdio::default()) {
        Ok(s) => s,
        Err(e) => {
            cleanup(&cgroup);
            return Err(SandboxError::Spawn {
                id,
                reason: format!("open /dev/null: {e}"),
            });
        }
    };
    let req = SpawnRequest {
        cgroup: cgroup.as_deref(),
        join: &[],
        unshare,
        keep_fds: stdio.fds.to_vec(),
    };
    let spawned = spawn(&req, sys, &mut |chan| pause_body(chan, stdio.fds, cfg, sys));
    drop(stdio);
    let spawned = match spawned {
        Ok(s) => s,
        Err(e) => {
            cleanup(&cgroup);
            return Err(match e {
                SpawnError::Setup(reason) => SandboxError::Setup { id, reason },
                other => SandboxError::Spawn {
                    id,
                    reason: other.to_string(),
                },
            });
        }
    };
    let sandbox = Sandbox {
        id: id.clone(),
        child: Child::new(spawned.pid),
        cgroup,
    };
    match spawned.chan.recv() {
        Ok(Some((TAG_READY, _))) => Ok(sandbox),
        other => {
            let _ = sandbox.destroy();
            let reason = match other {
                Ok(Some((TAG_ERROR, msg))) => String::from_utf8_lossy(&msg).into_owned(),
                Ok(_) => "the pause process exited during setup".into(),
                Err(e) => format!("read from the pause process: {e}"),
            };
            Err(SandboxError::Setup { id, reason })
        }
    }
}

impl Sandbox {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// `/proc/<pid>/ns/<ns>` for "net", "ipc", "uts", "pid" (or any other
    /// namespace name); used as the `path` of spec namespaces.
    pub fn namespace_path(&self, ns: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/{ns}", self.pid()))
    }

    /// True while the pause process has not exited (or not been reaped).
    pub fn is_running(&self) -> bool {
        self.child.exit_status().is_none()
    }

    /// SIGKILLs the pause process (which, as PID-namespace init, takes every
    /// process in the pod's PID namespace with it), reaps it and removes its
    /// cgroup. Idempotent.
    ///
    /// Destroy the pod's containers first (or have threads blocked in their
    /// `wait()`): their processes are this caller's children, and the pause
    /// process cannot finish exiting before they are reaped. If they are
    /// not, this returns [`SandboxError::Busy`] after a few seconds; calling
    /// `destroy` again later is fine.
    pub fn destroy(&self) -> Result<(), SandboxError> {
        let reaped = self
            .child
            .kill_and_reap_timeout(std::time::Duration::from_secs(5))
            .map_err(|source| SandboxError::Wait {
                id: self.id.clone(),
                source,
            })?;
        if reaped.is_none() {
            return Err(SandboxError::Busy {
                id: self.id.clone(),
                pid: self.pid(),
            });
        }
        if let Some(cg) = &self.cgroup {
            let map = |source| SandboxError::Cgroup {
                id: self.id.clone(),
                source,
            };
            cg.kill_all().map_err(map)?;
            cg.remove().map_err(map)?;
        }
        Ok(())
    }
}
