//! A decoded agent request through the checks the service makes before it
//! acts (never further): see `vmrun_agent::fuzzing::request`.
#![no_main]

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    vmrun_agent::fuzzing::request(data, dir.path());
});
