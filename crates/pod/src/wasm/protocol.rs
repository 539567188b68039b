//! What the pod's controller and its wasm engine process (`vmrun-wasm`) say
//! to each other: one JSON message per datagram on a `SOCK_SEQPACKET`
//! socket pair, with the container's stdio passed alongside as file
//! descriptors (`SCM_RIGHTS`). The engine inherits its end as fd 3.
//!
//! The engine ends its containers and exits when the controller's end
//! closes, so a controller that dies leaves no engine behind.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

/// The fd number the engine finds its end of the socket pair at.
pub const ENGINE_SOCKET_FD: RawFd = 3;
/// Largest message either side sends (args and env of one container).
pub const MAX_MESSAGE: usize = 1 << 20;

/// Controller → engine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start a container; stdout and stderr travel as the message's two fds.
    Start(StartRequest),
    /// Deliver `signal` to a container (WASI has no signal handlers, so every
    /// signal whose default action ends a process ends it).
    Signal { id: u64, signal: i32 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StartRequest {
    /// The controller's handle for this container run.
    pub id: u64,
    pub name: String,
    /// The module or component, on the host.
    pub wasm: PathBuf,
    /// argv, argv[0] being the path of the module inside the image.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Host directories the guest sees, `/` (the image) first.
    pub preopens: Vec<Preopen>,
    pub cwd: Option<String>,
    /// Bytes all linear memories and tables of the container may use.
    pub memory_limit: Option<u64>,
    /// CPU share in thousandths of a CPU, enforced at epoch ticks.
    pub cpu_limit_milli: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// Engine → controller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Instantiated; its entry point is being called.
    Started { id: u64 },
    /// Never ran: the message names why (invalid module, missing export, ...).
    StartFailed { id: u64, message: String },
    Exited {
        id: u64,
        code: i32,
        signal: Option<i32>,
        oom_killed: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the other side closed the channel")]
    Closed,
    #[error("socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// A connected pair: (controller's end, engine's end), both close-on-exec.
pub fn channel_pair() -> Result<(OwnedFd, OwnedFd), ChannelError> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sends one message with `fds` attached.
pub fn send<T: Serialize>(
    sock: BorrowedFd<'_>,
    message: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ChannelError> {
    let bytes = serde_json::to_vec(message)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ChannelError::TooLarge(bytes.len()));
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                return Err(ChannelError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message and the fds sent with it (at most 4; more are closed).
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> Result<(T, Vec<OwnedFd>), ChannelError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (len, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in this
                            // process for this message; nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                break (msg.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECONNRESET) => return Err(ChannelError::Closed),
            Err(e) => return Err(e.into()),
        }
    };
    if len == 0 {
        return Err(ChannelError::Closed);
    }
    Ok((serde_json::from_slice(&buf[..len])?, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_request_and_its_fds_arrive_whole() {
        let (a, b) = channel_pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let request = Request::Signal { id: 7, signal: 15 };
        send(a.as_fd(), &request, &[w.as_fd()]).unwrap();
        drop(w);
        let (got, fds): (Request, _) = recv(b.as_fd()).unwrap();
        assert_eq!(got, request);
        assert_eq!(fds.len(), 1);
        let mut passed = std::fs::File::from(fds.into_iter().next().unwrap());
        passed.write_all(b"through").unwrap();
        drop(passed);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "through");
    }

    #[test]
    fn a_closed_peer_is_reported_as_closed() {
        let (a, b) = channel_pair().unwrap();
        drop(a);
        let err = recv::<Event>(b.as_fd()).unwrap_err();
        assert!(matches!(err, ChannelError::Closed), "{err}");
    }
}
