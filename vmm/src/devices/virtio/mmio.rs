//! The virtio-mmio transport (virtio 1.2 section 4.2, version 2 register
//! layout): one 4 KiB window per device, registers at fixed offsets, the
//! device-specific configuration space from 0x100.
//!
//! Queue notifications are handled synchronously on the vCPU thread that
//! wrote QueueNotify.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver ("VMRN").
const VENDOR_ID: u32 = 0x4e52_4d56;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    /// Queues the driver gave a size virtio-queue refused (not a power of
    /// two, zero, or above the maximum): they must not be activated with
    /// a size the driver does not expect.
    bad_queue_sizes: Vec<bool>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = new_queues(device.as_ref());
        let bad_queue_sizes = vec![false; queues.len()];
        MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            bad_queue_sizes,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change before the driver is done.
    fn queue_writable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = new_queues(self.device.as_ref());
        self.bad_queue_sizes = vec![false; self.queues.len()];
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.acknowledge(u32::MAX);
    }

    /// Marks the device broken: the driver must reset it.
    /// The device broke (or the driver set it up wrong): the driver must
    /// reset it. Said once on stderr (the VMM's log), since a guest that
    /// loses a device often cannot say so itself.
    fn needs_reset(&mut self, why: &str) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            eprintln!(
                "vmrun-vmm: virtio {} device needs a reset: {why}",
                device_name(self.device.device_type())
            );
        }
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let _ = self.interrupt.signal_config_change();
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (besides FAILED), in order.
        let added = value & !self.status;
        if value & self.status != self.status {
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leave FEATURES_OK clear: the driver reads it back and gives up.
            self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0
        {
            self.activate();
        }
    }

    /// The driver's features are a subset of the device's and include
    /// VERSION_1 (no legacy interface).
    fn features_acceptable(&mut self) -> bool {
        let offered = self.device.features();
        if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            return false;
        }
        self.device.ack_features(self.driver_features);
        true
    }

    fn activate(&mut self) {
        let in_use = self.device.queues_in_use().min(self.queues.len());
        let valid = !self.bad_queue_sizes[..in_use].contains(&true)
            && self.queues[..in_use]
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.memory));
        if !valid {
            self.needs_reset("the driver activated it with a queue that is not ready or valid");
            return;
        }
        let mut queues = std::mem::replace(&mut self.queues, new_queues(self.device.as_ref()));
        queues.truncate(in_use);
        match self
            .device
            .activate(self.memory.clone(), queues, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(e) => self.needs_reset(&e.to_string()),
        }
    }

    fn notify(&mut self, index: u32) {
        if !self.activated {
            return;
        }
        if let Err(e) = self.device.process_queue(index as u16) {
            self.needs_reset(&e);
        }
    }

    fn set_driver_features_word(&mut self, value: u32) {
        let value = u64::from(value);
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    fn set_queue_size(&mut self, value: u32) {
        if !self.queue_writable() {
            return;
        }
        let index = self.queue_select as usize;
        if let Some(queue) = self.queues.get_mut(index) {
            let valid = u16::try_from(value)
                .is_ok_and(|size| size.is_power_of_two() && size <= queue.max_size());
            if valid {
                queue.set_size(value as u16);
            }
            self.bad_queue_sizes[index] = !valid;
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(self.device.config_generation()),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let queue_writable = self.queue_writable();
        let set_queue = |transport: &mut Self, f: &mut dyn FnMut(&mut Queue)| {
            if queue_writable {
                if let Some(queue) = transport.selected_queue() {
                    f(queue);
                }
            }
        };
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            // Features are fixed once the driver has set FEATURES_OK.
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                self.set_driver_features_word(value)
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => self.set_queue_size(value),
            VIRTIO_MMIO_QUEUE_READY => set_queue(self, &mut |q| q.set_ready(value == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                set_queue(self, &mut |q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                set_queue(self, &mut |q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                set_queue(self, &mut |q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                set_queue(self, &mut |q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                set_queue(self, &mut |q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                set_queue(self, &mut |q| q.set_used_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => {}
        }
    }
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        // Queue::new only fails for a size that is not a power of two; the
        // devices' fixed sizes are, so such a queue is left out and the
        // device then fails activation instead of panicking.
        .filter_map(|&size| Queue::new(size).ok())
        .collect()
}

/// Registers are 32 bits wide and naturally aligned; anything else is
/// ignored (reads return 0). The configuration space takes any width.
impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device
                    .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            if offset.is_multiple_of(4) {
                self.write_register(offset as u32, u32::from_le_bytes(bytes));
            }
        }
    }
}

/// A device type's name for people (VIRTIO_ID_*).
fn device_name(device_type: u32) -> String {
    use virtio_bindings::virtio_ids::*;
    match device_type {
        VIRTIO_ID_NET => "net".into(),
        VIRTIO_ID_BLOCK => "block".into(),
        VIRTIO_ID_BALLOON => "balloon".into(),
        VIRTIO_ID_VSOCK => "vsock".into(),
        other => format!("type-{other}"),
    }
}
