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

/// The kernel command line parameter through which the host picks the
/// smallest free block (as a buddy order) the guest reports to the host.
pub const PAGE_REPORTING_ORDER_PARAM: &str = "vmrun.page_reporting_order";

/// Where the kernel's free page reporting keeps its order. Linux 6.1 resets
/// it when the balloon driver registers (before init runs), so a
/// `page_reporting.page_reporting_order=` boot parameter cannot set it.
pub const PAGE_REPORTING_ORDER_SYSFS: &str =
    "/sys/module/page_reporting/parameters/page_reporting_order";

#[derive(Debug, thiserror::Error)]
pub enum PageReportingError {
    #[error("{PAGE_REPORTING_ORDER_PARAM}={value:?} on the kernel command line is not a buddy order (0-10)")]
    BadOrder { value: String },
    #[error("write {path}: {source} (is CONFIG_PAGE_REPORTING in the guest kernel?)")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Applies `vmrun.page_reporting_order=N` from `cmdline` to `sysfs_param`.
/// The kernel only reports free blocks of at least that order (by default
/// a 2 MiB pageblock), so an idle guest whose free memory is fragmented
/// below 2 MiB keeps it all; a smaller order gives more back to the host.
/// Returns the order set, None when the command line has none.
pub fn apply_page_reporting_order(
    cmdline: &str,
    sysfs_param: &Path,
) -> Result<Option<u32>, PageReportingError> {
    let prefix = format!("{PAGE_REPORTING_ORDER_PARAM}=");
    let Some(value) = cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix(&prefix))
        .next_back()
    else {
        return Ok(None);
    };
    let order = value
        .parse::<u32>()
        .ok()
        .filter(|order| *order <= 10)
        .ok_or_else(|| PageReportingError::BadOrder {
            value: value.to_string(),
        })?;
    std::fs::write(sysfs_param, order.to_string()).map_err(|source| PageReportingError::Write {
        path: sysfs_param.display().to_string(),
        source,
    })?;
    Ok(Some(order))
}

/// Starts the guest's /proc view (`vmrun_procview`), so that a container's
/// /proc/meminfo says its own limit, not the VM's size (which adds the
/// agent's overhead). Runs while PID 1 is single-threaded (the keeper is
/// forked). Without it, containers read the guest kernel's own files.
pub fn start_proc_view() {
    let mountpoint = Path::new(vmrun_procview::DEFAULT_MOUNTPOINT);
    let log = mountpoint.with_extension("log");
    match vmrun_procview::daemon::start_detached(mountpoint, &log) {
        Ok(()) => tracing::info!("/proc view on {}", mountpoint.display()),
        Err(e) => tracing::warn!("no /proc view: {e}"),
    }
}

/// Brings up the loopback interface of the guest's network namespace.
pub fn loopback_up() -> std::io::Result<()> {
    LinuxSyscall.set_interface_up("lo")
}

/// Reaps every child until `server` exits; returns how it ended. Every
/// other child of PID 1 is an orphan that nobody else waits for.
pub fn reap_until(server: Pid) -> ServerEnd {
    loop {
        let (clean, how) = match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == server => {
                (code == 0, format!("exited with status {code}"))
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == server => {
                (false, format!("was killed by {sig}"))
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => (false, format!("cannot be waited for ({e})")),
        };
        return ServerEnd { clean, how };
    }
}

/// How the agent's server process ended: `clean` after a Shutdown.
pub struct ServerEnd {
    pub clean: bool,
    pub how: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the sysfs file, holding the kernel's default (9).
    fn kernel_default_param() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let param = dir.path().join("page_reporting_order");
        std::fs::write(&param, "9").unwrap();
        (dir, param)
    }

    #[test]
    fn page_reporting_order_comes_from_the_command_line() {
        let (_dir, param) = kernel_default_param();
        let cmdline = "console=ttyS0 vmrun.page_reporting_order=3 quiet";
        assert_eq!(
            apply_page_reporting_order(cmdline, &param).unwrap(),
            Some(3)
        );
        assert_eq!(std::fs::read_to_string(&param).unwrap(), "3");
    }

    #[test]
    fn without_the_parameter_the_kernel_default_stays() {
        let (_dir, param) = kernel_default_param();
        assert_eq!(
            apply_page_reporting_order("console=ttyS0 quiet", &param).unwrap(),
            None
        );
        assert_eq!(std::fs::read_to_string(&param).unwrap(), "9");
    }

    #[test]
    fn a_bad_order_is_named_and_nothing_is_written() {
        let (_dir, param) = kernel_default_param();
        for bad in ["x", "11", "-1", ""] {
            let cmdline = format!("vmrun.page_reporting_order={bad}");
            let err = apply_page_reporting_order(&cmdline, &param).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
        assert_eq!(std::fs::read_to_string(&param).unwrap(), "9");
    }

    #[test]
    fn a_missing_sysfs_file_names_the_kernel_option() {
        let dir = tempfile::tempdir().unwrap();
        let param = dir.path().join("absent/page_reporting_order");
        let err = apply_page_reporting_order("vmrun.page_reporting_order=0", &param).unwrap_err();
        assert!(err.to_string().contains("CONFIG_PAGE_REPORTING"), "{err}");
    }
}
