//! The guest physical address map. Low addresses hold the boot structures
//! the VMM writes; RAM stops below 4 GiB for a gap that holds every MMIO
//! device (virtio-mmio, IOAPIC, LAPIC) and resumes at 4 GiB.

use vm_memory::GuestAddress;

/// The GDT the boot CPU starts with (5 entries, see `gdt`).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: any exception before the kernel loads its own triple-faults.
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH `hvm_start_info`, then its module list and memory map.
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 32;
/// The Linux boot protocol's `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT and four page directories of 2 MiB
/// pages, which map the first 4 GiB (RAM and the MMIO gap).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
/// Kernel command line (Linux reads at most 2 KiB on x86).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The extended BIOS data area: the first place Linux scans for an MP table.
pub const EBDA_START: u64 = 0x9fc00;
pub const EBDA_SIZE: u64 = 0x400;
/// Where kernels are loaded (1 MiB and up).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: [3 GiB, 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Per-device windows for virtio-mmio devices, one 4 KiB page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Three pages Intel VT needs for real-mode emulation, in the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// The interrupt line of the 8250 at 0x3f8 (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// The first interrupt line handed to virtio-mmio devices.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The in-kernel IOAPIC has 24 pins.
pub const IOAPIC_PINS: u32 = 24;

// The PVH memory map must end before the zero page, and the boot stack
// grows down from between the zero page and the page tables.
const _: () = assert!(PVH_MEMMAP_START + (PVH_MEMMAP_MAX_ENTRIES * 24) as u64 <= ZERO_PAGE_START);
const _: () = assert!(BOOT_STACK_TOP < PML4_START && BOOT_STACK_TOP > ZERO_PAGE_START + 0x1000);

/// The guest RAM ranges for `size` bytes of memory: below the gap, then from
/// 4 GiB on.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// One usable-RAM entry of the memory map handed to the kernel (e820 / PVH).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
}

/// The RAM a kernel may use: low memory below the EBDA, memory from 1 MiB to
/// the gap, and memory above 4 GiB. The EBDA and the legacy VGA/BIOS hole
/// between 640 KiB and 1 MiB are left out.
pub fn usable_ram(size: u64) -> Vec<RamRange> {
    let low_end = size.min(MMIO_GAP_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: EBDA_START,
    }];
    if low_end > HIGH_MEMORY_START {
        ranges.push(RamRange {
            start: HIGH_MEMORY_START,
            size: low_end - HIGH_MEMORY_START,
        });
    }
    if size > MMIO_GAP_START {
        ranges.push(RamRange {
            start: MMIO_GAP_END,
            size: size - MMIO_GAP_START,
        });
    }
    ranges
}

/// The end of RAM below the gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_range_below_the_gap() {
        assert_eq!(
            ram_ranges(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        assert_eq!(
            usable_ram(128 * MIB),
            vec![
                RamRange {
                    start: 0,
                    size: EBDA_START
                },
                RamRange {
                    start: MIB,
                    size: 127 * MIB
                },
            ]
        );
    }

    #[test]
    fn large_memory_resumes_above_4_gib() {
        let ranges = ram_ranges(4 * GIB);
        assert_eq!(ranges[0], (GuestAddress(0), (3 * GIB) as usize));
        assert_eq!(ranges[1], (GuestAddress(4 * GIB), GIB as usize));
        assert_eq!(
            usable_ram(4 * GIB)[2],
            RamRange {
                start: 4 * GIB,
                size: GIB
            }
        );
        assert_eq!(low_ram_end(4 * GIB), 3 * GIB);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 5 * 8),
            (BOOT_IDT_START, 8),
            (PVH_START_INFO, 0x40),
            (PVH_MODLIST_START, 0x40),
            (PVH_MEMMAP_START, (PVH_MEMMAP_MAX_ENTRIES * 24) as u64),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPT_START, 0x1000),
            (PD_START, PD_COUNT * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, EBDA_SIZE),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
    }
}
