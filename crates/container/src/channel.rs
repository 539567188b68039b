//! The parent <-> child message channel: a CLOEXEC `SOCK_SEQPACKET`
//! socketpair. Message boundaries come for free, `MSG_NOSIGNAL` avoids
//! SIGPIPE when the other side is gone, and because the child's end is
//! CLOEXEC, a successful `execve` shows up in the parent as EOF.
//!
//! Every message is one tag byte followed by a payload.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// C1 -> parent: the container init's pid (decimal text).
pub(crate) const TAG_PID: u8 = b'P';
/// C2 -> parent: setup finished, waiting for start.
pub(crate) const TAG_READY: u8 = b'R';
/// child -> parent: setup or exec failed (message text).
pub(crate) const TAG_ERROR: u8 = b'E';
/// parent -> C2: go ahead and exec.
pub(crate) const TAG_START: u8 = b'S';

const MAX_MESSAGE: usize = 16 * 1024;

#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
    /// Messages already read but not consumed yet (see `requeue`).
    backlog: Mutex<VecDeque<(u8, Vec<u8>)>>,
}

/// Creates the two ends (parent, child).
pub(crate) fn pair() -> io::Result<(Channel, Channel)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((Channel::new(a), Channel::new(b)))
}

impl Channel {
    fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            backlog: Mutex::new(VecDeque::new()),
        }
    }

    /// Puts a message back so the next `recv` returns it (in order).
    pub(crate) fn requeue(&self, msg: (u8, Vec<u8>)) {
        self.backlog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(msg);
    }

    /// Every message already queued in the socket, without blocking; stops
    /// at EOF or when nothing more is queued.
    pub(crate) fn drain(&self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Ok(Some(m)) = self.recv_flags(libc::MSG_DONTWAIT) {
            out.push(m);
        }
        out
    }
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn send(&self, tag: u8, payload: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(1 + payload.len().min(MAX_MESSAGE - 1));
        buf.push(tag);
        buf.extend_from_slice(&payload[..payload.len().min(MAX_MESSAGE - 1)]);
        loop {
            // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
            let n = unsafe {
                libc::send(
                    self.raw(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Next message, or None at EOF (every copy of the other end is closed).
    pub(crate) fn recv(&self) -> io::Result<Option<(u8, Vec<u8>)>> {
        if let Some(m) = self
            .backlog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
        {
            return Ok(Some(m));
        }
        self.recv_flags(0)
    }

    fn recv_flags(&self, flags: libc::c_int) -> io::Result<Option<(u8, Vec<u8>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::recv(self.raw(), buf.as_mut_ptr().cast(), buf.len(), flags) };
            if n > 0 {
                let n = n as usize;
                buf.truncate(n);
                let tag = buf.remove(0);
                return Ok(Some((tag, buf)));
            }
            if n == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
