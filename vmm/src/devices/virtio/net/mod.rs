//! virtio-net: the guest's network card, backed by a Linux tap device.
//!
//! Deliberately plain: one rx and one tx queue, no offloads (no checksum,
//! TSO/UFO or mergeable rx buffers), so every frame travels whole with an
//! all-zero virtio_net_hdr_v1. Offloads (VIRTIO_NET_F_CSUM,
//! VIRTIO_NET_F_GUEST_*, TUNSETOFFLOAD on the tap) and
//! VIRTIO_NET_F_MRG_RXBUF may come later, for throughput.
//!
//! The device runs on its own thread ([`worker`]): queue notifications
//! arrive as ioeventfds, the tap is waited on with epoll, interrupts leave
//! through the irqfd, and the vCPU threads never move frames.

pub mod chain;
pub mod mac;
pub mod tap;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::worker_thread::WorkerThread;
use super::{read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::config::NetConfig;
use mac::MacAddr;
use tap::{NetBackend, Tap, TapError};
use worker::Worker;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the virtio-net queue eventfds: {0}")]
    EventFd(std::io::Error),
    #[error("a network device needs a tap name or a tap file descriptor")]
    NoBackend,
}

/// What the device did, for diagnostics and tests.
#[derive(Debug, Default)]
pub struct NetStats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Malformed tx chains, returned unread.
    pub tx_bad_chains: AtomicU64,
    /// Frames the backend refused.
    pub tx_errors: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Malformed rx chains, returned unused.
    pub rx_bad_chains: AtomicU64,
    /// Frames dropped because the rx buffer could not hold them.
    pub rx_dropped: AtomicU64,
    /// Failed or runt reads from the backend.
    pub rx_errors: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_bad_chains: u64,
    pub tx_errors: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_bad_chains: u64,
    pub rx_dropped: u64,
    pub rx_errors: u64,
}

impl NetStats {
    pub fn snapshot(&self) -> NetCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCounters {
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_bad_chains: get(&self.tx_bad_chains),
            tx_errors: get(&self.tx_errors),
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_bad_chains: get(&self.rx_bad_chains),
            rx_dropped: get(&self.rx_dropped),
            rx_errors: get(&self.rx_errors),
        }
    }
}

pub struct Net {
    mac: MacAddr,
    acked_features: u64,
    /// The device thread and, while it does not run, the backend.
    worker: WorkerThread<Box<dyn NetBackend>>,
    stats: Arc<NetStats>,
}

impl Net {
    /// Opens the tap `config` names (or takes over its fd); the MAC is the
    /// configured one or one derived from the tap's name.
    pub fn open(config: &NetConfig) -> Result<Net, NetError> {
        let tap = match (&config.tap, config.fd) {
            (_, Some(fd)) => Tap::from_fd(fd)?,
            (Some(name), None) => Tap::open(name)?,
            (None, None) => return Err(NetError::NoBackend),
        };
        let mac = config
            .mac
            .unwrap_or_else(|| MacAddr::derived_from(tap.name()));
        Net::new(Box::new(tap), mac)
    }

    /// A device on any backend.
    pub fn new(backend: Box<dyn NetBackend>, mac: MacAddr) -> Result<Net, NetError> {
        let worker = WorkerThread::new("virtio-net", QUEUE_SIZES.len(), backend)
            .map_err(NetError::EventFd)?;
        Ok(Net {
            mac,
            acked_features: 0,
            worker,
            stats: Arc::new(NetStats::default()),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn stats(&self) -> NetCounters {
        self.stats.snapshot()
    }

    /// Whether the device thread runs.
    pub fn is_running(&self) -> bool {
        self.worker.is_running()
    }
}

/// struct virtio_net_config up to `status`: mac[6], le16 status.
fn config_space(mac: MacAddr) -> [u8; 8] {
    let mut config = [0u8; 8];
    config[..6].copy_from_slice(&mac.0);
    config[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        // The link is always up; STATUS lets the driver see it say so.
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(self.mac), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only for a VERSION_1 driver without
        // VIRTIO_NET_F_CTRL_MAC_ADDR; nothing else is writable.
    }

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
        let stats = self.stats.clone();
        self.worker.start(move |backend, events, stop, failure| {
            Worker::new(memory, queues, interrupt, backend, stats).run(events, stop, failure)
        })
    }

    fn process_queue(&mut self, index: u16) -> Result<(), String> {
        // Without an ioeventfd the transport calls us on the vCPU thread:
        // hand over to the worker.
        self.worker.notify(index)
    }

    fn reset(&mut self) {
        // A frame waiting in the worker goes with it.
        self.worker.stop();
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn device() -> Net {
        let (backend, _peer) = UnixDatagram::pair().unwrap();
        Net::new(Box::new(backend), "52:54:00:12:34:56".parse().unwrap()).unwrap()
    }

    #[test]
    fn config_space_holds_the_mac_and_link_up() {
        let net = device();
        let mut config = [0u8; 8];
        net.read_config(0, &mut config);
        assert_eq!(config, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 1);
        let mut past = [0xffu8; 4];
        net.read_config(8, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn offers_version_1_mac_and_status_only() {
        let mut net = device();
        assert_eq!(net.device_type(), 1);
        let features = net.features();
        assert_eq!(features, (1 << 32) | (1 << 5) | (1 << 16));
        net.ack_features(u64::MAX);
        assert_eq!(net.acked_features, features);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        assert_eq!(net.queue_events().len(), 2);
        assert!(net.process_queue(0).is_err(), "not activated");
    }
}
