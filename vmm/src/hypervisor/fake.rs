//! A scripted hypervisor for unit tests: each vCPU replays a list of exits and
//! everything the VMM asks of the hypervisor is recorded for inspection.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{
    CpuidEntry, FpuState, Hypervisor, HypervisorError, IoEventAddress, LapicState, MsrEntry,
    Result, SpecialRegisters, StandardRegisters, SystemEvent, UserMemoryRegion, Vcpu, Vm, VmExit,
};

/// One exit a fake vCPU reports from [`Vcpu::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptedExit {
    IoIn {
        port: u16,
        len: usize,
    },
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    MmioRead {
        addr: u64,
        len: usize,
    },
    MmioWrite {
        addr: u64,
        data: Vec<u8>,
    },
    Hlt,
    Shutdown,
    SystemEvent(SystemEvent),
    FailEntry(u64),
    InternalError,
    /// `run` fails with this message.
    Error(&'static str),
}

/// A read the VMM answered: what it put in the guest's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnsweredRead {
    Io { port: u16, data: Vec<u8> },
    Mmio { addr: u64, data: Vec<u8> },
}

/// Everything the VMM did to the fake hypervisor.
#[derive(Debug, Default)]
pub struct FakeRecord {
    pub memory_regions: Vec<UserMemoryRegion>,
    pub irq_chip: bool,
    pub pit: bool,
    pub irqfd_gsis: Vec<u32>,
    pub ioevents: Vec<(IoEventAddress, Option<u32>)>,
    pub vcpus: BTreeMap<u8, FakeVcpuState>,
}

/// The state of one fake vCPU.
#[derive(Debug, Default)]
pub struct FakeVcpuState {
    pub regs: StandardRegisters,
    pub sregs: SpecialRegisters,
    pub fpu: FpuState,
    pub cpuid: Vec<CpuidEntry>,
    pub msrs: BTreeMap<u32, u64>,
    pub lapic: LapicState,
    pub answered_reads: Vec<AnsweredRead>,
    /// How many exits the vCPU reported.
    pub exits: usize,
    /// How many times a kick interrupted it.
    pub kicks: usize,
    /// Blocked, script exhausted, until a kick arrives.
    pub waiting_for_kick: bool,
}

/// The fake hypervisor. Clones share the same scripts and record.
#[derive(Clone, Default)]
pub struct FakeHypervisor {
    scripts: Arc<Mutex<BTreeMap<u8, VecDeque<ScriptedExit>>>>,
    record: Arc<Mutex<FakeRecord>>,
    supported_cpuid: Vec<CpuidEntry>,
}

impl FakeHypervisor {
    pub fn new() -> Self {
        FakeHypervisor {
            supported_cpuid: default_supported_cpuid(),
            ..Default::default()
        }
    }

    /// Sets the exits vCPU `id` will report; after the last one it blocks
    /// until kicked, like a halted vCPU with an in-kernel irqchip.
    pub fn script(&self, id: u8, exits: Vec<ScriptedExit>) {
        lock(&self.scripts).insert(id, exits.into());
    }

    pub fn record(&self) -> MutexGuard<'_, FakeRecord> {
        lock(&self.record)
    }
}

/// A small CPUID table shaped like KVM's (vendor leaf, leaf 1, topology leaves).
fn default_supported_cpuid() -> Vec<CpuidEntry> {
    vec![
        CpuidEntry {
            function: 0,
            eax: 0xb,
            ebx: u32::from_le_bytes(*b"Genu"),
            edx: u32::from_le_bytes(*b"ineI"),
            ecx: u32::from_le_bytes(*b"ntel"),
            ..Default::default()
        },
        CpuidEntry {
            function: 1,
            eax: 0x000806c1,
            ..Default::default()
        },
        CpuidEntry {
            function: 4,
            index: 0,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: 0x121,
            ..Default::default()
        },
        CpuidEntry {
            function: 0xb,
            index: 0,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..Default::default()
        },
    ]
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        Ok(Arc::new(FakeVm {
            hypervisor: self.clone(),
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(self.supported_cpuid.clone())
    }

    fn max_vcpus(&self) -> usize {
        255
    }
}

struct FakeVm {
    hypervisor: FakeHypervisor,
}

impl Vm for FakeVm {
    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()> {
        self.hypervisor.record().memory_regions.push(region);
        Ok(())
    }

    fn set_tss_address(&self, _addr: u64) -> Result<()> {
        Ok(())
    }

    fn create_irq_chip(&self) -> Result<()> {
        self.hypervisor.record().irq_chip = true;
        Ok(())
    }

    fn create_pit(&self) -> Result<()> {
        let mut record = self.hypervisor.record();
        if !record.irq_chip {
            return Err(HypervisorError::new(
                "KVM_CREATE_PIT2",
                io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        record.pit = true;
        Ok(())
    }

    fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<()> {
        self.hypervisor.record().irqfd_gsis.push(gsi);
        Ok(())
    }

    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<()> {
        self.hypervisor.record().irqfd_gsis.retain(|&g| g != gsi);
        Ok(())
    }

    fn register_ioevent(
        &self,
        _fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        self.hypervisor.record().ioevents.push((addr, datamatch));
        Ok(())
    }

    fn unregister_ioevent(
        &self,
        _fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        self.hypervisor
            .record()
            .ioevents
            .retain(|e| *e != (addr, datamatch));
        Ok(())
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        let script = lock(&self.hypervisor.scripts)
            .remove(&id)
            .unwrap_or_default();
        self.hypervisor
            .record()
            .vcpus
            .insert(id, Default::default());
        Ok(Box::new(FakeVcpu {
            id,
            script,
            record: self.hypervisor.record.clone(),
            buffer: Vec::new(),
            pending_read: None,
            kick_signal: None,
        }))
    }
}

enum PendingRead {
    Io(u16),
    Mmio(u64),
}

struct FakeVcpu {
    id: u8,
    script: VecDeque<ScriptedExit>,
    record: Arc<Mutex<FakeRecord>>,
    /// Backs the data slice of the current exit.
    buffer: Vec<u8>,
    /// The read exit whose answer is collected on the next `run`.
    pending_read: Option<PendingRead>,
    kick_signal: Option<libc::c_int>,
}

impl FakeVcpu {
    fn with_state<R>(&self, f: impl FnOnce(&mut FakeVcpuState) -> R) -> R {
        let mut record = lock(&self.record);
        f(record.vcpus.entry(self.id).or_default())
    }

    /// Blocks until the kick signal is pending, then consumes it.
    fn wait_for_kick(&self) -> Result<()> {
        let signal = self.kick_signal.ok_or_else(|| {
            HypervisorError::new(
                "KVM_RUN",
                io::Error::other("fake vCPU script exhausted and no kick signal set"),
            )
        })?;
        // SAFETY: an all-zero sigset_t is a valid empty set to fill.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; `signal` is a signal number.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
        }
        // A bounded wait, so a test whose VMM never kicks fails instead of
        // hanging forever.
        let timeout = libc::timespec {
            tv_sec: Duration::from_secs(30).as_secs() as libc::time_t,
            tv_nsec: 0,
        };
        loop {
            // SAFETY: `set` and `timeout` are valid; the siginfo pointer may be null.
            let ret = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
            if ret == signal {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(HypervisorError::new("fake KVM_RUN wait for kick", err));
            }
        }
    }
}

impl Vcpu for FakeVcpu {
    fn id(&self) -> u8 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        if let Some(pending) = self.pending_read.take() {
            let data = self.buffer.clone();
            let answered = match pending {
                PendingRead::Io(port) => AnsweredRead::Io { port, data },
                PendingRead::Mmio(addr) => AnsweredRead::Mmio { addr, data },
            };
            self.with_state(|s| s.answered_reads.push(answered));
        }
        let Some(next) = self.script.pop_front() else {
            self.with_state(|s| s.waiting_for_kick = true);
            let waited = self.wait_for_kick();
            self.with_state(|s| s.waiting_for_kick = false);
            waited?;
            self.with_state(|s| s.kicks += 1);
            return Ok(VmExit::Interrupted);
        };
        self.with_state(|s| s.exits += 1);
        Ok(match next {
            ScriptedExit::IoIn { port, len } => {
                self.buffer = vec![0; len];
                self.pending_read = Some(PendingRead::Io(port));
                VmExit::IoIn {
                    port,
                    data: &mut self.buffer,
                }
            }
            ScriptedExit::IoOut { port, data } => {
                self.buffer = data;
                VmExit::IoOut {
                    port,
                    data: &self.buffer,
                }
            }
            ScriptedExit::MmioRead { addr, len } => {
                self.buffer = vec![0; len];
                self.pending_read = Some(PendingRead::Mmio(addr));
                VmExit::MmioRead {
                    addr,
                    data: &mut self.buffer,
                }
            }
            ScriptedExit::MmioWrite { addr, data } => {
                self.buffer = data;
                VmExit::MmioWrite {
                    addr,
                    data: &self.buffer,
                }
            }
            ScriptedExit::Hlt => VmExit::Hlt,
            ScriptedExit::Shutdown => VmExit::Shutdown,
            ScriptedExit::SystemEvent(event) => VmExit::SystemEvent(event),
            ScriptedExit::FailEntry(reason) => VmExit::FailEntry { reason },
            ScriptedExit::InternalError => VmExit::InternalError,
            ScriptedExit::Error(message) => {
                return Err(HypervisorError::new("KVM_RUN", io::Error::other(message)))
            }
        })
    }

    fn enable_kick(&mut self, signal: libc::c_int) -> Result<()> {
        self.kick_signal = Some(signal);
        Ok(())
    }

    fn get_regs(&self) -> Result<StandardRegisters> {
        Ok(self.with_state(|s| s.regs))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.with_state(|s| s.regs = *regs);
        Ok(())
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        Ok(self.with_state(|s| s.sregs))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.with_state(|s| s.sregs = *sregs);
        Ok(())
    }

    fn get_fpu(&self) -> Result<FpuState> {
        Ok(self.with_state(|s| s.fpu))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        self.with_state(|s| s.fpu = *fpu);
        Ok(())
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        self.with_state(|s| s.cpuid = entries.to_vec());
        Ok(())
    }

    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        Ok(self.with_state(|s| {
            indices
                .iter()
                .map(|&index| MsrEntry {
                    index,
                    data: s.msrs.get(&index).copied().unwrap_or(0),
                })
                .collect()
        }))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        self.with_state(|s| s.msrs.extend(msrs.iter().map(|m| (m.index, m.data))));
        Ok(())
    }

    fn get_lapic(&self) -> Result<LapicState> {
        Ok(self.with_state(|s| s.lapic))
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        self.with_state(|s| s.lapic = *lapic);
        Ok(())
    }
}
