//! virtio-net's rx and tx queues driven by a hostile guest driver and a
//! scripted backend: see `vmrun_vmm::fuzzing::net_queues`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmrun_vmm::fuzzing::net_queues(data);
});
