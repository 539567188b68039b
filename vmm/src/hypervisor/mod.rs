//! The seam between the VMM and the hypervisor: the VMM builds and runs guests
//! only through these traits, so the run loop and the device model can be
//! tested against [`fake`] and run for real on [`kvm`].
//!
//! The register types are KVM's x86_64 structures: the VMM only targets
//! x86_64, and another backend would convert from them.

pub mod fake;
pub mod kvm;

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use kvm_bindings::{
    kvm_fpu as FpuState, kvm_lapic_state as LapicState, kvm_regs as StandardRegisters,
    kvm_segment as SegmentRegister, kvm_sregs as SpecialRegisters,
};

/// A failed hypervisor call, named after the operation (the KVM ioctl).
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct HypervisorError {
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

impl HypervisorError {
    pub fn new(op: &'static str, source: impl Into<io::Error>) -> Self {
        HypervisorError {
            op,
            source: source.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// One CPUID leaf/subleaf as the hypervisor reports or accepts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits (whether `index` is significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// One model-specific register value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// A slot of guest physical memory backed by host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserMemoryRegion {
    pub slot: u32,
    pub guest_phys_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// Where an ioeventfd listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    Pio(u64),
    Mmio(u64),
}

/// Why a vCPU stopped running guest code.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// The guest read from an I/O port: fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// The guest wrote `data` to an I/O port.
    IoOut { port: u16, data: &'a [u8] },
    /// The guest read unbacked guest-physical memory: fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// The guest wrote `data` to unbacked guest-physical memory.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// HLT with no in-kernel irqchip to wait for an interrupt.
    Hlt,
    /// The vCPU shut down: on x86 a triple fault.
    Shutdown,
    /// The guest asked the platform for a power event.
    SystemEvent(SystemEvent),
    /// KVM_RUN was interrupted by a signal (the VMM kicked the vCPU).
    Interrupted,
    /// The hypervisor could not enter the guest.
    FailEntry { reason: u64 },
    /// The hypervisor hit an internal error emulating the guest.
    InternalError,
    /// An exit the VMM has no handling for.
    Unhandled(String),
}

/// The kinds of KVM_EXIT_SYSTEM_EVENT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemEvent {
    Shutdown,
    Reset,
    Crash,
    Other(u32),
}

/// Creates VMs.
pub trait Hypervisor: Send + Sync {
    /// Short name for messages ("kvm", "fake").
    fn name(&self) -> &'static str;
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// The CPUID leaves the hypervisor can virtualize (KVM_GET_SUPPORTED_CPUID).
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    /// The most vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;
}

/// One virtual machine: its memory map, interrupt controllers and vCPUs.
pub trait Vm: Send + Sync {
    /// Maps host memory into the guest physical address space.
    ///
    /// # Safety
    /// `region.host_addr .. host_addr + size` must be a mapping that stays valid
    /// (neither unmapped nor reused) for as long as the VM exists: the guest
    /// reads and writes it behind Rust's back.
    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()>;
    /// Places the three pages Intel VT needs for real-mode emulation.
    fn set_tss_address(&self, addr: u64) -> Result<()>;
    /// Creates the in-kernel PIC + IOAPIC (and per-vCPU LAPICs).
    fn create_irq_chip(&self) -> Result<()>;
    /// Creates the in-kernel i8254 PIT.
    fn create_pit(&self) -> Result<()>;
    /// Makes a write to `fd` raise interrupt line `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Makes a guest write to `addr` (matching `datamatch` if given) signal `fd`
    /// without a VM exit.
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
}

/// One virtual CPU. Owned by the thread that runs it.
pub trait Vcpu: Send {
    fn id(&self) -> u8;
    /// Runs guest code until the next exit.
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Called on the vCPU's own thread, where `signal` is blocked: from now on
    /// `signal` sent to this thread interrupts [`Vcpu::run`] (even one that has
    /// not started yet) with [`VmExit::Interrupted`].
    fn enable_kick(&mut self, signal: libc::c_int) -> Result<()>;
    fn get_regs(&self) -> Result<StandardRegisters>;
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    fn get_sregs(&self) -> Result<SpecialRegisters>;
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    fn get_fpu(&self) -> Result<FpuState>;
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    /// Reads the MSRs named by `indices`.
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>>;
    /// Writes all of `msrs`; fails naming the first one the hypervisor refused.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    fn get_lapic(&self) -> Result<LapicState>;
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
}
