//! The virtio-vsock packet header and the validation of guest descriptor
//! chains that carry packets (tx) or receive them (rx).
//!
//! Everything in a chain comes from the guest. A tx chain must end (no
//! loops), every descriptor must be non-empty, inside guest memory and
//! device-readable, the first must hold the whole 44-byte header, and the
//! header's `len` must fit in the chain and in one packet. An rx chain has
//! the same rules with device-writable descriptors. A chain that breaks
//! them fails on its own: the device returns it and goes on.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// sizeof(struct virtio_vsock_hdr).
pub const HEADER_SIZE: usize = 44;
/// The largest payload one packet carries (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); a larger `len` is malformed.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// struct virtio_vsock_hdr, all fields little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet the guest sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub header: Header,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
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
    #[error("the first descriptor has {0} bytes, less than the 44-byte header")]
    ShortHeader(u32),
    #[error("the header's len {len} exceeds the {available} payload bytes of the chain")]
    LenBeyondBuffers { len: u32, available: u64 },
    #[error("the header's len {0} exceeds the 64 KiB packet limit")]
    LenTooLarge(u32),
    #[error("guest memory: {0}")]
    Memory(String),
}

/// A malformed tx chain; `header` is set when the header itself was
/// readable, so the connection it names can be reset.
#[derive(Debug, PartialEq, Eq)]
pub struct TxError {
    pub header: Option<Header>,
    pub error: PacketError,
}

/// The chain's descriptors, if it ends properly.
fn collect(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Vec<Descriptor>, PacketError> {
    super::super::complete_chain(chain).ok_or(PacketError::UnterminatedChain)
}

/// Checks that descriptor `index` is non-empty, inside guest memory and
/// points the expected way (`writable` by the device or not).
fn check(
    index: usize,
    d: &Descriptor,
    memory: &GuestMemoryMmap,
    writable: bool,
) -> Result<(), PacketError> {
    if d.len() == 0 {
        return Err(PacketError::ZeroLength(index));
    }
    if !memory.check_range(d.addr(), d.len() as usize) {
        return Err(PacketError::OutOfRange {
            index,
            addr: d.addr().0,
            len: d.len(),
        });
    }
    if d.is_write_only() != writable {
        return Err(PacketError::WrongDirection(index));
    }
    if index == 0 && d.len() < HEADER_SIZE as u32 {
        return Err(PacketError::ShortHeader(d.len()));
    }
    Ok(())
}

/// Reads and validates the packet a tx chain carries. The header is read
/// as soon as its own descriptor checks out, so that a fault further down
/// the chain can still name (and reset) the stream.
pub fn read_tx(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
) -> Result<TxPacket, TxError> {
    let no_header = |error| TxError {
        header: None,
        error,
    };
    let descriptors = collect(chain).map_err(no_header)?;
    check(0, &descriptors[0], memory, false).map_err(no_header)?;
    let mut raw = [0u8; HEADER_SIZE];
    memory
        .read_slice(&mut raw, descriptors[0].addr())
        .map_err(|e| no_header(PacketError::Memory(e.to_string())))?;
    let header = Header::from_bytes(&raw);
    let with_header = |error| TxError {
        header: Some(header),
        error,
    };
    for (index, d) in descriptors.iter().enumerate().skip(1) {
        check(index, d, memory, false).map_err(with_header)?;
    }
    if header.len > MAX_PAYLOAD {
        return Err(with_header(PacketError::LenTooLarge(header.len)));
    }
    // The payload may follow the header in the first descriptor or come in
    // the next ones.
    let segments = payload_segments(&descriptors);
    let available: u64 = segments.iter().map(|(_, len)| u64::from(*len)).sum();
    if u64::from(header.len) > available {
        return Err(with_header(PacketError::LenBeyondBuffers {
            len: header.len,
            available,
        }));
    }
    let mut data = vec![0u8; header.len as usize];
    let mut filled = 0;
    for (addr, len) in segments {
        if filled == data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - filled);
        memory
            .read_slice(&mut data[filled..filled + n], addr)
            .map_err(|e| with_header(PacketError::Memory(e.to_string())))?;
        filled += n;
    }
    Ok(TxPacket { header, data })
}

/// The buffers after the header: the rest of the first descriptor, then
/// every following one.
fn payload_segments(descriptors: &[Descriptor]) -> Vec<(GuestAddress, u32)> {
    let first = descriptors[0];
    let rest = first.len() - HEADER_SIZE as u32;
    let mut segments = Vec::with_capacity(descriptors.len());
    if rest > 0 {
        segments.push((GuestAddress(first.addr().0 + HEADER_SIZE as u64), rest));
    }
    segments.extend(descriptors[1..].iter().map(|d| (d.addr(), d.len())));
    segments
}

/// A validated rx chain: where the header goes and room for the payload.
#[derive(Debug)]
pub struct RxBuffer {
    header: GuestAddress,
    payload: Vec<(GuestAddress, u32)>,
}

impl RxBuffer {
    /// Validates an rx chain: all device-writable, the first one holding
    /// at least the header.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<RxBuffer, PacketError> {
        let descriptors = collect(chain)?;
        for (index, d) in descriptors.iter().enumerate() {
            check(index, d, memory, true)?;
        }
        Ok(RxBuffer {
            header: descriptors[0].addr(),
            payload: payload_segments(&descriptors),
        })
    }

    /// How many payload bytes fit, capped at one packet's maximum.
    pub fn capacity(&self) -> usize {
        let total: u64 = self.payload.iter().map(|(_, len)| u64::from(*len)).sum();
        total.min(u64::from(MAX_PAYLOAD)) as usize
    }

    /// Writes `header` (its `len` set to the payload's) and `data`, which
    /// must fit in [`Self::capacity`]; returns the bytes written.
    pub fn write(
        &self,
        memory: &GuestMemoryMmap,
        mut header: Header,
        data: &[u8],
    ) -> Result<u32, PacketError> {
        debug_assert!(data.len() <= self.capacity());
        header.len = data.len() as u32;
        let memory_error = |e: vm_memory::GuestMemoryError| PacketError::Memory(e.to_string());
        memory
            .write_slice(&header.to_bytes(), self.header)
            .map_err(memory_error)?;
        let mut rest = data;
        for &(addr, len) in &self.payload {
            if rest.is_empty() {
                break;
            }
            let n = (len as usize).min(rest.len());
            memory.write_slice(&rest[..n], addr).map_err(memory_error)?;
            rest = &rest[n..];
        }
        Ok((HEADER_SIZE + data.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let header = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 1024,
            len: 5,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 7,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), header);
    }
}
