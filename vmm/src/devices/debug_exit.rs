//! The debug-exit port: a guest (a test payload, or a guest agent) writes a
//! status byte and the VM ends with that status. Linux has no driver for it,
//! so nothing writes it by accident.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::stop::{GuestStop, StopSignal};

/// The port, one byte wide.
pub const DEBUG_EXIT_PORT: u16 = 0x501;

pub struct DebugExit {
    stop: Arc<StopSignal>,
}

impl DebugExit {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        DebugExit { stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.stop.request(GuestStop::DebugExit(code));
        }
    }
}
