//! virtio-vsock's queues and muxer driven by a hostile guest driver and
//! host clients on unix sockets in a temp dir: see
//! `vmrun_vmm::fuzzing::vsock_queues`.
#![no_main]

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    vmrun_vmm::fuzzing::vsock_queues(data, dir.path());
});
