//! The remotecommand protocol (exec and attach), independent of transport:
//! which streams a request needs, running the backend, resize events; plus
//! its SPDY flavour, where each stream is a SPDY stream named by the
//! `streamType` header.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::spdy::{headers, IncomingStream, Session};
use crate::status::{Outcome, StatusFormat};
use crate::{AttachRequest, Backend, ExecRequest, Streams, TerminalSize};

pub(crate) const V1: &str = "channel.k8s.io";
pub(crate) const V2: &str = "v2.channel.k8s.io";
pub(crate) const V3: &str = "v3.channel.k8s.io";
pub(crate) const V4: &str = "v4.channel.k8s.io";
pub(crate) const V5: &str = "v5.channel.k8s.io";

/// Protocols offered over SPDY, in kubelet's order of preference. v5 only
/// adds a WebSocket close signal, so over SPDY it behaves as v4.
pub(crate) const SPDY_PROTOCOLS: &[&str] = &[V5, V4, V3, V2, V1];

/// How long the client has to open its streams (kubelet's default
/// streamCreationTimeout).
pub(crate) const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait after the process ended for its output to be queued.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) enum Op {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Wants {
    pub(crate) stdin: bool,
    pub(crate) stdout: bool,
    pub(crate) stderr: bool,
    pub(crate) tty: bool,
}

impl Op {
    pub(crate) fn wants(&self) -> Wants {
        match self {
            Op::Exec(r) => Wants {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
            Op::Attach(r) => Wants {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
        }
    }
}

pub(crate) fn status_format(protocol: &str) -> StatusFormat {
    if protocol.starts_with("v4.") || protocol.starts_with("v5.") {
        StatusFormat::Json
    } else {
        StatusFormat::Text
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Runs the operation on the backend with the client's streams.
pub(crate) async fn run(
    op: Op,
    backend: &Arc<dyn Backend>,
    stdin: Option<Reader>,
    stdout: Option<Writer>,
    stderr: Option<Writer>,
    resize: Option<Reader>,
) -> Outcome {
    let resize = resize.map(|r| {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(decode_resizes(r, tx));
        rx
    });
    let streams = Streams {
        stdin,
        stdout,
        stderr,
        resize,
    };
    match op {
        Op::Exec(req) => {
            let cmd = req.cmd.clone();
            match backend.exec(req, streams).await {
                Ok(0) => Outcome::Success,
                Ok(code) => Outcome::ExitCode { cmd, code },
                Err(e) => Outcome::Error(e),
            }
        }
        Op::Attach(req) => match backend.attach(req, streams).await {
            Ok(()) => Outcome::Success,
            Err(e) => Outcome::Error(e),
        },
    }
}

#[derive(Deserialize)]
struct WireSize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// A resize object is ~30 bytes; a client that sends more than this without
/// completing one is not sending resize events.
const MAX_RESIZE_PENDING: usize = 4096;

/// Turns the resize stream (concatenated JSON objects, as Go's json.Encoder
/// writes them) into terminal sizes; stops at the first malformed one.
async fn decode_resizes(mut r: Reader, tx: mpsc::Sender<TerminalSize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<WireSize>();
            match it.next() {
                Some(Ok(s)) => {
                    let used = it.byte_offset();
                    buf.drain(..used);
                    let size = TerminalSize {
                        width: s.width,
                        height: s.height,
                    };
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!("bad resize event: {e}");
                    return;
                }
                None => {
                    buf.clear();
                    break;
                }
            }
        }
        if buf.len() > MAX_RESIZE_PENDING {
            return;
        }
    }
}

/// Serves exec/attach on an upgraded SPDY connection.
pub(crate) async fn serve_spdy<IO>(
    io: IO,
    protocol: String,
    op: Op,
    backend: Arc<dyn Backend>,
    idle: Duration,
) where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (session, mut incoming) = Session::start(io);
    let wants = op.wants();
    let resizable = wants.tty && ![V1, V2, ""].contains(&protocol.as_str());
    let expected = 1 + [wants.stdin, wants.stdout, wants.stderr, resizable]
        .iter()
        .filter(|w| **w)
        .count();

    let mut streams: HashMap<String, IncomingStream> = HashMap::new();
    let mut received = 0;
    let collect = async {
        while received < expected {
            let Some(s) = incoming.recv().await else {
                return false;
            };
            received += 1;
            match headers::get(&s.headers, "streamtype") {
                Some(t @ ("error" | "stdin" | "stdout" | "stderr" | "resize")) => {
                    streams.insert(t.to_string(), s);
                }
                other => tracing::debug!("unexpected stream type {other:?} on stream {}", s.id),
            }
        }
        true
    };
    match tokio::time::timeout(STREAM_CREATION_TIMEOUT, collect).await {
        Ok(true) => {}
        Ok(false) => return session.close().await,
        Err(_) => {
            tracing::debug!("timed out waiting for client to create streams");
            return session.close().await;
        }
    }
    // Streams beyond the expected ones are not used: refuse them by closing
    // the channel rather than letting them queue up.
    drop(incoming);

    let mut take = |name: &str| streams.remove(name).map(|s| (s.io, s.flushed));
    let error = take("error");
    let stdin = take("stdin").map(|(io, _)| Box::new(io) as Reader);
    let (stdout, stdout_flushed) = split_writer(take("stdout"));
    let (stderr, stderr_flushed) = split_writer(take("stderr"));
    let resize = take("resize").map(|(io, _)| Box::new(io) as Reader);
    let format = status_format(&protocol);

    let work = async {
        let outcome = run(op, &backend, stdin, stdout, stderr, resize).await;
        for f in [stdout_flushed, stderr_flushed].into_iter().flatten() {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, f).await;
        }
        if let Some((mut io, flushed)) = error {
            let status = outcome.encode(format);
            if !status.is_empty() {
                let _ = io.write_all(&status).await;
            }
            let _ = io.shutdown().await;
            drop(io);
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, flushed).await;
        }
    };
    tokio::select! {
        _ = work => {}
        _ = session.idle(idle) => tracing::debug!("spdy exec/attach connection idle, closing"),
    }
    session.close().await;
}

type Flushed = tokio::sync::oneshot::Receiver<()>;

fn split_writer(
    s: Option<(tokio::io::DuplexStream, Flushed)>,
) -> (Option<Writer>, Option<Flushed>) {
    match s {
        Some((io, f)) => (Some(Box::new(io)), Some(f)),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resizes_split_across_reads() {
        let (mut w, r) = tokio::io::duplex(64);
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(decode_resizes(Box::new(r), tx));
        w.write_all(br#"{"Width":80,"Hei"#).await.unwrap();
        w.write_all(b"ght\":24}\n{\"Width\":100,\"Height\":50}")
            .await
            .unwrap();
        assert_eq!(
            rx.recv().await,
            Some(TerminalSize {
                width: 80,
                height: 24
            })
        );
        assert_eq!(
            rx.recv().await,
            Some(TerminalSize {
                width: 100,
                height: 50
            })
        );
        w.write_all(b"garbage").await.unwrap();
        assert_eq!(rx.recv().await, None);
    }
}
