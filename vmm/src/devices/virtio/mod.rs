//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on
//! the MMIO bus with the virtio-mmio (version 2) register layout, hands it
//! its queues when the driver is ready, and raises its interrupt line.
//! One module per device: [`balloon`], [`block`], [`net`], [`vsock`].

pub mod balloon;
pub mod block;
pub mod block_media;
pub mod block_request;
pub mod mmio;
pub mod net;
pub mod vsock;
pub mod worker_thread;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// The feature bit every modern (non-legacy) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device needs {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not ready or does not fit in guest memory")]
    InvalidQueue(usize),
    #[error("the {device} worker of a previous activation did not stop")]
    WorkerNotStopped { device: &'static str },
    #[error("the {device} device cannot create its worker's eventfds: {source}")]
    WorkerEventFds {
        device: &'static str,
        source: io::Error,
    },
    #[error("cannot start the {device} thread: {source}")]
    WorkerThread {
        device: &'static str,
        source: io::Error,
    },
}

/// What every device checks when the driver activates it: as many queues as
/// the device has, each ready and inside guest memory.
pub(crate) fn check_queues(
    queues: &[Queue],
    memory: &GuestMemoryMmap,
    expected: usize,
) -> Result<(), ActivateError> {
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    match queues.iter().position(|q| !q.is_valid(memory)) {
        Some(index) => Err(ActivateError::InvalidQueue(index)),
        None => Ok(()),
    }
}

/// The descriptors of a chain that ends properly, or `None`. The iterator
/// stops silently after queue-size descriptors (a loop), at an out-of-table
/// `next`, or at an unreadable descriptor: in each case the last one it gave
/// still says "next".
pub(crate) fn complete_chain(chain: DescriptorChain<&GuestMemoryMmap>) -> Option<Vec<Descriptor>> {
    let descriptors: Vec<Descriptor> = chain.collect();
    match descriptors.last() {
        Some(last) if !last.has_next() => Some(descriptors),
        _ => None,
    }
}

/// A device's interrupt: the virtio-mmio InterruptStatus bits and the
/// eventfd registered as the device's irqfd.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver the configuration (or device status) changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// VIRTIO_ID_* of the device.
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of the queues (from the first) the driver must set up with
    /// the features it accepted: a queue that only exists with a feature
    /// stays unused without it. All of them by default.
    fn queues_in_use(&self) -> usize {
        self.queue_max_sizes().len()
    }
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// The feature bits the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Counts changes of the configuration space the device made on its
    /// own (the transport adds its own count of driver writes), so that a
    /// driver reading it in pieces sees a change in between.
    fn config_generation(&self) -> u32 {
        0
    }
    /// One eventfd per queue, in queue order, for a device that serves its
    /// queues on its own thread: the VMM registers each as the ioeventfd
    /// of a QueueNotify write of that queue's index. Empty (the default)
    /// for devices served on the vCPU thread.
    fn queue_events(&self) -> &[EventFd] {
        &[]
    }
    /// Where a device with its own thread gets it once the VM runs (a
    /// vCPU thread activates devices but may not create threads).
    fn set_spawner(&mut self, _spawner: &crate::spawner::Spawner) {}
    /// The driver is ready: start serving `queues`.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`: process what it made available.
    /// An error means the device is broken and needs a reset.
    fn process_queue(&mut self, index: u16) -> Result<(), String>;
    /// Back to the state before activation (the driver wrote status 0).
    fn reset(&mut self);
}

/// Copies `source[offset..]` into `data`; bytes past the end read 0.
pub fn read_config_bytes(source: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(tail) = usize::try_from(offset).ok().and_then(|o| source.get(o..)) {
        let n = tail.len().min(data.len());
        data[..n].copy_from_slice(&tail[..n]);
    }
}
