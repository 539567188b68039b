//! A [`Syscall`] that records every call instead of performing it, for unit
//! tests of the operation sequence. Directory/file creation is recorded too
//! (nothing touches the filesystem), so path resolution sees the tempdir as it
//! was before the run.

use std::collections::HashSet;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use caps::Capability;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::SFlag;

use super::{ProcessCapabilities, Syscall};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Mount {
        source: Option<PathBuf>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    Umount2(PathBuf, MntFlags),
    PivotRoot(PathBuf, PathBuf),
    Chdir(PathBuf),
    Fchdir,
    Chroot(PathBuf),
    Sethostname(String),
    Setns(CloneFlags),
    Unshare(CloneFlags),
    MkdirAll(PathBuf),
    CreateFile(PathBuf),
    Mknod(PathBuf, SFlag, u32, u64),
    Chown(PathBuf, Option<u32>, Option<u32>),
    Symlink(PathBuf, PathBuf),
    WriteFile(PathBuf, Vec<u8>),
    Umask(u32),
    NoNewPrivs,
    /// A seccomp filter of this many instructions.
    Seccomp(usize),
    KeepCaps(bool),
    DropBounding(Vec<String>),
    SetCapabilities(ProcessCapabilities),
    Setgroups(Vec<u32>),
    Setgid(u32),
    Setuid(u32),
    Setrlimit(u32, u64, u64),
    InterfaceUp(String),
}

/// Records calls; `fail_on` makes the first call whose `Debug` text contains
/// the given string fail with EPERM (to test error reporting).
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    ops: Mutex<Vec<Op>>,
    fail_on: Option<String>,
}

impl RecordingSyscall {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn failing_on(pattern: &str) -> Self {
        Self {
            ops: Mutex::new(Vec::new()),
            fail_on: Some(pattern.to_string()),
        }
    }

    /// The calls recorded so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, op: Op) -> io::Result<()> {
        let fail = self
            .fail_on
            .as_deref()
            .is_some_and(|p| format!("{op:?}").contains(p));
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
        if fail {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }
}

impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        self.record(Op::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        })
    }
    fn umount2(&self, target: &Path, flags: MntFlags) -> io::Result<()> {
        self.record(Op::Umount2(target.to_path_buf(), flags))
    }
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        self.record(Op::PivotRoot(new_root.to_path_buf(), put_old.to_path_buf()))
    }
    fn chdir(&self, path: &Path) -> io::Result<()> {
        self.record(Op::Chdir(path.to_path_buf()))
    }
    fn fchdir(&self, _dir: BorrowedFd<'_>) -> io::Result<()> {
        self.record(Op::Fchdir)
    }
    fn chroot(&self, path: &Path) -> io::Result<()> {
        self.record(Op::Chroot(path.to_path_buf()))
    }
    fn sethostname(&self, name: &str) -> io::Result<()> {
        self.record(Op::Sethostname(name.to_string()))
    }
    fn setns(&self, _fd: BorrowedFd<'_>, nstype: CloneFlags) -> io::Result<()> {
        self.record(Op::Setns(nstype))
    }
    fn unshare(&self, flags: CloneFlags) -> io::Result<()> {
        self.record(Op::Unshare(flags))
    }
    fn mkdir_all(&self, path: &Path, _mode: u32) -> io::Result<()> {
        self.record(Op::MkdirAll(path.to_path_buf()))
    }
    fn create_file(&self, path: &Path, _mode: u32) -> io::Result<()> {
        self.record(Op::CreateFile(path.to_path_buf()))
    }
    fn mknod(&self, path: &Path, kind: SFlag, mode: u32, dev: u64) -> io::Result<()> {
        self.record(Op::Mknod(path.to_path_buf(), kind, mode, dev))
    }
    fn chown(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        self.record(Op::Chown(path.to_path_buf(), uid, gid))
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.record(Op::Symlink(target.to_path_buf(), link.to_path_buf()))
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.record(Op::WriteFile(path.to_path_buf(), data.to_vec()))
    }
    fn umask(&self, mask: u32) {
        let _ = self.record(Op::Umask(mask));
    }
    fn set_no_new_privs(&self) -> io::Result<()> {
        self.record(Op::NoNewPrivs)
    }
    fn set_seccomp_filter(&self, filter: &[seccompiler::sock_filter]) -> io::Result<()> {
        self.record(Op::Seccomp(filter.len()))
    }
    fn set_keep_caps(&self, keep: bool) -> io::Result<()> {
        self.record(Op::KeepCaps(keep))
    }
    fn drop_bounding_capabilities(&self, keep: &HashSet<Capability>) -> io::Result<()> {
        let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
        names.sort();
        self.record(Op::DropBounding(names))
    }
    fn set_capabilities(&self, caps: &ProcessCapabilities) -> io::Result<()> {
        self.record(Op::SetCapabilities(caps.clone()))
    }
    fn setgroups(&self, gids: &[u32]) -> io::Result<()> {
        self.record(Op::Setgroups(gids.to_vec()))
    }
    fn setgid(&self, gid: u32) -> io::Result<()> {
        self.record(Op::Setgid(gid))
    }
    fn setuid(&self, uid: u32) -> io::Result<()> {
        self.record(Op::Setuid(uid))
    }
    fn setrlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
        self.record(Op::Setrlimit(resource, soft, hard))
    }
    fn set_interface_up(&self, name: &str) -> io::Result<()> {
        self.record(Op::InterfaceUp(name.to_string()))
    }
}
