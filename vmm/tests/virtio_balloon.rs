//! virtio-balloon against queues built with virtio-queue's MockSplitQueue,
//! driven the way Linux's virtio_balloon driver drives it: free page reports
//! (device-writable ranges) and inflate requests (arrays of page numbers)
//! give the pages back (they read as zeros afterwards), and every range a
//! guest can get wrong (outside memory, unaligned, empty, the wrong
//! direction, looping chains) is skipped without touching memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmrun_vmm::devices::virtio::balloon::{
    discard, Balloon, DiscardError, DEFLATE_QUEUE, INFLATE_QUEUE, MAX_PFNS_PER_BUFFER,
    REPORTING_QUEUE, VIRTIO_BALLOON_F_REPORTING,
};
use vmrun_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

const MEMORY_SIZE: usize = 16 << 20;
const PAGE: u64 = 4096;
/// Guest RAM the tests fill and expect back as zeros (or untouched).
const RAM: u64 = 4 << 20;
const RAM_LEN: usize = 8 << 20;
/// Where inflate requests keep their page-number arrays.
const PFNS: u64 = 0x30_0000;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const FILL: u8 = 0xa5;
const REPORTING: u64 = 1 << VIRTIO_BALLOON_F_REPORTING;

fn memory() -> GuestMemoryMmap {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap();
    memory
        .write_slice(&vec![FILL; RAM_LEN], GuestAddress(RAM))
        .unwrap();
    memory
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// The bytes of guest RAM that no longer hold FILL, as (offset, len) runs.
fn zeroed_runs(memory: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut ram = vec![0u8; RAM_LEN];
    memory.read_slice(&mut ram, GuestAddress(RAM)).unwrap();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, byte) in ram.iter().enumerate() {
        if *byte == FILL {
            continue;
        }
        assert_eq!(*byte, 0, "a discarded page reads as zeros");
        let at = RAM + i as u64;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == at => *len += 1,
            _ => runs.push((at, 1)),
        }
    }
    runs
}

struct Driver {
    memory: GuestMemoryMmap,
    balloon: Balloon,
    queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    irq: EventFd,
}

impl Driver {
    /// A balloon activated like Linux does: with free page reporting
    /// accepted when `reporting`, three queues, else two.
    fn new(reporting: bool) -> Driver {
        let memory = memory();
        // The mock queues borrow the memory for their whole life.
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(memory.clone()));
        let mut balloon = Balloon::new(true);
        let features = VIRTIO_F_VERSION_1 | if reporting { REPORTING } else { 0 };
        balloon.ack_features(features);
        let count = balloon.queues_in_use();
        assert_eq!(count, if reporting { 3 } else { 2 });
        let queues: Vec<_> = (0..count as u64)
            .map(|i| MockSplitQueue::create(leaked, GuestAddress(i * 0x1_0000), 16))
            .collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let ready: Vec<Queue> = queues.iter().map(|q| q.create_queue().unwrap()).collect();
        balloon
            .activate(memory.clone(), ready, interrupt)
            .expect("the driver's queues are accepted");
        Driver {
            memory,
            balloon,
            queues,
            irq,
        }
    }

    /// Makes `chain` available on queue `index` and notifies the device;
    /// returns whether the driver was interrupted.
    fn send(&mut self, index: u16, chain: &[RawDescriptor], link: bool) -> bool {
        let mock = &self.queues[usize::from(index)];
        if link {
            mock.build_desc_chain(chain).unwrap();
        } else {
            mock.add_desc_chains(chain, 0).unwrap();
        }
        self.balloon
            .process_queue(index)
            .expect("the device keeps working");
        assert_eq!(
            mock.used().idx().load(),
            1,
            "the chain is returned to the driver"
        );
        self.irq.read().is_ok()
    }

    fn discarded(&self) -> u64 {
        self.balloon.stats().discarded_bytes.load(Ordering::Relaxed)
    }

    fn rejected(&self) -> u64 {
        self.balloon.stats().rejected_ranges.load(Ordering::Relaxed)
    }
}

#[test]
fn offers_free_page_reporting_as_a_modern_balloon_device() {
    let balloon = Balloon::new(true);
    assert_eq!(balloon.device_type(), VIRTIO_ID_BALLOON);
    assert_eq!(balloon.features(), VIRTIO_F_VERSION_1 | REPORTING);
    assert_eq!(balloon.queue_max_sizes().len(), 3);
    let plain = Balloon::new(false);
    assert_eq!(plain.features(), VIRTIO_F_VERSION_1);
    assert_eq!(plain.queue_max_sizes().len(), 2);
}

#[test]
fn reported_free_ranges_go_back_to_the_host() {
    let mut driver = Driver::new(true);
    let interrupted = driver.send(
        REPORTING_QUEUE,
        &[
            desc(RAM + 16 * PAGE, (64 * PAGE) as u32, WRITE),
            desc(RAM + (1 << 20), PAGE as u32, WRITE),
        ],
        true,
    );
    assert!(interrupted, "the driver waits for the report to be used");
    assert_eq!(
        zeroed_runs(&driver.memory),
        vec![(RAM + 16 * PAGE, 64 * PAGE), (RAM + (1 << 20), PAGE)]
    );
    assert_eq!(driver.discarded(), 65 * PAGE);
    assert_eq!(driver.rejected(), 0);
}

#[test]
fn bad_report_ranges_are_skipped_and_memory_is_untouched() {
    let bad_ranges = [
        (
            "outside guest memory",
            desc(MEMORY_SIZE as u64, PAGE as u32, WRITE),
        ),
        (
            "running past the end of guest memory",
            desc(MEMORY_SIZE as u64 - PAGE, 2 * PAGE as u32, WRITE),
        ),
        ("an unaligned start", desc(RAM + 100, PAGE as u32, WRITE)),
        ("a partial page", desc(RAM, PAGE as u32 + 1, WRITE)),
        ("zero length", desc(RAM, 0, WRITE)),
        ("device-readable", desc(RAM, PAGE as u32, 0)),
    ];
    for (what, range) in bad_ranges {
        let mut driver = Driver::new(true);
        driver.send(REPORTING_QUEUE, &[range], true);
        assert_eq!(zeroed_runs(&driver.memory), vec![], "{what}");
        assert_eq!((driver.discarded(), driver.rejected()), (0, 1), "{what}");
    }
}

#[test]
fn a_bad_range_does_not_stop_the_good_ones_in_the_same_report() {
    let mut driver = Driver::new(true);
    driver.send(
        REPORTING_QUEUE,
        &[
            desc(RAM + 3, PAGE as u32, WRITE),
            desc(RAM + 8 * PAGE, PAGE as u32, WRITE),
        ],
        true,
    );
    assert_eq!(zeroed_runs(&driver.memory), vec![(RAM + 8 * PAGE, PAGE)]);
    assert_eq!((driver.discarded(), driver.rejected()), (PAGE, 1));
}

#[test]
fn looping_or_dangling_chains_are_returned_without_touching_memory() {
    // Descriptor 0 -> 1 -> 0 -> ...
    let looping = [
        RawDescriptor::from(Descriptor::new(
            RAM,
            PAGE as u32,
            WRITE | VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(Descriptor::new(
            RAM + PAGE,
            PAGE as u32,
            WRITE | VRING_DESC_F_NEXT as u16,
            0,
        )),
    ];
    let dangling = [RawDescriptor::from(Descriptor::new(
        RAM,
        PAGE as u32,
        WRITE | VRING_DESC_F_NEXT as u16,
        200,
    ))];
    for chain in [&looping[..], &dangling[..]] {
        let mut driver = Driver::new(true);
        driver.send(REPORTING_QUEUE, chain, false);
        assert_eq!(zeroed_runs(&driver.memory), vec![]);
        assert_eq!((driver.discarded(), driver.rejected()), (0, 1));
    }
}

#[test]
fn inflated_pages_are_discarded_in_runs() {
    let mut driver = Driver::new(true);
    let first = (RAM >> 12) as u32;
    // Three consecutive pages, one apart, and one outside guest memory.
    let pfns = [first, first + 1, first + 2, first + 10, 0x00ff_ffff];
    for (i, pfn) in pfns.iter().enumerate() {
        driver
            .memory
            .write_obj(pfn.to_le(), GuestAddress(PFNS + 4 * i as u64))
            .unwrap();
    }
    driver.send(INFLATE_QUEUE, &[desc(PFNS, 4 * pfns.len() as u32, 0)], true);
    assert_eq!(
        zeroed_runs(&driver.memory),
        vec![(RAM, 3 * PAGE), (RAM + 10 * PAGE, PAGE)]
    );
    assert_eq!((driver.discarded(), driver.rejected()), (4 * PAGE, 1));
}

#[test]
fn inflate_arrays_that_are_not_whole_page_numbers_are_refused() {
    let mut driver = Driver::new(true);
    driver
        .memory
        .write_obj(((RAM >> 12) as u32).to_le(), GuestAddress(PFNS))
        .unwrap();
    // A 5-byte array, a device-writable one, and one longer than any
    // driver sends.
    driver.send(
        INFLATE_QUEUE,
        &[
            desc(PFNS, 5, 0),
            desc(PFNS, 4, WRITE),
            desc(PFNS, 4 * (MAX_PFNS_PER_BUFFER + 1), 0),
        ],
        true,
    );
    assert_eq!(zeroed_runs(&driver.memory), vec![]);
    assert_eq!(driver.rejected(), 3);
}

#[test]
fn deflate_only_returns_buffers() {
    let mut driver = Driver::new(true);
    driver
        .memory
        .write_obj(((RAM >> 12) as u32).to_le(), GuestAddress(PFNS))
        .unwrap();
    driver.send(DEFLATE_QUEUE, &[desc(PFNS, 4, 0)], true);
    assert_eq!(zeroed_runs(&driver.memory), vec![]);
}

#[test]
fn a_driver_without_reporting_runs_with_two_queues() {
    let mut driver = Driver::new(false);
    let first = (RAM >> 12) as u32;
    driver
        .memory
        .write_obj(first.to_le(), GuestAddress(PFNS))
        .unwrap();
    driver.send(INFLATE_QUEUE, &[desc(PFNS, 4, 0)], true);
    assert_eq!(zeroed_runs(&driver.memory), vec![(RAM, PAGE)]);
    assert!(
        driver.balloon.process_queue(REPORTING_QUEUE).is_ok(),
        "a queue that was not set up is ignored"
    );
}

#[test]
fn config_space_has_no_target_and_takes_actual() {
    let mut balloon = Balloon::new(true);
    let mut config = [0xffu8; 16];
    balloon.read_config(0, &mut config);
    assert_eq!(config, [0; 16]);
    balloon.write_config(4, &7u32.to_le_bytes());
    balloon.write_config(0, &9u32.to_le_bytes());
    let mut num_pages_and_actual = [0u8; 8];
    balloon.read_config(0, &mut num_pages_and_actual);
    assert_eq!(num_pages_and_actual, [0, 0, 0, 0, 7, 0, 0, 0]);
}

#[test]
fn discard_checks_alignment_and_bounds() {
    let memory = memory();
    assert_eq!(
        discard(&memory, GuestAddress(RAM), 0),
        Err(DiscardError::Unaligned { addr: RAM, len: 0 })
    );
    assert_eq!(
        discard(&memory, GuestAddress(!(PAGE - 1)), PAGE),
        Err(DiscardError::OutsideMemory {
            addr: !(PAGE - 1),
            len: PAGE
        })
    );
    assert_eq!(discard(&memory, GuestAddress(RAM), PAGE), Ok(()));
    assert_eq!(zeroed_runs(&memory), vec![(RAM, PAGE)]);
}

#[test]
fn notifying_before_activation_is_a_device_error_not_a_panic() {
    let mut balloon = Balloon::new(true);
    assert!(balloon.process_queue(REPORTING_QUEUE).is_err());
}
