//! Emulated devices and the buses that route guest accesses to them.

pub mod bus;
pub mod console_input;
pub mod debug_exit;
pub mod i8042;
pub mod panic_watch;
pub mod serial;
pub mod virtio;
