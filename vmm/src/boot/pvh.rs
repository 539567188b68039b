//! PVH boot information: `hvm_start_info`, the memory map and the module
//! list (the initrd), as the x86/HVM direct boot ABI defines them.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, Error};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::InitrdPlacement;
use crate::arch::layout::{
    usable_ram, CMDLINE_START, PVH_MEMMAP_START, PVH_MODLIST_START, PVH_START_INFO,
};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const START_INFO_VERSION: u32 = 1;
const MEMMAP_TYPE_RAM: u32 = 1;

pub fn write_start_info(
    mem: &GuestMemoryMmap,
    memory_size: u64,
    initrd: Option<InitrdPlacement>,
) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = usable_ram(memory_size)
        .into_iter()
        .map(|range| hvm_memmap_table_entry {
            addr: range.start,
            size: range.size,
            type_: MEMMAP_TYPE_RAM,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: START_INFO_VERSION,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.address,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
}
