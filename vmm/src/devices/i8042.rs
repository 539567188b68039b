//! Enough of the i8042 keyboard controller for Linux: `reboot=k` (the
//! CPU-reset pulse, 0xfe on the command port, ends the VM) and the driver's
//! probe. The probe reads and writes the controller configuration byte
//! (CTR); a controller that never answers costs the guest seconds of
//! polling at boot ("Can't read CTR"), so those commands get real replies.
//! There is no keyboard or mouse behind it and it raises no interrupts.

use std::collections::VecDeque;
use std::sync::Arc;

use super::bus::BusDevice;
use crate::stop::{GuestStop, StopSignal};

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const PULSE_RESET_LINE: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const KBD_TEST_PASSED: u8 = 0x00;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_KBD_ENABLED: u8 = 0x10;

/// CTR after power-on: keyboard interrupt enabled, POST passed.
const CTR_DEFAULT: u8 = 0x45;
/// Output port: A20 on, CPU not held in reset.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
/// Replies waiting to be read; a guest that never reads cannot grow it.
const MAX_PENDING: usize = 16;

pub struct I8042 {
    stop: Arc<StopSignal>,
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    /// A command whose parameter byte comes next on the data port.
    awaiting: Option<u8>,
    replies: VecDeque<u8>,
}

impl I8042 {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        I8042 {
            stop,
            ctr: CTR_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            last_was_command: false,
            awaiting: None,
            replies: VecDeque::new(),
        }
    }

    fn reply(&mut self, byte: u8) {
        if self.replies.len() < MAX_PENDING {
            self.replies.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_KBD_ENABLED;
        if !self.replies.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.awaiting = None;
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.awaiting = Some(cmd),
            CMD_SELF_TEST => self.reply(SELF_TEST_PASSED),
            CMD_KBD_TEST => self.reply(KBD_TEST_PASSED),
            PULSE_RESET_LINE => self.stop.request(GuestStop::Reset),
            // Enable/disable port commands and the rest: accepted, no reply.
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.last_was_command = false;
        match self.awaiting.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                // Bit 0 low holds the CPU in reset: the old way to reboot.
                if byte & 0x01 == 0 {
                    self.stop.request(GuestStop::Reset);
                }
            }
            // A byte for the (absent) keyboard: nobody answers.
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, _offset: u64, data: &mut [u8]) {
        let value = if base == u64::from(COMMAND_PORT) {
            self.status()
        } else {
            self.replies.pop_front().unwrap_or(0)
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        if base == u64::from(COMMAND_PORT) {
            self.command(byte);
        } else {
            self.data(byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, port: u16) -> u8 {
        let mut b = [0xffu8];
        dev.read(u64::from(port), 0, &mut b);
        b[0]
    }

    #[test]
    fn reset_pulse_on_the_command_port_stops_the_guest() {
        let stop = Arc::new(StopSignal::new());
        let mut i8042 = I8042::new(stop.clone());
        i8042.write(u64::from(DATA_PORT), 0, &[PULSE_RESET_LINE]);
        assert!(!stop.is_requested());
        assert_eq!(read(&mut i8042, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        i8042.write(u64::from(COMMAND_PORT), 0, &[PULSE_RESET_LINE]);
        assert_eq!(stop.wait(), GuestStop::Reset);
    }

    #[test]
    fn ctr_reads_back_what_was_written_as_the_linux_probe_expects() {
        let stop = Arc::new(StopSignal::new());
        let mut i8042 = I8042::new(stop.clone());
        i8042.write(u64::from(COMMAND_PORT), 0, &[CMD_READ_CTR]);
        assert_ne!(read(&mut i8042, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut i8042, DATA_PORT), CTR_DEFAULT);
        assert_eq!(read(&mut i8042, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        i8042.write(u64::from(COMMAND_PORT), 0, &[CMD_WRITE_CTR]);
        i8042.write(u64::from(DATA_PORT), 0, &[0x30]);
        i8042.write(u64::from(COMMAND_PORT), 0, &[CMD_READ_CTR]);
        assert_eq!(read(&mut i8042, DATA_PORT), 0x30);
        i8042.write(u64::from(COMMAND_PORT), 0, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut i8042, DATA_PORT), SELF_TEST_PASSED);
        assert!(!stop.is_requested());
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_reply_queue() {
        let mut i8042 = I8042::new(Arc::new(StopSignal::new()));
        for _ in 0..1000 {
            i8042.write(u64::from(COMMAND_PORT), 0, &[CMD_READ_CTR]);
        }
        assert_eq!(i8042.replies.len(), MAX_PENDING);
    }

    #[test]
    fn output_port_reset_bit_stops_the_guest() {
        let stop = Arc::new(StopSignal::new());
        let mut i8042 = I8042::new(stop.clone());
        i8042.write(u64::from(COMMAND_PORT), 0, &[CMD_WRITE_OUTPUT_PORT]);
        i8042.write(u64::from(DATA_PORT), 0, &[0x02]);
        assert_eq!(stop.wait(), GuestStop::Reset);
    }
}
