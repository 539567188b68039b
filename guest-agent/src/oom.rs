//! `OomEvents`: an event each time the OOM killer kills in a container's
//! cgroup, i.e. its kill counter (`oom_kill` in v2 `memory.events`, or in
//! v1 `memory.oom_control`, through the container library's cgroup
//! interface) goes up.
//!
//! The counters are polled every [`POLL_INTERVAL`] while at least one
//! stream is open: one small cgroupfs read per running container, the
//! same code for v1 and v2, and no per-container inotify or eventfd
//! registrations to manage. A kill that ends a container's init is also
//! published as soon as the init is reaped, before `WaitProcess` reports
//! it, and counters are read once more just before a container's removal,
//! so short-lived containers are not missed between two polls.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::Status;
use vmrun_proto::v1::OomEvent;

use crate::containers::Containers;

/// How often the kill counters are read while a stream is open.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Events buffered per stream before a slow client misses some.
const BACKLOG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum OomEventsError {
    #[error("OOM events of sandbox {wanted:?}: not found; this guest has {has}")]
    SandboxNotFound { wanted: String, has: String },
}

impl From<OomEventsError> for Status {
    fn from(e: OomEventsError) -> Self {
        match e {
            OomEventsError::SandboxNotFound { .. } => Status::not_found(e.to_string()),
        }
    }
}

pub(crate) type OomEventStream = Pin<Box<dyn Stream<Item = Result<OomEvent, Status>> + Send>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_time_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The kill counts already reported, and the streams to report new ones to.
#[derive(Debug)]
pub(crate) struct OomMonitor {
    tx: broadcast::Sender<OomEvent>,
    /// Per running container, the kill count reported so far.
    seen: Mutex<HashMap<String, u64>>,
    /// Whether a poller runs; changed only together with subscribing (see
    /// `subscribe` and `keep_polling`), so a new stream never finds a
    /// poller that is just about to stop.
    polling: Mutex<bool>,
}

impl OomMonitor {
    pub(crate) fn new() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            seen: Mutex::new(HashMap::new()),
            polling: Mutex::new(false),
        }
    }

    /// Starts tracking a container from its current count.
    pub(crate) fn baseline(&self, id: &str, count: u64) {
        lock(&self.seen).insert(id.to_string(), count);
    }

    /// Records a container's current count and, with `publish`, sends an
    /// event when it went up. Ignored for containers not (or no longer)
    /// tracked, so a late read after removal cannot resurrect one.
    pub(crate) fn observe(&self, id: &str, count: u64) {
        self.update(id, count, true);
    }

    fn update(&self, id: &str, count: u64, publish: bool) {
        let mut seen = lock(&self.seen);
        let Some(last) = seen.get_mut(id) else { return };
        if count <= *last {
            return;
        }
        *last = count;
        if publish {
            tracing::warn!(container = id, oom_kills = count, "OOM kill");
            // No receivers is fine: nobody asked.
            let _ = self.tx.send(OomEvent {
                container_id: id.to_string(),
                timestamp_ns: unix_time_ns(),
                oom_kills: count,
            });
        }
    }

    pub(crate) fn forget(&self, id: &str) {
        lock(&self.seen).remove(id);
    }

    /// A new receiver, and whether the caller must start the poller.
    fn subscribe(&self) -> (broadcast::Receiver<OomEvent>, bool) {
        let mut polling = lock(&self.polling);
        let rx = self.tx.subscribe();
        let start = !*polling;
        *polling = true;
        (rx, start)
    }

    /// For the poller, each round: false (and the poller counts as
    /// stopped) once every stream is gone.
    fn keep_polling(&self) -> bool {
        let mut polling = lock(&self.polling);
        if self.tx.receiver_count() == 0 {
            *polling = false;
        }
        *polling
    }
}

impl Containers {
    /// Reads every running container's kill counter; without `publish`
    /// only records it.
    fn check_oom(&self, publish: bool) {
        for (id, container) in self.running_containers() {
            // One small cgroupfs read: quick enough for the async thread.
            let count = container.cgroup().oom_kill_count();
            self.oom.update(&id, count, publish);
        }
    }

    /// An `OomEvents` stream: events from now on, until the client goes
    /// away or `stop` resolves (agent shutdown).
    pub(crate) fn oom_events(
        self: &Arc<Self>,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> OomEventStream {
        let (mut events, start_poller) = self.oom.subscribe();
        if start_poller {
            // Kills from while nobody listened are not news to this stream.
            self.check_oom(false);
            tokio::spawn(poll(Arc::downgrade(self)));
        }
        let (tx, rx) = mpsc::channel(BACKLOG);
        tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = tx.closed() => return,
                    _ = &mut stop => return,
                };
                match event {
                    Ok(e) => {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!("OomEvents: a slow client missed {n} events");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Reads the counters every `POLL_INTERVAL` until no stream is open (or the
/// service is gone).
async fn poll(containers: Weak<Containers>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(containers) = containers.upgrade() else {
            return;
        };
        if !containers.oom.keep_polling() {
            return;
        }
        containers.check_oom(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_increases_of_tracked_containers_only() {
        let m = OomMonitor::new();
        let (mut rx, start) = m.subscribe();
        assert!(start);
        assert!(!m.subscribe().1, "a second stream shares the poller");
        m.baseline("a", 2);
        m.observe("a", 2);
        m.observe("untracked", 5);
        m.observe("a", 4);
        m.update("a", 6, false);
        m.observe("a", 6);
        m.forget("a");
        m.observe("a", 9);
        let e = rx.try_recv().unwrap();
        assert_eq!((e.container_id.as_str(), e.oom_kills), ("a", 4));
        assert!(e.timestamp_ns > 0);
        assert!(rx.try_recv().is_err(), "only one increase was published");
    }

    #[test]
    fn poller_stops_when_the_last_stream_goes() {
        let m = OomMonitor::new();
        let (rx, start) = m.subscribe();
        assert!(start && m.keep_polling());
        drop(rx);
        assert!(!m.keep_polling());
        assert!(m.subscribe().1, "the next stream starts a poller again");
    }
}
