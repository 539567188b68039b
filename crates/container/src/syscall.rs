//! The OS seam: every privileged or state-changing operation the container
//! setup performs goes through [`Syscall`], so unit tests can check the
//! sequence of operations with [`recording::RecordingSyscall`] while the real
//! code runs [`LinuxSyscall`].
//!
//! The implementation is passed in as `&dyn Syscall`; it is never swapped by
//! `cfg(test)`. Implementations used in forked children must not take locks
//! that another thread of the caller could hold at fork time (`LinuxSyscall`
//! takes none; the recording fake is only meant for in-process unit tests).
//!
//! Read-only inspection of the filesystem (stat, readlink) is not part of the
//! seam: it is done with `std::fs` directly so tests can point it at a tempdir.

pub mod recording;

use std::collections::HashSet;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use caps::{CapSet, Capability};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag};

/// The capability sets applied after the uid/gid switch. The bounding set is
/// handled separately ([`Syscall::drop_bounding_capabilities`]) because it has
/// to shrink while the process still holds `CAP_SETPCAP`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessCapabilities {
    pub effective: HashSet<Capability>,
    pub permitted: HashSet<Capability>,
    pub inheritable: HashSet<Capability>,
    pub ambient: HashSet<Capability>,
}

/// Operating-system operations used to build a container.
pub trait Syscall: Send + Sync {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn umount2(&self, target: &Path, flags: MntFlags) -> io::Result<()>;
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()>;
    fn chdir(&self, path: &Path) -> io::Result<()>;
    /// Changes to the directory open as `dir` (e.g. a root that a
    /// pivot_root has since covered, unreachable by path).
    fn fchdir(&self, dir: BorrowedFd<'_>) -> io::Result<()>;
    fn chroot(&self, path: &Path) -> io::Result<()>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    fn setns(&self, fd: BorrowedFd<'_>, nstype: CloneFlags) -> io::Result<()>;
    fn unshare(&self, flags: CloneFlags) -> io::Result<()>;
    /// `mkdir -p` with `mode` for the directories it creates.
    fn mkdir_all(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// Creates an empty regular file if missing (a bind-mount target).
    fn create_file(&self, path: &Path, mode: u32) -> io::Result<()>;
    fn mknod(&self, path: &Path, kind: SFlag, mode: u32, dev: u64) -> io::Result<()>;
    fn chown(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()>;
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    /// Writes `data` to an existing file (files in /proc and /sys).
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    fn umask(&self, mask: u32);
    fn set_no_new_privs(&self) -> io::Result<()>;
    /// Installs a seccomp BPF filter on the calling thread (without setting
    /// no_new_privs: that is the spec's choice, made apart).
    fn set_seccomp_filter(&self, filter: &[seccompiler::sock_filter]) -> io::Result<()>;
    fn set_keep_caps(&self, keep: bool) -> io::Result<()>;
    /// Drops every capability not in `keep` from the bounding set.
    fn drop_bounding_capabilities(&self, keep: &HashSet<Capability>) -> io::Result<()>;
    fn set_capabilities(&self, caps: &ProcessCapabilities) -> io::Result<()>;
    fn setgroups(&self, gids: &[u32]) -> io::Result<()>;
    fn setgid(&self, gid: u32) -> io::Result<()>;
    fn setuid(&self, uid: u32) -> io::Result<()>;
    fn setrlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()>;
    /// Brings a network interface of the current network namespace up.
    fn set_interface_up(&self, name: &str) -> io::Result<()>;
}

/// The real implementation.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn caps_err(e: caps::errors::CapsError) -> io::Error {
    io::Error::other(e.to_string())
}

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data).map_err(io::Error::from)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> io::Result<()> {
        nix::mount::umount2(target, flags).map_err(io::Error::from)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        nix::unistd::pivot_root(new_root, put_old).map_err(io::Error::from)
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        nix::unistd::chdir(path).map_err(io::Error::from)
    }

    fn fchdir(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        nix::unistd::fchdir(dir).map_err(io::Error::from)
    }

    fn chroot(&self, path: &Path) -> io::Result<()> {
        nix::unistd::chroot(path).map_err(io::Error::from)
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name).map_err(io::Error::from)
    }

    fn setns(&self, fd: BorrowedFd<'_>, nstype: CloneFlags) -> io::Result<()> {
        nix::sched::setns(fd, nstype).map_err(io::Error::from)
    }

    fn unshare(&self, flags: CloneFlags) -> io::Result<()> {
        nix::sched::unshare(flags).map_err(io::Error::from)
    }

    fn mkdir_all(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
    }

    fn create_file(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map(drop)
    }

    fn mknod(&self, path: &Path, kind: SFlag, mode: u32, dev: u64) -> io::Result<()> {
        nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(mode), dev)
            .map_err(io::Error::from)
    }

    fn chown(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        nix::unistd::chown(
            path,
            uid.map(nix::unistd::Uid::from_raw),
            gid.map(nix::unistd::Gid::from_raw),
        )
        .map_err(io::Error::from)
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(data)
    }

    fn umask(&self, mask: u32) {
        nix::sys::stat::umask(Mode::from_bits_truncate(mask));
    }

    fn set_no_new_privs(&self) -> io::Result<()> {
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
    }

    fn set_seccomp_filter(&self, filter: &[seccompiler::sock_filter]) -> io::Result<()> {
        let len = u16::try_from(filter.len())
            .map_err(|_| io::Error::other("seccomp filter longer than 65535 instructions"))?;
        let prog = libc::sock_fprog {
            len,
            // seccompiler's sock_filter is #[repr(C)] with the kernel's layout.
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: prog points at `len` instructions that outlive the call;
        // the kernel copies them and keeps no pointer.
        check(unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        })
    }

    fn set_keep_caps(&self, keep: bool) -> io::Result<()> {
        // SAFETY: prctl(PR_SET_KEEPCAPS) takes integer arguments only.
        check(
            unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) }
                .into(),
        )
    }

    fn drop_bounding_capabilities(&self, keep: &HashSet<Capability>) -> io::Result<()> {
        // Only the capabilities this kernel knows can be dropped; asking to
        // drop an unknown one fails with EINVAL.
        for cap in caps::runtime::thread_all_supported() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(caps_err)?;
            }
        }
        Ok(())
    }

    fn set_capabilities(&self, c: &ProcessCapabilities) -> io::Result<()> {
        // Order matters: the effective set must always stay a subset of the
        // permitted one, and inheritable may only grow while permitted is
        // still large. Ambient needs both permitted and inheritable.
        caps::set(None, CapSet::Inheritable, &c.inheritable).map_err(caps_err)?;
        caps::set(None, CapSet::Effective, &c.effective).map_err(caps_err)?;
        caps::set(None, CapSet::Permitted, &c.permitted).map_err(caps_err)?;
        if !c.ambient.is_empty() || caps::runtime::ambient_set_supported().is_ok() {
            caps::set(None, CapSet::Ambient, &c.ambient).map_err(caps_err)?;
        }
        Ok(())
    }

    fn setgroups(&self, gids: &[u32]) -> io::Result<()> {
        // Raw syscalls for the id changes: glibc's wrappers broadcast to every
        // thread through its internal thread list, which we do not want to
        // depend on in a forked child. These processes are single-threaded.
        // SAFETY: `gids` is a valid slice of gid_t for the duration of the call.
        check(unsafe { libc::syscall(libc::SYS_setgroups, gids.len(), gids.as_ptr()) })
    }

    fn setgid(&self, gid: u32) -> io::Result<()> {
        // SAFETY: setresgid takes integer arguments only.
        check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })
    }

    fn setuid(&self, uid: u32) -> io::Result<()> {
        // SAFETY: setresuid takes integer arguments only.
        check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })
    }

    fn setrlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `lim` is a valid rlimit that outlives the call; a null
        // old-limit pointer is allowed.
        check(unsafe { libc::prlimit(0, resource as _, &lim, std::ptr::null_mut()) }.into())
    }

    fn set_interface_up(&self, name: &str) -> io::Result<()> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        // SAFETY: socket() takes integer arguments only.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket() succeeded, so `fd` is an open descriptor we own.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
        // SAFETY: `req` is a valid ifreq that lives across the call.
        if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: as above.
        if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
