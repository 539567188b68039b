//! A spawned task that is aborted when its handle is dropped, so that a
//! connection's helper tasks (socket reader, writer) do not outlive it when
//! its handler is cancelled (server shutdown, idle timeout).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

pub(crate) struct Task<T>(JoinHandle<T>);

impl<T: Send + 'static> Task<T> {
    pub(crate) fn spawn<F>(f: F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        Task(tokio::spawn(f))
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for Task<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}
