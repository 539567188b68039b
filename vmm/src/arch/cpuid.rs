//! The CPUID each vCPU sees: what the hypervisor supports, plus the
//! hypervisor bit and a topology of `count` single-threaded cores in one
//! socket, with the vCPU's own APIC ID.

use crate::hypervisor::CpuidEntry;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMETERS: u32 = 4;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` items (the APIC ID shift of a level).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// The CPUID table for vCPU `id` of `count`.
pub fn vcpu_cpuid(supported: &[CpuidEntry], id: u8, count: u8) -> Vec<CpuidEntry> {
    let apic_id = u32::from(id);
    let count = u32::from(count);
    supported
        .iter()
        .map(|entry| {
            let mut e = *entry;
            match e.function {
                LEAF_FEATURES => {
                    // EBX: [31:24] initial APIC ID, [23:16] logical processors.
                    e.ebx = (e.ebx & 0xffff) | (count << 16) | (apic_id << 24);
                    e.ecx |= ECX_HYPERVISOR;
                    if count > 1 {
                        e.edx |= EDX_HTT;
                    } else {
                        e.edx &= !EDX_HTT;
                    }
                }
                LEAF_CACHE_PARAMETERS => {
                    // EAX: [31:26] cores per package - 1; [25:14] logical
                    // processors sharing the cache - 1 (only L3 is shared).
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 { count - 1 } else { 0 };
                    e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((count - 1) << 26);
                }
                LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
                    // EAX: shift to the next level's ID; EBX: processors at
                    // this level; ECX: [15:8] level type, [7:0] level number.
                    let (shift, processors, level_type) = match e.index {
                        0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                        1 => (id_bits(count), count, TOPOLOGY_LEVEL_CORE),
                        _ => (0, 0, 0),
                    };
                    e.eax = shift;
                    e.ebx = processors;
                    e.ecx = (level_type << 8) | (e.index & 0xff);
                    e.edx = apic_id;
                }
                _ => {}
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX as INDEXED;

    fn supported() -> Vec<CpuidEntry> {
        let leaf = |function, index, eax, ebx| CpuidEntry {
            function,
            index,
            flags: if function == 1 { 0 } else { INDEXED },
            eax,
            ebx,
            ..Default::default()
        };
        vec![
            leaf(1, 0, 0x806c1, 0x0010_0800),
            leaf(4, 0, 0x121, 0),
            leaf(4, 3, 0x163, 0),
            leaf(0xb, 0, 1, 2),
            leaf(0xb, 1, 4, 8),
            leaf(0xb, 2, 0, 0),
        ]
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let table = vcpu_cpuid(&supported(), 3, 4);
        let leaf1 = table.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_single_threaded_cores() {
        let table = vcpu_cpuid(&supported(), 2, 3);
        let sub = |i| {
            *table
                .iter()
                .find(|e| e.function == 0xb && e.index == i)
                .unwrap()
        };
        assert_eq!(
            (sub(0).eax, sub(0).ebx, sub(0).ecx, sub(0).edx),
            (0, 1, 0x100, 2)
        );
        assert_eq!(
            (sub(1).eax, sub(1).ebx, sub(1).ecx, sub(1).edx),
            (2, 3, 0x201, 2)
        );
        assert_eq!((sub(2).ebx, sub(2).ecx >> 8), (0, 0));
        let l3 = table
            .iter()
            .find(|e| e.function == 4 && e.index == 3)
            .unwrap();
        assert_eq!(l3.eax >> 26, 2);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        let l1 = table
            .iter()
            .find(|e| e.function == 4 && e.index == 0)
            .unwrap();
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
    }

    #[test]
    fn id_bits_rounds_up_to_a_power_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
