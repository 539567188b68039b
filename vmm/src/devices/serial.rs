//! The 8250 UART at 0x3f8 (COM1), from vm-superio, raising its interrupt
//! through an eventfd the hypervisor turns into IRQ 4. Output goes to any
//! writer: stdout, a file, a test buffer or nowhere.

use std::io::{self, Write};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::config::ConsoleConfig;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_COUNT: u64 = 8;

/// Raises the serial interrupt by signalling its irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Flushes after every write so output appears as the guest prints it.
pub struct FlushingWriter(pub Box<dyn Write + Send>);

impl Write for FlushingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.0.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Opens where the console goes: stdout, a file (created or truncated), or
/// nowhere.
pub fn console_writer(console: &ConsoleConfig) -> io::Result<Box<dyn Write + Send>> {
    Ok(match console {
        ConsoleConfig::Stdio => Box::new(io::stdout()),
        ConsoleConfig::Off => Box::new(io::sink()),
        ConsoleConfig::File(path) => Box::new(std::fs::File::create(path)?),
    })
}

/// Signals an eventfd when the guest has read every input byte, so the
/// console input thread knows there is room again.
pub struct InputRoom(EventFd);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed write means the counter is already non-zero: the waiter
        // will wake anyway.
        let _ = self.0.write(1);
    }
}

pub struct SerialPort {
    uart: Serial<IrqTrigger, InputRoom, FlushingWriter>,
    room: EventFd,
}

impl SerialPort {
    /// `interrupt` must already be registered as the irqfd of IRQ 4.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let room = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(SerialPort {
            uart: Serial::with_events(
                IrqTrigger(interrupt),
                InputRoom(room.try_clone()?),
                FlushingWriter(out),
            ),
            room,
        })
    }

    /// Queues `input` for the guest to read (raising the receive interrupt
    /// if the guest enabled it); returns how many bytes fit in the FIFO.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        // Full FIFO or a failed interrupt: the caller retries what did not fit.
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }

    /// An eventfd that becomes readable when the guest emptied the input
    /// FIFO.
    pub fn room_event(&self) -> io::Result<EventFd> {
        self.room.try_clone()
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for byte in data.iter_mut() {
            *byte = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for &byte in data {
            // A failed console write (closed stdout, full disk) must not
            // stop the guest: the byte is lost, as on a disconnected line.
            let _ = self.uart.write(offset as u8, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_the_interrupt_when_enabled() {
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let buffer = Buffer::default();
        let mut serial =
            SerialPort::new(interrupt.try_clone().unwrap(), Box::new(buffer.clone())).unwrap();
        // Enable the "transmitter holding register empty" interrupt (IER bit 1).
        serial.write(0x3f8, 1, &[0x02]);
        serial.write(0x3f8, 0, b"OK\n");
        assert_eq!(&*buffer.0.lock().unwrap(), b"OK\n");
        assert!(interrupt.read().unwrap() >= 1);
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        serial.read(0x3f8, 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
