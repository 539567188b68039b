//! virtio-blk: a disk image file as a block device with one request queue.
//!
//! Requests are served synchronously when the driver notifies the queue.
//! A malformed request gets VIRTIO_BLK_S_IOERR (or, without a usable status
//! byte, a used entry of length 0) and the device goes on; only a queue
//! the device cannot even return buffers to makes it need a reset.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::block_media::{Media, MediaError, MediaSlot};
use super::block_request::{
    collect_chain, parse, status_address, Request, RequestError, RequestType, SECTOR_SIZE,
};
use super::{read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 256;

/// Opening a boot disk fails as opening any disk does.
pub type BlockError = MediaError;

struct Active {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Block {
    media: Arc<MediaSlot>,
    /// VIRTIO_BLK_F_RO offered: a read-only boot disk. A slot filled later
    /// offers it not (the feature is fixed at probe); a read-only disk put
    /// there refuses writes with an I/O error instead.
    read_only_feature: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    acked_features: u64,
    active: Option<Active>,
}

/// Why a request failed after validation.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Invalid(#[from] RequestError),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("no disk in this slot")]
    NoMedia,
    #[error("disk I/O: {0}")]
    Io(#[from] io::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

impl Block {
    /// Opens `path` as the disk; `id` is what GET_ID reports (serial number).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Block, BlockError> {
        let media = Media::open(path, read_only)?;
        Ok(Block::new(MediaSlot::with(media), read_only, id))
    }

    /// A disk slot to fill after boot through `media` (capacity 0 until then).
    pub fn empty(id: &str) -> (Block, Arc<MediaSlot>) {
        let media = MediaSlot::empty();
        (Block::new(media.clone(), false, id), media)
    }

    fn new(media: Arc<MediaSlot>, read_only_feature: bool, id: &str) -> Block {
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            media,
            read_only_feature,
            id: id_bytes,
            acked_features: 0,
            active: None,
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.media.capacity_sectors()
    }

    /// Serves a validated request; returns the bytes written to guest buffers.
    fn serve(
        &self,
        disk: Option<&Media>,
        request: &Request,
        memory: &GuestMemoryMmap,
    ) -> Result<u32, ServeError> {
        // Only reads and writes have their sectors checked against the disk
        // (`parse`), which keeps this product in range; FLUSH and GET_ID
        // carry whatever sector the guest wrote, so their product may
        // overflow (a panic with overflow checks on). Found by fuzzing
        // (fuzz/regressions/virtio_block/sector-overflow-flush).
        let disk_offset = || request.sector * SECTOR_SIZE;
        let mut written = 0u32;
        match request.kind {
            RequestType::In => {
                let disk = disk.ok_or(ServeError::NoMedia)?;
                let mut offset = disk_offset();
                for segment in &request.data {
                    let mut buffer = vec![0u8; segment.len as usize];
                    disk.file.read_exact_at(&mut buffer, offset)?;
                    memory.write_slice(&buffer, segment.addr)?;
                    offset += u64::from(segment.len);
                    // Descriptors may overlap, so with a disk and guest
                    // memory of several GiB the total can pass u32.
                    written = written.saturating_add(segment.len);
                }
            }
            RequestType::Out => {
                let disk = disk.ok_or(ServeError::NoMedia)?;
                if disk.read_only {
                    return Err(ServeError::ReadOnly);
                }
                let mut offset = disk_offset();
                for segment in &request.data {
                    let mut buffer = vec![0u8; segment.len as usize];
                    memory.read_slice(&mut buffer, segment.addr)?;
                    disk.file.write_all_at(&buffer, offset)?;
                    offset += u64::from(segment.len);
                }
            }
            RequestType::Flush => {
                if let Some(disk) = disk {
                    disk.file.sync_data()?;
                }
            }
            RequestType::GetId => {
                let mut remaining: &[u8] = &self.id;
                for segment in &request.data {
                    let n = remaining.len().min(segment.len as usize);
                    memory.write_slice(&remaining[..n], segment.addr)?;
                    remaining = &remaining[n..];
                    written += n as u32;
                }
            }
            RequestType::Unsupported(_) => {}
        }
        Ok(written)
    }

    /// Handles one chain; returns the used length to report.
    fn handle_chain(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> u32 {
        let descriptors = match collect_chain(chain) {
            Ok(descriptors) => descriptors,
            // No trustworthy end of chain, so no status byte to write.
            Err(_) => return 0,
        };
        // Each request sees one disk: the slot may be filled meanwhile.
        let disk = self.media.current();
        let capacity = disk.as_ref().map_or(0, |d| d.capacity);
        let (status, written) = match parse(&descriptors, memory, capacity) {
            Ok(request) => match request.kind {
                RequestType::Unsupported(_) => (VIRTIO_BLK_S_UNSUPP, 0),
                _ => match self.serve(disk.as_deref(), &request, memory) {
                    Ok(written) => (VIRTIO_BLK_S_OK, written),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                },
            },
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        };
        match status_address(&descriptors, memory) {
            Some(address) if memory.write_obj(status as u8, address).is_ok() => {
                written.saturating_add(1)
            }
            _ => 0,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only_feature {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `capacity` (u64, sectors).
        read_config_bytes(&self.capacity_sectors().to_le_bytes(), offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.media.generation()
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in our configuration space is writable.
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        super::check_queues(&queues, &memory, 1)?;
        let queue = queues.remove(0);
        self.media.set_interrupt(Some(interrupt.clone()));
        self.active = Some(Active {
            memory,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: u16) -> Result<(), String> {
        if index != 0 {
            return Ok(());
        }
        let Some(mut active) = self.active.take() else {
            return Err("queue notified before activation".into());
        };
        let result = self.drain(&mut active);
        self.active = Some(active);
        result
    }

    fn reset(&mut self) {
        self.media.set_interrupt(None);
        self.active = None;
        self.acked_features = 0;
    }
}

impl Block {
    fn drain(&self, active: &mut Active) -> Result<(), String> {
        let mut used = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.memory) {
            let head = chain.head_index();
            let len = self.handle_chain(chain, &active.memory);
            active
                .queue
                .add_used(&active.memory, head, len)
                .map_err(|e| format!("cannot return descriptor {head}: {e}"))?;
            used = true;
        }
        let notify = used
            && active
                .queue
                .needs_notification(&active.memory)
                .map_err(|e| format!("cannot read the used-event index: {e}"))?;
        if notify {
            active
                .interrupt
                .signal_used_queue()
                .map_err(|e| format!("cannot raise the interrupt: {e}"))?;
        }
        Ok(())
    }
}
