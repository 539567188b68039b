//! Model-specific registers every vCPU starts with.

use crate::hypervisor::MsrEntry;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without it a kernel maps
/// all RAM uncached.
const MTRR_ENABLE_DEFAULT_WRITE_BACK: u64 = (1 << 11) | 6;

/// Zeroed syscall/sysenter state, TSC from 0, fast strings, write-back MTRRs.
pub fn boot_msrs() -> Vec<MsrEntry> {
    let zero = |index| MsrEntry { index, data: 0 };
    vec![
        zero(MSR_IA32_SYSENTER_CS),
        zero(MSR_IA32_SYSENTER_ESP),
        zero(MSR_IA32_SYSENTER_EIP),
        zero(MSR_STAR),
        zero(MSR_CSTAR),
        zero(MSR_KERNEL_GS_BASE),
        zero(MSR_SYSCALL_MASK),
        zero(MSR_LSTAR),
        zero(MSR_IA32_TSC),
        MsrEntry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
        },
        MsrEntry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_DEFAULT_WRITE_BACK,
        },
    ]
}
