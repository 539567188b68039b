//! A native container's terminal ([`Launch::tty`](crate::runtime::Launch)):
//! a pty the container's init opens on its own devpts, whose master the
//! runtime keeps, relaying the caller's stdin pipe into it and its output
//! into the caller's stdout pipe.
//!
//! The relays are two threads of their own, each a poll loop: the seam is
//! blocking, and a pty master is no pipe for tokio. They end when their
//! input ends (the caller closed stdin; the master reads EIO once the
//! container and everything that inherited the slave are gone) or when the
//! terminal is closed, so a removed container leaves no descriptor and no
//! thread behind even if its output is never read.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::runtime::WindowSize;

/// What the end of the caller's stdin types into the terminal: a terminal
/// cannot be half-closed, so the default EOF character (^D), which ends a
/// read at the start of a line in canonical mode as closing a pipe would
/// (the guest agent does the same for a pod VM's containers).
const TTY_EOF: u8 = 0x04;

pub(crate) struct Terminal {
    /// None once closed: the pty goes with the container, not with the
    /// sandbox's list of what it started.
    master: Mutex<Option<OwnedFd>>,
    /// The write end of a pipe both relays poll: dropping it stops them.
    stop: Mutex<Option<OwnedFd>>,
    stop_rx: OwnedFd,
    relays: Mutex<Vec<JoinHandle<()>>>,
}

impl Terminal {
    /// The terminal of a pty master: the container's own, opened on its
    /// devpts ([`vmrun_container::Console::FromContainer`]).
    pub(crate) fn from_master(master: OwnedFd) -> io::Result<Self> {
        // Non-blocking, so a relay never blocks where its poll cannot wake
        // it (O_NONBLOCK is the open file's: both relays' copies share it).
        set_nonblocking(master.as_fd())?;
        let (stop_rx, stop) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        Ok(Self {
            master: Mutex::new(Some(master)),
            stop: Mutex::new(Some(stop)),
            stop_rx,
            relays: Mutex::new(Vec::new()),
        })
    }

    /// A pty on this process's devpts: the terminal and its slave.
    #[cfg(test)]
    pub(crate) fn open() -> io::Result<(Self, OwnedFd)> {
        let (master, slave) = vmrun_container::open_pty()?;
        Ok((Self::from_master(master)?, slave))
    }

    /// Starts relaying: `stdin` (when given) into the terminal, and what the
    /// container writes to it into `stdout`.
    pub(crate) fn relay(&self, stdin: Option<OwnedFd>, stdout: OwnedFd) -> io::Result<()> {
        set_nonblocking(stdout.as_fd())?;
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let (master, stop) = (self.master()?, self.stop_rx.try_clone()?);
        relays.push(spawn("tty-output", move || {
            let _ = copy(master.as_fd(), stdout.as_fd(), stop.as_fd());
        })?);
        if let Some(stdin) = stdin {
            set_nonblocking(stdin.as_fd())?;
            let (master, stop) = (self.master()?, self.stop_rx.try_clone()?);
            relays.push(spawn("tty-input", move || {
                if copy(stdin.as_fd(), master.as_fd(), stop.as_fd()) == Ended::Eof {
                    let _ = write_all(master.as_fd(), &[TTY_EOF], stop.as_fd());
                }
            })?);
        }
        Ok(())
    }

    /// A descriptor of the master, while the terminal is open.
    fn master(&self) -> io::Result<OwnedFd> {
        match &*self.master.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(master) => master.try_clone(),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the terminal is closed",
            )),
        }
    }

    pub(crate) fn resize(&self, size: WindowSize) -> io::Result<()> {
        let master = self.master()?;
        let ws = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
        // points at a live local; `master` is an open pty master.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops both relays, waits for them and closes the master; idempotent.
    pub(crate) fn close(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
        let relays = std::mem::take(&mut *self.relays.lock().unwrap_or_else(|p| p.into_inner()));
        for relay in relays {
            let _ = relay.join();
        }
        drop(self.master.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.close();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The input ended: EOF, or EIO from a master whose slave is gone.
    Eof,
    /// The terminal was closed.
    Stopped,
    /// The output is gone (the reader closed its end).
    WriteFailed,
}

/// Waits until `fd` is ready for `events`; false when `stop` woke it.
fn wait(fd: BorrowedFd<'_>, events: PollFlags, stop: BorrowedFd<'_>) -> bool {
    loop {
        let mut fds = [
            PollFd::new(fd, events),
            PollFd::new(stop, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            // Cannot poll: treat as stopped rather than spin.
            Err(_) => return false,
            Ok(_) => {
                // The stop pipe only ever becomes readable by hanging up.
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    return false;
                }
                return true;
            }
        }
    }
}

/// Copies `from` into `to` until `from` ends, `to` fails or `stop` hangs up.
fn copy(from: BorrowedFd<'_>, to: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> Ended {
    let mut buf = [0u8; 4096];
    loop {
        if !wait(from, PollFlags::POLLIN, stop) {
            return Ended::Stopped;
        }
        match nix::unistd::read(from, &mut buf) {
            Ok(0) => return Ended::Eof,
            Ok(n) => {
                if let Err(ended) = write_all(to, &buf[..n], stop) {
                    return ended;
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            // EIO: a master whose slave every holder has closed.
            Err(_) => return Ended::Eof,
        }
    }
}

fn write_all(to: BorrowedFd<'_>, mut data: &[u8], stop: BorrowedFd<'_>) -> Result<(), Ended> {
    while !data.is_empty() {
        match nix::unistd::write(to, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EAGAIN) => {
                if !wait(to, PollFlags::POLLOUT, stop) {
                    return Err(Ended::Stopped);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return Err(Ended::WriteFailed),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        (r.into(), w.into())
    }

    /// Reads from `from` until `want` has arrived (a terminal echoes input
    /// and turns "\n" into "\r\n", so the exact bytes vary by settings).
    fn read_until(from: &mut std::fs::File, want: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains(want) {
            let n = from.read(&mut buf).unwrap();
            assert!(n > 0, "EOF before {want:?}; got {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn relays_both_ways_resizes_and_ends_with_the_slave() {
        let (terminal, slave) = Terminal::open().unwrap();
        let (stdin_r, mut stdin_w) = pipe();
        let (mut stdout_r, stdout_w) = pipe();
        terminal
            .relay(Some(stdin_r.into()), stdout_w.into())
            .unwrap();
        let mut slave = std::fs::File::from(slave);

        // Typed on stdin: the slave (the container's side) reads it.
        stdin_w.write_all(b"typed\n").unwrap();
        let mut line = [0u8; 6];
        slave.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"typed\n");
        // Written by the container: arrives on stdout (after the echo).
        slave.write_all(b"from-the-container\n").unwrap();
        let out = read_until(&mut stdout_r, "from-the-container");
        assert!(out.contains("typed"), "the terminal echoes input: {out:?}");

        terminal
            .resize(WindowSize {
                rows: 40,
                cols: 100,
            })
            .unwrap();
        let mut ws = no_size();
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which
        // points at a live local; `slave` is an open pty slave.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (40, 100));

        // The end of stdin is the terminal's EOF character: a read at the
        // start of a line returns 0, as on a closed pipe.
        drop(stdin_w);
        let mut buf = [0u8; 16];
        assert_eq!(slave.read(&mut buf).unwrap(), 0);

        // The slave's last holder goes: the output relay ends, closing stdout.
        drop(slave);
        let mut rest = Vec::new();
        stdout_r.read_to_end(&mut rest).unwrap();
        terminal.close();
    }

    #[test]
    fn close_stops_relays_whose_output_nobody_reads() {
        let (terminal, slave) = Terminal::open().unwrap();
        // A stdin that never ends, an output never read.
        let (stdin_r, _stdin_w) = pipe();
        let (_stdout_r, stdout_w) = pipe();
        terminal
            .relay(Some(stdin_r.into()), stdout_w.into())
            .unwrap();
        // More than the pipe holds: the output relay ends up waiting to write.
        let mut slave = std::fs::File::from(slave);
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..8 {
                if slave.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        // Both relays (one waiting for stdin, one to write) stop and are
        // joined, and the master is closed: the container's writes fail
        // instead of blocking.
        terminal.close();
        writer.join().unwrap();
        assert!(terminal.resize(WindowSize { rows: 1, cols: 1 }).is_err());
    }

    fn no_size() -> libc::winsize {
        libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}
