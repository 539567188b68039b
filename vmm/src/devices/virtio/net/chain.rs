//! The validation of guest descriptor chains that carry frames (tx) or
//! receive them (rx).
//!
//! Everything in a chain comes from the guest. A chain must end (no
//! loops, no `next` outside the table), every descriptor must be
//! non-empty, inside guest memory and point the right way: device-readable
//! for tx, device-writable for rx. A tx chain holds the 12-byte
//! virtio_net_hdr_v1 and an Ethernet frame, at most 65562 bytes in all;
//! an rx chain must hold the header and the whole frame it is given.
//! Descriptor boundaries mean nothing: the header and the frame may be
//! split anywhere (VIRTIO_F_ANY_LAYOUT is implied by VIRTIO_F_VERSION_1).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// sizeof(struct virtio_net_hdr_v1): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const VNET_HDR_SIZE: usize = 12;
/// The largest frame: a 65535-byte MTU plus the Ethernet header.
pub const MAX_FRAME: usize = 65550;
/// The largest tx chain: header and largest frame.
pub const MAX_TX_CHAIN: u64 = (VNET_HDR_SIZE + MAX_FRAME) as u64;
/// Destination, source and EtherType: no frame is shorter.
pub const ETH_HLEN: usize = 14;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error(
        "the descriptor chain loops, outgrows the queue or points outside the descriptor table"
    )]
    UnterminatedChain,
    #[error("descriptor {0} has zero length")]
    ZeroLength(usize),
    #[error("descriptor {index} ({addr:#x}+{len:#x}) lies outside guest memory")]
    OutOfRange { index: usize, addr: u64, len: u32 },
    #[error("descriptor {0} points the wrong way")]
    WrongDirection(usize),
    #[error("the chain has {0} bytes, less than the 12-byte virtio-net header")]
    ShortHeader(u64),
    #[error("the frame has {0} bytes, less than an Ethernet header")]
    ShortFrame(u64),
    #[error("the chain has {0} bytes, more than a header and the largest frame (65562)")]
    TooLarge(u64),
    #[error("the buffer holds {capacity} bytes; header and frame need {needed}")]
    TooSmall { capacity: u64, needed: u64 },
    #[error("guest memory: {0}")]
    Memory(String),
}

/// The chain's descriptors, checked one by one: non-empty, in guest
/// memory, device-`writable` or not. Returns them and their total length.
fn collect(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    writable: bool,
) -> Result<(Vec<Descriptor>, u64), ChainError> {
    let descriptors = super::super::complete_chain(chain).ok_or(ChainError::UnterminatedChain)?;
    let mut total = 0u64;
    for (index, d) in descriptors.iter().enumerate() {
        if d.len() == 0 {
            return Err(ChainError::ZeroLength(index));
        }
        if !memory.check_range(d.addr(), d.len() as usize) {
            return Err(ChainError::OutOfRange {
                index,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if d.is_write_only() != writable {
            return Err(ChainError::WrongDirection(index));
        }
        total += u64::from(d.len());
    }
    Ok((descriptors, total))
}

/// Reads the frame a tx chain carries into `frame` (replacing what it
/// held), without the header: no offloads are negotiated, so the header
/// says nothing the backend needs.
pub fn read_tx(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    frame: &mut Vec<u8>,
) -> Result<(), ChainError> {
    frame.clear();
    let (descriptors, total) = collect(chain, memory, false)?;
    if total < VNET_HDR_SIZE as u64 {
        return Err(ChainError::ShortHeader(total));
    }
    if total > MAX_TX_CHAIN {
        return Err(ChainError::TooLarge(total));
    }
    let frame_len = total - VNET_HDR_SIZE as u64;
    if frame_len < ETH_HLEN as u64 {
        return Err(ChainError::ShortFrame(frame_len));
    }
    frame.resize(frame_len as usize, 0);
    let mut skip = VNET_HDR_SIZE as u64;
    let mut filled = 0;
    for d in descriptors {
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        // Inside the descriptor's range, which is inside guest memory.
        let addr = GuestAddress(d.addr().0 + skip);
        let n = (len - skip) as usize;
        skip = 0;
        memory
            .read_slice(&mut frame[filled..filled + n], addr)
            .map_err(|e| ChainError::Memory(e.to_string()))?;
        filled += n;
    }
    Ok(())
}

/// A validated rx chain: the device-writable buffers a frame goes into.
#[derive(Debug)]
pub struct RxBuffer {
    segments: Vec<(GuestAddress, u32)>,
    capacity: u64,
}

impl RxBuffer {
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<RxBuffer, ChainError> {
        let (descriptors, capacity) = collect(chain, memory, true)?;
        Ok(RxBuffer {
            segments: descriptors.iter().map(|d| (d.addr(), d.len())).collect(),
            capacity,
        })
    }

    /// Bytes the chain holds, header included.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Writes the header (all zeros but `num_buffers` = 1) and `frame`;
    /// returns the bytes written, the used length to report.
    pub fn write(&self, memory: &GuestMemoryMmap, frame: &[u8]) -> Result<u32, ChainError> {
        let needed = (VNET_HDR_SIZE + frame.len()) as u64;
        if needed > self.capacity {
            return Err(ChainError::TooSmall {
                capacity: self.capacity,
                needed,
            });
        }
        let mut header = [0u8; VNET_HDR_SIZE];
        header[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
        let mut parts = [&header[..], frame];
        let mut part = 0;
        for &(addr, len) in &self.segments {
            let mut offset = 0usize;
            while offset < len as usize && part < parts.len() {
                let source = &mut parts[part];
                let n = source.len().min(len as usize - offset);
                memory
                    .write_slice(&source[..n], GuestAddress(addr.0 + offset as u64))
                    .map_err(|e| ChainError::Memory(e.to_string()))?;
                *source = &source[n..];
                offset += n;
                if source.is_empty() {
                    part += 1;
                }
            }
            if part == parts.len() {
                break;
            }
        }
        Ok(needed as u32)
    }
}
