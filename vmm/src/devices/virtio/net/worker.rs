//! The virtio-net device thread: waits (epoll) on the queue notifications
//! (ioeventfds), the backend's fd (edge-triggered) and a stop eventfd,
//! moves frames between the queues and the backend, and interrupts the
//! guest through the device's irqfd.
//!
//! A frame is read from the backend only once the guest has a valid rx
//! buffer in hand for it, so no frame ever waits in the device: they stay
//! in the backend (for a tap, in the kernel's queue, which drops on
//! overflow as a busy link would).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{read_tx, RxBuffer, ETH_HLEN, MAX_FRAME};
use super::tap::NetBackend;
use super::{NetStats, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::worker_thread::{
    add_used, notify_used, record_failure, Failure, WorkerError,
};
use crate::devices::virtio::VirtioInterrupt;

const TOKEN_BACKEND: u64 = 10;
const TOKEN_STOP: u64 = 11;

/// The device in error messages.
const DEVICE: &str = "virtio-net";

fn epoll_error(source: io::Error) -> WorkerError {
    WorkerError::Epoll {
        device: DEVICE,
        source,
    }
}

pub struct Worker {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    pub backend: Box<dyn NetBackend>,
    stats: Arc<NetStats>,
    rx: RxSource,
    tx_frame: Vec<u8>,
    /// Edge-triggered readiness: whether the backend may take a frame.
    writable: bool,
}

/// The receiving side of the backend.
struct RxSource {
    /// Where a frame is read to, on its way to an rx buffer.
    frame: Vec<u8>,
    /// Edge-triggered readiness: whether the backend may have a frame.
    readable: bool,
    /// The backend said it will give no more frames.
    closed: bool,
}

impl RxSource {
    fn may_have_frame(&self) -> bool {
        self.readable && !self.closed
    }

    /// Reads the next frame into `frame`: its length, or None when the
    /// backend has none now.
    fn read_frame(&mut self, backend: &mut dyn NetBackend, stats: &NetStats) -> Option<usize> {
        while self.readable && !self.closed {
            match backend.recv(&mut self.frame) {
                Ok(0) => self.closed = true,
                Ok(len) if len < ETH_HLEN => bump(&stats.rx_errors),
                Ok(len) => return Some(len),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => bump(&stats.rx_errors),
                // Until the fd signals again: a detached tap (EBADFD)
                // would otherwise fail forever.
                Err(_) => {
                    bump(&stats.rx_errors);
                    self.readable = false;
                }
            }
        }
        None
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Worker {
    /// `queues` are rx and tx, validated by the caller.
    pub fn new(
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        backend: Box<dyn NetBackend>,
        stats: Arc<NetStats>,
    ) -> Worker {
        Worker {
            memory,
            queues,
            interrupt,
            backend,
            stats,
            rx: RxSource {
                frame: vec![0u8; MAX_FRAME],
                // Frames may wait already.
                readable: true,
                closed: false,
            },
            tx_frame: Vec::with_capacity(MAX_FRAME),
            writable: true,
        }
    }

    /// Serves until `stop` is signalled or the device fails; gives the
    /// backend back so it survives a device reset.
    pub fn run(
        mut self,
        queue_events: Vec<EventFd>,
        stop: EventFd,
        failure: Failure,
    ) -> Box<dyn NetBackend> {
        if let Err(e) = self.serve(&queue_events, &stop) {
            record_failure(&failure, &e);
        }
        self.backend
    }

    fn serve(&mut self, queue_events: &[EventFd], stop: &EventFd) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(epoll_error)?;
        let add = |fd: i32, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(epoll_error)
        };
        for (index, event) in queue_events.iter().enumerate() {
            add(event.as_raw_fd(), EventSet::IN, index as u64)?;
        }
        add(stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
        // Edge-triggered: a backend with frames but no rx buffers to put
        // them in must not keep the thread spinning.
        add(
            self.backend.as_raw_fd(),
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            TOKEN_BACKEND,
        )?;
        // Notifications may have arrived before the worker started.
        self.process_tx()?;
        self.process_rx()?;
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(epoll_error(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_BACKEND => self.on_backend_event(event.events()),
                    index => {
                        // A failed read only means the count was already 0.
                        let _ = queue_events[index as usize].read();
                    }
                }
            }
            // Cheap when there is nothing to do: one look at each avail index.
            self.process_tx()?;
            self.process_rx()?;
        }
    }

    /// The backend's fd became ready (epoll event bits).
    pub fn on_backend_event(&mut self, events: u32) {
        let error = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if events & (libc::EPOLLIN as u32 | error) != 0 {
            self.rx.readable = true;
        }
        if events & (libc::EPOLLOUT as u32 | error) != 0 {
            self.writable = true;
        }
    }

    /// Sends every frame the guest queued; a malformed chain is returned
    /// (length 0), counted, and the next one served.
    pub fn process_tx(&mut self) -> Result<(), WorkerError> {
        let memory = &self.memory;
        let mut used = false;
        while self.writable {
            let queue = &mut self.queues[TX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            match read_tx(chain, memory, &mut self.tx_frame) {
                Ok(()) => match self.backend.send(&self.tx_frame) {
                    Ok(()) => {
                        bump(&self.stats.tx_frames);
                        let len = self.tx_frame.len() as u64;
                        self.stats.tx_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        // The chain stays the device's; it is read again
                        // when the backend can take it.
                        queue.go_to_previous_position();
                        if e.kind() == io::ErrorKind::WouldBlock {
                            self.writable = false;
                        }
                        continue;
                    }
                    // The backend refused the frame (a tap that is down
                    // says EIO): dropped, as a link would.
                    Err(_) => bump(&self.stats.tx_errors),
                },
                Err(_) => bump(&self.stats.tx_bad_chains),
            }
            // The device writes nothing into tx buffers.
            add_used(DEVICE, (queue, TX_QUEUE), memory, head, 0)?;
            used = true;
        }
        if used {
            self.notify(TX_QUEUE)?;
        }
        Ok(())
    }

    /// Fills the guest's rx buffers with frames from the backend.
    pub fn process_rx(&mut self) -> Result<(), WorkerError> {
        let memory = &self.memory;
        let queue = &mut self.queues[RX_QUEUE];
        let mut used = false;
        while self.rx.may_have_frame() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break; // the guest will notify when it adds buffers
            };
            let head = chain.head_index();
            let len = match RxBuffer::parse(chain, memory) {
                Ok(buffer) => {
                    let Some(frame_len) = self.rx.read_frame(self.backend.as_mut(), &self.stats)
                    else {
                        // Nothing after all: the buffer stays the guest's.
                        queue.go_to_previous_position();
                        break;
                    };
                    match buffer.write(memory, &self.rx.frame[..frame_len]) {
                        Ok(written) => {
                            bump(&self.stats.rx_frames);
                            let len = frame_len as u64;
                            self.stats.rx_bytes.fetch_add(len, Ordering::Relaxed);
                            written
                        }
                        // Too small (or unwritable after all): the frame
                        // is dropped, the buffer returned unused.
                        Err(_) => {
                            bump(&self.stats.rx_dropped);
                            0
                        }
                    }
                }
                // A malformed buffer is returned unused; no frame was read
                // for it.
                Err(_) => {
                    bump(&self.stats.rx_bad_chains);
                    0
                }
            };
            add_used(DEVICE, (queue, RX_QUEUE), memory, head, len)?;
            used = true;
        }
        if used {
            self.notify(RX_QUEUE)?;
        }
        Ok(())
    }

    fn notify(&mut self, queue: usize) -> Result<(), WorkerError> {
        notify_used(&mut self.queues[queue], &self.memory, &self.interrupt)
    }
}
