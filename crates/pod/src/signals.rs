//! How a pod's supervising process (foreground `vmrun run` or the detached
//! supervisor) learns that it should stop the pod.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `stop` on SIGINT or SIGTERM; the returned number becomes the
/// signal that arrived (0 until then), for a shell-style exit status.
pub fn stop_on_signals(stop: CancellationToken) -> std::io::Result<Arc<AtomicI32>> {
    let received = Arc::new(AtomicI32::new(0));
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let seen = received.clone();
    tokio::spawn(async move {
        let signo = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
        };
        seen.store(signo, Ordering::SeqCst);
        eprintln!("vmrun: stopping the pod (signal {signo})");
        stop.cancel();
    });
    Ok(received)
}
