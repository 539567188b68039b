//! What the agent does as PID 1 before serving: leave the initramfs root,
//! mount the kernel filesystems, enable cgroup controllers, bring up `lo`;
//! and afterwards: reap orphans and power the guest off.
//!
//! Everything here is a single syscall or two per step, in boot order, so
//! the guest's state can be read off this file.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use vmrun_container::{LinuxSyscall, Syscall};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        source: Errno,
    },
    #[error("create {path}: {source}")]
    Mkdir {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("move the root off the initramfs: {what}: {source}")]
    SwitchRoot { what: &'static str, source: Errno },
}

/// Controllers enabled for the containers' cgroups.
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

/// pivot_root(2) fails with EINVAL while the root is the initramfs'
/// `rootfs`, a mount without a parent, and so would every container the
/// library starts. Stack a bind mount of `/` on top of it and chroot there
/// (busybox switch_root's move, with the same files): the root then has a
/// parent and pivot_root works in the containers' mount namespaces.
pub fn leave_rootfs() -> Result<(), InitError> {
    let err = |what| move |source| InitError::SwitchRoot { what, source };
    const STAGE: &str = "/.vmrun-root";
    match nix::unistd::mkdir(STAGE, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(err("mkdir /.vmrun-root")(e)),
    }
    mount(
        Some("/"),
        STAGE,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err("bind / on /.vmrun-root"))?;
    nix::unistd::chdir(STAGE).map_err(err("chdir /.vmrun-root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move it onto /"))?;
    nix::unistd::chroot(".").map_err(err("chroot"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    // Seen from the new root, the staging directory is an empty directory.
    let _ = std::fs::remove_dir(STAGE);
    Ok(())
}

struct Fs {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

#[rustfmt::skip]
fn mount_table() -> [Fs; 8] {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let hardened = nosuid_nodev | MsFlags::MS_NOEXEC;
    [
        Fs { target: "/proc", fstype: "proc", flags: hardened, data: None },
        Fs { target: "/sys", fstype: "sysfs", flags: hardened, data: None },
        Fs { target: "/dev", fstype: "devtmpfs", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
        Fs { target: "/dev/pts", fstype: "devpts", flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5") },
        Fs { target: "/dev/shm", fstype: "tmpfs", flags: nosuid_nodev, data: Some("mode=1777") },
        Fs { target: "/sys/fs/cgroup", fstype: "cgroup2", flags: hardened, data: None },
        Fs { target: "/run", fstype: "tmpfs", flags: nosuid_nodev, data: Some("mode=0755") },
        Fs { target: "/tmp", fstype: "tmpfs", flags: nosuid_nodev, data: Some("mode=1777") },
    ]
}

/// Mounts the kernel filesystems and tmpfs dirs the agent and the container
/// library need. Mount points are created as needed (the initramfs ships
/// dev, proc, sys, run, tmp; the others live on those mounts).
pub fn mount_filesystems() -> Result<(), InitError> {
    for fs in mount_table() {
        std::fs::create_dir_all(fs.target).map_err(|source| InitError::Mkdir {
            path: fs.target,
            source,
        })?;
        match mount(
            Some(fs.fstype),
            fs.target,
            Some(fs.fstype),
            fs.flags,
            fs.data,
        ) {
            Ok(()) => {}
            // The kernel may have mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
            Err(Errno::EBUSY) if fs.fstype == "devtmpfs" => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: fs.fstype,
                    target: fs.target,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Enables the controllers in the root's `cgroup.subtree_control`, so the
/// agent's cgroups can limit containers. Returns the ones the kernel
/// refused (not configured); the rest are enabled.
pub fn enable_cgroup_controllers(root: &Path) -> Vec<&'static str> {
    let control = root.join("cgroup.subtree_control");
    let all = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
    if std::fs::write(&control, all).is_ok() {
        return Vec::new();
    }
    // One at a time to find out which one the kernel lacks.
    CONTROLLERS
        .into_iter()
        .filter(|c| std::fs::write(&control, format!("+{c}")).is_err())
        .collect()
}

/// Brings up the loopback interface of the guest's network namespace.
pub fn loopback_up() -> std::io::Result<()> {
    LinuxSyscall.set_interface_up("lo")
}

/// Reaps every child until `server` exits; returns how it ended. Every
/// other child of PID 1 is an orphan that nobody else waits for.
pub fn reap_until(server: Pid) -> String {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == server => {
                return format!("exited with status {code}")
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == server => {
                return format!("was killed by {sig}")
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return format!("cannot be waited for ({e})"),
        }
    }
}

/// Syncs and resets the machine: with `reboot=k` on the kernel command line
/// the VMM sees the i8042 reset and exits 0. Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reachable without CAP_SYS_BOOT, i.e. never as the guest's PID 1.
    tracing::error!("reboot: {err:?}; halting in place");
    loop {
        nix::unistd::pause();
    }
}
