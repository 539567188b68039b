//! An Intel MultiProcessor Specification 1.4 table in the EBDA: how a
//! kernel without ACPI learns the CPUs, the IOAPIC and the interrupt wiring.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{EBDA_SIZE, EBDA_START, IOAPIC_PINS, IOAPIC_START, LAPIC_START};

const SPEC_REVISION: u8 = 4;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const ENTRY_SIZE: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6, as reported in the processor entries (informational).
const CPU_SIGNATURE: u32 = 6 << 8;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

/// The most vCPUs whose table fits in the 1 KiB EBDA.
pub const MAX_CPUS: u8 = 32;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table describes 1 to {MAX_CPUS} CPUs, not {0}")]
    CpuCount(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// The table's bytes for `cpus` CPUs, placed at `address`: the floating
/// pointer followed by the configuration table.
pub fn build(address: u64, cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;

    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    // ISA interrupt n arrives on IOAPIC pin n, with the bus's default
    // polarity and trigger (flags 0); KVM routes GSI n to pin n.
    for pin in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT, 0, 0, ISA_BUS_ID, pin]);
        entries.extend_from_slice(&[ioapic_id, pin]);
        entry_count += 1;
    }
    for (kind, lint) in [(INTERRUPT_EXTINT, 0u8), (INTERRUPT_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0]);
        entries.extend_from_slice(&[ALL_LOCAL_APICS, lint]);
        entry_count += 1;
    }
    debug_assert_eq!(
        entries.len(),
        usize::from(cpus) * PROCESSOR_ENTRY_SIZE
            + (entry_count as usize - usize::from(cpus)) * ENTRY_SIZE
    );

    let table_address = address + FLOATING_POINTER_SIZE as u64;
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    header.push(SPEC_REVISION);
    header.push(0); // checksum, below
    header.extend_from_slice(b"VMRUN   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_address as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REVISION);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // configuration table present, no IMCR
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` CPUs at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(EBDA_START, cpus)?;
    debug_assert!(bytes.len() as u64 <= EBDA_SIZE);
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        let bytes = build(EBDA_START, 4).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table_address = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_address, EBDA_START + 16);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let length = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(length, table.len());
        assert_eq!(sum(table), 0);
        let entries = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(entries, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn processor_entries_mark_only_cpu_0_as_boot_processor() {
        let bytes = build(EBDA_START, 3).unwrap();
        let first = 16 + HEADER_SIZE;
        for cpu in 0..3 {
            let entry = &bytes[first + cpu * PROCESSOR_ENTRY_SIZE..][..PROCESSOR_ENTRY_SIZE];
            assert_eq!((entry[0], entry[1]), (ENTRY_PROCESSOR, cpu as u8));
            assert_eq!(entry[3] & CPU_BOOT_PROCESSOR != 0, cpu == 0);
        }
    }

    #[test]
    fn the_largest_table_fits_in_the_ebda() {
        assert!(build(EBDA_START, MAX_CPUS).unwrap().len() as u64 <= EBDA_SIZE);
        assert!(matches!(
            build(EBDA_START, 0),
            Err(MpTableError::CpuCount(0))
        ));
        assert!(matches!(
            build(EBDA_START, 33),
            Err(MpTableError::CpuCount(33))
        ));
    }
}
