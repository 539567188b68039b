//! Client-to-server data for the streams of one connection.
//!
//! The connection's reader must not stall every stream because one consumer
//! is slow (a process that does not read its stdin must not hold back its
//! resize events, one slow forwarded connection must not hold back the
//! others), yet must not buffer without bound for an untrusted client — and
//! spdystream clients ignore SPDY flow control. So each stream gets a queue
//! drained into its pipe by a task of its own, and the reader only waits
//! (pushing back on TCP) once that stream has `PER_STREAM` bytes queued or
//! the whole connection has `PER_CONNECTION`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

const PER_STREAM: usize = 1 << 20;
const PER_CONNECTION: usize = 8 << 20;

/// The byte budget shared by all streams of one connection.
#[derive(Default)]
pub(crate) struct Budget {
    queued: AtomicUsize,
    released: Notify,
}

impl Budget {
    pub(crate) fn new() -> Arc<Budget> {
        Arc::new(Budget::default())
    }
}

/// The sending side of one stream's queue; dropping it ends the stream (the
/// consumer reads EOF once what is queued has been delivered).
pub(crate) struct Feeder {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    budget: Arc<Budget>,
}

impl Feeder {
    /// Starts delivering into `w`.
    pub(crate) fn spawn<W>(mut w: W, budget: Arc<Budget>) -> Feeder
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let queued = Arc::new(AtomicUsize::new(0));
        let (q, b) = (queued.clone(), budget.clone());
        let release = move |n: usize| {
            q.fetch_sub(n, Ordering::Relaxed);
            b.queued.fetch_sub(n, Ordering::Relaxed);
            b.released.notify_waiters();
        };
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                let ok = w.write_all(&chunk).await.is_ok();
                release(chunk.len());
                if !ok {
                    // The consumer is gone: refuse more, free what is queued.
                    rx.close();
                    while let Ok(c) = rx.try_recv() {
                        release(c.len());
                    }
                    return;
                }
            }
            let _ = w.shutdown().await;
        });
        Feeder { tx, queued, budget }
    }

    /// Queues `data`, first waiting for room; `false` once the consumer is
    /// gone (the data is then dropped).
    pub(crate) async fn send(&self, data: Bytes) -> bool {
        loop {
            let released = self.budget.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.tx.is_closed() {
                return false;
            }
            let stream_full = self.queued.load(Ordering::Relaxed) >= PER_STREAM;
            let conn_full = self.budget.queued.load(Ordering::Relaxed) >= PER_CONNECTION;
            if !stream_full && !conn_full {
                break;
            }
            released.await;
        }
        let n = data.len();
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.budget.queued.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(data).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.budget.queued.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_stalled_stream_does_not_block_others() {
        let budget = Budget::new();
        let (stalled_w, _stalled_r) = tokio::io::duplex(16);
        let (w, mut r) = tokio::io::duplex(16);
        let stalled = Feeder::spawn(stalled_w, budget.clone());
        let other = Feeder::spawn(w, budget.clone());
        assert!(stalled.send(Bytes::from(vec![0u8; 100_000])).await);
        assert!(other.send(Bytes::from_static(b"resize")).await);
        drop(other);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"resize");
    }

    #[tokio::test]
    async fn a_full_stream_waits_and_a_gone_consumer_refuses() {
        let budget = Budget::new();
        let (w, r) = tokio::io::duplex(16);
        let f = Feeder::spawn(w, budget.clone());
        assert!(f.send(Bytes::from(vec![0u8; PER_STREAM])).await);
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            f.send(Bytes::from_static(b"x")),
        )
        .await;
        assert!(blocked.is_err(), "over budget must wait");
        drop(r);
        assert!(!f.send(Bytes::from_static(b"x")).await);
        assert_eq!(budget.queued.load(Ordering::Relaxed), 0);
    }
}
