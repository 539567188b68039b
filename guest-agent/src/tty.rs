//! Pseudo-terminals for processes whose OCI process has `terminal: true`.
//! The agent keeps the master: `ReadOutput` streams it as stdout,
//! `WriteStdin` writes to it and `ResizeTty` sets its window size. The
//! process gets the slave as stdin/stdout/stderr and makes it its
//! controlling terminal (the container library's `terminal.rs`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::Status;

use crate::containers::{ContainerError, Containers};

#[derive(Debug, thiserror::Error)]
pub enum ResizeTtyError {
    #[error(transparent)]
    Lookup(#[from] ContainerError),
    #[error("resize the terminal of {what}: it has none (its OCI process needs terminal: true)")]
    NoTerminal { what: String },
    #[error("resize the terminal of {what}: {rows} rows x {cols} cols: at most 65535 each")]
    TooLarge { what: String, rows: u32, cols: u32 },
    #[error("resize the terminal of {what}: ioctl(TIOCSWINSZ): {source}")]
    Ioctl { what: String, source: io::Error },
}

impl From<ResizeTtyError> for Status {
    fn from(e: ResizeTtyError) -> Self {
        match e {
            ResizeTtyError::Lookup(e) => e.into(),
            ResizeTtyError::NoTerminal { .. } => Status::failed_precondition(e.to_string()),
            ResizeTtyError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
            ResizeTtyError::Ioctl { .. } => Status::internal(e.to_string()),
        }
    }
}

impl Containers {
    /// `ResizeTty`: sets the window size of a process's terminal.
    pub(crate) fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ResizeTtyError> {
        let (io, what) = self.process_io(id, exec_id)?;
        let master = io
            .tty()
            .ok_or_else(|| ResizeTtyError::NoTerminal { what: what.clone() })?;
        let (Ok(r), Ok(c)) = (u16::try_from(rows), u16::try_from(cols)) else {
            return Err(ResizeTtyError::TooLarge { what, rows, cols });
        };
        master
            .resize(r, c)
            .map_err(|source| ResizeTtyError::Ioctl { what, source })
    }
}

/// The agent's end of a terminal, shared by the output reader, the stdin
/// writer and `ResizeTty`. Closed when the last of them goes.
#[derive(Debug)]
pub(crate) struct Master(AsyncFd<OwnedFd>);

impl Master {
    /// Makes the master non-blocking and registers it with the tokio
    /// reactor (so: call inside the runtime).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Arc<Self>> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays
        // open and the same for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(Arc::new(Self(fd)))
    }

    /// Sets the window size; the kernel sends SIGWINCH to the terminal's
    /// foreground process group.
    pub(crate) fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a `winsize` through the pointer, which
        // points to a live, initialised value.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The process's output, read from the master.
pub(crate) struct Reader(pub Arc<Master>);

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0 .0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), unfilled)?)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Once every descriptor of the slave is closed (the process
                // and its children are gone), the master reads EIO: that is
                // its end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The process's input, written to the master.
pub(crate) struct Writer(pub Arc<Master>);

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0 .0.poll_write_ready(cx))?;
            match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), data)?)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn winsize(fd: &OwnedFd) -> (u16, u16) {
        // SAFETY: all-zero is a valid winsize.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize through a valid pointer.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        (ws.ws_row, ws.ws_col)
    }

    #[tokio::test]
    async fn relays_both_ways_resizes_and_ends_with_the_slave() {
        let (master, slave) = vmrun_container::open_pty().unwrap();
        let master = Master::new(master).unwrap();
        master.resize(33, 111).unwrap();
        assert_eq!(winsize(&slave), (33, 111));

        // Raw mode: no echo, no line editing, no \n -> \r\n.
        let mut t = nix::sys::termios::tcgetattr(&slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();

        Writer(master.clone()).write_all(b"in").await.unwrap();
        let mut buf = [0u8; 2];
        nix::unistd::read(&slave, &mut buf).unwrap();
        assert_eq!(&buf, b"in");

        nix::unistd::write(&slave, b"out").unwrap();
        drop(slave);
        let mut out = Vec::new();
        Reader(master).read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"out");
    }
}
