//! Host input for the serial console: a thread that waits (poll) for bytes
//! on an input fd (stdin with `--console stdio`) and feeds them to the UART
//! as fast as the guest reads them, plus the raw-mode terminal guard.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::serial::SerialPort;
use crate::seccomp::{ThreadFilters, ThreadKind};

/// The running input thread; [`ConsoleInput::stop`] ends and joins it.
pub struct ConsoleInput {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl ConsoleInput {
    pub fn spawn(
        input: OwnedFd,
        serial: Arc<Mutex<SerialPort>>,
        filters: ThreadFilters,
    ) -> io::Result<ConsoleInput> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let thread_stop = stop.try_clone()?;
        let room = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .room_event()?;
        let thread = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                filters.enter(ThreadKind::ConsoleInput);
                forward(File::from(input), &serial, &room, &thread_stop)
            })?;
        Ok(ConsoleInput { stop, thread })
    }

    pub fn stop(self) {
        // Only join a thread that was told to stop.
        if self.stop.write(1).is_ok() {
            let _ = self.thread.join();
        }
    }
}

/// Waits until one of `fds` is readable; returns which (or none on error).
fn poll_readable(fds: &[RawFd]) -> Vec<bool> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries
        // that outlives the call.
        let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if ret >= 0 {
            break;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return vec![false; fds.len()];
        }
    }
    pollfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect()
}

fn forward(mut input: File, serial: &Mutex<SerialPort>, room: &EventFd, stop: &EventFd) {
    let mut pending: Vec<u8> = Vec::new();
    let mut input_open = true;
    loop {
        // While bytes wait for FIFO room, wait for room instead of input,
        // so a fast writer cannot make us buffer without bound.
        let source = if pending.is_empty() {
            if !input_open {
                // Nothing more can come: wait for the stop alone.
                poll_readable(&[stop.as_raw_fd()]);
                return;
            }
            input.as_raw_fd()
        } else {
            room.as_raw_fd()
        };
        let ready = poll_readable(&[stop.as_raw_fd(), source]);
        if ready[0] || ready == [false, false] {
            return;
        }
        if pending.is_empty() {
            let mut buffer = [0u8; 256];
            match input.read(&mut buffer) {
                Ok(0) => input_open = false,
                Ok(n) => pending.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => input_open = false,
            }
        } else {
            let _ = room.read();
        }
        if !pending.is_empty() {
            let taken = serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue(&pending);
            pending.drain(..taken);
        }
    }
}

/// Puts a terminal in raw mode (the guest does its own line editing and
/// echo) and restores it when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode for `fd` if it is a terminal; `None` otherwise.
    pub fn enable_if_tty(fd: RawFd) -> io::Result<Option<RawTerminal>> {
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is an initialized termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is an initialized termios for a terminal fd.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawTerminal { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios read from this fd by enable_if_tty.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;

    use crate::devices::bus::BusDevice;

    fn pipe() -> (OwnedFd, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned here only.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    /// Input larger than the 64-byte FIFO reaches the guest in order as the
    /// guest reads, each byte announced by the receive interrupt.
    #[test]
    fn input_bytes_reach_the_guest_in_order() {
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(
            SerialPort::new(interrupt.try_clone().unwrap(), Box::new(io::sink())).unwrap(),
        ));
        // Received-data interrupt on (IER bit 0).
        serial.lock().unwrap().write(0x3f8, 1, &[0x01]);
        let (read_end, mut write_end) = pipe();
        let input = ConsoleInput::spawn(read_end, serial.clone(), ThreadFilters::none()).unwrap();
        let sent: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        write_end.write_all(&sent).unwrap();
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let ready = poll_readable(&[interrupt.as_raw_fd()]);
            assert!(ready[0]);
            let _ = interrupt.read();
            let mut port = serial.lock().unwrap();
            let mut lsr = [0u8];
            loop {
                port.read(0x3f8, 5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break; // no data ready
                }
                let mut byte = [0u8];
                port.read(0x3f8, 0, &mut byte);
                got.push(byte[0]);
            }
        }
        assert_eq!(got, sent);
        input.stop();
    }
}
