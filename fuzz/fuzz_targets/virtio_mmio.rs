//! The virtio-mmio transport's registers and config space, any offset,
//! width and value: see `vmrun_vmm::fuzzing::mmio_accesses`.
#![no_main]

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    vmrun_vmm::fuzzing::mmio_accesses(data, &dir.path().join("disk"));
});
