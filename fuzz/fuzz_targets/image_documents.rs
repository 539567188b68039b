//! A registry's manifest, index and config documents.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrun_image::fuzzing::parse_manifest(data);
    let _ = vmrun_image::fuzzing::parse_config(data);
});
