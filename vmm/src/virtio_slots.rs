//! Puts virtio devices on the MMIO bus: device n gets the n-th 4 KiB window
//! from VIRTIO_MMIO_START and interrupt line VIRTIO_FIRST_IRQ + n (an irqfd),
//! and is announced to the kernel on its command line
//! (`virtio_mmio.device=4K@<base>:<irq>`, CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IOAPIC_PINS, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::devices::bus::{Bus, BusInsertError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::hypervisor::{HypervisorError, IoEventAddress, Vm};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;

/// How many virtio devices fit on the IOAPIC's remaining lines.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_FIRST_IRQ) as usize;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("at most {MAX_VIRTIO_DEVICES} virtio devices fit, not {0}")]
    TooMany(usize),
    #[error("cannot create the interrupt eventfd of virtio device {index}: {source}")]
    EventFd {
        index: usize,
        source: std::io::Error,
    },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Bus(#[from] BusInsertError),
}

/// Where one device went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
}

impl VirtioSlot {
    pub fn for_index(index: usize) -> VirtioSlot {
        VirtioSlot {
            base: VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
            irq: VIRTIO_FIRST_IRQ + index as u32,
        }
    }

    /// The kernel command-line parameter that declares this device.
    pub fn cmdline_parameter(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_SIZE >> 10,
            self.base,
            self.irq
        )
    }
}

/// Attaches `devices` in order; returns their slots.
pub fn attach(
    vm: &dyn Vm,
    memory: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<Vec<VirtioSlot>, AttachError> {
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(AttachError::TooMany(devices.len()));
    }
    let mut slots = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let slot = VirtioSlot::for_index(index);
        let irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|source| AttachError::EventFd { index, source })?;
        vm.register_irqfd(&irq, slot.irq)?;
        // A QueueNotify write of queue n signals the device's n-th eventfd
        // without leaving the guest.
        let notify = IoEventAddress::Mmio(slot.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
        for (queue, event) in device.queue_events().iter().enumerate() {
            vm.register_ioevent(event, notify, Some(queue as u32))?;
        }
        let interrupt = Arc::new(VirtioInterrupt::new(irq));
        let transport = MmioTransport::new(device, memory.clone(), interrupt);
        mmio_bus.insert(slot.base, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)))?;
        slots.push(slot);
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_windows_and_lines() {
        assert_eq!(
            VirtioSlot::for_index(0).cmdline_parameter(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            VirtioSlot::for_index(2),
            VirtioSlot {
                base: 0xd000_2000,
                irq: 7
            }
        );
        assert_eq!(VirtioSlot::for_index(MAX_VIRTIO_DEVICES - 1).irq, 23);
    }
}
