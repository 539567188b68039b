//! Local APIC wiring: LINT0 receives the PIC (ExtINT), LINT1 the NMI, as
//! the MP table tells the kernel.

use crate::hypervisor::LapicState;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_MODE_NMI: u32 = 0x400;
const DELIVERY_MODE_EXTINT: u32 = 0x700;

fn read_register(lapic: &LapicState, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn write_register(lapic: &mut LapicState, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

/// Sets the delivery modes of LINT0 and LINT1, keeping their other bits.
pub fn wire_local_interrupts(mut lapic: LapicState) -> LapicState {
    for (offset, mode) in [
        (APIC_LVT_LINT0, DELIVERY_MODE_EXTINT),
        (APIC_LVT_LINT1, DELIVERY_MODE_NMI),
    ] {
        let value = read_register(&lapic, offset);
        write_register(&mut lapic, offset, (value & !DELIVERY_MODE_MASK) | mode);
    }
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_extint_and_nmi_keeping_other_bits() {
        let mut lapic = LapicState::default();
        write_register(&mut lapic, APIC_LVT_LINT0, 0x0001_0000);
        let lapic = wire_local_interrupts(lapic);
        assert_eq!(read_register(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(read_register(&lapic, APIC_LVT_LINT1), 0x400);
    }
}
