//! `process.terminal`, two ways ([`Console`](crate::Console)):
//! - passed: the caller allocates the pseudo-terminal (it keeps the master
//!   to relay I/O and set the window size) and passes the slave as stdin,
//!   stdout and stderr;
//! - from the container: the init opens it on the container's own devpts
//!   once its rootfs is ready and sends the master back over a socket of
//!   its own (runc's console socket), so the slave has a name inside the
//!   container (`tty` prints `/dev/pts/0`).
//!
//! Either way the container process makes the slave its controlling
//! terminal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::container::Stdio;

/// Opens a pseudo-terminal on this process's devpts: (master, slave), both
/// close-on-exec (the caller hands the slave to the process explicitly) and
/// neither one this process's controlling terminal.
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    // grantpt is not needed: devpts creates the slave owned by us already.
    nix::pty::unlockpt(&master)?;
    slave_of(master.into())
}

/// The devpts multiplexer's device number (5, 2).
const PTMX_MAJOR: u64 = 5;
const PTMX_MINOR: u64 = 2;

/// Opens a pseudo-terminal on the devpts instance of the container whose
/// process is `pid` (its `/dev/pts/ptmx`), so that the slave has a name in
/// the container (`tty` prints `/dev/pts/N`) and is counted against its
/// devpts, not the caller's. The container's files are not trusted: the
/// node is opened without following a final symlink and must be the ptmx
/// character device, or this fails with `InvalidData`. `NotFound` when the
/// container has no devpts of its own.
pub fn open_pty_in_container(pid: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::stat::{fstat, major, minor, SFlag};
    let path = format!("/proc/{pid}/root/dev/pts/ptmx");
    let node = nix::fcntl::open(
        path.as_str(),
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let st = fstat(&node)?;
    let is_char = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR;
    let rdev = st.st_rdev;
    if !is_char || major(rdev) != PTMX_MAJOR || minor(rdev) != PTMX_MINOR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} is not the pty multiplexer"),
        ));
    }
    // Reopened through the checked descriptor: the path may have changed.
    let master = nix::fcntl::open(
        format!("/proc/self/fd/{}", node.as_raw_fd()).as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    unlock(&master)?;
    slave_of(master)
}

/// TIOCSPTLCK(0): the slave may be opened.
fn unlock(master: &OwnedFd) -> io::Result<()> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which points
    // at a live local for the duration of the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The slave of an unlocked master, opened through the master.
fn slave_of(master: OwnedFd) -> io::Result<(OwnedFd, OwnedFd)> {
    // TIOCGPTPEER (Linux 4.13) opens the slave through the master instead
    // of by its /dev/pts path, which may name another devpts instance.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as an int argument and
    // returns a new descriptor; no memory is passed.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl succeeded, so `slave` is a new descriptor that
    // nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok((master, slave))
}

/// In the container init, after its rootfs is final and before it drops
/// privileges: opens a pty on the container's devpts (`/dev/pts/ptmx`,
/// mounted by the container's own setup), gives the slave to `owner` (the
/// process's user, so it may reopen its terminal by name), sends the
/// master over `sock` and puts the slave on 0, 1 and 2. Raw syscalls and
/// plain allocation only: runs between fork and exec.
pub(crate) fn open_console(sock: RawFd, owner: u32) -> io::Result<()> {
    let path = c"/dev/pts/ptmx";
    // SAFETY: `path` is a NUL-terminated literal; open has no other
    // preconditions.
    let master = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open succeeded, so `master` is a new descriptor nothing
    // else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    unlock(&master)?;
    let (master, slave) = slave_of(master)?;
    // SAFETY: fchown on an open descriptor; -1 keeps the group (devpts'
    // `gid=5`, the tty group).
    if unsafe { libc::fchown(slave.as_raw_fd(), owner, u32::MAX) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(b"C")];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    drop(master);
    for target in 0..3 {
        // SAFETY: dup2 onto 0..2 replaces the standard descriptors, which
        // no Rust object in the child owns.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// In the parent: the master the init sent over its console socket, or
/// None when the init ended without sending one (its setup error comes
/// over the setup channel).
pub(crate) fn receive_console(sock: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut master = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: SCM_RIGHTS installed `fd` in this process just
                // now; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                if master.is_none() {
                    master = Some(fd);
                }
            }
        }
    }
    Ok(master)
}

/// Checks, in the parent, that a process asking for a terminal got one on
/// stdin (the descriptor that becomes its controlling terminal).
pub(crate) fn check_stdio(stdio: &Stdio) -> Result<(), String> {
    let Some(stdin) = &stdio.stdin else {
        return Err(
            "process.terminal needs the caller to pass a terminal (pty slave) as \
                    stdin, stdout and stderr; stdin is /dev/null"
                .into(),
        );
    };
    // SAFETY: isatty only inspects the descriptor, which `stdio` keeps open.
    if unsafe { libc::isatty(stdin.as_raw_fd()) } != 1 {
        return Err(
            "process.terminal needs the caller to pass a terminal (pty slave) as \
                    stdin, stdout and stderr; stdin is not a terminal"
                .into(),
        );
    }
    Ok(())
}

/// In the forked container process, after stdio is installed: starts a new
/// session and makes the terminal on descriptor 0 its controlling terminal,
/// so the shell gets job control, /dev/tty works and SIGWINCH arrives on a
/// resize. Only raw syscalls: runs between fork and exec.
pub(crate) fn make_controlling() -> io::Result<()> {
    // SAFETY: setsid has no preconditions. It fails with EPERM only for a
    // process-group leader, which a freshly cloned child is not.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal the terminal
    // from another session); descriptor 0 is the caller's pty slave.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;

    /// A pty pair as callers make it: (master, slave).
    fn pty() -> (OwnedFd, OwnedFd) {
        open_pty().unwrap()
    }

    #[test]
    fn stdin_must_be_a_terminal() {
        let e = check_stdio(&Stdio::default()).unwrap_err();
        assert!(e.contains("/dev/null"), "{e}");
        let (r, _w) = nix::unistd::pipe().unwrap();
        let e = check_stdio(&Stdio {
            stdin: Some(r),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("not a terminal"), "{e}");
        let (_master, slave) = pty();
        check_stdio(&Stdio {
            stdin: Some(slave),
            ..Default::default()
        })
        .unwrap();
    }

    /// A forked child that puts the slave on 0 and calls make_controlling
    /// owns a session whose controlling terminal is the slave.
    #[test]
    fn child_gets_the_terminal_as_controlling_terminal() {
        let (_master, slave) = pty();
        // SAFETY: the child only makes raw syscalls and then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: raw syscalls on descriptors this process owns.
            let code = unsafe {
                if libc::dup2(slave.as_raw_fd(), 0) < 0 || make_controlling().is_err() {
                    2
                } else if libc::tcgetsid(0) == libc::getpid() {
                    0
                } else {
                    3
                }
            };
            // SAFETY: ends the forked child without running the parent's
            // destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer; `pid` is our child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
    }
}
