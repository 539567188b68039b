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
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

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

struct Running {
    stop: EventFd,
    thread: JoinHandle<Muxer>,
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    queue_events: Vec<EventFd>,
    acked_features: u64,
    /// Here while no worker runs; the worker owns it while it does.
    muxer: Option<Muxer>,
    running: Option<Running>,
    /// Why the worker stopped on its own, if it did.
    failure: Arc<Mutex<Option<String>>>,
}

impl Vsock {
    /// Binds `uds_path` at once, so host clients can connect (and wait in
    /// the backlog) before the guest driver is up.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        let muxer = Muxer::new(guest_cid, uds_path)?;
        let queue_events = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VsockError::EventFd)?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_owned(),
            queue_events,
            acked_features: 0,
            muxer: Some(muxer),
            running: None,
            failure: Arc::new(Mutex::new(None)),
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
        if let Some(muxer) = self.muxer.as_mut() {
            muxer.set_connect_timeout(timeout);
        }
    }

    /// Stops the worker and takes the muxer back.
    fn stop_worker(&mut self) {
        if let Some(running) = self.running.take() {
            // The eventfd counter cannot overflow from one write; should the
            // write fail anyway, join would hang, so only join on success.
            if running.stop.write(1).is_ok() {
                if let Ok(muxer) = running.thread.join() {
                    self.muxer = Some(muxer);
                }
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Joins the thread; dropping the muxer then removes the socket file.
        self.stop_worker();
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
        &self.queue_events
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        super::check_queues(&queues, &memory, QUEUE_SIZES.len())?;
        self.stop_worker();
        let muxer = self.muxer.take().ok_or(ActivateError::Unavailable(
            "the vsock worker of a previous activation did not stop",
        ))?;
        let Ok((events, stop, thread_stop)) = super::worker_eventfds(&self.queue_events) else {
            return self.keep(muxer);
        };
        let worker = Worker::new(memory, queues, interrupt, muxer);
        let failure = self.failure.clone();
        *failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let thread = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || worker.run(events, thread_stop, failure));
        match thread {
            Ok(thread) => {
                self.running = Some(Running { stop, thread });
                Ok(())
            }
            // The closure (and the muxer with the listener) is gone; the
            // device cannot serve again.
            Err(_) => Err(ActivateError::Unavailable("cannot start the vsock thread")),
        }
    }

    fn process_queue(&mut self, index: u16) -> Result<(), String> {
        if let Some(reason) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(reason);
        }
        if self.running.is_none() {
            return Err("queue notified before activation".into());
        }
        // Without an ioeventfd (or on a hypervisor that lacks them) the
        // transport calls us on the vCPU thread: hand over to the worker.
        match self.queue_events.get(usize::from(index)) {
            Some(event) => event.write(1).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
        if let Some(muxer) = self.muxer.as_mut() {
            muxer.reset();
        }
        self.acked_features = 0;
    }
}

impl Vsock {
    /// Activation failed before the worker took the muxer: keep it.
    fn keep(&mut self, muxer: Muxer) -> Result<(), ActivateError> {
        self.muxer = Some(muxer);
        Err(ActivateError::Unavailable(
            "cannot create the vsock eventfds",
        ))
    }
}
