//! The loop each vCPU thread runs: enter the guest, dispatch its exits to
//! the buses, and turn fatal exits into a [`GuestStop`].

use crate::seccomp::{ThreadFilters, ThreadKind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::devices::bus::Bus;
use crate::hypervisor::{SystemEvent, Vcpu, VmExit};
use crate::kick::kick_signal;
use crate::pause::PauseGate;
use crate::stop::{GuestStop, StopSignal};

/// What a vCPU thread shares with the rest of the VM.
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub stop: Arc<StopSignal>,
    /// vCPU threads still running; the last one to leave reports
    /// [`GuestStop::AllVcpusHalted`] if nobody reported anything else.
    pub running: Arc<AtomicUsize>,
    /// Where the thread parks while the VM is paused.
    pub pause: Arc<PauseGate>,
    /// The thread enters the vCPU filter before anything else.
    pub filters: ThreadFilters,
}

/// What one exit means for the loop.
enum Next {
    Continue,
    /// This vCPU is done (the VM may go on with others).
    Leave,
    /// The vCPU cannot go on; the VM stops with this reason.
    Fail(String),
}

/// Runs `vcpu` until the VM stops. Call on the vCPU's own thread, which
/// must have been spawned with the kick signal blocked.
pub fn run_vcpu(mut vcpu: Box<dyn Vcpu>, context: VcpuContext) {
    context.filters.enter(ThreadKind::Vcpu);
    let id = vcpu.id();
    if let Err(e) = vcpu.enable_kick(kick_signal()) {
        context.stop.request(GuestStop::VcpuFailed {
            vcpu: id,
            reason: e.to_string(),
        });
    }
    let _leave = LeaveGuard {
        vcpu: id,
        context: &context,
    };
    while !context.stop.is_requested() {
        // A pause kicks us out of the guest; park here until resumed.
        context.pause.park_if_paused();
        if context.stop.is_requested() {
            break;
        }
        let next = match vcpu.run() {
            Ok(exit) => handle_exit(id, exit, &context),
            Err(e) => Next::Fail(e.to_string()),
        };
        match next {
            Next::Continue => {}
            Next::Leave => break,
            Next::Fail(reason) => {
                // Where the guest was helps tell a guest bug from a
                // hypervisor limitation (e.g. an instruction kvm_pvm cannot
                // emulate).
                let at = vcpu
                    .get_regs()
                    .map(|regs| format!(" at rip {:#x}", regs.rip))
                    .unwrap_or_default();
                context.stop.request(GuestStop::VcpuFailed {
                    vcpu: id,
                    reason: reason + &at,
                });
                break;
            }
        }
    }
}

/// Accounts for a vCPU thread leaving, also by panic, so the VM's waiter
/// always learns when no vCPU is left.
struct LeaveGuard<'a> {
    vcpu: u8,
    context: &'a VcpuContext,
}

impl Drop for LeaveGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.context.stop.request(GuestStop::VcpuFailed {
                vcpu: self.vcpu,
                reason: "the vCPU thread panicked".into(),
            });
        }
        if self.context.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.context.stop.request(GuestStop::AllVcpusHalted);
        }
        // A pause waiting for every vCPU to park must stop counting us.
        self.context.pause.notify();
    }
}

fn handle_exit(vcpu: u8, exit: VmExit<'_>, context: &VcpuContext) -> Next {
    let stop = |reason| {
        context.stop.request(reason);
        Next::Leave
    };
    match exit {
        VmExit::IoIn { port, data } => {
            context.io_bus.read(u64::from(port), data);
            Next::Continue
        }
        VmExit::IoOut { port, data } => {
            context.io_bus.write(u64::from(port), data);
            Next::Continue
        }
        VmExit::MmioRead { addr, data } => {
            context.mmio_bus.read(addr, data);
            Next::Continue
        }
        VmExit::MmioWrite { addr, data } => {
            context.mmio_bus.write(addr, data);
            Next::Continue
        }
        // A kick: the loop condition decides whether to go on.
        VmExit::Interrupted => Next::Continue,
        // Only without an in-kernel irqchip: nothing will wake this vCPU.
        VmExit::Hlt => Next::Leave,
        VmExit::Shutdown => stop(GuestStop::TripleFault { vcpu }),
        VmExit::SystemEvent(SystemEvent::Reset) => stop(GuestStop::Reset),
        VmExit::SystemEvent(SystemEvent::Shutdown) => stop(GuestStop::PowerOff),
        VmExit::SystemEvent(SystemEvent::Crash) => stop(GuestStop::Crash { vcpu }),
        VmExit::SystemEvent(SystemEvent::Other(kind)) => {
            Next::Fail(format!("unhandled system event {kind}"))
        }
        VmExit::FailEntry { reason } => Next::Fail(format!(
            "the hypervisor could not enter the guest (hardware entry failure reason {reason:#x})"
        )),
        VmExit::InternalError => {
            Next::Fail("the hypervisor hit an internal error (emulation failure)".into())
        }
        VmExit::Unhandled(what) => Next::Fail(format!("unhandled exit {what}")),
    }
}
