//! A bus: address ranges mapped to devices, for port I/O or MMIO. The
//! ranges are fixed before the vCPUs start, so lookups need no lock; each
//! device has its own mutex because any vCPU thread may access it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the base of the range the
/// access hit; `base` tells which range (a device may own several).
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusInsertError {
    #[error("bus range at {base:#x} has zero length")]
    Empty { base: u64 },
    #[error("bus range {base:#x}+{len:#x} wraps around the address space")]
    Overflow { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

struct Range {
    len: u64,
    device: SharedDevice,
}

/// Address-range dispatch for one address space.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

/// Whether an access found a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Handled,
    /// Nothing at that address: reads see all ones, writes are dropped.
    Unclaimed,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), BusInsertError> {
        if len == 0 {
            return Err(BusInsertError::Empty { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusInsertError::Overflow { base, len })?;
        let overlapping = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(other_base, other)| **other_base + other.len > base);
        if let Some((other_base, other)) = overlapping {
            return Err(BusInsertError::Overlap {
                base,
                len,
                other_base: *other_base,
                other_len: other.len,
            });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// The device whose range holds the whole access `[addr, addr + size)`.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(size as u64)?;
        (end <= base + range.len).then_some((*base, range))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) -> Access {
        match self.find(addr, data.len()) {
            Some((base, range)) => {
                lock(&range.device).read(base, addr - base, data);
                Access::Handled
            }
            None => {
                data.fill(0xff);
                Access::Unclaimed
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Access {
        match self.find(addr, data.len()) {
            Some((base, range)) => {
                lock(&range.device).write(base, addr - base, data);
                Access::Handled
            }
            None => Access::Unclaimed,
        }
    }
}

/// A device mutex is only poisoned by a panic in another vCPU thread, which
/// ends the VM anyway; keep serving with the data as it is.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, probe.clone()).unwrap();
        bus.insert(0x60, 1, probe.clone()).unwrap();
        let mut data = [0u8; 1];
        assert_eq!(bus.read(0x3fd, &mut data), Access::Handled);
        assert_eq!(data, [5]);
        assert_eq!(bus.write(0x60, &[0xfe]), Access::Handled);
        assert_eq!(probe.lock().unwrap().writes, vec![(0x60, 0, vec![0xfe])]);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x10, Arc::new(Mutex::new(Probe::default())))
            .unwrap();
        let mut data = [0u8; 4];
        assert_eq!(bus.read(0xfff, &mut data), Access::Unclaimed);
        assert_eq!(data, [0xff; 4]);
        // An access straddling the end of a range is not the device's.
        assert_eq!(bus.read(0x100e, &mut data), Access::Unclaimed);
        assert_eq!(bus.write(0x1010, &[1]), Access::Unclaimed);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let device: SharedDevice = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x100, device.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x1ff, 1, device.clone()),
            Err(BusInsertError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x80, 0x81, device.clone()),
            Err(BusInsertError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(0x0, 0, device.clone()),
            Err(BusInsertError::Empty { base: 0 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, device.clone()),
            Err(BusInsertError::Overflow { .. })
        ));
        bus.insert(0x80, 0x80, device.clone()).unwrap();
        bus.insert(0x200, 1, device).unwrap();
    }
}
