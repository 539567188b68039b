//! Container setup from an OCI runtime spec: a small, synchronous "runc as a
//! library".
//!
//! The crate deliberately has no async runtime dependency: the guest agent
//! (PID 1 inside a microVM) links it as well as the host-side pod layer, which
//! calls it from `spawn_blocking` threads.
//!
//! Process model (see `spawn.rs`): the caller `fork()`s a single-threaded
//! helper (C1) that joins the cgroup and the namespaces, which then `clone()`s
//! the container init (C2) with `CLONE_PARENT`, so C2 lives in the new PID
//! namespace and is still a direct child of the caller (which can `waitpid` it).
//! C2 prepares the rootfs and blocks until [`Created::start`] releases it.
//!
//! # Caller obligations
//!
//! * Processes made here ([`Container`], [`ExecProcess`], [`Sandbox`]) are
//!   children of the calling process: do not set SIGCHLD to `SIG_IGN` and
//!   do not reap with `waitpid(-1)` elsewhere, or `wait()` reports ECHILD.
//! * A PID-namespace init (a container with its own PID namespace, or the
//!   sandbox) can only finish exiting when every process of its namespace
//!   has been reaped, including this caller's children in it. Keep a thread
//!   in `wait()` for each container/exec, or destroy containers before the
//!   sandbox; `destroy()` gives up with a `Busy` error instead of hanging.
//! * Dropping a [`Created`] aborts it; dropping a [`Container`] leaves it
//!   running (call [`Container::destroy`]); dropping an [`ExecProcess`]
//!   reaps it in the background.
//!
//! # Spec coverage
//!
//! Honoured: namespaces (pid, network, ipc, uts, mount, cgroup; new or
//! joined), hostname, root (directory or overlay, readonly), mounts (bind
//! with remount flags and propagation, tmpfs, proc, sysfs, devpts, mqueue,
//! cgroup/cgroup2), default devices + `linux.devices`, /dev symlinks, masked
//! and readonly paths, namespaced sysctls, `linux.resources` (memory, cpu,
//! cpuset, pids, blkio/io, hugetlb, v1 devices, net_cls/net_prio, v2
//! unified), `rootfsPropagation` (private/slave/shared: with shared the rootfs's parent mount is made private and the old root a slave before it is detached, as runc does), process args/env/cwd,
//! user/additionalGids/umask, capabilities, noNewPrivileges, rlimits,
//! oomScoreAdj, `linux.seccomp` (compiled with seccompiler, installed last
//! before exec; [`exec`] takes the container's profile too),
//! `process.terminal` (either the caller allocates the pty, e.g. with [`open_pty`],
//! and passes its slave as stdin/stdout/stderr, or, with [`Console::FromContainer`],
//! the init opens it on the container's own devpts and sends the master back over a
//! console socket; the process makes it its controlling terminal).
//!
//! Not supported (rejected with an error): user and time namespaces,
//! idmapped mounts.
//! Ignored with a `tracing` warning: AppArmor/SELinux labels,
//! hooks, intelRdt, personality, memory policy, net devices, scheduler and
//! I/O priority. Ignored silently: device cgroup rules on cgroup v2 (they
//! need an eBPF program; the container's /dev is still limited to the
//! listed devices).

pub mod cgroups;
pub mod sandbox;
pub mod syscall;

mod channel;
mod container;
mod exec;
mod fds;
mod mount_options;
mod namespaces;
mod path_lookup;
mod process_setup;
mod reaper;
mod resolve;
mod rootfs;
pub mod seccomp;
mod spawn;
mod terminal;
mod usage;

pub use container::{
    create, Console, Container, ContainerConfig, CreateError, Created, DestroyError, Rootfs,
    StartError, Stdio,
};
pub use exec::{exec, ExecError, ExecProcess};
pub use reaper::{ExitStatus, SignalError, WaitError};
pub use sandbox::{create_sandbox, Sandbox, SandboxConfig, SandboxError};
pub use syscall::{LinuxSyscall, Syscall};
pub use terminal::{open_pty, open_pty_in_container};
pub use usage::{dir_usage, DirUsage};

/// The capabilities a container gets by default: containerd's and Docker's set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

#[cfg(test)]
mod tests {
    /// The pod layer shares these across tokio `spawn_blocking` threads.
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::Container>();
        check::<crate::Created>();
        check::<crate::ExecProcess>();
        check::<crate::Sandbox>();
        check::<Box<dyn crate::cgroups::Cgroup>>();
        check::<crate::LinuxSyscall>();
    }
}
