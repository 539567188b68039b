//! virtio-vsock as a Firecracker-style hybrid vsock: guest vsock streams
//! end in host unix sockets.
//!
//! Host → guest: a host client connects to `uds_path`, writes
//! `CONNECT <port>\n`, and once the guest accepted gets `OK <hostport>\n`;
//! the socket is then the stream. Guest → host: a guest connect to CID 2
//! port P is a connect to the unix socket `<uds_path>_P` (RST if nobody
//! listens there).
//!
//! The device runs on its own thread ([`worker`]): queue notifications
//! arrive as ioeventfds, interrupts leave through the irqfd, and the vCPU
//! threads never do vsock work.

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::worker_thread::WorkerThread;
use super::{read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use muxer::{Muxer, MuxerError};
use worker::Worker;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// The guest driver keeps its whole rx queue filled with 4 KiB buffers, so
/// this is guest memory every VM pays for while idle: 128 entries (512 KiB;
/// QEMU's vhost-vsock default) instead of 256 leaves half a MiB in the pod's
/// host PSS and still lets 512 KiB be in flight towards the guest.
pub const QUEUE_SIZE: u16 = 128;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    #[error("cannot create the vsock queue eventfds: {0}")]
    EventFd(std::io::Error),
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    acked_features: u64,
    /// The device thread and, while it does not run, the muxer.
    worker: WorkerThread<Muxer>,
}

impl Vsock {
    /// Binds `uds_path` at once, so host clients can connect (and wait in
    /// the backlog) before the guest driver is up.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        let muxer = Muxer::new(guest_cid, uds_path)?;
        // Dropped with the device (after its thread, if one runs), the muxer
        // removes the socket file.
        let worker =
            WorkerThread::new("vsock", QUEUE_SIZES.len(), muxer).map_err(VsockError::EventFd)?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_owned(),
            acked_features: 0,
            worker,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Replaces [`muxer::CONNECT_TIMEOUT`] for host clients accepted from
    /// now on; takes effect while the device is not running (before
    /// activation or after a reset).
    pub fn set_connect_timeout(&mut self, timeout: std::time::Duration) {
        if let Some(muxer) = self.worker.backend_mut() {
            muxer.set_connect_timeout(timeout);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn queue_events(&self) -> &[EventFd] {
        self.worker.queue_events()
    }

    fn set_spawner(&mut self, spawner: &crate::spawner::Spawner) {
        self.worker.set_spawner(spawner);
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        super::check_queues(&queues, &memory, QUEUE_SIZES.len())?;
        self.worker.start(move |muxer, events, stop, failure| {
            Worker::new(memory, queues, interrupt, muxer).run(events, stop, failure)
        })
    }

    fn process_queue(&mut self, index: u16) -> Result<(), String> {
        // Without an ioeventfd (or on a hypervisor that lacks them) the
        // transport calls us on the vCPU thread: hand over to the worker.
        self.worker.notify(index)
    }

    fn reset(&mut self) {
        self.worker.stop();
        if let Some(muxer) = self.worker.backend_mut() {
            muxer.reset();
        }
        self.acked_features = 0;
    }
}
