//! Just enough of the i8042 keyboard controller for Linux's `reboot=k`: the
//! status register reads "input buffer empty", and the CPU-reset pulse
//! command (0xfe on the command port) ends the VM.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::stop::{GuestStop, StopSignal};

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;
const PULSE_RESET_LINE: u8 = 0xfe;

pub struct I8042 {
    stop: Arc<StopSignal>,
}

impl I8042 {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        I8042 { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status: no output byte, input buffer empty. Data: nothing typed.
        data.fill(0);
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        if base == u64::from(COMMAND_PORT) && data.first() == Some(&PULSE_RESET_LINE) {
            self.stop.request(GuestStop::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_pulse_on_the_command_port_stops_the_guest() {
        let stop = Arc::new(StopSignal::new());
        let mut i8042 = I8042::new(stop.clone());
        i8042.write(u64::from(DATA_PORT), 0, &[PULSE_RESET_LINE]);
        assert!(!stop.is_requested());
        let mut status = [0xffu8];
        i8042.read(u64::from(COMMAND_PORT), 0, &mut status);
        assert_eq!(status, [0]);
        i8042.write(u64::from(COMMAND_PORT), 0, &[PULSE_RESET_LINE]);
        assert_eq!(stop.wait(), GuestStop::Reset);
    }
}
