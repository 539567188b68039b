//! The control socket: accepts one client at a time, reads request lines,
//! forwards each parsed action to the VM's owner and writes its reply.
//! Waits with poll on the socket and a stop eventfd, never by sleeping.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{parse_request, ActionReply, ActionRequest, OwnerEvent, PassedFile, VmmAction};
use crate::seccomp::{ThreadFilters, ThreadKind};

/// Longest request line accepted.
const MAX_LINE: usize = 4096;
/// File descriptors a client may have sent ahead of the requests that use
/// them; one that sends more is dropped.
const MAX_PENDING_FILES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the control socket thread: {0}")]
    Spawn(io::Error),
}

/// The bound socket, before the VM runs. Removes the socket file when
/// dropped (also after [`ApiSocket::serve`]'s thread ended).
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    pub fn bind(path: &Path) -> Result<ApiSocket, ApiError> {
        let bind_error = |source| ApiError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(ApiSocket {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serves on a thread, sending actions to `owner`; the thread enters
    /// the API threads' seccomp filter first.
    pub fn serve(
        self,
        owner: Sender<OwnerEvent>,
        filters: ThreadFilters,
    ) -> Result<ApiServer, ApiError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Spawn)?;
        let thread_stop = stop.try_clone().map_err(ApiError::Spawn)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                filters.enter(ThreadKind::Api);
                serve(&self.listener, &owner, &thread_stop);
                drop(self); // removes the socket file
            })
            .map_err(ApiError::Spawn)?;
        Ok(ApiServer { stop, thread })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The running server thread.
pub struct ApiServer {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl ApiServer {
    /// Ends the thread (closing any client) and waits for it.
    pub fn stop(self) {
        if self.stop.write(1).is_ok() {
            let _ = self.thread.join();
        }
    }
}

/// Polls `fds` for input; `None` if the stop fd (the first) fired or
/// polling failed, else which of the others are ready.
fn wait(fds: &[RawFd]) -> Option<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries.
        let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if ret >= 0 {
            break;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
    }
    if pollfds[0].revents != 0 {
        return None;
    }
    Some(pollfds[1..].iter().map(|p| p.revents != 0).collect())
}

fn serve(listener: &UnixListener, owner: &Sender<OwnerEvent>, stop: &EventFd) {
    loop {
        if wait(&[stop.as_raw_fd(), listener.as_raw_fd()]).is_none() {
            return;
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => continue, // WouldBlock after a spurious wake-up, or transient
        };
        if client.set_nonblocking(true).is_err() {
            continue;
        }
        if !serve_client(client, owner, stop) {
            return;
        }
    }
}

/// Serves one client until it leaves; false when the server must stop.
fn serve_client(mut client: UnixStream, owner: &Sender<OwnerEvent>, stop: &EventFd) -> bool {
    let mut buffer = Vec::new();
    let mut files = VecDeque::new();
    loop {
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let reply = handle_line(&line[..end], &mut files, owner);
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            // The client is non-blocking, and a reply is tiny: a client that
            // does not read its replies loses them.
            if client.set_nonblocking(false).is_err()
                || client.write_all(text.as_bytes()).is_err()
                || client.set_nonblocking(true).is_err()
            {
                return true;
            }
        }
        if buffer.len() > MAX_LINE {
            return true; // drop a client that sends garbage without newlines
        }
        if wait(&[stop.as_raw_fd(), client.as_raw_fd()]).is_none() {
            return false;
        }
        let mut chunk = [0u8; 1024];
        match client.recv_with_fd(&mut chunk) {
            Ok((0, None)) => return true,
            Ok((n, file)) => {
                buffer.extend_from_slice(&chunk[..n]);
                files.extend(file);
                if files.len() > MAX_PENDING_FILES {
                    return true;
                }
            }
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {}
            Err(_) => return true,
        }
    }
}

/// Parses a request and has the owner act on it; an `attach_disk` takes
/// the oldest file the client sent, if any.
fn handle_line(line: &[u8], files: &mut VecDeque<File>, owner: &Sender<OwnerEvent>) -> ActionReply {
    let Ok(text) = std::str::from_utf8(line) else {
        return ActionReply::error("request is not UTF-8");
    };
    let action = match parse_request(text.trim()) {
        Ok(VmmAction::AttachDisk {
            path, read_only, ..
        }) => VmmAction::AttachDisk {
            path,
            read_only,
            file: files
                .pop_front()
                .map(|file| PassedFile(std::sync::Arc::new(file))),
        },
        Ok(VmmAction::TestForbiddenSyscall) => return forbidden_syscall(),
        Ok(action) => action,
        Err(e) => return ActionReply::error(e.to_string()),
    };
    let (reply, answer) = mpsc::channel();
    if owner
        .send(OwnerEvent::Action(ActionRequest { action, reply }))
        .is_err()
    {
        return ActionReply::error("the VM has stopped");
    }
    // The owner answers every request before it stops this server.
    answer
        .recv()
        .unwrap_or_else(|_| ActionReply::error("the VM has stopped"))
}

/// The seccomp test hook: a call no filter of the API thread allows. With
/// a filter the VMM ends here; the reply says there was none.
fn forbidden_syscall() -> ActionReply {
    // SAFETY: getppid has no preconditions and changes nothing.
    let parent = unsafe { libc::getppid() };
    ActionReply::error(format!(
        "getppid answered {parent}: this VMM runs without seccomp filters"
    ))
}
