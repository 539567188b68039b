//! The VMM's jail, entered once the VM is built and before any thread
//! starts: what Firecracker's jailer gives its VMM, done by the VMM itself.
//!
//! By then every file the VM needs is open (kernel and initrd read, disks,
//! console, tap, /dev/kvm, the sockets bound), so the jail keeps nothing
//! else: a mount namespace of its own whose root is the jail directory
//! (the pod's VM directory: its sockets and logs), read-only, nosuid,
//! nodev and noexec; no capabilities, in any set; another uid and gid
//! when asked; `no_new_privs`; not dumpable. Disks attached later come as
//! open files over the control socket.
//!
//! Paths the VMM uses once jailed (the guest connecting to host vsock
//! listeners, `<socket>_<port>`) resolve in the jail, so give them
//! relative to the jail directory (the VMM's working directory).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where and as whom the VMM runs once jailed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// The jail's root: a directory the VMM's files live in.
    pub root: PathBuf,
    /// The uid and gid to become (none: stay uid 0, without capabilities).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail directory {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
    #[error("the jail must be entered before the VMM starts threads ({0} run)")]
    Threads(usize),
    #[error("cannot {step} for the VMM's jail: {source}{hint}")]
    Step {
        step: &'static str,
        source: io::Error,
        hint: &'static str,
    },
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| {
        let hint = if source.raw_os_error() == Some(libc::EPERM) {
            " (the jail needs root: CAP_SYS_ADMIN, CAP_SETUID and CAP_SETGID)"
        } else {
            ""
        };
        JailError::Step { step, source, hint }
    }
}

/// Enters the jail: see the module's documentation. The calling thread
/// must be the process's only one.
pub fn enter(config: &JailConfig) -> Result<(), JailError> {
    let root = std::fs::canonicalize(&config.root).map_err(|source| JailError::Root {
        path: config.root.clone(),
        source,
    })?;
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count())
        .unwrap_or(1);
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    // /proc is gone once jailed.
    let last_cap = last_capability();
    enter_mount_namespace(&root)?;
    drop_privileges(config, last_cap)?;
    Ok(())
}

fn cstring(path: &Path) -> CString {
    // A canonical path from the kernel has no NUL byte.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount(source: Option<&CString>, target: &CString, flags: libc::c_ulong) -> io::Result<()> {
    let source = source.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: both paths are NUL-terminated strings that outlive the call;
    // no filesystem type or data is passed.
    check(unsafe {
        libc::mount(
            source,
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// A mount namespace whose root is `root` (bind-mounted on itself), with
/// the host's mounts gone from it.
fn enter_mount_namespace(root: &Path) -> Result<(), JailError> {
    let root_c = cstring(root);
    let slash = CString::from(c"/");
    let dot = CString::from(c".");
    // SAFETY: unshare takes no pointers.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })
        .map_err(step("unshare the mount namespace"))?;
    // Nothing mounted here reaches the host, nor the other way.
    mount(None, &slash, libc::MS_REC | libc::MS_PRIVATE)
        .map_err(step("make the mounts private"))?;
    // pivot_root wants the new root to be a mount point.
    mount(Some(&root_c), &root_c, libc::MS_BIND).map_err(step("bind-mount the jail directory"))?;
    // SAFETY: a NUL-terminated path that outlives the call.
    check(unsafe { libc::chdir(root_c.as_ptr()) }).map_err(step("enter the jail directory"))?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one,
    // which the detach below then removes; both paths outlive the call.
    let pivoted = check(unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int
    });
    match pivoted {
        Ok(()) => {
            // SAFETY: a NUL-terminated path that outlives the call.
            check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
                .map_err(step("detach the host's root"))?;
        }
        // The root is the initramfs (rootfs cannot be pivoted away): move
        // the jail onto it and chroot, as switch_root does.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount(Some(&dot), &slash, libc::MS_MOVE).map_err(step("move the jail onto /"))?;
            // SAFETY: a NUL-terminated path that outlives the call.
            check(unsafe { libc::chroot(dot.as_ptr()) }).map_err(step("chroot into the jail"))?;
        }
        Err(e) => return Err(step("pivot_root into the jail")(e)),
    }
    // SAFETY: a NUL-terminated path that outlives the call.
    check(unsafe { libc::chdir(slash.as_ptr()) }).map_err(step("enter the jail's root"))?;
    mount(
        None,
        &slash,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
    )
    .map_err(step("make the jail read-only"))?;
    Ok(())
}

/// Highest capability number the running kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// No capabilities now or after any exec, the asked uid and gid, no new
/// privileges, not dumpable.
fn drop_privileges(config: &JailConfig, last_cap: u32) -> Result<(), JailError> {
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })
            .map_err(step("drop the capability bounding set"))?;
    }
    // SAFETY: prctl with integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
    .map_err(step("clear the ambient capabilities"))?;
    if let Some(gid) = config.gid {
        // SAFETY: no groups: a null list of length 0.
        check(unsafe { libc::setgroups(0, std::ptr::null()) })
            .map_err(step("drop the supplementary groups"))?;
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresgid(gid, gid, gid) }).map_err(step("change the gid"))?;
    }
    if let Some(uid) = config.uid {
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresuid(uid, uid, uid) }).map_err(step("change the uid"))?;
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and two data structs, which
    // live until the call returns.
    check(unsafe {
        libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) as libc::c_int
    })
    .map_err(step("drop every capability"))?;
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("set no_new_privs"))?;
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
        .map_err(step("make the VMM not dumpable"))?;
    Ok(())
}
