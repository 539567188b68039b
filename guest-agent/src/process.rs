//! What the agent keeps per process (a container's init or an exec'd
//! process): the host's ends of its stdio pipes (or its terminal's master)
//! and its exit status.

use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::Status;
use vmrun_container::Stdio;
use vmrun_proto::v1::{output_chunk, OutputChunk};

use crate::tty;

/// Bytes per `OutputChunk`.
const CHUNK: usize = 32 * 1024;

/// What closing a terminal's stdin writes: a terminal cannot be
/// half-closed, so send the default EOF character (^D), which ends a read
/// at the start of a line in canonical mode, as closing a pipe would.
const TTY_EOF: u8 = 0x04;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("create stdio pipes: {0}")]
    Pipe(std::io::Error),
    #[error("allocate a terminal (process.terminal): {0}")]
    Pty(std::io::Error),
    #[error("{0}: the output already has a reader")]
    Busy(String),
    #[error("{0}: stdin was not requested or is closed")]
    NoStdin(String),
    #[error("{what}: write stdin: {source}")]
    Write {
        what: String,
        source: std::io::Error,
    },
}

impl From<StdioError> for Status {
    fn from(e: StdioError) -> Self {
        match e {
            StdioError::Pipe(_) | StdioError::Pty(_) | StdioError::Write { .. } => {
                Status::internal(e.to_string())
            }
            StdioError::Busy(_) | StdioError::NoStdin(_) => {
                Status::failed_precondition(e.to_string())
            }
        }
    }
}

/// The host-facing ends of a process's pipes or terminal.
pub(crate) struct ProcessIo {
    stdin: tokio::sync::Mutex<Option<Stdin>>,
    /// `None` while a `ReadOutput` call holds the pipes.
    output: Mutex<Option<Output>>,
    /// The terminal of a `process.terminal` process (for `ResizeTty`).
    tty: Option<Arc<tty::Master>>,
}

enum Stdin {
    Pipe(pipe::Sender),
    Tty(tty::Writer),
}

type OutputPipe = Box<dyn AsyncRead + Send + Unpin>;

/// A terminal has only stdout (the master); stderr is then `None`.
#[derive(Default)]
struct Output {
    stdout: Option<OutputPipe>,
    stderr: Option<OutputPipe>,
}

/// A pipe whose write end is blocking (for the process) and whose read end
/// is async (for the agent). Both are close-on-exec: the container library
/// dups the process's end onto 0-2.
fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// Makes the pipes (or, with `terminal`, the pty) for a new process: what
/// the process gets, and what the agent keeps. Must run inside the tokio
/// runtime (the async ends register with its reactor).
pub(crate) fn make_stdio(
    with_stdin: bool,
    terminal: Option<PtyHome>,
) -> Result<(Stdio, ProcessIo), StdioError> {
    if let Some(home) = terminal {
        return make_tty(with_stdin, home);
    }
    let (out_r, out_w) = pipe_pair().map_err(StdioError::Pipe)?;
    let (err_r, err_w) = pipe_pair().map_err(StdioError::Pipe)?;
    let (stdin_child, stdin_ours) = if with_stdin {
        let (r, w) = pipe_pair().map_err(StdioError::Pipe)?;
        (
            Some(r),
            Some(Stdin::Pipe(
                pipe::Sender::from_owned_fd(w).map_err(StdioError::Pipe)?,
            )),
        )
    } else {
        (None, None)
    };
    let output = Output {
        stdout: Some(Box::new(
            pipe::Receiver::from_owned_fd(out_r).map_err(StdioError::Pipe)?,
        )),
        stderr: Some(Box::new(
            pipe::Receiver::from_owned_fd(err_r).map_err(StdioError::Pipe)?,
        )),
    };
    let stdio = Stdio {
        stdin: stdin_child,
        stdout: Some(out_w),
        stderr: Some(err_w),
    };
    let io = ProcessIo {
        stdin: tokio::sync::Mutex::new(stdin_ours),
        output: Mutex::new(Some(output)),
        tty: None,
    };
    Ok((stdio, io))
}

/// Whose devpts an exec'd process's terminal comes from: that of the
/// container whose process this is, so the terminal has a name there; the
/// agent's if the container has none. (A container's init opens its own:
/// [`vmrun_container::Console::FromContainer`], then [`tty_io`].)
#[derive(Debug, Clone, Copy)]
pub(crate) struct PtyHome {
    pub pid: i32,
}

/// The process gets the slave as stdin, stdout and stderr; the agent keeps
/// the master for output, stdin (when asked for) and resizing.
fn make_tty(with_stdin: bool, home: PtyHome) -> Result<(Stdio, ProcessIo), StdioError> {
    let pid = home.pid;
    let pair = vmrun_container::open_pty_in_container(pid).or_else(|e| {
        tracing::debug!(pid, "the container's devpts: {e}; using the agent's");
        vmrun_container::open_pty()
    });
    let (master, slave) = pair.map_err(StdioError::Pty)?;
    let stdio = Stdio {
        stdin: Some(slave.try_clone().map_err(StdioError::Pty)?),
        stdout: Some(slave.try_clone().map_err(StdioError::Pty)?),
        stderr: Some(slave),
    };
    Ok((stdio, tty_io(master, with_stdin)?))
}

/// What the agent keeps of a terminal's master: output, stdin (when asked
/// for) and resizing. Must run inside the tokio runtime.
pub(crate) fn tty_io(master: OwnedFd, with_stdin: bool) -> Result<ProcessIo, StdioError> {
    let master = tty::Master::new(master).map_err(StdioError::Pty)?;
    let output = Output {
        stdout: Some(Box::new(tty::Reader(master.clone()))),
        stderr: None,
    };
    let stdin = with_stdin.then(|| Stdin::Tty(tty::Writer(master.clone())));
    Ok(ProcessIo {
        stdin: tokio::sync::Mutex::new(stdin),
        output: Mutex::new(Some(output)),
        tty: Some(master),
    })
}

pub(crate) type OutputStream = Pin<Box<dyn Stream<Item = Result<OutputChunk, Status>> + Send>>;

impl ProcessIo {
    /// Streams stdout and stderr until both reach EOF. When the reader goes
    /// away first, the pipes are put back for the next `ReadOutput`.
    pub(crate) fn read_output(self: &Arc<Self>, what: &str) -> Result<OutputStream, StdioError> {
        let mut output = self
            .output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| StdioError::Busy(what.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        let io = self.clone();
        tokio::spawn(async move {
            pump(&mut output, &tx).await;
            *io.output.lock().unwrap_or_else(|e| e.into_inner()) = Some(output);
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    pub(crate) async fn write_stdin(
        &self,
        what: &str,
        data: &[u8],
        close: bool,
    ) -> Result<(), StdioError> {
        let mut stdin = self.stdin.lock().await;
        let sink = stdin
            .as_mut()
            .ok_or_else(|| StdioError::NoStdin(what.to_string()))?;
        let eof: &[u8] = match sink {
            Stdin::Tty(_) if close => &[TTY_EOF],
            _ => &[],
        };
        for bytes in [data, eof] {
            if bytes.is_empty() {
                continue;
            }
            let written = match sink {
                Stdin::Pipe(p) => p.write_all(bytes).await,
                Stdin::Tty(t) => t.write_all(bytes).await,
            };
            written.map_err(|source| StdioError::Write {
                what: what.to_string(),
                source,
            })?;
        }
        if close {
            *stdin = None;
        }
        Ok(())
    }

    /// The process's terminal, if it was started with one.
    pub(crate) fn tty(&self) -> Option<&Arc<tty::Master>> {
        self.tty.as_ref()
    }
}

/// Reads one pipe into a chunk; `None` (and the pipe dropped) at EOF or on
/// a read error.
async fn read_chunk(pipe: &mut Option<OutputPipe>) -> Option<Vec<u8>> {
    let p = pipe.as_mut()?;
    let mut buf = vec![0u8; CHUNK];
    match p.read(&mut buf).await {
        Ok(n) if n > 0 => {
            buf.truncate(n);
            Some(buf)
        }
        _ => {
            *pipe = None;
            None
        }
    }
}

/// Forwards output until both pipes are at EOF or the receiver is gone.
/// `read` on a pipe (and on `tty::Reader`) is cancel-safe, so losing a
/// `select!` race drops nothing.
async fn pump(out: &mut Output, tx: &mpsc::Sender<Result<OutputChunk, Status>>) {
    use output_chunk::Stream as Kind;
    while out.stdout.is_some() || out.stderr.is_some() {
        let (kind, data) = tokio::select! {
            d = read_chunk(&mut out.stdout), if out.stdout.is_some() => (Kind::Stdout, d),
            d = read_chunk(&mut out.stderr), if out.stderr.is_some() => (Kind::Stderr, d),
            _ = tx.closed() => return,
        };
        // None: that pipe reached EOF and is now closed.
        let Some(data) = data else { continue };
        let chunk = OutputChunk {
            stream: kind as i32,
            data,
        };
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
    }
}

/// How a process ended, as the protocol reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitInfo {
    pub code: i32,
    pub signal: i32,
    pub oom_killed: bool,
}

/// Set once by the thread that reaps the process; awaited by `WaitProcess`.
#[derive(Debug)]
pub(crate) struct ExitCell(watch::Sender<Option<ExitInfo>>);

impl ExitCell {
    pub(crate) fn new() -> Self {
        Self(watch::channel(None).0)
    }

    pub(crate) fn set(&self, info: ExitInfo) {
        self.0.send_replace(Some(info));
    }

    /// The exit status once set. `None` cannot happen in practice: the
    /// sender lives in `self`, so the channel stays open while we wait.
    pub(crate) async fn wait(&self) -> Option<ExitInfo> {
        let mut rx = self.0.subscribe();
        let info = rx.wait_for(Option::is_some).await.map(|v| *v);
        info.ok().flatten()
    }
}
