//! The boot CPU's initial register state for the two entry protocols.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{boot_gdt, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_TOP, PVH_START_INFO, ZERO_PAGE_START,
};
use super::paging::write_identity_tables;
use crate::hypervisor::{FpuState, SpecialRegisters, StandardRegisters};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// How the boot CPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode on identity page tables,
    /// `rsi` = `boot_params`.
    Linux64(u64),
}

/// Writes the GDT, the empty IDT and (for 64-bit entry) the page tables.
pub fn write_descriptor_tables(
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<Option<u64>, GuestMemoryError> {
    for (index, descriptor) in boot_gdt().iter().enumerate() {
        mem.write_obj(
            descriptor.encode(),
            GuestAddress(BOOT_GDT_START + index as u64 * 8),
        )?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    match entry {
        EntryPoint::Linux64(_) => write_identity_tables(mem).map(Some),
        EntryPoint::Pvh(_) => Ok(None),
    }
}

/// The general-purpose registers at entry.
pub fn boot_regs(entry: EntryPoint) -> StandardRegisters {
    match entry {
        EntryPoint::Pvh(rip) => StandardRegisters {
            rip,
            rbx: PVH_START_INFO,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        EntryPoint::Linux64(rip) => StandardRegisters {
            rip,
            rsp: BOOT_STACK_TOP,
            rbp: BOOT_STACK_TOP,
            rsi: ZERO_PAGE_START,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// Updates `sregs` (as read from the vCPU) for the entry protocol; `cr3` is
/// the page-table root for 64-bit entry.
pub fn boot_sregs(
    mut sregs: SpecialRegisters,
    entry: EntryPoint,
    cr3: Option<u64>,
) -> SpecialRegisters {
    let gdt = boot_gdt();
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = gdt[(DATA_SELECTOR / 8) as usize].segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt[(TSS_SELECTOR / 8) as usize].segment(TSS_SELECTOR);

    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cs = gdt[(CODE32_SELECTOR / 8) as usize].segment(CODE32_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64(_) => {
            sregs.cs = gdt[(CODE64_SELECTOR / 8) as usize].segment(CODE64_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = cr3.unwrap_or_default();
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// The x87/SSE state Linux expects: default control word and MXCSR.
pub fn boot_fpu() -> FpuState {
    FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_is_flat_protected_mode_without_paging() {
        let sregs = boot_sregs(
            SpecialRegisters::default(),
            EntryPoint::Pvh(0x100_0000),
            None,
        );
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(
            (sregs.cs.selector, sregs.cs.db, sregs.cs.l),
            (CODE32_SELECTOR, 1, 0)
        );
        assert_eq!(sregs.efer, 0);
        let regs = boot_regs(EntryPoint::Pvh(0x100_0000));
        assert_eq!((regs.rip, regs.rbx), (0x100_0000, PVH_START_INFO));
    }

    #[test]
    fn linux64_entry_is_long_mode() {
        let sregs = boot_sregs(
            SpecialRegisters::default(),
            EntryPoint::Linux64(0x20_0000),
            Some(0x9000),
        );
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!((sregs.cr3, sregs.cr4), (0x9000, CR4_PAE));
        assert_eq!((sregs.cs.selector, sregs.cs.l), (CODE64_SELECTOR, 1));
        let regs = boot_regs(EntryPoint::Linux64(0x20_0000));
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x20_0000, ZERO_PAGE_START, BOOT_STACK_TOP)
        );
    }
}
