//! One SPDY/3.1 session on the server side: a reader task that demultiplexes
//! the client's streams and a writer task that owns the connection's write
//! half and the header compressor (one zlib context per direction, so frames
//! are compressed in the order they hit the wire).
//!
//! Each stream is handed out as one end of an in-memory pipe, fed by the
//! reader through a bounded per-stream queue (see `inbound`): spdystream does
//! not do flow control, so the queue budget and, past it, backpressure on the
//! TCP connection are what bound the memory a client can make us use.
//! WINDOW_UPDATEs are still sent as data is accepted, for clients that do
//! respect windows. In the other direction the client's window is not
//! enforced: spdystream never sends WINDOW_UPDATE, so honouring it would stall
//! every stream after 64 KiB (kubelet, on spdystream, does not either).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};

use super::frame::{self, Control, FrameError, Head};
use super::headers::{Decoder, Encoder, HeaderError, Headers};
use crate::activity::Activity;
use crate::inbound::{Budget, Feeder};
use crate::task::Task;

/// The SPDY/3 default initial window, also the per-stream pipe capacity.
const WINDOW: usize = 64 * 1024;
/// Remotecommand needs at most five streams and each forwarded connection
/// two; more than this many open at once is refused.
const MAX_STREAMS: usize = 256;
const CHUNK: usize = 32 * 1024;

/// A stream the client opened.
pub(crate) struct IncomingStream {
    pub(crate) id: u32,
    pub(crate) headers: Headers,
    /// Reads give the client's data (EOF on its FIN); writes go to the client
    /// (shutting down or dropping sends FIN).
    pub(crate) io: DuplexStream,
    /// Resolves once everything written to `io` (and the FIN) is queued for
    /// the wire, so that a final status or GOAWAY is ordered after it.
    pub(crate) flushed: oneshot::Receiver<()>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

enum Out {
    Frame(Vec<u8>),
    Reply(u32),
    Close,
}

pub(crate) struct Session {
    out: mpsc::Sender<Out>,
    // Both end with the session (dropping it closes the connection).
    writer: Task<()>,
    _reader: Task<()>,
    activity: Activity,
}

impl Session {
    /// Starts serving `io`; new streams arrive on the returned receiver,
    /// which closes when the client goes away.
    pub(crate) fn start<IO>(io: IO) -> (Session, mpsc::Receiver<IncomingStream>)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let activity = Activity::new();
        let last_id = Arc::new(AtomicU32::new(0));
        let (out_tx, out_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(16);
        let writer = Task::spawn(write_loop(wr, out_rx, activity.clone(), last_id.clone()));
        let reader = {
            let (out, activity) = (out_tx.clone(), activity.clone());
            Task::spawn(async move {
                if let Err(e) = read_loop(rd, out.clone(), in_tx, activity, last_id).await {
                    tracing::debug!("spdy session ends: {e}");
                    // Tell the peer why; it is ignored if the writer is gone.
                    let _ = out.send(Out::Close).await;
                }
            })
        };
        let session = Session {
            out: out_tx,
            writer,
            _reader: reader,
            activity,
        };
        (session, in_rx)
    }

    /// Resolves when the connection saw no traffic for `timeout`.
    pub(crate) async fn idle(&self, timeout: Duration) {
        self.activity.idle(timeout).await
    }

    /// Sends GOAWAY after everything queued so far and closes the connection.
    pub(crate) async fn close(mut self) {
        let _ = self.out.send(Out::Close).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.writer).await;
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    activity: Activity,
    last_id: Arc<AtomicU32>,
) {
    let mut enc = match Encoder::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("spdy: {e}");
            return;
        }
    };
    while let Some(out) = rx.recv().await {
        let (bytes, close) = match out {
            Out::Frame(b) => (b, false),
            Out::Reply(id) => match enc.encode(&[]) {
                Ok(block) => (frame::encode_syn_reply(id, false, &block), false),
                Err(e) => {
                    tracing::warn!("spdy: {e}");
                    break;
                }
            },
            Out::Close => (frame::encode_goaway(last_id.load(Ordering::Relaxed)), true),
        };
        if w.write_all(&bytes).await.is_err() {
            break;
        }
        activity.touch();
        if close {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
            break;
        }
        if rx.is_empty() && w.flush().await.is_err() {
            break;
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    out: mpsc::Sender<Out>,
    incoming: mpsc::Sender<IncomingStream>,
    activity: Activity,
    last_id: Arc<AtomicU32>,
) -> Result<(), SessionError> {
    let mut dec = Decoder::new();
    // Queues into the pipes of streams the client has not finished.
    let mut sinks: HashMap<u32, Feeder> = HashMap::new();
    let budget = Budget::new();
    // Streams whose handler end is still alive (their pump still runs).
    let open = Arc::new(AtomicUsize::new(0));
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Some(head) = frame::read_head(&mut r).await? else {
            return Ok(());
        };
        activity.touch();
        match head {
            Head::Data {
                stream_id,
                flags,
                len,
            } => {
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK);
                    r.read_exact(&mut buf[..n]).await.map_err(FrameError::Io)?;
                    left -= n;
                    activity.touch();
                    if let Some(sink) = sinks.get(&stream_id) {
                        if !sink.send(Bytes::copy_from_slice(&buf[..n])).await {
                            // The consumer is gone: drop the rest.
                            sinks.remove(&stream_id);
                        }
                    }
                }
                if len > 0 && sinks.contains_key(&stream_id) {
                    let _ = out
                        .send(Out::Frame(frame::encode_window_update(
                            stream_id, len as u32,
                        )))
                        .await;
                }
                if flags & frame::FLAG_FIN != 0 {
                    // Dropping the queue gives EOF after what it holds.
                    sinks.remove(&stream_id);
                }
            }
            Head::Control { kind, flags, len } => {
                let mut payload = vec![0u8; len];
                r.read_exact(&mut payload).await.map_err(FrameError::Io)?;
                match frame::parse_control(kind, flags, payload)? {
                    Control::SynStream {
                        stream_id,
                        flags,
                        block,
                    } => {
                        // Decode even a refused stream's headers: the zlib
                        // context must see every block.
                        let headers = dec.decode(&block)?;
                        if stream_id % 2 == 0 || stream_id <= last_id.load(Ordering::Relaxed) {
                            return Err(SessionError::Protocol("bad client stream id"));
                        }
                        last_id.store(stream_id, Ordering::Relaxed);
                        if open.load(Ordering::Relaxed) >= MAX_STREAMS {
                            let rst = frame::encode_rst(stream_id, frame::RST_REFUSED_STREAM);
                            let _ = out.send(Out::Frame(rst)).await;
                            continue;
                        }
                        open.fetch_add(1, Ordering::Relaxed);
                        let (local, remote) = tokio::io::duplex(WINDOW);
                        let (local_rd, mut local_wr) = tokio::io::split(local);
                        if flags & frame::FLAG_FIN != 0 {
                            let _ = local_wr.shutdown().await;
                        } else {
                            sinks.insert(stream_id, Feeder::spawn(local_wr, budget.clone()));
                        }
                        // The reply goes out before any data the pump sends.
                        if out.send(Out::Reply(stream_id)).await.is_err() {
                            return Ok(());
                        }
                        let (flushed_tx, flushed) = oneshot::channel();
                        let (out, open) = (out.clone(), open.clone());
                        tokio::spawn(async move {
                            pump(local_rd, stream_id, out, flushed_tx).await;
                            open.fetch_sub(1, Ordering::Relaxed);
                        });
                        let stream = IncomingStream {
                            id: stream_id,
                            headers,
                            io: remote,
                            flushed,
                        };
                        if incoming.send(stream).await.is_err() {
                            tracing::debug!(
                                "spdy stream {stream_id} arrived after the handler finished"
                            );
                        }
                    }
                    Control::SynReply { block, .. } => {
                        dec.decode(&block)?;
                    }
                    Control::Headers {
                        stream_id,
                        flags,
                        block,
                    } => {
                        dec.decode(&block)?;
                        if flags & frame::FLAG_FIN != 0 {
                            sinks.remove(&stream_id);
                        }
                    }
                    Control::RstStream { stream_id, .. } => {
                        sinks.remove(&stream_id);
                    }
                    Control::Ping { id } => {
                        // Client pings are odd; echo them (ours would be even).
                        if id % 2 == 1 {
                            let _ = out.send(Out::Frame(frame::encode_ping(id))).await;
                        }
                    }
                    // GOAWAY only stops new streams: the open ones finish.
                    Control::GoAway
                    | Control::Settings
                    | Control::WindowUpdate { .. }
                    | Control::Other => {}
                }
            }
        }
    }
}

/// Copies what the handler writes on a stream into DATA frames, then FIN.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    stream_id: u32,
    out: mpsc::Sender<Out>,
    flushed: oneshot::Sender<()>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let data = frame::encode_data(stream_id, false, &buf[..n]);
                if out.send(Out::Frame(data)).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = out
        .send(Out::Frame(frame::encode_data(stream_id, true, &[])))
        .await;
    let _ = flushed.send(());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        getrandom::getrandom(&mut v).unwrap();
        v
    }

    /// Whatever a client sends, the reader ends with a result, never a panic.
    #[tokio::test]
    async fn garbage_never_panics() {
        let mut enc = Encoder::new().unwrap();
        for i in 0..300 {
            let n = usize::from(random(1)[0]) * 4;
            let mut wire = Vec::new();
            // Half the cases start with a valid stream so the random part
            // hits DATA/HEADERS handling and the live zlib context.
            if i % 2 == 0 {
                let block = enc.encode(&[("streamtype", "stdin")]).unwrap();
                wire.extend(frame::encode_syn_stream(1, false, &block));
                let mut head = frame::encode_data(1, false, &[]);
                head[0] = 0x80 | (random(1)[0] & 0x01);
                head[1] = 3;
                wire.extend(&head[..4]);
            }
            wire.extend(random(n));
            let (out_tx, mut out_rx) = mpsc::channel(1024);
            let (in_tx, mut in_rx) = mpsc::channel(16);
            tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
            tokio::spawn(async move { while in_rx.recv().await.is_some() {} });
            let run = read_loop(&wire[..], out_tx, in_tx, Activity::new(), Arc::default());
            let _ = tokio::time::timeout(Duration::from_secs(5), run)
                .await
                .expect("reader finished");
            // A fresh encoder per case: each case is its own session.
            enc = Encoder::new().unwrap();
        }
    }
}
