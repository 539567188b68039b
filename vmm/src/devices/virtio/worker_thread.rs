//! The thread a device's queues are served on (virtio-net, vsock), and the
//! backend it owns while it runs.
//!
//! A device keeps its backend (a tap, the vsock muxer) while stopped; on
//! activation the backend moves to a new thread, which gets the queues'
//! notifications as ioeventfds and a stop eventfd, and hands the backend
//! back when told to stop, so a reset device can be activated again. If the
//! thread ends on its own (an error that breaks the device), it says why,
//! and every later queue notification fails with that reason: a broken
//! device fails, the VMM goes on.

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, VirtioInterrupt};
use crate::spawner::Spawner;

/// Where the thread leaves why it stopped on its own.
pub type Failure = Arc<Mutex<Option<String>>>;

/// A failure that stops a device thread (the driver must reset the device).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot set up the {device} epoll set: {source}")]
    Epoll {
        device: &'static str,
        source: io::Error,
    },
    #[error("cannot return a buffer to {device} queue {queue}: {error}")]
    Used {
        device: &'static str,
        queue: usize,
        error: String,
    },
    #[error("cannot interrupt the guest: {0}")]
    Interrupt(io::Error),
}

/// Leaves `error` as the reason the thread stopped, for the device's next
/// queue notification to report.
pub fn record_failure(failure: &Failure, error: &WorkerError) {
    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
}

/// Puts a chain the device is done with on the used ring of `queue` (the
/// device's queue `index`), `len` bytes written into it.
pub fn add_used(
    device: &'static str,
    (queue, index): (&mut Queue, usize),
    memory: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), WorkerError> {
    queue
        .add_used(memory, head, len)
        .map_err(|e| WorkerError::Used {
            device,
            queue: index,
            error: e.to_string(),
        })
}

/// Interrupts the guest for new used buffers in `queue`, unless the driver
/// asked not to be (VIRTIO_RING_F_EVENT_IDX or VRING_AVAIL_F_NO_INTERRUPT);
/// when that cannot be read, it is interrupted.
pub fn notify_used(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
) -> Result<(), WorkerError> {
    if queue.needs_notification(memory).unwrap_or(true) {
        interrupt
            .signal_used_queue()
            .map_err(WorkerError::Interrupt)?;
    }
    Ok(())
}

struct Running<B> {
    stop: EventFd,
    thread: JoinHandle<B>,
}

pub struct WorkerThread<B: Send + 'static> {
    /// The thread's name, also the device in error messages.
    name: &'static str,
    queue_events: Vec<EventFd>,
    /// Here while no thread runs; the thread owns it while it does.
    backend: Option<B>,
    running: Option<Running<B>>,
    failure: Failure,
    spawner: Spawner,
}

impl<B: Send + 'static> WorkerThread<B> {
    /// A stopped worker with one queue eventfd per queue.
    pub fn new(name: &'static str, queues: usize, backend: B) -> io::Result<Self> {
        let queue_events = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(WorkerThread {
            name,
            queue_events,
            backend: Some(backend),
            running: None,
            failure: Arc::new(Mutex::new(None)),
            spawner: Spawner::direct(),
        })
    }

    /// Where the thread comes from once the VM runs (see [`Spawner`]).
    pub fn set_spawner(&mut self, spawner: &Spawner) {
        self.spawner = spawner.clone();
    }

    /// The eventfds the transport registers as the queues' ioeventfds.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The backend, while no thread runs.
    pub fn backend_mut(&mut self) -> Option<&mut B> {
        self.backend.as_mut()
    }

    /// Whether the thread runs.
    pub fn is_running(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|running| !running.thread.is_finished())
    }

    /// Stops a running thread, then runs `serve` on a new one with the
    /// backend, clones of the queue eventfds, a stop eventfd and the failure
    /// slot; `serve` returns the backend when it ends.
    pub fn start<F>(&mut self, serve: F) -> Result<(), ActivateError>
    where
        F: FnOnce(B, Vec<EventFd>, EventFd, Failure) -> B + Send + 'static,
    {
        self.stop();
        let device = self.name;
        let backend = self
            .backend
            .take()
            .ok_or(ActivateError::WorkerNotStopped { device })?;
        let eventfds = (|| {
            let events = self
                .queue_events
                .iter()
                .map(EventFd::try_clone)
                .collect::<io::Result<Vec<_>>>()?;
            let stop = EventFd::new(libc::EFD_NONBLOCK)?;
            let thread_stop = stop.try_clone()?;
            Ok::<_, io::Error>((events, stop, thread_stop))
        })();
        let (events, stop, thread_stop) = match eventfds {
            Ok(fds) => fds,
            Err(source) => {
                self.backend = Some(backend);
                return Err(ActivateError::WorkerEventFds { device, source });
            }
        };
        let failure = self.failure.clone();
        *failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let thread = self
            .spawner
            .spawn(device, move || serve(backend, events, thread_stop, failure))
            // The closure, and the backend with it, is gone: the device
            // cannot serve again.
            .map_err(|source| ActivateError::WorkerThread { device, source })?;
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    /// Passes a queue notification the transport got on a vCPU thread (no
    /// ioeventfd) to the thread; fails if the thread stopped on its own or
    /// never started.
    pub fn notify(&self, queue: u16) -> Result<(), String> {
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
        match self.queue_events.get(usize::from(queue)) {
            Some(event) => event.write(1).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Stops the thread and takes the backend back.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // The eventfd counter cannot overflow from one write; should the
            // write fail anyway, join would hang, so only join on success.
            if running.stop.write(1).is_ok() {
                if let Ok(backend) = running.thread.join() {
                    self.backend = Some(backend);
                }
            }
        }
    }
}

impl<B: Send + 'static> Drop for WorkerThread<B> {
    fn drop(&mut self) {
        // The backend comes back from its thread and is dropped with `self`.
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that counts notifications until stopped (those that came
    /// before the stop included), or fails at once when its backend says so.
    fn serve(mut count: u64, events: Vec<EventFd>, stop: EventFd, failure: Failure) -> u64 {
        if count == u64::MAX {
            *failure.lock().unwrap() = Some("the backend broke".into());
            return count;
        }
        loop {
            let stopping = stop.read().is_ok();
            for event in &events {
                if let Ok(n) = event.read() {
                    count += n;
                }
            }
            if stopping {
                return count;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_backend_comes_back_after_stop_and_serves_again() {
        let mut worker = WorkerThread::new("test", 2, 0u64).unwrap();
        assert_eq!(
            worker.notify(0).unwrap_err(),
            "queue notified before activation"
        );
        worker.start(serve).unwrap();
        assert!(
            worker.backend_mut().is_none(),
            "the thread owns the backend"
        );
        worker.notify(1).unwrap();
        worker.notify(7).unwrap(); // no such queue: ignored
        worker.stop();
        assert!(!worker.is_running());
        assert_eq!(
            *worker.backend_mut().unwrap(),
            1,
            "the notification reached the thread"
        );
        worker.start(serve).unwrap();
        assert!(worker.is_running());
    }

    #[test]
    fn a_thread_that_failed_makes_notifications_fail_with_its_reason() {
        let mut worker = WorkerThread::new("test", 1, u64::MAX).unwrap();
        worker.start(serve).unwrap();
        while worker.is_running() {
            std::thread::yield_now();
        }
        assert_eq!(worker.notify(0).unwrap_err(), "the backend broke");
        // Stop collects the backend; a new start clears the failure.
        worker.stop();
        *worker.backend_mut().unwrap() = 0;
        worker.start(serve).unwrap();
        worker.notify(0).unwrap();
    }
}
