//! virtio-balloon, for free page reporting.
//!
//! A booted guest has touched far more memory than it keeps using: the
//! initramfs copy it unpacked and freed, page cache of files gone, memory of
//! exited processes. Once touched, those pages stay resident in the VMM
//! until the guest says they are free. With VIRTIO_BALLOON_F_REPORTING the
//! guest's page allocator reports large free blocks (4 MiB with our kernel)
//! on the reporting queue, and the device drops them from the VMM's mapping
//! (`MADV_DONTNEED`): the host gets the memory back, and the guest reads
//! zeros if it allocates those pages again.
//!
//! The balloon target (`num_pages`) stays 0: the host never asks for memory.
//! Pages a driver puts on the inflate queue anyway are dropped the same way;
//! the deflate queue only returns buffers.
//!
//! Every range comes from the guest and is checked: page aligned, non-empty,
//! whole pages, inside guest memory. A bad range is skipped (and counted),
//! never passed to `madvise`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::VIRTIO_F_VERSION_1;
use super::{complete_chain, read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt};

/// The guest reports free pages on the reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Inflate/deflate queues carry 32-bit page frame numbers of 4 KiB pages.
const PFN_SHIFT: u32 = 12;
const PAGE_SIZE: u64 = 1 << PFN_SHIFT;
/// Linux refuses a reporting queue shorter than its batch (32 ranges).
pub const QUEUE_SIZE: u16 = 64;

/// Linux puts at most 256 page numbers in one inflate request; a guest
/// asking for far more per buffer would only keep its own vCPU busy, but
/// there is no reason to walk it.
pub const MAX_PFNS_PER_BUFFER: u32 = 4096;

pub const INFLATE_QUEUE: u16 = 0;
pub const DEFLATE_QUEUE: u16 = 1;
/// Present only when VIRTIO_BALLOON_F_REPORTING was negotiated.
pub const REPORTING_QUEUE: u16 = 2;

/// struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id,
/// poison_val (all little-endian u32).
const CONFIG_SIZE: usize = 16;
const CONFIG_ACTUAL: u64 = 4;

/// What the device did, for status reports and tests.
#[derive(Debug, Default)]
pub struct BalloonStats {
    /// Bytes handed back to the host (reported free or inflated).
    pub discarded_bytes: AtomicU64,
    /// Guest ranges refused: unaligned, empty, outside guest memory, or in a
    /// descriptor pointing the wrong way.
    pub rejected_ranges: AtomicU64,
}

struct Active {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Balloon {
    free_page_reporting: bool,
    acked_features: u64,
    /// Pages the driver says it holds (`actual` in the config space).
    actual_pages: u32,
    stats: Arc<BalloonStats>,
    active: Option<Active>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscardError {
    #[error("range {addr:#x}+{len:#x} is not whole, aligned pages")]
    Unaligned { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("madvise(MADV_DONTNEED) failed: {0}")]
    Madvise(String),
}

impl Balloon {
    /// A balloon that offers free page reporting when `free_page_reporting`.
    pub fn new(free_page_reporting: bool) -> Self {
        Balloon {
            free_page_reporting,
            acked_features: 0,
            actual_pages: 0,
            stats: Arc::default(),
            active: None,
        }
    }

    pub fn stats(&self) -> Arc<BalloonStats> {
        self.stats.clone()
    }

    fn reporting_negotiated(&self) -> bool {
        self.acked_features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        // num_pages (0: the host wants nothing back), then actual.
        config[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        config
    }

    fn discard_counted(&self, memory: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
        match discard(memory, addr, len) {
            Ok(()) => {
                self.stats.discarded_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.rejected_ranges.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A report: each device-writable buffer is one free range.
    fn serve_report(&self, descriptors: &[Descriptor], memory: &GuestMemoryMmap) {
        for descriptor in descriptors {
            if !descriptor.is_write_only() {
                self.stats.rejected_ranges.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.discard_counted(memory, descriptor.addr(), u64::from(descriptor.len()));
        }
    }

    /// An inflate request: device-readable buffers of u32 page numbers.
    /// Runs of consecutive pages are discarded in one call.
    fn serve_inflate(&self, descriptors: &[Descriptor], memory: &GuestMemoryMmap) {
        let mut run: Option<(u64, u64)> = None;
        for descriptor in descriptors {
            if descriptor.is_write_only()
                || !descriptor.len().is_multiple_of(4)
                || descriptor.len() / 4 > MAX_PFNS_PER_BUFFER
            {
                self.stats.rejected_ranges.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for index in 0..u64::from(descriptor.len() / 4) {
                let Some(at) = descriptor.addr().checked_add(index * 4) else {
                    break;
                };
                let Ok(pfn) = memory.read_obj::<u32>(at) else {
                    self.stats.rejected_ranges.fetch_add(1, Ordering::Relaxed);
                    break;
                };
                let page = u64::from(u32::from_le(pfn)) << PFN_SHIFT;
                run = match run {
                    Some((start, len)) if start + len == page => Some((start, len + PAGE_SIZE)),
                    Some((start, len)) => {
                        self.discard_counted(memory, GuestAddress(start), len);
                        Some((page, PAGE_SIZE))
                    }
                    None => Some((page, PAGE_SIZE)),
                };
            }
        }
        if let Some((start, len)) = run {
            self.discard_counted(memory, GuestAddress(start), len);
        }
    }

    fn drain(&self, active: &mut Active, index: u16) -> Result<(), String> {
        let Active {
            memory,
            queues,
            interrupt,
        } = active;
        let Some(queue) = queues.get_mut(usize::from(index)) else {
            return Ok(());
        };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*memory) {
            let head = chain.head_index();
            match complete_chain(chain) {
                Some(descriptors) => match index {
                    INFLATE_QUEUE => self.serve_inflate(&descriptors, memory),
                    REPORTING_QUEUE => self.serve_report(&descriptors, memory),
                    _ => {}
                },
                None => {
                    self.stats.rejected_ranges.fetch_add(1, Ordering::Relaxed);
                }
            }
            queue
                .add_used(&*memory, head, 0)
                .map_err(|e| format!("cannot return descriptor {head}: {e}"))?;
            used = true;
        }
        let notify = used
            && queue
                .needs_notification(&*memory)
                .map_err(|e| format!("cannot read the used-event index: {e}"))?;
        if notify {
            interrupt
                .signal_used_queue()
                .map_err(|e| format!("cannot raise the interrupt: {e}"))?;
        }
        Ok(())
    }
}

/// Drops the guest pages `[addr, addr + len)` from the VMM's (anonymous,
/// private) guest memory mapping; the guest reads zeros there afterwards.
pub fn discard(memory: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), DiscardError> {
    let unaligned = DiscardError::Unaligned { addr: addr.0, len };
    if len == 0 || !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(unaligned);
    }
    let outside = DiscardError::OutsideMemory { addr: addr.0, len };
    let Ok(count) = usize::try_from(len) else {
        return Err(outside);
    };
    if !memory.check_range(addr, count) {
        return Err(outside);
    }
    for slice in memory.get_slices(addr, count) {
        let slice = slice.map_err(|_| outside.clone())?;
        let guard = slice.ptr_guard_mut();
        let host = guard.as_ptr();
        if !(host as usize).is_multiple_of(PAGE_SIZE as usize) {
            return Err(unaligned);
        }
        // SAFETY: the range lies in one region of `memory`'s private anonymous
        // mapping, alive while `memory` is (checked by `get_slices`); MADV_DONTNEED
        // only swaps those pages, which the guest gave up, for zero-fill ones.
        let rc = unsafe { libc::madvise(host.cast(), slice.len(), libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(DiscardError::Madvise(
                std::io::Error::last_os_error().to_string(),
            ));
        }
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        if self.free_page_reporting {
            &[QUEUE_SIZE; 3]
        } else {
            &[QUEUE_SIZE; 2]
        }
    }

    fn queues_in_use(&self) -> usize {
        if self.reporting_negotiated() {
            3
        } else {
            2
        }
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1;
        if self.free_page_reporting {
            features |= 1 << VIRTIO_BALLOON_F_REPORTING;
        }
        features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        if offset == CONFIG_ACTUAL {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.actual_pages = u32::from_le_bytes(bytes);
            }
        }
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        super::check_queues(&queues, &memory, self.queues_in_use())?;
        self.active = Some(Active {
            memory,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: u16) -> Result<(), String> {
        let Some(mut active) = self.active.take() else {
            return Err("queue notified before activation".into());
        };
        let result = self.drain(&mut active, index);
        self.active = Some(active);
        result
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.actual_pages = 0;
    }
}
