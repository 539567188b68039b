//! `create` / `start` / `destroy` of a container from an OCI spec.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use oci_spec::runtime::Spec;

use crate::cgroups::{self, Cgroup, CgroupError};
use crate::channel::{Channel, TAG_ERROR, TAG_READY, TAG_START};
use crate::fds::{close_fds_except, install_stdio};
use crate::namespaces::{self, NamespaceError};
use crate::path_lookup::errno_text;
use crate::process_setup::{self, ProcessPlan};
use crate::reaper::{Child, ExitStatus, SignalError, WaitError};
use crate::rootfs::{self, RootfsPlan, SetupError};
use crate::spawn::{spawn, SpawnError, SpawnRequest};
use crate::syscall::Syscall;
use crate::terminal;

/// The container's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// An existing directory, bind-mounted as the root.
    Dir(PathBuf),
    /// An overlay of image layers, mounted on `spec.root.path` inside the
    /// container's mount namespace (nothing to unmount on the host).
    Overlay {
        /// Bottom layer first.
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
    },
}

/// The container's standard streams; `None` means /dev/null. For a
/// `process.terminal` process, pass the pty slave as all three.
#[derive(Debug, Default)]
pub struct Stdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Where a `process.terminal` process's terminal comes from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// The caller passes a pty slave as stdin, stdout and stderr.
    #[default]
    Passed,
    /// The init opens one on the container's own devpts once its rootfs is
    /// ready and hands the master back: [`Created::take_terminal`]. The
    /// slave then has a name inside the container. A spec that mounts no
    /// devpts on /dev/pts gets one from the caller's devpts instead. `stdio`
    /// is not used.
    FromContainer,
}

#[derive(Debug)]
pub struct ContainerConfig {
    pub id: String,
    pub spec: Spec,
    pub rootfs: Rootfs,
    pub stdio: Stdio,
    pub console: Console,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("container {id}: invalid spec: {reason}")]
    InvalidSpec { id: String, reason: String },
    #[error("container {id}: {source}")]
    Namespace { id: String, source: NamespaceError },
    #[error("container {id}: cgroup: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("container {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        source: std::io::Error,
    },
    #[error("container {id}: {reason}")]
    Spawn { id: String, reason: String },
    /// Rootfs/mount/process setup failed inside the container.
    #[error("container {id}: setup failed: {reason}")]
    Setup { id: String, reason: String },
    #[error("container {id}: {reason}")]
    OomScoreAdj { id: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// execve failed (or the executable was not found); nothing is left
    /// behind.
    #[error("container {id}: {reason}")]
    Exec { id: String, reason: String },
    #[error("container {id}: the container process is gone ({reason})")]
    Gone { id: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("container {id}: cgroup: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("container {id}: {source}")]
    Wait { id: String, source: WaitError },
    #[error(
        "container {id}: the init {pid} (a PID namespace init) cannot exit until every process \
         of its namespace is reaped; wait() the container's exec'd processes first"
    )]
    Busy { id: String, pid: i32 },
}

/// Where the init reads its stdio from: the caller's fds or /dev/null.
pub(crate) struct StdioFds {
    _owned: Stdio,
    _devnull: OwnedFd,
    pub fds: [i32; 3],
}

pub(crate) fn stdio_fds(stdio: Stdio) -> std::io::Result<StdioFds> {
    let devnull: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into();
    let pick = |f: &Option<OwnedFd>| f.as_ref().map_or(devnull.as_raw_fd(), |f| f.as_raw_fd());
    let fds = [pick(&stdio.stdin), pick(&stdio.stdout), pick(&stdio.stderr)];
    Ok(StdioFds {
        _owned: stdio,
        _devnull: devnull,
        fds,
    })
}

/// The container init's side after C1: stdio, rootfs, process attributes,
/// then wait for the start signal and exec.
fn init_body(
    chan: &Channel,
    stdio: [i32; 3],
    console: Option<RawFd>,
    rootfs_plan: &RootfsPlan,
    proc_plan: &ProcessPlan,
    sys: &dyn Syscall,
) -> SetupError {
    let keep: Vec<RawFd> = [chan.raw()].into_iter().chain(console).collect();
    if let Err(e) = install_stdio(stdio).and_then(|_| close_fds_except(&keep)) {
        return SetupError(format!("set up stdio: {}", errno_text(&e)));
    }
    if proc_plan.terminal && console.is_none() {
        if let Err(e) = terminal::make_controlling() {
            return SetupError(format!(
                "make stdin the controlling terminal: {}",
                errno_text(&e)
            ));
        }
    }
    sys.umask(0);
    if let Err(e) =
        rootfs::prepare(rootfs_plan, sys).and_then(|_| rootfs::finalize(rootfs_plan, sys))
    {
        return e;
    }
    if let Some(sock) = console {
        let opened = terminal::open_console(sock, proc_plan.uid).and_then(|_| {
            // SAFETY: `sock` is this process's console socket end, which
            // nothing else here uses once the master is sent.
            unsafe { libc::close(sock) };
            terminal::make_controlling()
        });
        if let Err(e) = opened {
            return SetupError(format!(
                "open the container's terminal on its /dev/pts/ptmx: {}",
                errno_text(&e)
            ));
        }
    }
    if let Err(e) = process_setup::apply(proc_plan, sys, true) {
        return e;
    }
    if let Err(e) = chan.send(TAG_READY, b"") {
        return SetupError(format!("report ready: {}", errno_text(&e)));
    }
    match chan.recv() {
        Ok(Some((TAG_START, _))) => process_setup::exec(proc_plan, sys),
        // The caller aborted or went away: leave quietly.
        // SAFETY: _exit ends this forked process immediately.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Spec fields this runtime does not implement: logged, not silently
/// dropped (see the crate docs for the list).
fn warn_unsupported(id: &str, spec: &Spec) {
    let linux = spec.linux().as_ref();
    let process = spec.process().as_ref();
    let ignored = [
        (
            "linux.mountLabel",
            linux.is_some_and(|l| l.mount_label().is_some()),
        ),
        (
            "linux.intelRdt",
            linux.is_some_and(|l| l.intel_rdt().is_some()),
        ),
        (
            "linux.personality",
            linux.is_some_and(|l| l.personality().is_some()),
        ),
        (
            "linux.memoryPolicy",
            linux.is_some_and(|l| l.memory_policy().is_some()),
        ),
        (
            "linux.netDevices",
            linux.is_some_and(|l| l.net_devices().is_some()),
        ),
        (
            "process.apparmorProfile",
            process.is_some_and(|p| p.apparmor_profile().is_some()),
        ),
        (
            "process.selinuxLabel",
            process.is_some_and(|p| p.selinux_label().is_some()),
        ),
        (
            "process.scheduler",
            process.is_some_and(|p| p.scheduler().is_some()),
        ),
        (
            "process.ioPriority",
            process.is_some_and(|p| p.io_priority().is_some()),
        ),
        ("hooks", spec.hooks().is_some()),
    ];
    for (field, set) in ignored {
        if set {
            tracing::warn!(
                container = id,
                field,
                "spec field is not supported and is ignored"
            );
        }
    }
}

/// Creates the container and leaves its init blocked just before execve.
pub fn create(cfg: ContainerConfig, sys: &dyn Syscall) -> Result<Created, CreateError> {
    let id = cfg.id.clone();
    let invalid = |reason: String| CreateError::InvalidSpec {
        id: id.clone(),
        reason,
    };
    if cfg.id.is_empty() {
        return Err(invalid("empty container id".into()));
    }
    let spec = &cfg.spec;
    warn_unsupported(&id, spec);
    let linux = spec.linux().clone().unwrap_or_default();
    let ns =
        namespaces::plan(linux.namespaces().as_deref().unwrap_or_default()).map_err(|source| {
            CreateError::Namespace {
                id: id.clone(),
                source,
            }
        })?;
    if !ns.has(CloneFlags::CLONE_NEWNS) {
        return Err(invalid(
            "the container needs a mount namespace (building a rootfs in the host's is refused)"
                .into(),
        ));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("process is missing".into()))?;
    let mut proc_plan = process_setup::plan(process).map_err(invalid)?;
    if let Some(profile) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        proc_plan.seccomp = crate::seccomp::compile(profile).map_err(|e| invalid(e.to_string()))?;
    }
    match (proc_plan.terminal, cfg.console) {
        (true, Console::Passed) => terminal::check_stdio(&cfg.stdio).map_err(invalid)?,
        (false, Console::FromContainer) => {
            return Err(invalid(
                "a terminal from the container was asked for, but process.terminal is not set"
                    .into(),
            ))
        }
        _ => {}
    }
    // Without a devpts of its own the container has nowhere to open a
    // terminal: it gets one from this process's devpts, as passed.
    let mut parent_terminal = None;
    let (mut stdio_cfg, mut console_mode) = (cfg.stdio, cfg.console);
    if console_mode == Console::FromContainer && !mounts_devpts(spec) {
        let io = |source| CreateError::Io {
            id: id.clone(),
            what: "open a terminal (the container mounts no devpts on /dev/pts)".into(),
            source,
        };
        let (master, slave) = terminal::open_pty().map_err(io)?;
        stdio_cfg = Stdio {
            stdin: Some(slave.try_clone().map_err(io)?),
            stdout: Some(slave.try_clone().map_err(io)?),
            stderr: Some(slave),
        };
        console_mode = Console::Passed;
        parent_terminal = Some(master);
    }
    let console = match console_mode {
        Console::Passed => None,
        Console::FromContainer => Some(console_pair().map_err(|source| CreateError::Io {
            id: id.clone(),
            what: "create the console socket".into(),
            source,
        })?),
    };

    let root = match &cfg.rootfs {
        Rootfs::Dir(p) => p.clone(),
        Rootfs::Overlay { .. } => {
            let p = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .filter(|p| p.is_absolute())
                .ok_or_else(|| {
                    invalid("an overlay rootfs needs an absolute root.path to mount on".into())
                })?;
            std::fs::create_dir_all(&p).map_err(|source| CreateError::Io {
                id: id.clone(),
                what: format!("create rootfs mount point {}", p.display()),
                source,
            })?;
            p
        }
    };
    let root = std::fs::canonicalize(&root).map_err(|source| CreateError::Io {
        id: id.clone(),
        what: format!("rootfs {}", root.display()),
        source,
    })?;
    let rootfs_plan = rootfs::plan(spec, &cfg.rootfs, root, &ns).map_err(invalid)?;

    let cgroup_path = linux
        .cgroups_path()
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("/vmrun/{}", cfg.id));
    let cgroup = open_cgroup(&cgroup_path, linux.resources().as_ref()).map_err(|source| {
        CreateError::Cgroup {
            id: id.clone(),
            source,
        }
    })?;

    let stdio = stdio_fds(stdio_cfg).map_err(|source| CreateError::Io {
        id: id.clone(),
        what: "open /dev/null".into(),
        source,
    })?;
    let req = SpawnRequest {
        cgroup: Some(cgroup.as_ref()),
        join: &ns.join,
        unshare: ns.unshare,
        keep_fds: stdio
            .fds
            .iter()
            .copied()
            .chain(console.as_ref().map(|(_, child)| child.as_raw_fd()))
            .collect(),
    };
    let child_console = console.as_ref().map(|(_, child)| child.as_raw_fd());
    let spawned = spawn(&req, sys, &mut |chan| {
        init_body(
            chan,
            stdio.fds,
            child_console,
            &rootfs_plan,
            &proc_plan,
            sys,
        )
    });
    drop(stdio);
    // Only the init holds the child end now, so its exit is EOF here.
    let console = console.map(|(parent, _child)| parent);
    let spawned = match spawned {
        Ok(s) => s,
        Err(e) => {
            cleanup_cgroup(cgroup.as_ref());
            return Err(match e {
                SpawnError::Setup(reason) => CreateError::Setup { id, reason },
                other => CreateError::Spawn {
                    id,
                    reason: other.to_string(),
                },
            });
        }
    };
    let mut created = Created {
        id: id.clone(),
        child: Child::new(spawned.pid),
        chan: spawned.chan,
        cgroup: Some(cgroup),
        terminal: parent_terminal,
    };
    if let Some(adj) = proc_plan.oom_score_adj {
        if let Err(reason) = process_setup::write_oom_score_adj(sys, created.pid(), adj) {
            created.abort();
            return Err(CreateError::OomScoreAdj { id, reason });
        }
    }
    match created.chan.recv() {
        Ok(Some((TAG_READY, _))) => {
            if let Some(sock) = &console {
                // Sent before READY, so it is queued already.
                match terminal::receive_console(sock) {
                    Ok(Some(master)) => created.terminal = Some(master),
                    other => {
                        created.abort();
                        return Err(CreateError::Setup {
                            id,
                            reason: format!(
                                "the container init sent no terminal ({})",
                                other.map_or_else(|e| e.to_string(), |_| "none came".into())
                            ),
                        });
                    }
                }
            }
            tracing::debug!(container = %created.id, pid = created.pid(), "container created");
            Ok(created)
        }
        Ok(Some((TAG_ERROR, msg))) => {
            created.abort();
            Err(CreateError::Setup {
                id,
                reason: String::from_utf8_lossy(&msg).into_owned(),
            })
        }
        other => {
            let status = created.child.kill_and_reap();
            created.abort();
            Err(CreateError::Setup {
                id,
                reason: format!(
                    "the container init exited during setup ({}{})",
                    status.map_or_else(|e| e.to_string(), |s| exit_text(&s)),
                    match other {
                        Err(e) => format!("; channel: {e}"),
                        _ => String::new(),
                    }
                ),
            })
        }
    }
}

/// Whether the spec mounts a devpts instance on /dev/pts.
fn mounts_devpts(spec: &Spec) -> bool {
    spec.mounts().iter().flatten().any(|m| {
        m.destination() == std::path::Path::new("/dev/pts") && m.typ().as_deref() == Some("devpts")
    })
}

/// The console socket pair (parent end, child end), close-on-exec.
fn console_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

fn exit_text(s: &ExitStatus) -> String {
    match s.signal {
        Some(sig) => format!(
            "killed by {}",
            Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string())
        ),
        None => format!("exit status {}", s.code),
    }
}

/// Creates the cgroup and applies resources; removes it again when applying
/// fails so a bad spec leaves nothing behind.
pub(crate) fn open_cgroup(
    path: &str,
    resources: Option<&oci_spec::runtime::LinuxResources>,
) -> Result<Box<dyn Cgroup>, CgroupError> {
    let cg = cgroups::open(path, None)?;
    if let Some(r) = resources {
        if let Err(e) = cg.apply(r) {
            let _ = cg.remove();
            return Err(e);
        }
    }
    Ok(cg)
}

fn cleanup_cgroup(cg: &dyn Cgroup) {
    let _ = cg.kill_all();
    let _ = cg.remove();
}

/// A container whose init is set up and blocked before execve.
#[derive(Debug)]
pub struct Created {
    id: String,
    child: Child,
    chan: Channel,
    /// None once ownership moved on (start) or cleanup ran (abort).
    cgroup: Option<Box<dyn Cgroup>>,
    /// With [`Console::FromContainer`]: the terminal's master, until taken.
    terminal: Option<OwnedFd>,
}

impl Created {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// With [`Console::FromContainer`]: the master of the terminal the
    /// init opened on the container's devpts (once; None afterwards).
    pub fn take_terminal(&mut self) -> Option<OwnedFd> {
        self.terminal.take()
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Lets the init exec the process. Fails (cleaning everything up) when
    /// execve fails, e.g. `exec "foo": executable file not found in $PATH`.
    pub fn start(mut self) -> Result<Container, StartError> {
        let id = self.id.clone();
        if let Err(e) = self.chan.send(TAG_START, b"") {
            let reason = format!("send start: {}", errno_text(&e));
            self.abort_inner();
            return Err(StartError::Gone { id, reason });
        }
        match self.chan.recv() {
            // EOF: the CLOEXEC channel closed, so execve succeeded.
            Ok(None) => {}
            Ok(Some((TAG_ERROR, msg))) => {
                self.abort_inner();
                return Err(StartError::Exec {
                    id,
                    reason: String::from_utf8_lossy(&msg).into_owned(),
                });
            }
            Ok(Some((tag, _))) => {
                self.abort_inner();
                return Err(StartError::Gone {
                    id,
                    reason: format!("unexpected message {:?}", tag as char),
                });
            }
            Err(e) => {
                self.abort_inner();
                return Err(StartError::Gone {
                    id,
                    reason: format!("read from init: {e}"),
                });
            }
        }
        let cgroup = self
            .cgroup
            .take()
            .expect("cgroup is present until start/abort");
        let child = Child::new(self.child.pid());
        Ok(Container {
            id,
            child,
            cgroup,
            oom_kills_at_exit: OnceLock::new(),
        })
    }

    /// Kills the init and removes the cgroup.
    pub fn abort(mut self) {
        self.abort_inner();
    }

    fn abort_inner(&mut self) {
        let Some(cg) = self.cgroup.take() else { return };
        let _ = self.child.kill_and_reap();
        cleanup_cgroup(cg.as_ref());
    }
}

impl Drop for Created {
    /// A dropped, never-started container must not linger blocked.
    fn drop(&mut self) {
        self.abort_inner();
    }
}

/// A running container.
#[derive(Debug)]
pub struct Container {
    id: String,
    child: Child,
    cgroup: Box<dyn Cgroup>,
    oom_kills_at_exit: OnceLock<u64>,
}

impl Container {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Signals the init. Safe against pid reuse: fails with
    /// [`SignalError::Exited`] once the init has been reaped.
    pub fn signal(&self, sig: Signal) -> Result<(), SignalError> {
        self.child.signal(sig)
    }

    /// Blocks until the init exits (reaping it). Callable from several
    /// threads, concurrently with `signal`; every caller gets the status.
    pub fn wait(&self) -> Result<ExitStatus, WaitError> {
        let s = self.child.wait()?;
        self.oom_kills_at_exit
            .get_or_init(|| self.cgroup.oom_kill_count());
        Ok(s)
    }

    /// The exit status if the init has been reaped already.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child.exit_status()
    }

    /// True when the init died of SIGKILL and the kernel OOM killer killed
    /// something in the container's cgroup.
    pub fn oom_killed(&self) -> bool {
        let killed = self
            .child
            .exit_status()
            .is_some_and(|s| s.signal == Some(libc::SIGKILL));
        let count = self
            .oom_kills_at_exit
            .get()
            .copied()
            .unwrap_or_else(|| self.cgroup.oom_kill_count());
        killed && count > 0
    }

    pub fn cgroup(&self) -> &dyn Cgroup {
        self.cgroup.as_ref()
    }

    /// SIGKILLs everything in the cgroup, reaps the init and removes the
    /// cgroup. Idempotent.
    pub fn destroy(&self) -> Result<(), DestroyError> {
        let id = &self.id;
        let killed = self.cgroup.kill_all();
        let reaped = self.child.kill_and_reap_timeout(Duration::from_secs(5));
        self.oom_kills_at_exit
            .get_or_init(|| self.cgroup.oom_kill_count());
        killed.map_err(|source| DestroyError::Cgroup {
            id: id.clone(),
            source,
        })?;
        let reaped = reaped.map_err(|source| DestroyError::Wait {
            id: id.clone(),
            source,
        })?;
        if reaped.is_none() {
            return Err(DestroyError::Busy {
                id: id.clone(),
                pid: self.pid(),
            });
        }
        self.cgroup.remove().map_err(|source| DestroyError::Cgroup {
            id: id.clone(),
            source,
        })
    }
}
