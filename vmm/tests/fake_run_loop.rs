//! The build steps and the run loop against the scripted fake hypervisor:
//! what the VMM asks of the hypervisor, how exits reach the buses, and how
//! every kind of stop ends all vCPU threads.

mod support;

use std::sync::{Arc, Mutex};

use support::{guests, temp_file, Capture, ScratchRegister};
use vmrun_vmm::arch::layout::{PVH_START_INFO, VIRTIO_MMIO_START};
use vmrun_vmm::config::VmConfig;
use vmrun_vmm::hypervisor::fake::{AnsweredRead, FakeHypervisor, ScriptedExit};
use vmrun_vmm::hypervisor::SystemEvent;
use vmrun_vmm::stop::GuestStop;
use vmrun_vmm::vm::MicroVm;

fn build(
    hypervisor: &FakeHypervisor,
    vcpus: u8,
    console: Capture,
) -> (tempfile::TempPath, MicroVm) {
    let (guard, path) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    let mut config = VmConfig::new(&path);
    config.memory_mib = 64;
    config.vcpus = vcpus;
    let vm = MicroVm::build(hypervisor, &config, Box::new(console)).expect("build");
    (guard, vm)
}

fn out(port: u16, data: &[u8]) -> ScriptedExit {
    ScriptedExit::IoOut {
        port,
        data: data.to_vec(),
    }
}

#[test]
fn build_sets_up_irqchip_memory_devices_and_the_boot_cpu() {
    let hypervisor = FakeHypervisor::new();
    let (_kernel, _vm) = build(&hypervisor, 3, Capture::default());
    let record = hypervisor.record();
    assert!(record.irq_chip && record.pit);
    assert_eq!(record.irqfd_gsis, vec![4], "serial IRQ 4 through an irqfd");
    assert_eq!(record.memory_regions.len(), 1);
    assert_eq!(record.memory_regions[0].size, 64 << 20);
    assert_eq!(record.vcpus.len(), 3);
    let bsp = &record.vcpus[&0];
    assert_eq!((bsp.regs.rip, bsp.regs.rbx), (0x10_0000, PVH_START_INFO));
    assert_eq!(bsp.sregs.cr0 & 1, 1, "protected mode");
    for (id, vcpu) in &record.vcpus {
        let leaf1 = vcpu.cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, u32::from(*id), "APIC ID of vCPU {id}");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 3);
        assert_eq!(
            vcpu.msrs.get(&0x2ff),
            Some(&((1 << 11) | 6)),
            "MTRRs on vCPU {id}"
        );
    }
    assert_eq!(record.vcpus[&1].regs.rip, 0, "APs wait for the startup IPI");
}

#[test]
fn serial_output_then_debug_exit() {
    let hypervisor = FakeHypervisor::new();
    hypervisor.script(
        0,
        vec![out(0x3f8, b"O"), out(0x3f8, b"K\n"), out(0x501, &[0])],
    );
    let console = Capture::default();
    let (_kernel, vm) = build(&hypervisor, 1, console.clone());
    assert_eq!(vm.run().unwrap(), GuestStop::DebugExit(0));
    assert_eq!(console.text(), "OK\n");
}

#[test]
fn port_reads_are_answered_by_devices_or_all_ones() {
    let hypervisor = FakeHypervisor::new();
    hypervisor.script(
        0,
        vec![
            ScriptedExit::IoIn {
                port: 0x3fd,
                len: 1,
            },
            ScriptedExit::IoIn {
                port: 0x2f8,
                len: 2,
            },
            ScriptedExit::IoIn { port: 0x64, len: 1 },
            out(0x501, &[9]),
        ],
    );
    let (_kernel, vm) = build(&hypervisor, 1, Capture::default());
    assert_eq!(vm.run().unwrap(), GuestStop::DebugExit(9));
    let record = hypervisor.record();
    let reads = &record.vcpus[&0].answered_reads;
    let AnsweredRead::Io { port: 0x3fd, data } = &reads[0] else {
        panic!("{reads:?}")
    };
    assert_ne!(data[0] & 0x20, 0, "serial transmitter empty");
    assert_eq!(
        reads[1],
        AnsweredRead::Io {
            port: 0x2f8,
            data: vec![0xff, 0xff]
        }
    );
    // The i8042 status register: system flag and keyboard enabled, no byte waiting.
    assert_eq!(
        reads[2],
        AnsweredRead::Io {
            port: 0x64,
            data: vec![0x14]
        }
    );
}

#[test]
fn mmio_exits_reach_the_mmio_bus() {
    let hypervisor = FakeHypervisor::new();
    hypervisor.script(
        0,
        vec![
            ScriptedExit::MmioWrite {
                addr: VIRTIO_MMIO_START,
                data: vec![1, 2, 3, 4],
            },
            ScriptedExit::MmioRead {
                addr: VIRTIO_MMIO_START,
                len: 4,
            },
            out(0x501, &[0]),
        ],
    );
    let (_kernel, mut vm) = build(&hypervisor, 1, Capture::default());
    let register = Arc::new(Mutex::new(ScratchRegister::default()));
    vm.mmio_bus_mut()
        .insert(VIRTIO_MMIO_START, 4, register.clone())
        .unwrap();
    assert_eq!(vm.run().unwrap(), GuestStop::DebugExit(0));
    let record = hypervisor.record();
    assert_eq!(
        record.vcpus[&0].answered_reads,
        vec![AnsweredRead::Mmio {
            addr: VIRTIO_MMIO_START,
            data: vec![1, 2, 3, 4]
        }]
    );
}

#[test]
fn triple_fault_on_one_vcpu_ends_the_vm() {
    let hypervisor = FakeHypervisor::new();
    // vCPU 0 has nothing scripted: it blocks until kicked, like a halted CPU.
    hypervisor.script(1, vec![out(0x3f8, b"x"), ScriptedExit::Shutdown]);
    let (_kernel, vm) = build(&hypervisor, 2, Capture::default());
    assert_eq!(vm.run().unwrap(), GuestStop::TripleFault { vcpu: 1 });
    assert!(!hypervisor.record().vcpus[&0].waiting_for_kick);
}

#[test]
fn blocked_vcpus_are_kicked_out_when_the_vm_stops() {
    let hypervisor = FakeHypervisor::new();
    let (_kernel, vm) = build(&hypervisor, 4, Capture::default());
    let stop = vm.stop_signal();
    let requester = {
        let hypervisor = hypervisor.clone();
        std::thread::spawn(move || {
            // Poll until all four vCPUs sit blocked in "KVM_RUN".
            while hypervisor
                .record()
                .vcpus
                .values()
                .filter(|v| v.waiting_for_kick)
                .count()
                < 4
            {
                std::thread::yield_now();
            }
            stop.request(GuestStop::PowerOff);
        })
    };
    assert_eq!(vm.run().unwrap(), GuestStop::PowerOff);
    requester.join().unwrap();
    let record = hypervisor.record();
    for (id, vcpu) in &record.vcpus {
        assert_eq!(vcpu.kicks, 1, "vCPU {id}");
    }
}

#[test]
fn system_events_map_to_stops() {
    for (event, expected) in [
        (SystemEvent::Reset, GuestStop::Reset),
        (SystemEvent::Shutdown, GuestStop::PowerOff),
        (SystemEvent::Crash, GuestStop::Crash { vcpu: 0 }),
    ] {
        let hypervisor = FakeHypervisor::new();
        hypervisor.script(0, vec![ScriptedExit::SystemEvent(event)]);
        let (_kernel, vm) = build(&hypervisor, 1, Capture::default());
        assert_eq!(vm.run().unwrap(), expected);
    }
}

#[test]
fn hypervisor_failures_stop_the_vm_with_a_reason() {
    let cases = [
        (
            ScriptedExit::Error("device went away"),
            "KVM_RUN failed: device went away",
        ),
        (
            ScriptedExit::FailEntry(0x21),
            "hardware entry failure reason 0x21",
        ),
        (ScriptedExit::InternalError, "internal error"),
    ];
    for (exit, message) in cases {
        let hypervisor = FakeHypervisor::new();
        hypervisor.script(0, vec![exit]);
        let (_kernel, vm) = build(&hypervisor, 2, Capture::default());
        let stop = vm.run().unwrap();
        let GuestStop::VcpuFailed { vcpu: 0, reason } = &stop else {
            panic!("{stop:?}")
        };
        assert!(reason.contains(message), "{reason}");
        assert_eq!(stop.exit_code(), 1);
    }
}

#[test]
fn all_vcpus_halting_ends_the_vm() {
    let hypervisor = FakeHypervisor::new();
    hypervisor.script(0, vec![ScriptedExit::Hlt]);
    hypervisor.script(1, vec![out(0x80, &[1]), ScriptedExit::Hlt]);
    let (_kernel, vm) = build(&hypervisor, 2, Capture::default());
    assert_eq!(vm.run().unwrap(), GuestStop::AllVcpusHalted);
}

/// The guest prints Linux's panic line, then resets (`panic=-1` with
/// `reboot=k`): the VM ends as a kernel panic quoting the line, even with
/// the console off; the same reset without the line is a clean stop.
#[test]
fn a_reset_after_a_kernel_panic_line_is_a_panic() {
    for (console, panics) in [
        (
            &b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n"[..],
            true,
        ),
        (&b"[ 1.0] reboot: Restarting system\n"[..], false),
    ] {
        let hypervisor = FakeHypervisor::new();
        let mut script: Vec<ScriptedExit> = console.iter().map(|b| out(0x3f8, &[*b])).collect();
        script.push(out(0x64, &[0xfe]));
        hypervisor.script(0, script);
        let (guard, path) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
        let mut config = VmConfig::new(&path);
        config.memory_mib = 64;
        config.console = vmrun_vmm::config::ConsoleConfig::Off;
        let vm = MicroVm::build(&hypervisor, &config, Box::new(std::io::sink())).unwrap();
        let stop = vm.run().unwrap();
        drop(guard);
        if panics {
            assert_eq!(
                stop,
                GuestStop::KernelPanic {
                    line: "Kernel panic - not syncing: VFS: Unable to mount root fs".into()
                }
            );
            assert_eq!(stop.exit_code(), 1);
        } else {
            assert_eq!(stop, GuestStop::Reset);
            assert_eq!(stop.exit_code(), 0);
        }
    }
}
