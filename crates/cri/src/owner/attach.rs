//! Attach, the owner's side: a container's stdin and live output, kept for
//! its whole life by the process that owns it (so they outlive a daemon
//! restart), and the `ContainerIo.Attach` sessions (proto/owner.proto) the
//! daemon's streaming server opens to connect a client to them.
//!
//! What a session does follows containerd's CRI: output from the moment of
//! attaching (no history), stderr only without a tty, and when the client's
//! stdin ends either the container's stdin is closed (`stdin_once`, attach
//! without tty) or the session ends while the container goes on.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use vmrun_pod::logs::{OutputChunk, OutputTap, Stream};
use vmrun_pod::runtime::{Running, WindowSize};

use super::pod::Owner;
use crate::api;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("vmrun.owner.v1");
}

use proto::attach_input::Input;
use proto::attach_output::Output;
use proto::{AttachInput, AttachOpen, AttachOutput};

/// Output chunks a follower may fall behind by before its session ends
/// (each at most one pipe read, 8 KiB).
const TAP_CAPACITY: usize = 1024;

/// A container's attachable streams.
pub struct ContainerIo {
    /// Created with a terminal (ContainerConfig.tty).
    pub tty: bool,
    /// Created with a stdin (ContainerConfig.stdin).
    pub stdin: bool,
    pub stdin_once: bool,
    /// The write end of the container's stdin pipe, from its start until it
    /// exits or `stdin_once` closes it.
    writer: tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>,
    /// Set when `stdin_once` closed stdin: later attaches get no stdin.
    stdin_closed: AtomicBool,
    tap: OutputTap,
}

impl ContainerIo {
    pub fn new(config: &api::ContainerConfig) -> Self {
        Self {
            tty: config.tty,
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            writer: tokio::sync::Mutex::new(None),
            stdin_closed: AtomicBool::new(false),
            tap: broadcast::channel(TAP_CAPACITY).0,
        }
    }

    /// Where the container's output pumps send what they read.
    pub fn tap(&self) -> OutputTap {
        self.tap.clone()
    }

    /// For a start: a new stdin pipe, whose read end the runtime gets and
    /// whose write end stays here; None for a container without stdin.
    pub async fn stdin_for_start(&self) -> std::io::Result<Option<OwnedFd>> {
        if !self.stdin {
            return Ok(None);
        }
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let w = tokio::net::unix::pipe::Sender::from_owned_fd(w)?;
        *self.writer.lock().await = Some(w);
        Ok(Some(r))
    }

    async fn write_stdin(&self, data: &[u8]) -> std::io::Result<()> {
        match self.writer.lock().await.as_mut() {
            Some(w) => w.write_all(data).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the container's stdin is closed",
            )),
        }
    }

    /// Whether `stdin_once` has closed stdin.
    pub fn stdin_closed(&self) -> bool {
        self.stdin_closed.load(Ordering::SeqCst)
    }

    /// The container's end of input: EOF on its stdin pipe.
    pub async fn close_stdin(&self) {
        self.writer.lock().await.take();
    }
}

/// Why an attach to container `id` is refused, if it is: what the daemon
/// checks at the Attach call (from the owner's verbose status) and the owner
/// again when the session opens.
pub fn refusal(
    id: &str,
    has_stdin: bool,
    has_tty: bool,
    stdin_closed: bool,
    want_stdin: bool,
    want_tty: bool,
) -> Option<String> {
    if want_stdin && !has_stdin {
        return Some(format!(
            "attach to container {id} with stdin: it was created without stdin \
             (ContainerConfig.stdin), there is none to attach to"
        ));
    }
    if want_stdin && stdin_closed {
        return Some(format!(
            "attach to container {id} with stdin: its stdin was closed when the \
             first attach's input ended (ContainerConfig.stdin_once)"
        ));
    }
    if want_tty && !has_tty {
        return Some(format!(
            "attach to container {id} with a tty: it was created without a terminal \
             (ContainerConfig.tty); attach without tty"
        ));
    }
    None
}

pub struct AttachService {
    owner: Arc<Owner>,
}

impl AttachService {
    pub fn new(owner: Arc<Owner>) -> Self {
        Self { owner }
    }
}

type OutputStream = ReceiverStream<Result<AttachOutput, Status>>;

#[tonic::async_trait]
impl proto::container_io_server::ContainerIo for AttachService {
    type AttachStream = OutputStream;

    async fn attach(
        &self,
        request: Request<Streaming<AttachInput>>,
    ) -> Result<Response<OutputStream>, Status> {
        let mut input = request.into_inner();
        let open = match input.message().await? {
            Some(AttachInput {
                input: Some(Input::Open(open)),
            }) => open,
            _ => {
                return Err(Status::invalid_argument(
                    "attach: the first input must open the session (container id, streams)",
                ))
            }
        };
        let id = open.container_id.clone();
        let c = self.owner.container(&id)?;
        let running = c.running().ok_or_else(|| {
            Status::failed_precondition(format!(
                "container {id} is not running ({:?}): there is nothing to attach to",
                c.phase()
            ))
        })?;
        let io = c.io.clone();
        let closed = io.stdin_closed();
        if let Some(why) = refusal(&id, io.stdin, io.tty, closed, open.stdin, open.tty) {
            return Err(Status::failed_precondition(why));
        }
        // Subscribed before the reply: everything written from now on is sent.
        let output = io.tap.subscribe();
        let (tx, rx) = mpsc::channel(16);
        let session = Session { io, running, open };
        tokio::spawn(session.run(input, output, c.exited(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    io: Arc<ContainerIo>,
    running: Arc<dyn Running>,
    open: AttachOpen,
}

/// How the client's input ended the session's input side.
enum InputEnd {
    /// The session is over (the client went, or its stdin ended without
    /// closing the container's).
    Detach,
    /// `stdin_once`: the container's stdin is closed; output goes on.
    StdinClosed,
}

impl Session {
    async fn run(
        self,
        mut input: Streaming<AttachInput>,
        mut output: broadcast::Receiver<OutputChunk>,
        mut exited: watch::Receiver<bool>,
        tx: mpsc::Sender<Result<AttachOutput, Status>>,
    ) {
        let forward = self.forward(&mut output, &mut exited, &tx);
        tokio::pin!(forward);
        tokio::select! {
            _ = &mut forward => return,
            end = self.take_input(&mut input) => match end {
                InputEnd::Detach => return,
                InputEnd::StdinClosed => {}
            },
        }
        // Input after stdin is closed: resizes, and the client's going.
        tokio::select! {
            _ = forward => {}
            _ = self.take_resizes(&mut input) => {}
        }
    }

    /// Sends the container's output until it exits or the client goes.
    async fn forward(
        &self,
        output: &mut broadcast::Receiver<OutputChunk>,
        exited: &mut watch::Receiver<bool>,
        tx: &mpsc::Sender<Result<AttachOutput, Status>>,
    ) {
        loop {
            tokio::select! {
                biased;
                chunk = output.recv() => match chunk {
                    Ok(chunk) => {
                        if !self.send(tx, chunk).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "attach to container {}: the client fell {n} chunks behind its output",
                                self.open.container_id
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = async { drop(exited.wait_for(|e| *e).await) } => {
                    // The owner reports the exit after the output is drained.
                    while let Ok(chunk) = output.try_recv() {
                        if !self.send(tx, chunk).await {
                            return;
                        }
                    }
                    return;
                }
            }
        }
    }

    /// False once the client is gone.
    async fn send(
        &self,
        tx: &mpsc::Sender<Result<AttachOutput, Status>>,
        chunk: OutputChunk,
    ) -> bool {
        let data = chunk.data.to_vec();
        let out = match chunk.stream {
            Stream::Stdout if self.open.stdout => Output::Stdout(data),
            // A tty attach has one output, as with containerd.
            Stream::Stderr if self.open.stderr && !self.open.tty => Output::Stderr(data),
            _ => return true,
        };
        tx.send(Ok(AttachOutput { output: Some(out) }))
            .await
            .is_ok()
    }

    async fn take_input(&self, input: &mut Streaming<AttachInput>) -> InputEnd {
        let id = &self.open.container_id;
        let stdin_open = self.open.stdin;
        loop {
            let message = match input.message().await {
                Ok(Some(m)) => m.input,
                // The client is gone: its stdin ended with it.
                Ok(None) | Err(_) => {
                    if stdin_open && self.stdin_end().await {
                        return InputEnd::StdinClosed;
                    }
                    return InputEnd::Detach;
                }
            };
            match message {
                Some(Input::Stdin(data)) if stdin_open => {
                    if let Err(e) = self.io.write_stdin(&data).await {
                        tracing::debug!(container = %id, "attach: stdin: {e}");
                    }
                }
                Some(Input::StdinEnd(_)) if stdin_open => {
                    if self.stdin_end().await {
                        return InputEnd::StdinClosed;
                    }
                    return InputEnd::Detach;
                }
                Some(Input::Resize(size)) => self.resize(size).await,
                _ => {}
            }
        }
    }

    /// The client's stdin ended: true when that closes the container's
    /// (stdin_once, and this attach has no tty: containerd's rule).
    async fn stdin_end(&self) -> bool {
        if !self.io.stdin_once || self.open.tty {
            return false;
        }
        self.io.stdin_closed.store(true, Ordering::SeqCst);
        self.io.close_stdin().await;
        true
    }

    async fn take_resizes(&self, input: &mut Streaming<AttachInput>) {
        while let Ok(Some(m)) = input.message().await {
            if let Some(Input::Resize(size)) = m.input {
                self.resize(size).await;
            }
        }
    }

    async fn resize(&self, size: proto::TerminalSize) {
        let size = WindowSize {
            rows: size.height.min(u16::MAX as u32) as u16,
            cols: size.width.min(u16::MAX as u32) as u16,
        };
        let running = self.running.clone();
        // Running's calls block (a pod VM's would ask its agent).
        let done = tokio::task::spawn_blocking(move || running.resize(size)).await;
        if let Ok(Err(e)) = done {
            tracing::debug!(container = %self.open.container_id, "attach: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_container_and_the_field() {
        assert_eq!(refusal("c1", true, true, false, true, true), None);
        assert_eq!(refusal("c1", false, false, false, false, false), None);
        let no_stdin = refusal("c1", false, false, false, true, false).unwrap();
        assert!(no_stdin.contains("c1") && no_stdin.contains("ContainerConfig.stdin"));
        let closed = refusal("c1", true, false, true, true, false).unwrap();
        assert!(closed.contains("stdin_once"), "{closed}");
        // Closed stdin does not stop an output-only attach.
        assert_eq!(refusal("c1", true, false, true, false, false), None);
        let no_tty = refusal("c1", true, false, false, false, true).unwrap();
        assert!(no_tty.contains("ContainerConfig.tty"), "{no_tty}");
        // A tty container may be attached without a tty (its output is the terminal's).
        assert_eq!(refusal("c1", true, true, false, true, false), None);
    }

    #[tokio::test]
    async fn stdin_goes_to_the_pipe_the_runtime_got_until_closed() {
        let config = api::ContainerConfig {
            stdin: true,
            stdin_once: true,
            ..Default::default()
        };
        let io = ContainerIo::new(&config);
        let read_end = io.stdin_for_start().await.unwrap().unwrap();
        io.write_stdin(b"data").await.unwrap();
        io.close_stdin().await;
        let mut got = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(read_end), &mut got).unwrap();
        assert_eq!(got, "data");
        assert!(io.write_stdin(b"more").await.is_err());
        let without = ContainerIo::new(&api::ContainerConfig::default());
        assert!(without.stdin_for_start().await.unwrap().is_none());
    }
}
