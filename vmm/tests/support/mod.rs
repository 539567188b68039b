//! Shared helpers for the tests that run guests on the real /dev/kvm:
//! building tiny kernel images around flat payloads, capturing the serial
//! console, and a scratch MMIO device.

#![allow(dead_code)] // each test binary uses a different subset

pub mod guests;
pub mod net_guest;
pub mod vsock_guest;

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmrun_vmm::devices::bus::BusDevice;

/// Where payloads are loaded (and linked): 1 MiB.
pub const LOAD_ADDRESS: u64 = 0x10_0000;

/// Fails (never skips) when /dev/kvm cannot be used, naming why.
pub fn require_kvm() {
    if let Err(e) = vmrun_vmm::hypervisor::kvm::kvm_device_usable() {
        panic!(
            "this test boots a guest on the real /dev/kvm, which cannot be opened read-write: {e} \
             (run on a host with KVM, as a user with access to /dev/kvm)"
        );
    }
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// An ELF64 x86_64 executable with one loadable segment holding `code` at
/// LOAD_ADDRESS, entry at its start, and (if `pvh`) the Xen PHYS32 entry
/// note that selects the PVH boot protocol.
pub fn elf_image(code: &[u8], pvh: bool) -> Vec<u8> {
    let header_size = 64u64;
    let phdr_size = 56u64;
    let phnum: u16 = if pvh { 2 } else { 1 };
    let mut note = Vec::new();
    if pvh {
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(LOAD_ADDRESS as u32).to_le_bytes());
    }
    let note_offset = header_size + phdr_size * u64::from(phnum);
    let code_offset = (note_offset + note.len() as u64).next_multiple_of(16);

    let mut image = Vec::new();
    image.extend_from_slice(b"\x7fELF");
    image.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    image.extend_from_slice(&[0; 8]);
    image.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    image.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    image.extend_from_slice(&1u32.to_le_bytes());
    image.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // e_entry
    image.extend_from_slice(&header_size.to_le_bytes()); // e_phoff
    image.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    image.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    image.extend_from_slice(&(header_size as u16).to_le_bytes());
    image.extend_from_slice(&(phdr_size as u16).to_le_bytes());
    image.extend_from_slice(&phnum.to_le_bytes());
    image.extend_from_slice(&[0; 6]); // no section headers
    assert_eq!(image.len() as u64, header_size);

    let mut phdr = |kind: u32, offset: u64, addr: u64, size: u64| {
        image.extend_from_slice(&kind.to_le_bytes());
        image.extend_from_slice(&7u32.to_le_bytes()); // RWX
        image.extend_from_slice(&offset.to_le_bytes());
        image.extend_from_slice(&addr.to_le_bytes()); // vaddr
        image.extend_from_slice(&addr.to_le_bytes()); // paddr
        image.extend_from_slice(&size.to_le_bytes()); // filesz
        image.extend_from_slice(&size.to_le_bytes()); // memsz
        image.extend_from_slice(&16u64.to_le_bytes());
    };
    phdr(PT_LOAD, code_offset, LOAD_ADDRESS, code.len() as u64);
    if pvh {
        phdr(PT_NOTE, note_offset, 0, note.len() as u64);
    }
    image.extend_from_slice(&note);
    image.resize(code_offset as usize, 0);
    image.extend_from_slice(code);
    image
}

/// A bzImage whose protected-mode part is 0x200 bytes of padding (the
/// 32-bit entry, unused) followed by `code64` at the 64-bit entry.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    let setup_sectors = 1u8;
    let setup_size = (usize::from(setup_sectors) + 1) * 512;
    let mut image = vec![0u8; setup_size + 0x200];
    image[0x1f1] = setup_sectors;
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    image[0x211] = 1; // LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&(LOAD_ADDRESS as u32).to_le_bytes()); // code32_start
    image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    image[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    image.extend_from_slice(code64);
    image
}

/// Writes `bytes` to a temporary file that lives as long as the returned guard.
pub fn temp_file(bytes: &[u8]) -> (tempfile::TempPath, PathBuf) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(bytes).expect("write temp file");
    let path = file.into_temp_path();
    let owned = path.to_path_buf();
    (path, owned)
}

/// A console that collects what the guest prints.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A 32-bit register on the MMIO bus that reads back what was written and
/// remembers every write.
#[derive(Default)]
pub struct ScratchRegister {
    pub value: u32,
    pub writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for ScratchRegister {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
        let mut bytes = self.value.to_le_bytes();
        for (i, byte) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(offset as usize + i) {
                *slot = *byte;
            }
        }
        self.value = u32::from_le_bytes(bytes);
    }
}
