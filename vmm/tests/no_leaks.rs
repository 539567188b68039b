//! A VM that ran to its end leaves no thread, file descriptor, socket file
//! or tap device behind, and neither does a virtio-net device whose thread
//! ran. Alone in its test binary, so no other test's VM is counted.

mod support;

use std::sync::Arc;

use support::net_guest::{enter_private_netns, interface_exists, NetGuest};
use support::{guests, require_kvm, temp_file};
use vmrun_vmm::config::VmConfig;
use vmrun_vmm::devices::virtio::net::Net;
use vmrun_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use vmrun_vmm::hypervisor::kvm::KvmHypervisor;
use vmrun_vmm::stop::GuestStop;
use vmrun_vmm::vm::MicroVm;

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// A net device on a tap, activated (its thread runs), reset, activated
/// again and dropped.
fn cycle_a_net_device() {
    let mut device = Net::open(&"vmrleak1".parse().unwrap()).unwrap();
    for _ in 0..2 {
        let guest = NetGuest::new();
        let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
        device
            .activate(guest.memory.clone(), guest.queues(), interrupt)
            .unwrap();
        assert!(device.is_running());
        device.reset();
    }
    // Dropped while its thread runs.
    let guest = NetGuest::new();
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    device
        .activate(guest.memory.clone(), guest.queues(), interrupt)
        .unwrap();
    drop(device);
    assert!(
        !interface_exists("vmrleak1"),
        "the tap goes with the device"
    );
}

#[test]
fn running_vms_leaks_no_threads_or_fds() {
    require_kvm();
    // The taps live (and die) in a network namespace of the test's own.
    let test = std::thread::spawn(|| {
        enter_private_netns();
        run_vms_and_count();
    });
    if let Err(panic) = test.join() {
        std::panic::resume_unwind(panic);
    }
}

fn run_vms_and_count() {
    let (_k, kernel) = temp_file(&support::elf_image(guests::SMP, true));
    let (_d, disk) = temp_file(&[0u8; 4096]);
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let run_once = || {
        let hypervisor = KvmHypervisor::new().unwrap();
        let mut config = VmConfig::new(&kernel);
        config.memory_mib = 64;
        config.vcpus = 4;
        config.disks = vec![vmrun_vmm::config::DiskConfig {
            path: disk.clone(),
            read_only: false,
        }];
        config.vsock = Some(vmrun_vmm::config::VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        });
        config.nets = vec!["vmrleak0".parse().unwrap()];
        let vm = MicroVm::build(&hypervisor, &config, Box::new(std::io::sink())).unwrap();
        assert!(interface_exists("vmrleak0"));
        assert_eq!(vm.run().unwrap(), GuestStop::DebugExit(0));
        assert!(!uds.exists(), "the vsock socket file is removed");
        assert!(!interface_exists("vmrleak0"), "the tap device is gone");
        cycle_a_net_device();
    };
    // The first run installs process-wide state (the kick signal handler).
    run_once();
    let fds = count_entries("/proc/self/fd");
    let threads = count_entries("/proc/self/task");
    for _ in 0..3 {
        run_once();
    }
    assert_eq!(count_entries("/proc/self/fd"), fds, "file descriptors");
    assert_eq!(count_entries("/proc/self/task"), threads, "threads");
}
