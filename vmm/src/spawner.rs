//! Where device worker threads come from.
//!
//! A device's worker starts when the guest driver activates the device,
//! which happens on a vCPU thread. Under seccomp a vCPU may not create
//! threads, and a thread would inherit the vCPU's filter anyway, so the
//! running VM has one thread that starts workers for the others: it gets
//! the job, creates the thread, and hands its handle back. Before the VM
//! runs (and in tests of a device alone) a [`Spawner::direct`] creates the
//! thread on the caller's own.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{Builder, JoinHandle};

use crate::seccomp::{ThreadFilters, ThreadKind};

type Job = Box<dyn FnOnce(&ThreadFilters) + Send>;

/// Starts device workers; cheap to clone (devices keep one each).
#[derive(Clone, Default)]
pub struct Spawner {
    /// None: on the caller's thread, unconfined.
    jobs: Option<Sender<Job>>,
}

/// The other end of a [`Spawner`], until [`SpawnerJobs::serve`] gives it
/// its thread.
pub struct SpawnerJobs(Receiver<Job>);

impl Spawner {
    /// Creates workers on the thread that asks.
    pub fn direct() -> Spawner {
        Spawner { jobs: None }
    }

    /// A spawner whose jobs wait for [`SpawnerJobs::serve`].
    pub fn pending() -> (Spawner, SpawnerJobs) {
        let (jobs, receiver) = mpsc::channel();
        (Spawner { jobs: Some(jobs) }, SpawnerJobs(receiver))
    }

    /// Runs `work` on a new thread named `name`, confined to the device
    /// worker filter when the VM has filters.
    pub fn spawn<T, F>(&self, name: &str, work: F) -> io::Result<JoinHandle<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let builder = Builder::new().name(name.to_owned());
        let Some(jobs) = &self.jobs else {
            return builder.spawn(work);
        };
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |filters: &ThreadFilters| {
            let filters = filters.clone();
            let spawned = builder.spawn(move || {
                filters.enter(ThreadKind::DeviceWorker);
                work()
            });
            let _ = reply.send(spawned);
        });
        let gone = || io::Error::other("the VM's thread spawner has ended");
        jobs.send(job).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

impl SpawnerJobs {
    /// Starts the spawner thread; it ends once every [`Spawner`] is gone.
    pub fn serve(self, filters: ThreadFilters) -> io::Result<JoinHandle<()>> {
        Builder::new().name("spawner".into()).spawn(move || {
            filters.enter(ThreadKind::Spawner);
            for job in self.0 {
                job(&filters);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_and_served_spawners_run_the_work() {
        let direct = Spawner::direct();
        assert_eq!(direct.spawn("t1", || 1).unwrap().join().unwrap(), 1);

        let (spawner, jobs) = Spawner::pending();
        let thread = jobs.serve(ThreadFilters::none()).unwrap();
        let handle = spawner
            .spawn("t2", || std::thread::current().name().map(str::to_owned))
            .unwrap();
        assert_eq!(handle.join().unwrap().as_deref(), Some("t2"));
        drop(spawner);
        thread.join().unwrap();
    }

    #[test]
    fn a_spawner_whose_thread_is_gone_says_so() {
        let (spawner, jobs) = Spawner::pending();
        drop(jobs);
        let error = spawner.spawn("t", || ()).unwrap_err();
        assert!(error.to_string().contains("spawner has ended"), "{error}");
    }
}
