//! Guest RAM: anonymous mappings laid out around the MMIO gap and handed to
//! the hypervisor slot by slot.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::layout::ram_ranges;
use crate::hypervisor::{HypervisorError, UserMemoryRegion, Vm};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {size_mib} MiB of guest memory: {source}")]
    Allocate {
        size_mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot find the host address of guest region {slot}: {source}")]
    HostAddress {
        slot: u32,
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Register(#[from] HypervisorError),
}

/// Allocates `size` bytes of guest RAM.
pub fn allocate(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Allocate {
        size_mib: size >> 20,
        source,
    })
}

/// Maps every region of `mem` into `vm`.
///
/// `mem` must outlive the VM's use of it: the caller keeps both together
/// and drops the VM first.
pub fn register(vm: &dyn Vm, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host_addr = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|source| MemoryError::HostAddress { slot, source })?;
        let region = UserMemoryRegion {
            slot,
            guest_phys_addr: region.start_addr().0,
            size: region.len(),
            host_addr: host_addr as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which the caller keeps alive
        // (and unmoved: the mapping does not move with the struct) until the
        // VM is dropped, per this function's contract.
        unsafe { vm.set_user_memory_region(region) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::fake::FakeHypervisor;
    use crate::hypervisor::Hypervisor;

    #[test]
    fn registers_one_slot_per_region() {
        let hypervisor = FakeHypervisor::new();
        let vm = hypervisor.create_vm().unwrap();
        let mem = allocate(64 << 20).unwrap();
        register(vm.as_ref(), &mem).unwrap();
        let record = hypervisor.record();
        assert_eq!(record.memory_regions.len(), 1);
        assert_eq!(record.memory_regions[0].size, 64 << 20);
        assert_eq!(record.memory_regions[0].guest_phys_addr, 0);
    }
}
