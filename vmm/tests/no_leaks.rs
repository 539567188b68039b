//! A VM that ran to its end leaves no thread, file descriptor or socket
//! file behind. Alone in its test binary, so no other test's VM is counted.

mod support;

use support::{guests, require_kvm, temp_file};
use vmrun_vmm::config::VmConfig;
use vmrun_vmm::hypervisor::kvm::KvmHypervisor;
use vmrun_vmm::stop::GuestStop;
use vmrun_vmm::vm::MicroVm;

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn running_vms_leaks_no_threads_or_fds() {
    require_kvm();
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
        let vm = MicroVm::build(&hypervisor, &config, Box::new(std::io::sink())).unwrap();
        assert_eq!(vm.run().unwrap(), GuestStop::DebugExit(0));
        assert!(!uds.exists(), "the vsock socket file is removed");
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
