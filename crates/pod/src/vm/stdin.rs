//! A vm container's stdin ([`Launch::stdin`](crate::runtime::Launch)): the
//! caller's pipe is read on a thread of its own and each chunk written into
//! the container through the agent's `WriteStdin`; the pipe's end closes the
//! container's stdin (the agent types the terminal's EOF character into a
//! tty container instead).
//!
//! The thread polls the pipe beside a stop pipe, so removing the container
//! ends it even when the caller neither writes nor closes.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::runtime::Handle;
use tonic::transport::Channel;
use vmrun_proto::v1;
use vmrun_proto::AgentClient;

use super::sandbox::call;
use super::vmm_process::VmmProcess;

/// One WriteStdin's worth: small enough for one agent message.
const CHUNK: usize = 32 << 10;

pub(super) struct StdinFeeder {
    /// Dropping the write end wakes the thread to end.
    stop: Mutex<Option<OwnedFd>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Where the feeder writes: the container's init in the guest.
pub(super) struct StdinTarget {
    pub rt: Handle,
    pub agent: AgentClient<Channel>,
    pub vmm: Arc<VmmProcess>,
    pub container_id: String,
}

impl StdinFeeder {
    pub(super) fn spawn(target: StdinTarget, stdin: OwnedFd) -> io::Result<Self> {
        let (stop_rx, stop) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let thread = std::thread::Builder::new()
            .name("vm-stdin".into())
            .spawn(move || feed(&target, &stdin, &stop_rx))?;
        Ok(Self {
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Ends the thread (idempotent) and waits for it.
    pub(super) fn stop(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for StdinFeeder {
    fn drop(&mut self) {
        self.stop();
    }
}

fn feed(target: &StdinTarget, stdin: &OwnedFd, stop: &OwnedFd) {
    // A thread of our own is outside the runtime: the calls' timers need it.
    let _runtime = target.rt.enter();
    let mut buf = vec![0u8; CHUNK];
    loop {
        if !readable(stdin.as_fd(), stop.as_fd()) {
            return; // stopped
        }
        let (data, close) = match nix::unistd::read(stdin, &mut buf) {
            Ok(0) => (&[][..], true),
            Ok(n) => (&buf[..n], false),
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(e) => {
                tracing::debug!(container = %target.container_id, "reading stdin: {e}");
                (&[][..], true)
            }
        };
        let mut agent = target.agent.clone();
        let request = v1::WriteStdinRequest {
            container_id: target.container_id.clone(),
            exec_id: String::new(),
            data: data.to_vec(),
            close,
        };
        let written = call(
            &target.rt,
            &target.vmm,
            "writing stdin",
            agent.write_stdin(request),
        );
        if let Err(e) = written {
            // The container ended (or the VM): nothing more to feed.
            tracing::debug!(container = %target.container_id, "{e}");
            return;
        }
        if close {
            return;
        }
    }
}

/// Waits until `fd` has data or its end (true), or `stop` is closed (false).
fn readable(fd: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> bool {
    loop {
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(stop, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(_) => return false,
            Ok(_) => {
                let fired = |p: &PollFd| p.revents().is_some_and(|r| !r.is_empty());
                if fired(&fds[1]) {
                    return false;
                }
                if fired(&fds[0]) {
                    return true;
                }
            }
        }
    }
}
