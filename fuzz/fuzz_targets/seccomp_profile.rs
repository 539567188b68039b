//! A Localhost seccomp profile (OCI JSON) compiled into BPF filters.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(profile) = serde_json::from_slice::<oci_spec::runtime::LinuxSeccomp>(data) {
        let _ = vmrun_container::seccomp::compile(&profile);
    }
});
