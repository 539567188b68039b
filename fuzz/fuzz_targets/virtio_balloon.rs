//! virtio-balloon's inflate, deflate and reporting queues driven by a
//! hostile guest driver: see `vmrun_vmm::fuzzing::balloon_queues`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmrun_vmm::fuzzing::balloon_queues(data);
});
