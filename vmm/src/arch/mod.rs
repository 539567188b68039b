//! x86_64 platform pieces: the guest physical layout, descriptor tables, page
//! tables, boot register state, CPUID, MSRs, LAPIC and the MP table.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod paging;
pub mod regs;
