//! virtio-blk against queues built with virtio-queue's MockSplitQueue:
//! reads, writes, flush, GET_ID, and guest chains that are wrong in every
//! way the device must survive (bad addresses, loops, zero lengths, wrong
//! directions, short buffers, sectors past the end).

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmrun_vmm::devices::virtio::block::Block;
use vmrun_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};

const MEMORY_SIZE: usize = 16 << 20;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const SECTOR: usize = 512;

struct Disk {
    file: tempfile::NamedTempFile,
}

impl Disk {
    /// A 16-sector disk; sector n is filled with byte n.
    fn new() -> Disk {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for sector in 0..16u8 {
            file.write_all(&[sector; SECTOR]).unwrap();
        }
        Disk { file }
    }

    fn sector(&self, n: u64) -> Vec<u8> {
        let mut file = self.file.reopen().unwrap();
        file.seek(SeekFrom::Start(n * SECTOR as u64)).unwrap();
        let mut data = vec![0; SECTOR];
        file.read_exact(&mut data).unwrap();
        data
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

fn write_header(memory: &GuestMemoryMmap, kind: u32, sector: u64) {
    memory
        .write_obj(kind.to_le(), GuestAddress(HEADER))
        .unwrap();
    memory.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
    memory
        .write_obj(sector.to_le(), GuestAddress(HEADER + 8))
        .unwrap();
}

/// The outcome of one request: the used entry and the status byte.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    used_len: u32,
    status: u8,
    interrupts: u64,
}

/// Puts `chain` on a fresh queue of `device`, notifies it, and reports.
fn run_chain(
    memory: &GuestMemoryMmap,
    device: &mut Block,
    chain: &[RawDescriptor],
    link: bool,
) -> Outcome {
    memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mock = MockSplitQueue::create(memory, GuestAddress(0), 16);
    if link {
        mock.build_desc_chain(chain).unwrap();
    } else {
        mock.add_desc_chains(chain, 0).unwrap();
    }
    let queue: Queue = mock.create_queue().unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
    device.reset();
    device
        .activate(memory.clone(), vec![queue], interrupt)
        .unwrap();
    device.process_queue(0).expect("the device keeps working");
    assert_eq!(
        mock.used().idx().load(),
        1,
        "the chain is returned to the driver"
    );
    let used = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(used.id(), 0);
    Outcome {
        used_len: used.len(),
        status: memory.read_obj(GuestAddress(STATUS)).unwrap(),
        interrupts: irq.read().unwrap_or(0),
    }
}

fn ok(used_len: u32) -> Outcome {
    Outcome {
        used_len,
        status: VIRTIO_BLK_S_OK as u8,
        interrupts: 1,
    }
}

fn ioerr() -> Outcome {
    Outcome {
        used_len: 1,
        status: VIRTIO_BLK_S_IOERR as u8,
        interrupts: 1,
    }
}

fn open(disk: &Disk, read_only: bool) -> Block {
    Block::open(disk.file.path(), read_only, "vmrun-disk-0").unwrap()
}

#[test]
fn reads_sectors_into_guest_buffers() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    assert_eq!(block.capacity_sectors(), 16);
    write_header(&memory, VIRTIO_BLK_T_IN, 3);
    let chain = [
        desc(HEADER, 16, 0),
        desc(DATA, 1024, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &chain, true), ok(1025));
    let mut data = vec![0u8; 1024];
    memory.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data[..512].iter().all(|&b| b == 3) && data[512..].iter().all(|&b| b == 4));
}

#[test]
fn writes_guest_buffers_to_the_disk_across_segments() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    memory
        .write_slice(&[0xaa; 512], GuestAddress(DATA))
        .unwrap();
    memory
        .write_slice(&[0xbb; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    write_header(&memory, VIRTIO_BLK_T_OUT, 14);
    let chain = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, 0),
        desc(DATA + 0x1000, 512, 0),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &chain, true), ok(1));
    assert_eq!(disk.sector(14), vec![0xaa; 512]);
    assert_eq!(disk.sector(15), vec![0xbb; 512]);
    assert_eq!(disk.sector(13), vec![13; 512]);
}

#[test]
fn flush_and_get_id() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_FLUSH, 0);
    let flush = [desc(HEADER, 16, 0), desc(STATUS, 1, WRITE)];
    assert_eq!(run_chain(&memory, &mut block, &flush, true), ok(1));

    write_header(&memory, VIRTIO_BLK_T_GET_ID, 0);
    let get_id = [
        desc(HEADER, 16, 0),
        desc(DATA, 20, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &get_id, true), ok(21));
    let mut id = [0u8; 20];
    memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"vmrun-disk-0");
}

#[test]
fn unknown_request_types_are_unsupported() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, 0x77, 0);
    let chain = [desc(HEADER, 16, 0), desc(STATUS, 1, WRITE)];
    let outcome = run_chain(&memory, &mut block, &chain, true);
    assert_eq!(outcome.status, VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(outcome.used_len, 1);
}

#[test]
fn writes_to_a_read_only_disk_fail() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, true);
    assert_ne!(block.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    write_header(&memory, VIRTIO_BLK_T_OUT, 0);
    let chain = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, 0),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &chain, true), ioerr());
    assert_eq!(disk.sector(0), vec![0; 512]);
}

#[test]
fn buffers_outside_guest_memory_are_refused() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let beyond = MEMORY_SIZE as u64 - 256;
    let chain = [
        desc(HEADER, 16, 0),
        desc(beyond, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &chain, true), ioerr());
    let far = [
        desc(HEADER, 16, 0),
        desc(u64::MAX - 100, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &far, true), ioerr());
}

#[test]
fn zero_length_buffers_are_refused() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let chain = [
        desc(HEADER, 16, 0),
        desc(DATA, 0, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &chain, true), ioerr());
}

#[test]
fn buffers_pointing_the_wrong_way_are_refused() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    // A read whose data buffer is device-readable.
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let read = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, 0),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &read, true), ioerr());
    // A write whose data buffer is device-writable: the disk is untouched.
    memory
        .write_slice(&[0xcc; 512], GuestAddress(DATA))
        .unwrap();
    write_header(&memory, VIRTIO_BLK_T_OUT, 2);
    let write = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &write, true), ioerr());
    assert_eq!(disk.sector(2), vec![2; 512]);
    // A device-writable header.
    let header = [
        desc(HEADER, 16, WRITE),
        desc(DATA, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &header, true), ioerr());
}

#[test]
fn a_read_only_status_byte_is_never_written() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let chain = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, WRITE),
        desc(STATUS, 1, 0),
    ];
    let outcome = run_chain(&memory, &mut block, &chain, true);
    assert_eq!((outcome.used_len, outcome.status), (0, 0xff));
}

#[test]
fn requests_past_the_end_of_the_disk_or_partial_sectors_fail() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_IN, 15);
    let past = [
        desc(HEADER, 16, 0),
        desc(DATA, 1024, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &past, true), ioerr());
    write_header(&memory, VIRTIO_BLK_T_IN, u64::MAX);
    let overflow = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &overflow, true), ioerr());
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let partial = [
        desc(HEADER, 16, 0),
        desc(DATA, 100, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &partial, true), ioerr());
}

#[test]
fn short_chains_and_headers_fail() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let lone = [desc(STATUS, 1, WRITE)];
    assert_eq!(run_chain(&memory, &mut block, &lone, true), ioerr());
    let short_header = [
        desc(HEADER, 8, 0),
        desc(DATA, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &short_header, true), ioerr());
    write_header(&memory, VIRTIO_BLK_T_GET_ID, 0);
    let short_id = [
        desc(HEADER, 16, 0),
        desc(DATA, 8, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &short_id, true), ioerr());
}

#[test]
fn looping_chains_are_returned_without_touching_memory() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    // Descriptor 0 -> 1 -> 0 -> ...
    let chain = [
        RawDescriptor::from(Descriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(
            STATUS,
            1,
            WRITE | VRING_DESC_F_NEXT as u16,
            0,
        )),
    ];
    let outcome = run_chain(&memory, &mut block, &chain, false);
    assert_eq!((outcome.used_len, outcome.status), (0, 0xff));
}

#[test]
fn chains_leaving_the_descriptor_table_are_returned() {
    let (disk, memory) = (Disk::new(), memory());
    let mut block = open(&disk, false);
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let chain = [RawDescriptor::from(Descriptor::new(
        HEADER,
        16,
        VRING_DESC_F_NEXT as u16,
        200,
    ))];
    let outcome = run_chain(&memory, &mut block, &chain, false);
    assert_eq!((outcome.used_len, outcome.status), (0, 0xff));
}

#[test]
fn notifying_before_activation_is_a_device_error_not_a_panic() {
    let disk = Disk::new();
    let mut block = open(&disk, false);
    assert!(block.process_queue(0).is_err());
    assert!(
        block.process_queue(5).is_ok(),
        "other queue indexes are ignored"
    );
}

/// A spare slot (CRI attaches a pod's images after its VM booted): capacity
/// 0 and I/O errors while empty; once filled, the capacity is in the
/// configuration space with a new generation, the active driver gets a
/// configuration interrupt, reads work and a read-only disk refuses writes
/// (the slot cannot offer VIRTIO_BLK_F_RO: features are fixed at probe).
#[test]
fn a_spare_slot_is_filled_while_the_driver_runs() {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
    use vmrun_vmm::devices::virtio::block_media::Media;

    let (disk, memory) = (Disk::new(), memory());
    let (mut block, slot) = Block::empty("vmrun-disk-3");
    assert_eq!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let capacity = |block: &Block| {
        let mut bytes = [0u8; 8];
        block.read_config(0, &mut bytes);
        u64::from_le_bytes(bytes)
    };
    assert_eq!((capacity(&block), block.config_generation()), (0, 0));
    write_header(&memory, VIRTIO_BLK_T_IN, 0);
    let read = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &read, true), ioerr());

    // The driver is active (run_chain left it so) when the disk arrives.
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
    let mock = MockSplitQueue::create(&memory, GuestAddress(0), 16);
    block.reset();
    block
        .activate(
            memory.clone(),
            vec![mock.create_queue().unwrap()],
            interrupt.clone(),
        )
        .unwrap();
    slot.fill(Media::open(disk.file.path(), true).unwrap())
        .unwrap();
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!((capacity(&block), block.config_generation()), (16, 1));

    write_header(&memory, VIRTIO_BLK_T_IN, 5);
    assert_eq!(run_chain(&memory, &mut block, &read, true), ok(513));
    let mut data = vec![0u8; 512];
    memory.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, vec![5; 512]);
    write_header(&memory, VIRTIO_BLK_T_OUT, 5);
    let write = [
        desc(HEADER, 16, 0),
        desc(DATA, 512, 0),
        desc(STATUS, 1, WRITE),
    ];
    assert_eq!(run_chain(&memory, &mut block, &write, true), ioerr());
    assert_eq!(disk.sector(5), vec![5; 512]);
}
