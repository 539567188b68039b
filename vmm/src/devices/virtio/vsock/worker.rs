//! The vsock device thread: waits (epoll) on the queue notifications
//! (ioeventfds), the host sockets (the muxer's nested epoll set) and a
//! stop eventfd, moves packets between the queues and the muxer, and
//! interrupts the guest through the device's irqfd.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{read_tx, RxBuffer};
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::worker_thread::{
    add_used, notify_used, record_failure, Failure, WorkerError,
};
use crate::devices::virtio::VirtioInterrupt;

const TOKEN_STOP: u64 = 10;
const TOKEN_MUXER: u64 = 11;

/// The device in error messages.
const DEVICE: &str = "vsock";

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
    pub muxer: Muxer,
}

impl Worker {
    /// `queues` are rx, tx and event, validated by the caller.
    pub fn new(
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        muxer: Muxer,
    ) -> Worker {
        Worker {
            memory,
            queues,
            interrupt,
            muxer,
        }
    }

    /// Serves until `stop` is signalled or the device fails; gives the
    /// muxer back so the listener survives a device reset.
    pub fn run(mut self, queue_events: Vec<EventFd>, stop: EventFd, failure: Failure) -> Muxer {
        if let Err(e) = self.serve(&queue_events, &stop) {
            record_failure(&failure, &e);
        }
        self.muxer
    }

    fn serve(&mut self, queue_events: &[EventFd], stop: &EventFd) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(epoll_error)?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(epoll_error)
        };
        for (index, event) in queue_events.iter().enumerate() {
            add(event.as_raw_fd(), index as u64)?;
        }
        add(stop.as_raw_fd(), TOKEN_STOP)?;
        add(self.muxer.epoll_fd(), TOKEN_MUXER)?;
        // Notifications may have arrived before the worker started.
        self.process_tx()?;
        self.process_rx()?;
        let mut events = [EpollEvent::default(); 8];
        loop {
            // Wake up for the earliest host connect that may run out of time.
            let timeout = self.muxer.next_deadline().map_or(-1, |deadline| {
                let left = deadline.saturating_duration_since(Instant::now());
                // Rounded up, so the wait never ends just before the deadline.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            });
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(epoll_error(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_MUXER => self.muxer.process_host_events(),
                    index => {
                        // A failed read only means the count was already 0.
                        let _ = queue_events[index as usize].read();
                        if index as usize == TX_QUEUE {
                            self.process_tx()?;
                        }
                    }
                }
            }
            self.muxer.expire_connects();
            // Whatever happened may have made packets for the guest.
            self.process_rx()?;
        }
    }

    /// Takes every packet the guest sent and hands it to the muxer.
    pub fn process_tx(&mut self) -> Result<(), WorkerError> {
        let memory = &self.memory;
        let mut used = false;
        while let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(memory) {
            let head = chain.head_index();
            match read_tx(chain, memory) {
                Ok(packet) => self.muxer.send(&packet.header, &packet.data),
                Err(e) => {
                    if let Some(header) = e.header {
                        self.muxer.reject(&header);
                    }
                }
            }
            // The device writes nothing into tx buffers.
            add_used(
                DEVICE,
                (&mut self.queues[TX_QUEUE], TX_QUEUE),
                memory,
                head,
                0,
            )?;
            used = true;
        }
        if used {
            self.notify(TX_QUEUE)?;
        }
        Ok(())
    }

    /// Fills the guest's rx buffers with the packets the muxer has for it.
    pub fn process_rx(&mut self) -> Result<(), WorkerError> {
        let memory = &self.memory;
        let mut used = false;
        while self.muxer.has_rx() {
            let queue = &mut self.queues[RX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break; // the guest will notify when it adds buffers
            };
            let head = chain.head_index();
            let len = match RxBuffer::parse(chain, memory) {
                Ok(buffer) => match self.muxer.recv(buffer.capacity()) {
                    Some((header, data)) => buffer.write(memory, header, &data).unwrap_or(0),
                    None => {
                        // Nothing after all: the buffer stays the guest's.
                        queue.go_to_previous_position();
                        break;
                    }
                },
                // A malformed buffer is returned unused.
                Err(_) => 0,
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
