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
    #[error("cannot set the huge page policy of guest memory: {0}")]
    HugePages(std::io::Error),
    #[error(transparent)]
    Register(#[from] HypervisorError),
}

/// Allocates `size` bytes of guest RAM, backed by transparent huge pages
/// only when `huge_pages` (see [`set_huge_pages`]).
pub fn allocate(size: u64, huge_pages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| {
        MemoryError::Allocate {
            size_mib: size >> 20,
            source,
        }
    })?;
    set_huge_pages(&mem, huge_pages)?;
    Ok(mem)
}

/// Opts guest RAM in or out of transparent huge pages, whatever the host's
/// default. Out is the default for a microVM: with THP, every 4 KiB page the
/// guest touches costs the host a 2 MiB page (measured: an idle pod VM's RSS
/// 36.4 MiB with THP, 31.0 MiB without), and freed memory the guest reports
/// splits them again. In trades that for fewer TLB misses in the guest.
pub fn set_huge_pages(mem: &GuestMemoryMmap, huge_pages: bool) -> Result<(), MemoryError> {
    let advice = if huge_pages {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|source| MemoryError::HostAddress {
                slot: slot as u32,
                source,
            })?;
        // SAFETY: `host..host + len` is exactly the region's anonymous
        // mapping, owned by `mem`; MADV_(NO)HUGEPAGE only changes how the
        // kernel backs it, never its contents or other memory.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
        if rc != 0 {
            return Err(MemoryError::HugePages(std::io::Error::last_os_error()));
        }
    }
    Ok(())
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
        let mem = allocate(64 << 20, false).unwrap();
        register(vm.as_ref(), &mem).unwrap();
        let record = hypervisor.record();
        assert_eq!(record.memory_regions.len(), 1);
        assert_eq!(record.memory_regions[0].size, 64 << 20);
        assert_eq!(record.memory_regions[0].guest_phys_addr, 0);
    }

    /// The VmFlags line of the mapping that holds `addr` in /proc/self/smaps.
    /// It need not start there: the kernel merges the mapping with a
    /// neighbour of the same flags, e.g. another test's guest memory.
    fn vm_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_mapping = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) = (
                        usize::from_str_radix(start, 16),
                        usize::from_str_radix(end, 16),
                    ) {
                        in_mapping = (start..end).contains(&addr);
                        continue;
                    }
                }
            }
            if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| in_mapping) {
                return flags.split_whitespace().map(str::to_owned).collect();
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps");
    }

    #[test]
    fn guest_memory_opts_out_of_huge_pages_unless_asked() {
        for (huge_pages, flag) in [(false, "nh"), (true, "hg")] {
            let mem = allocate(64 << 20, huge_pages).unwrap();
            let region = mem.iter().next().unwrap();
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
            let flags = vm_flags(host as usize);
            assert!(
                flags.iter().any(|f| f == flag),
                "huge_pages={huge_pages}: VmFlags {flags:?} lack {flag}"
            );
        }
    }
}
