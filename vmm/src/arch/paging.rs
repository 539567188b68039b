//! Identity page tables for the 64-bit boot protocol: 2 MiB pages over the
//! first 4 GiB, so the kernel and every MMIO device are reachable before the
//! kernel builds its own tables.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{PDPT_START, PD_COUNT, PD_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE_PAGE: u64 = 0x80;
const ENTRIES_PER_TABLE: u64 = 512;
const TWO_MIB: u64 = 2 << 20;

/// Writes PML4, PDPT and page directories; returns the CR3 value.
pub fn write_identity_tables(mem: &GuestMemoryMmap) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPT_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    for directory in 0..PD_COUNT {
        let pd = PD_START + directory * 0x1000;
        mem.write_obj(
            pd | PRESENT_WRITABLE,
            GuestAddress(PDPT_START + directory * 8),
        )?;
        let mut entries = Vec::with_capacity((ENTRIES_PER_TABLE * 8) as usize);
        for entry in 0..ENTRIES_PER_TABLE {
            let page = (directory * ENTRIES_PER_TABLE + entry) * TWO_MIB;
            entries.extend_from_slice(&(page | PRESENT_WRITABLE | HUGE_PAGE).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_first_4_gib_one_to_one() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_identity_tables(&mem).unwrap(), PML4_START);
        let walk = |virt: u64| -> u64 {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(PML4_START + ((virt >> 39) & 511) * 8))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((virt >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((virt >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83);
            (pde & !0x1f_ffff & !0x83) | (virt & 0x1f_ffff)
        };
        for virt in [0, 0x1234_5678, 0xd000_0010, 0xfee0_0000, 0xffff_fff0] {
            assert_eq!(walk(virt), virt);
        }
    }
}
