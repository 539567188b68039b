//! Boots tiny hand-assembled guests on the real /dev/kvm through the
//! library: PVH and 64-bit boot protocols, ELF and bzImage, initrd, SMP,
//! MMIO round trips, triple faults and the i8042 reset line.
//!
//! These tests require /dev/kvm; without it they fail, naming why.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use support::{guests, require_kvm, temp_file, Capture, ScratchRegister};
use vmrun_vmm::arch::layout::VIRTIO_MMIO_START;
use vmrun_vmm::arch::regs::EntryPoint;
use vmrun_vmm::config::VmConfig;
use vmrun_vmm::hypervisor::kvm::KvmHypervisor;
use vmrun_vmm::stop::GuestStop;
use vmrun_vmm::vm::MicroVm;

/// Boots `kernel` and returns how it stopped and what it printed.
fn boot(kernel: &[u8], configure: impl FnOnce(&mut VmConfig)) -> (GuestStop, String) {
    boot_with(kernel, configure, |_| {})
}

fn boot_with(
    kernel: &[u8],
    configure: impl FnOnce(&mut VmConfig),
    prepare: impl FnOnce(&mut MicroVm),
) -> (GuestStop, String) {
    require_kvm();
    let (_guard, path) = temp_file(kernel);
    let mut config = VmConfig::new(&path);
    config.memory_mib = 64;
    configure(&mut config);
    let hypervisor = KvmHypervisor::new().expect("open /dev/kvm");
    let console = Capture::default();
    let mut vm = MicroVm::build(&hypervisor, &config, Box::new(console.clone())).expect("build VM");
    prepare(&mut vm);
    let started = Instant::now();
    let stop = vm.run().expect("run VM");
    eprintln!("guest ran {:?}: {stop}", started.elapsed());
    (stop, console.text())
}

#[test]
fn pvh_guest_prints_its_cmdline_and_exits_cleanly() {
    let kernel = support::elf_image(guests::PVH_HELLO, true);
    let (stop, output) = boot(&kernel, |c| c.cmdline = "hello from the test".into());
    assert_eq!(output, "PVH hello from the test\n");
    assert_eq!(stop, GuestStop::DebugExit(0));
}

#[test]
fn pvh_guest_finds_the_initrd_as_its_first_module() {
    let kernel = support::elf_image(guests::PVH_HELLO, true);
    let (_initrd_guard, initrd) = temp_file(b"initrd contents\n");
    let (stop, output) = boot(&kernel, |c| {
        c.cmdline = "x".into();
        c.initrd = Some(initrd.clone());
    });
    assert_eq!(output, "PVH x\ninitrd contents\n");
    assert_eq!(stop, GuestStop::DebugExit(0));
}

/// Adds the scratch register at the first virtio-mmio window.
fn with_scratch(register: &Arc<Mutex<ScratchRegister>>) -> impl FnOnce(&mut MicroVm) + '_ {
    move |vm| {
        vm.mmio_bus_mut()
            .insert(VIRTIO_MMIO_START, 4, register.clone())
            .unwrap()
    }
}

#[test]
fn long_mode_elf_guest_reads_boot_params_and_round_trips_mmio() {
    let kernel = support::elf_image(guests::LINUX64_MMIO, false);
    let register = Arc::new(Mutex::new(ScratchRegister::default()));
    let (stop, output) = boot_with(
        &kernel,
        |c| c.cmdline = "lm".into(),
        with_scratch(&register),
    );
    assert_eq!(output, "LM64 lm\nMMIO OK\n");
    assert_eq!(stop, GuestStop::DebugExit(0));
    let register = register.lock().unwrap();
    assert_eq!(register.value, 0x1234_abcd);
    assert_eq!(
        register.writes,
        vec![(0, 0x1234_abcdu32.to_le_bytes().to_vec())]
    );
}

#[test]
fn bzimage_guest_enters_at_the_64_bit_entry() {
    let kernel = support::bzimage(guests::LINUX64_MMIO);
    let register = Arc::new(Mutex::new(ScratchRegister::default()));
    let (stop, output) = boot_with(
        &kernel,
        |c| c.cmdline = "bz".into(),
        with_scratch(&register),
    );
    assert_eq!(output, "LM64 bz\nMMIO OK\n");
    assert_eq!(stop, GuestStop::DebugExit(0));
}

#[test]
fn mmio_read_without_a_device_sees_all_ones() {
    // No scratch register: the read-back differs and the guest exits with 4.
    let kernel = support::elf_image(guests::LINUX64_MMIO, false);
    let (stop, output) = boot(&kernel, |c| c.cmdline = "none".into());
    assert_eq!(output, "LM64 none\n");
    assert_eq!(stop, GuestStop::DebugExit(4));
}

#[test]
fn entry_protocol_follows_the_image() {
    require_kvm();
    let hypervisor = KvmHypervisor::new().unwrap();
    for (image, expected) in [
        (
            support::elf_image(guests::PVH_HELLO, true),
            EntryPoint::Pvh(0x10_0000),
        ),
        (
            support::elf_image(guests::LINUX64_MMIO, false),
            EntryPoint::Linux64(0x10_0000),
        ),
        (
            support::bzimage(guests::LINUX64_MMIO),
            EntryPoint::Linux64(0x10_0200),
        ),
    ] {
        let (_guard, path) = temp_file(&image);
        let mut config = VmConfig::new(&path);
        config.memory_mib = 64;
        let vm = MicroVm::build(&hypervisor, &config, Box::new(std::io::sink())).unwrap();
        assert_eq!(vm.kernel().entry, expected);
    }
}

#[test]
fn two_vcpus_each_run_and_report() {
    let kernel = support::elf_image(guests::SMP, true);
    let (stop, output) = boot(&kernel, |c| c.vcpus = 2);
    assert_eq!(stop, GuestStop::DebugExit(0), "output: {output:?}");
    assert_eq!(output, "cpu0\ncpu1\n");
}

#[test]
fn four_vcpus_each_run_and_report() {
    let kernel = support::elf_image(guests::SMP, true);
    let (stop, output) = boot(&kernel, |c| c.vcpus = 4);
    assert_eq!(stop, GuestStop::DebugExit(0), "output: {output:?}");
    let mut lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "cpu0");
    lines.sort();
    assert_eq!(lines, ["cpu0", "cpu1", "cpu2", "cpu3"]);
}

#[test]
fn triple_fault_is_reported_as_a_crash() {
    let kernel = support::elf_image(guests::TRIPLE_FAULT, true);
    let (stop, output) = boot(&kernel, |_| {});
    assert_eq!(output, "boom\n");
    assert_eq!(stop, GuestStop::TripleFault { vcpu: 0 });
    assert_eq!(stop.exit_code(), 1);
}

#[test]
fn i8042_reset_ends_the_vm_cleanly() {
    let kernel = support::elf_image(guests::I8042_RESET, true);
    let (stop, _) = boot(&kernel, |c| c.vcpus = 2);
    assert_eq!(stop, GuestStop::Reset);
    assert_eq!(stop.exit_code(), 0);
}

#[test]
fn virtio_blk_guest_driver_reads_and_writes_the_disk() {
    let kernel = support::elf_image(guests::VIRTIO_BLK, true);
    let mut image = vec![0u8; 4 * 512];
    image[512..520].copy_from_slice(b"SECTOR-1");
    let (_disk_guard, disk) = temp_file(&image);
    let (stop, output) = boot(&kernel, |c| {
        c.disks = vec![vmrun_vmm::config::DiskConfig {
            path: disk.clone(),
            read_only: false,
        }]
    });
    assert_eq!(stop, GuestStop::DebugExit(0), "output: {output:?}");
    assert_eq!(output, "SECTOR-1\n");
    let written = std::fs::read(&disk).unwrap();
    assert_eq!(&written[1024..1032], b"SECTOR-1");
}

#[test]
fn virtio_devices_are_announced_on_the_kernel_cmdline() {
    let kernel = support::elf_image(guests::PVH_HELLO, true);
    let (_disk_guard, disk) = temp_file(&[0u8; 512]);
    let (stop, output) = boot(&kernel, |c| {
        c.cmdline = "console=ttyS0".into();
        c.disks = vec![
            vmrun_vmm::config::DiskConfig {
                path: disk.clone(),
                read_only: true,
            },
            vmrun_vmm::config::DiskConfig {
                path: disk.clone(),
                read_only: true,
            },
        ];
    });
    assert_eq!(stop, GuestStop::DebugExit(0));
    assert_eq!(
        output,
        "PVH console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6\n"
    );
}
