//! virtio-blk's request queue driven by a hostile guest driver: see
//! `vmrun_vmm::fuzzing::block_queue`.
#![no_main]

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    vmrun_vmm::fuzzing::block_queue(data, &dir.path().join("disk"));
});
