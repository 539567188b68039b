//! The boot GDT and the matching segment registers.
//!
//! A descriptor is described by 16 "flags" bits: the access byte (type, S,
//! DPL, P) in bits 0-7 and the flags nibble (AVL, L, D/B, G) in bits 12-15,
//! the same layout the descriptor has in its upper dword.

use super::super::hypervisor::SegmentRegister;

pub const CODE64_FLAGS: u16 = 0xa09b; // G, L; present, code, execute/read, accessed
pub const DATA_FLAGS: u16 = 0xc093; // G, D/B; present, data, read/write, accessed
pub const TSS_FLAGS: u16 = 0x008b; // present, busy 32/64-bit TSS
pub const CODE32_FLAGS: u16 = 0xc09b; // G, D/B; present, code, execute/read, accessed

pub const CODE64_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;
pub const CODE32_SELECTOR: u16 = 0x20;

/// One descriptor of the boot GDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub flags: u16,
    pub base: u32,
    /// 20-bit limit, in pages when the G flag is set.
    pub limit: u32,
}

/// The boot GDT: null, 64-bit code, data, TSS, 32-bit code (for PVH).
pub fn boot_gdt() -> [Descriptor; 5] {
    let flat = |flags| Descriptor {
        flags,
        base: 0,
        limit: 0xfffff,
    };
    [
        Descriptor {
            flags: 0,
            base: 0,
            limit: 0,
        },
        flat(CODE64_FLAGS),
        flat(DATA_FLAGS),
        Descriptor {
            flags: TSS_FLAGS,
            base: 0,
            limit: 0x67,
        },
        flat(CODE32_FLAGS),
    ]
}

impl Descriptor {
    /// The 8-byte in-memory encoding.
    pub fn encode(&self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit);
        let flags = u64::from(self.flags);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | ((flags & 0xff) << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((flags >> 12) & 0xf) << 52)
            | (((base >> 24) & 0xff) << 56)
    }

    /// The segment register a CPU holds after loading this descriptor.
    pub fn segment(&self, selector: u16) -> SegmentRegister {
        let flag = |bit: u16| ((self.flags >> bit) & 1) as u8;
        let granular = flag(15) == 1;
        let present = flag(7);
        SegmentRegister {
            base: u64::from(self.base),
            limit: if granular {
                (self.limit << 12) | 0xfff
            } else {
                self.limit
            },
            selector,
            type_: (self.flags & 0xf) as u8,
            present,
            dpl: ((self.flags >> 5) & 3) as u8,
            db: flag(14),
            s: flag(4),
            l: flag(13),
            g: flag(15),
            avl: flag(12),
            unusable: u8::from(present == 0),
            padding: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_architectural_flat_descriptors() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0].encode(), 0);
        assert_eq!(gdt[1].encode(), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2].encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[4].encode(), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt[3].encode(), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_match_their_descriptors() {
        let gdt = boot_gdt();
        let code = gdt[1].segment(CODE64_SELECTOR);
        assert_eq!(
            (code.l, code.db, code.g, code.type_, code.s),
            (1, 0, 1, 0xb, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let code32 = gdt[4].segment(CODE32_SELECTOR);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = gdt[3].segment(TSS_SELECTOR);
        assert_eq!((tss.limit, tss.s, tss.type_, tss.g), (0x67, 0, 0xb, 0));
        assert_eq!(gdt[0].segment(0).unusable, 1);
    }
}
