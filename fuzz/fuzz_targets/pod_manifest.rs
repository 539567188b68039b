//! `vmrun run` input: arbitrary text as a manifest file, then the planner
//! on whatever parses. Errors are fine; a panic or a hang is a finding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = vmrun_pod::manifest::parse("fuzz.yaml", text) {
        let _ = vmrun_pod::plan::plan(&manifest, "0000-fuzz", "node");
    }
});
