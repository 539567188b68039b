//! A guest-side virtio-vsock driver on virtio-queue's MockSplitQueue: it
//! posts rx buffers and tx packets the way Linux's driver does and reads
//! back what the device returned.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;

use virtio_queue::mock::DescriptorTable;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmrun_vmm::devices::virtio::vsock::packet::{Header, HEADER_SIZE, TYPE_STREAM};

pub const GUEST_CID: u64 = 3;
pub const HOST_CID: u64 = 2;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub use vmrun_vmm::devices::virtio::vsock::QUEUE_SIZE;
/// One rx buffer: header and a page of payload in one descriptor, as
/// Linux allocates them.
pub const RX_BUFFER: u32 = 4096 + HEADER_SIZE as u32;
const TX_AREA: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u64 = 64;
const RX_AREA: u64 = 0x200_0000;
const RX_SLOT: u64 = 0x2000;
/// Scratch space for hand-made chains.
pub const SCRATCH: u64 = 0x300_0000;
pub const MEMORY_SIZE: usize = 64 << 20;

/// A header from the guest to the host.
pub fn to_host(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// One virtqueue as the driver sees it. The descriptor table is
/// virtio-queue's mock one; the rings are laid out here, a page each,
/// because MockSplitQueue places the used ring by the avail ring's element
/// count instead of its byte size, overlapping the two for large queues.
pub struct GuestQueue {
    table: DescriptorTable<'static, GuestMemoryMmap>,
    memory: &'static GuestMemoryMmap,
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    /// Uses `[base, base + 0x3000)`.
    pub fn new(memory: &'static GuestMemoryMmap, base: u64) -> GuestQueue {
        for offset in [0x1000u64, 0x2000] {
            memory.write_obj(0u32, GuestAddress(base + offset)).unwrap();
        }
        GuestQueue {
            table: DescriptorTable::new(memory, GuestAddress(base), QUEUE_SIZE),
            memory,
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.base);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail());
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used());
        queue.set_used_ring_address(lo, hi);
        queue.set_ready(true);
        queue
    }

    /// Posts a chain built by `build(first_index)`; the descriptors go to
    /// consecutive table slots and are published as one available entry.
    pub fn add_raw(&mut self, build: impl FnOnce(u16) -> Vec<RawDescriptor>) -> u16 {
        let head = self.next_desc;
        let descriptors = build(head);
        for (i, d) in descriptors.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            self.table.store(index, *d).unwrap();
        }
        self.next_desc = (head + descriptors.len() as u16) % QUEUE_SIZE;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.memory
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the device must see the ring entry before the index.
        self.memory
            .store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail() + 2),
                Ordering::Release,
            )
            .unwrap();
        head
    }
    /// Posts `(addr, len, flags)` buffers linked into one chain.
    pub fn add(&mut self, buffers: &[(u64, u32, u16)]) -> u16 {
        let count = buffers.len();
        self.add_raw(|head| {
            buffers
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let last = i + 1 == count;
                    let flags = if last {
                        flags
                    } else {
                        flags | VRING_DESC_F_NEXT as u16
                    };
                    let next = (head + i as u16 + 1) % QUEUE_SIZE;
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
                })
                .collect()
        })
    }

    /// Used entries returned since the last call: (head, len).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx = u16::from_le(
            self.memory
                .load::<u16>(GuestAddress(self.used() + 2), Ordering::Acquire)
                .unwrap(),
        );
        let mut entries = Vec::new();
        while self.used_seen != idx {
            let element = self.used() + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
            let id: u32 = self.memory.read_obj(GuestAddress(element)).unwrap();
            let len: u32 = self.memory.read_obj(GuestAddress(element + 4)).unwrap();
            entries.push((u32::from_le(id) as u16, u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        entries
    }

    pub fn memory(&self) -> &'static GuestMemoryMmap {
        self.memory
    }
}

/// The whole driver: rx, tx and event queues plus buffer bookkeeping.
pub struct Guest {
    pub memory: &'static GuestMemoryMmap,
    pub rx: GuestQueue,
    pub tx: GuestQueue,
    pub event: GuestQueue,
    pub irq: EventFd,
    rx_buffers: HashMap<u16, u64>,
    next_rx_slot: u64,
    next_tx_slot: u64,
}

impl Guest {
    pub fn new() -> Guest {
        // Leaked so the mock queues can borrow it for 'static; tests are
        // short-lived processes.
        let memory: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap(),
        ));
        Guest {
            memory,
            rx: GuestQueue::new(memory, 0),
            tx: GuestQueue::new(memory, 0x1_0000),
            event: GuestQueue::new(memory, 0x2_0000),
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            rx_buffers: HashMap::new(),
            next_rx_slot: 0,
            next_tx_slot: 0,
        }
    }

    pub fn queues(&self) -> Vec<Queue> {
        vec![self.rx.queue(), self.tx.queue(), self.event.queue()]
    }

    /// Posts `count` rx buffers.
    pub fn give_rx(&mut self, count: usize) {
        for _ in 0..count {
            let addr = RX_AREA + (self.next_rx_slot % u64::from(QUEUE_SIZE)) * RX_SLOT;
            self.next_rx_slot += 1;
            let head = self.rx.add(&[(addr, RX_BUFFER, WRITE)]);
            self.rx_buffers.insert(head, addr);
        }
    }

    /// Posts a packet on the tx queue: header and payload in separate
    /// descriptors, as Linux sends them.
    pub fn send(&mut self, mut header: Header, data: &[u8]) {
        header.len = data.len() as u32;
        let addr = TX_AREA + (self.next_tx_slot % TX_SLOTS) * TX_SLOT;
        self.next_tx_slot += 1;
        self.memory
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        if data.is_empty() {
            self.tx.add(&[(addr, HEADER_SIZE as u32, 0)]);
        } else {
            let data_addr = addr + 0x100;
            self.memory
                .write_slice(data, GuestAddress(data_addr))
                .unwrap();
            self.tx.add(&[
                (addr, HEADER_SIZE as u32, 0),
                (data_addr, data.len() as u32, 0),
            ]);
        }
    }

    /// Packets the device delivered since the last call.
    pub fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.rx
            .take_used()
            .into_iter()
            .filter_map(|(head, len)| {
                let Some(addr) = self.rx_buffers.remove(&head) else {
                    panic!(
                        "used head {head} (len {len}) was not posted; posted: {:?}",
                        self.rx_buffers.keys()
                    );
                };
                if len == 0 {
                    return None; // returned unused
                }
                assert!(len as usize >= HEADER_SIZE, "used length {len}");
                let mut raw = [0u8; HEADER_SIZE];
                self.memory
                    .read_slice(&mut raw, GuestAddress(addr))
                    .unwrap();
                let header = Header::from_bytes(&raw);
                assert_eq!(header.len as usize, len as usize - HEADER_SIZE);
                let mut data = vec![0u8; header.len as usize];
                self.memory
                    .read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64))
                    .unwrap();
                Some((header, data))
            })
            .collect()
    }

    /// Waits (poll on the irqfd, bounded) until `done` holds for what was
    /// received so far; returns it all.
    pub fn wait_rx(
        &mut self,
        mut done: impl FnMut(&[(Header, Vec<u8>)]) -> bool,
    ) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut all = Vec::new();
        loop {
            all.extend(self.received());
            if done(&all) {
                return all;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out; received {all:?}");
            wait_readable(self.irq.as_raw_fd(), left);
            let _ = self.irq.read();
        }
    }
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

/// Blocks until `fd` is readable or `timeout` passes.
pub fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is a valid, initialized array of one entry.
    let ret = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) };
    ret > 0
}
