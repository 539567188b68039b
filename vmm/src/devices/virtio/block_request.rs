//! Parsing and validating one virtio-blk request from its descriptor chain.
//!
//! Everything in a chain comes from the guest and is checked before use:
//! the chain must end (no loops, no dangling `next`), every buffer must lie
//! in guest memory and be non-empty, the header must be device-readable,
//! data buffers must point the way the request type moves data, and the
//! status byte must be device-writable. A bad chain is a request error,
//! answered with an I/O error status when the status byte is usable.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

pub const SECTOR_SIZE: u64 = 512;
/// type (u32), reserved (u32), sector (u64).
const HEADER_SIZE: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read from the disk into guest buffers.
    In,
    /// Write guest buffers to the disk.
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }

    /// Whether data buffers must be device-writable (`Some(true)`),
    /// device-readable (`Some(false)`), or absent (`None`).
    fn data_writable(self) -> Option<bool> {
        match self {
            RequestType::In | RequestType::GetId => Some(true),
            RequestType::Out => Some(false),
            RequestType::Flush | RequestType::Unsupported(_) => None,
        }
    }
}

/// One guest buffer of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    pub data: Vec<Segment>,
    pub status: GuestAddress,
}

impl Request {
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error(
        "the descriptor chain loops, outgrows the queue or points outside the descriptor table"
    )]
    UnterminatedChain,
    #[error("the chain has {0} descriptors; a request needs a header and a status byte")]
    TooShort(usize),
    #[error("descriptor {index} ({addr:#x}+{len:#x}) lies outside guest memory")]
    OutOfRange { index: usize, addr: u64, len: u32 },
    #[error("descriptor {0} has zero length")]
    ZeroLength(usize),
    #[error("the request header is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("the status descriptor is not device-writable")]
    BadStatus,
    #[error("descriptor {index} points the wrong way for a {kind:?} request")]
    WrongDirection { index: usize, kind: RequestType },
    #[error("{kind:?} request has no data buffer")]
    MissingData { kind: RequestType },
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("sectors {first}..{end} are past the disk's {capacity} sectors")]
    BeyondDisk { first: u64, end: u64, capacity: u64 },
    #[error("GET_ID buffer of {0} bytes is smaller than the 20-byte ID")]
    ShortIdBuffer(u64),
    #[error("cannot read the request header")]
    ReadHeader,
}

/// The chain's descriptors, or an error if it does not end properly.
pub fn collect_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<Descriptor>, RequestError> {
    super::complete_chain(chain).ok_or(RequestError::UnterminatedChain)
}

/// The status byte's address, if the chain's last descriptor can take it.
pub fn status_address(
    descriptors: &[Descriptor],
    memory: &GuestMemoryMmap,
) -> Option<GuestAddress> {
    let last = descriptors.last()?;
    (last.is_write_only() && last.len() >= 1 && memory.check_range(last.addr(), 1))
        .then(|| last.addr())
}

/// Validates the chain as a request for a disk of `capacity` sectors.
pub fn parse(
    descriptors: &[Descriptor],
    memory: &GuestMemoryMmap,
    capacity: u64,
) -> Result<Request, RequestError> {
    if descriptors.len() < 2 {
        return Err(RequestError::TooShort(descriptors.len()));
    }
    for (index, d) in descriptors.iter().enumerate() {
        if d.len() == 0 {
            return Err(RequestError::ZeroLength(index));
        }
        if !memory.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::OutOfRange {
                index,
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    let header = descriptors[0];
    if header.is_write_only() || header.len() < HEADER_SIZE {
        return Err(RequestError::BadHeader);
    }
    let raw_type: u32 = memory
        .read_obj(header.addr())
        .map_err(|_| RequestError::ReadHeader)?;
    let sector_address = header
        .addr()
        .checked_add(8)
        .ok_or(RequestError::ReadHeader)?;
    let sector: u64 = memory
        .read_obj(sector_address)
        .map_err(|_| RequestError::ReadHeader)?;
    let kind = RequestType::from_raw(u32::from_le(raw_type));
    let sector = u64::from_le(sector);

    let status = descriptors[descriptors.len() - 1];
    if !status.is_write_only() {
        return Err(RequestError::BadStatus);
    }
    let data_descriptors = &descriptors[1..descriptors.len() - 1];
    let data: Vec<Segment> = data_descriptors
        .iter()
        .map(|d| Segment {
            addr: d.addr(),
            len: d.len(),
        })
        .collect();
    if let Some(writable) = kind.data_writable() {
        if let Some(offset) = data_descriptors
            .iter()
            .position(|d| d.is_write_only() != writable)
        {
            return Err(RequestError::WrongDirection {
                index: offset + 1,
                kind,
            });
        }
        if data.is_empty() {
            return Err(RequestError::MissingData { kind });
        }
    }
    let request = Request {
        kind,
        sector,
        data,
        status: status.addr(),
    };
    match kind {
        RequestType::In | RequestType::Out => check_disk_range(&request, capacity)?,
        RequestType::GetId if request.data_len() < u64::from(VIRTIO_BLK_ID_BYTES) => {
            return Err(RequestError::ShortIdBuffer(request.data_len()))
        }
        _ => {}
    }
    Ok(request)
}

fn check_disk_range(request: &Request, capacity: u64) -> Result<(), RequestError> {
    let len = request.data_len();
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::PartialSector(len));
    }
    let end = request.sector.checked_add(len / SECTOR_SIZE);
    match end {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::BeyondDisk {
            first: request.sector,
            end: end.unwrap_or(u64::MAX),
            capacity,
        }),
    }
}
