//! Placing the initial ramdisk: as high as possible in low memory (below the
//! kernel's `initrd_addr_max` for bzImage), page aligned, above the kernel.

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::arch::layout::low_ram_end;

const PAGE_SIZE: u64 = 4096;

/// Where the initrd went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub address: u64,
    pub size: u64,
}

/// The highest page-aligned address for `size` bytes below `limit` that
/// stays above `kernel_end`.
pub fn place(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end).then_some(start)
}

pub fn load(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    memory_size: u64,
    addr_max: Option<u64>,
) -> Result<InitrdPlacement, BootError> {
    let open_error = |source| BootError::OpenInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let size = file.metadata().map_err(open_error)?.len();
    let limit = addr_max.map_or(low_ram_end(memory_size), |max| {
        max.min(low_ram_end(memory_size))
    });
    let address = place(size, kernel_end, limit).ok_or_else(|| BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end,
        limit,
    })?;
    mem.read_exact_volatile_from(GuestAddress(address), &mut file, size as usize)
        .map_err(|source| BootError::ReadInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok(InitrdPlacement { address, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_to_the_top_page_aligned() {
        assert_eq!(
            place(0x1800, 0x20_0000, 0x800_0000),
            Some(0x800_0000 - 0x2000)
        );
        assert_eq!(
            place(0x1000, 0x20_0000, 0x800_0000),
            Some(0x800_0000 - 0x1000)
        );
    }

    #[test]
    fn refuses_to_overlap_the_kernel() {
        assert_eq!(place(0x700_0000, 0x200_0000, 0x800_0000), None);
        assert_eq!(place(0x900_0000, 0, 0x800_0000), None);
    }
}
