//! Loading a Linux kernel: an ELF vmlinux (PVH entry when it has the Xen
//! PHYS32 note, else the 64-bit boot protocol) or a bzImage, with its command
//! line, initrd and the boot information the entry protocol expects.

mod initrd;
mod pvh;
mod zero_page;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START};
use crate::arch::regs::EntryPoint;
pub use initrd::InitrdPlacement;

/// Offset of the 64-bit entry (startup_64) in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_HEADER_OFFSET: u64 = 0x202;
const BZIMAGE_HEADER_MAGIC: &[u8; 4] = b"HdrS";

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub memory_size: u64,
}

/// A kernel loaded into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub kernel_end: u64,
    pub initrd: Option<InitrdPlacement>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel { path: PathBuf, source: io::Error },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    #[error("cannot load kernel {path} (does it fit in guest memory?): {source}")]
    LoadKernel {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(loader::Error),
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd { path: PathBuf, source: io::Error },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the boot information: {0}")]
    WriteBootInfo(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File) -> io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(Some(KernelFormat::Elf));
    }
    file.seek(SeekFrom::Start(BZIMAGE_HEADER_OFFSET))?;
    if file.read_exact(&mut magic).is_ok() && &magic == BZIMAGE_HEADER_MAGIC {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads kernel, command line and initrd, and writes the boot information
/// for the entry protocol the kernel supports.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<LoadedKernel, BootError> {
    let open_error = |source| BootError::OpenKernel {
        path: spec.kernel.to_owned(),
        source,
    };
    let mut file = File::open(spec.kernel).map_err(open_error)?;
    let format = detect_format(&mut file)
        .map_err(open_error)?
        .ok_or_else(|| BootError::UnknownKernelFormat(spec.kernel.to_owned()))?;
    let load_error = |source| BootError::LoadKernel {
        path: spec.kernel.to_owned(),
        source,
    };
    let high_memory = Some(GuestAddress(HIGH_MEMORY_START));
    let (entry, kernel_end, header) = match format {
        KernelFormat::Elf => {
            let loaded = Elf::load(mem, None, &mut file, high_memory).map_err(load_error)?;
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(address) => EntryPoint::Pvh(address.0),
                _ => EntryPoint::Linux64(loaded.kernel_load.0),
            };
            (entry, loaded.kernel_end, None)
        }
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, &mut file, high_memory).map_err(load_error)?;
            let entry = EntryPoint::Linux64(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET);
            (entry, loaded.kernel_end, loaded.setup_header)
        }
    };

    let cmdline = write_cmdline(mem, spec.cmdline)?;
    let initrd = match spec.initrd {
        Some(path) => {
            let limit = header.map(|h: setup_header| u64::from(h.initrd_addr_max) + 1);
            Some(initrd::load(
                mem,
                path,
                kernel_end,
                spec.memory_size,
                limit,
            )?)
        }
        None => None,
    };

    match entry {
        EntryPoint::Pvh(_) => pvh::write_start_info(mem, spec.memory_size, initrd),
        EntryPoint::Linux64(_) => {
            zero_page::write(mem, header, spec.memory_size, cmdline.len(), initrd)
        }
    }
    .map_err(|e| BootError::WriteBootInfo(e.to_string()))?;

    Ok(LoadedKernel {
        entry,
        kernel_end,
        initrd,
    })
}

/// Writes the command line at CMDLINE_START; returns it (without NUL).
fn write_cmdline(mem: &GuestMemoryMmap, text: &str) -> Result<String, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !text.trim().is_empty() {
        cmdline
            .insert_str(text.trim())
            .map_err(BootError::Cmdline)?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BootError::WriteCmdline)?;
    Ok(text.trim().to_owned())
}
