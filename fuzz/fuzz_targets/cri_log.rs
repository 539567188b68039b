//! Container output through the CRI log writer into a file, every record
//! checked: see `vmrun_pod::logs::fuzzing::log_writer`.
#![no_main]

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    vmrun_pod::logs::fuzzing::log_writer(data, dir.path());
});
