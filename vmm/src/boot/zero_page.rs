//! The Linux boot protocol's `boot_params` ("zero page"): the setup header
//! (from the bzImage, or a minimal one for an ELF vmlinux), the command line,
//! the initrd and the e820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, Error};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::InitrdPlacement;
use crate::arch::layout::{usable_ram, CMDLINE_START, ZERO_PAGE_START};

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HEADER_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const E820_RAM: u32 = 1;

/// Fills `boot_params` for the 64-bit entry.
pub fn boot_params_for(
    header: Option<setup_header>,
    memory_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> boot_params {
    let mut params = boot_params {
        hdr: header.unwrap_or_default(),
        ..Default::default()
    };
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HEADER_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let ram = usable_ram(memory_size);
    for (slot, range) in params.e820_table.iter_mut().zip(&ram) {
        *slot = boot_e820_entry {
            addr: range.start,
            size: range.size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = ram.len() as u8;
    params
}

pub fn write(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    memory_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), Error> {
    let params = boot_params_for(header, memory_size, cmdline_len, initrd);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_cmdline_initrd_and_memory_map() {
        let initrd = InitrdPlacement {
            address: 0x7f0_0000,
            size: 0x1234,
        };
        let params = boot_params_for(None, 128 << 20, 17, Some(initrd));
        let hdr = params.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 17);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x7f0_0000, 0x1234)
        );
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ params.e820_entries }, 2);
        let second = params.e820_table[1];
        assert_eq!(({ second.addr }, { second.size }), (1 << 20, 127 << 20));
    }
}
