//! The KVM backend of the hypervisor seam, on `kvm-ioctls`.

use std::io;
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, kvm_pit_config, kvm_signal_mask, kvm_userspace_memory_region,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::{
    CpuidEntry, FpuState, Hypervisor, HypervisorError, IoEventAddress, LapicState, MsrEntry,
    Result, SpecialRegisters, StandardRegisters, SystemEvent, UserMemoryRegion, Vcpu, Vm, VmExit,
};

const KVM_IOCTL_BASE: u32 = 0xAE;
ioctl_iow_nr!(KVM_SET_SIGNAL_MASK, KVM_IOCTL_BASE, 0x8b, kvm_signal_mask);

/// What kind of KVM the host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKvm {
    /// Hardware virtualization (VT-x / AMD-V).
    Hardware,
    /// `kvm_pvm`, the Pagetable-based VM: no hardware virtualization, guest
    /// kernel code is emulated and only a PVM-enabled guest kernel boots.
    Pvm,
}

impl HostKvm {
    /// Detects `kvm_pvm` by its module directory in sysfs.
    pub fn detect() -> HostKvm {
        if Path::new("/sys/module/kvm_pvm").exists() {
            HostKvm::Pvm
        } else {
            HostKvm::Hardware
        }
    }
}

/// `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::new("open /dev/kvm", e))?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HypervisorError::new(
                "KVM_GET_API_VERSION",
                io::Error::other(format!("API version {version}, expected 12")),
            ));
        }
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::new("KVM_CREATE_VM", e))?;
        Ok(Arc::new(KvmVm { fd }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::new("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid.as_slice().iter().map(from_kvm_cpuid).collect())
    }

    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}

struct KvmVm {
    fd: VmFd,
}

impl Vm for KvmVm {
    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: region.slot,
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.size,
            userspace_addr: region.host_addr,
            flags: 0,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the
        // VM's lifetime (this function's own safety contract).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| HypervisorError::new("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn set_tss_address(&self, addr: u64) -> Result<()> {
        self.fd
            .set_tss_address(addr as usize)
            .map_err(|e| HypervisorError::new("KVM_SET_TSS_ADDR", e))
    }

    fn create_irq_chip(&self) -> Result<()> {
        self.fd
            .create_irq_chip()
            .map_err(|e| HypervisorError::new("KVM_CREATE_IRQCHIP", e))
    }

    fn create_pit(&self) -> Result<()> {
        // The dummy speaker port keeps port 0x61 reads in the kernel.
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(config)
            .map_err(|e| HypervisorError::new("KVM_CREATE_PIT2", e))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| HypervisorError::new("KVM_IRQFD", e))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(|e| HypervisorError::new("KVM_IRQFD (deassign)", e))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = to_kvm_ioevent_address(addr);
        match datamatch {
            Some(value) => self.fd.register_ioevent(fd, &addr, value),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(|e| HypervisorError::new("KVM_IOEVENTFD", e))
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = to_kvm_ioevent_address(addr);
        match datamatch {
            Some(value) => self.fd.unregister_ioevent(fd, &addr, value),
            None => self.fd.unregister_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(|e| HypervisorError::new("KVM_IOEVENTFD (deassign)", e))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::new("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu { id, fd }))
    }
}

fn to_kvm_ioevent_address(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(port) => kvm_ioctls::IoEventAddress::Pio(port),
        IoEventAddress::Mmio(addr) => kvm_ioctls::IoEventAddress::Mmio(addr),
    }
}

struct KvmVcpu {
    id: u8,
    fd: VcpuFd,
}

/// KVM_SET_SIGNAL_MASK's argument with the kernel's 8-byte sigset_t inline.
#[repr(C)]
struct KernelSignalMask {
    len: u32,
    sigset: [u8; 8],
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u8 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        match self.fd.run() {
            Ok(exit) => Ok(from_kvm_exit(exit)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::new("KVM_RUN", e)),
        }
    }

    fn enable_kick(&mut self, signal: libc::c_int) -> Result<()> {
        // KVM_RUN runs with this mask: the thread's mask minus the kick signal.
        // Outside KVM_RUN the signal stays blocked and pending, so a kick sent
        // just before KVM_RUN still makes it return EINTR at once.
        // SAFETY: an all-zero sigset_t is a valid (empty) set to be filled.
        let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `mask` is a valid sigset_t to write the current mask into.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
        if ret != 0 {
            return Err(HypervisorError::new(
                "pthread_sigmask",
                io::Error::from_raw_os_error(ret),
            ));
        }
        // SAFETY: `mask` is an initialized sigset_t and `signal` a signal number.
        if unsafe { libc::sigdelset(&mut mask, signal) } != 0 {
            return Err(HypervisorError::new(
                "sigdelset",
                io::Error::last_os_error(),
            ));
        }
        let mut arg = KernelSignalMask {
            len: 8,
            sigset: [0; 8],
        };
        // SAFETY: glibc's sigset_t is at least 8 bytes and starts with the
        // kernel's 64-bit signal set; we copy exactly those 8 bytes.
        let kernel_set =
            unsafe { std::slice::from_raw_parts(&mask as *const libc::sigset_t as *const u8, 8) };
        arg.sigset.copy_from_slice(kernel_set);
        // SAFETY: the fd is a vCPU fd, and `arg` has the layout KVM reads for
        // KVM_SET_SIGNAL_MASK (len followed by `len` bytes of sigset).
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_SET_SIGNAL_MASK(), &arg) };
        if ret < 0 {
            return Err(HypervisorError::new(
                "KVM_SET_SIGNAL_MASK",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn get_regs(&self) -> Result<StandardRegisters> {
        self.fd
            .get_regs()
            .map_err(|e| HypervisorError::new("KVM_GET_REGS", e))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd
            .set_regs(regs)
            .map_err(|e| HypervisorError::new("KVM_SET_REGS", e))
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        self.fd
            .get_sregs()
            .map_err(|e| HypervisorError::new("KVM_GET_SREGS", e))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.fd
            .set_sregs(sregs)
            .map_err(|e| HypervisorError::new("KVM_SET_SREGS", e))
    }

    fn get_fpu(&self) -> Result<FpuState> {
        self.fd
            .get_fpu()
            .map_err(|e| HypervisorError::new("KVM_GET_FPU", e))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        self.fd
            .set_fpu(fpu)
            .map_err(|e| HypervisorError::new("KVM_SET_FPU", e))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let entries: Vec<kvm_cpuid_entry2> = entries.iter().map(to_kvm_cpuid).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|e| {
            HypervisorError::new("KVM_SET_CPUID2", io::Error::other(format!("{e:?}")))
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| HypervisorError::new("KVM_SET_CPUID2", e))
    }

    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| {
            HypervisorError::new("KVM_GET_MSRS", io::Error::other(format!("{e:?}")))
        })?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(|e| HypervisorError::new("KVM_GET_MSRS", e))?;
        if read != indices.len() {
            return Err(HypervisorError::new(
                "KVM_GET_MSRS",
                io::Error::other(format!("MSR {:#x} is not readable", indices[read])),
            ));
        }
        Ok(msrs
            .as_slice()
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect())
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|e| {
            HypervisorError::new("KVM_SET_MSRS", io::Error::other(format!("{e:?}")))
        })?;
        let written = self
            .fd
            .set_msrs(&kvm_msrs)
            .map_err(|e| HypervisorError::new("KVM_SET_MSRS", e))?;
        if written != msrs.len() {
            return Err(HypervisorError::new(
                "KVM_SET_MSRS",
                io::Error::other(format!("MSR {:#x} was refused", msrs[written].index)),
            ));
        }
        Ok(())
    }

    fn get_lapic(&self) -> Result<LapicState> {
        self.fd
            .get_lapic()
            .map_err(|e| HypervisorError::new("KVM_GET_LAPIC", e))
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        self.fd
            .set_lapic(lapic)
            .map_err(|e| HypervisorError::new("KVM_SET_LAPIC", e))
    }
}

fn from_kvm_exit(exit: VcpuExit<'_>) -> VmExit<'_> {
    match exit {
        VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
        VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
        VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
        VcpuExit::Hlt => VmExit::Hlt,
        VcpuExit::Shutdown => VmExit::Shutdown,
        VcpuExit::Intr => VmExit::Interrupted,
        VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
            KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
            KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
            other => SystemEvent::Other(other),
        }),
        VcpuExit::FailEntry(reason, _cpu) => VmExit::FailEntry { reason },
        VcpuExit::InternalError => VmExit::InternalError,
        other => VmExit::Unhandled(format!("{other:?}")),
    }
}

fn from_kvm_cpuid(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn to_kvm_cpuid(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// Whether `/dev/kvm` can be opened read-write (for messages and test guards).
pub fn kvm_device_usable() -> std::result::Result<(), io::Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
}
