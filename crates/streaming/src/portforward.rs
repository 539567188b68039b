//! The portforward protocol over SPDY (`portforward.k8s.io`): per forwarded
//! connection the client opens an `error` and a `data` stream carrying the
//! same `port` and `requestID` headers; once both are there the data stream
//! is handed to the backend and any failure is written on the error stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::spdy::{headers, IncomingStream, Session};
use crate::Backend;

pub(crate) const PROTOCOL: &str = "portforward.k8s.io";

/// How long the first stream of a pair waits for its partner (kubelet's
/// streamCreationTimeout).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// Unpaired requests kept at once; a client opening only halves of pairs
/// cannot make the table grow past this.
const MAX_PENDING_PAIRS: usize = 128;

#[derive(Default)]
struct Pair {
    error: Option<DuplexStream>,
    data: Option<DuplexStream>,
    port: u16,
    since: Option<Instant>,
}

/// The message kubelet writes on the error stream when forwarding fails.
pub(crate) fn forward_error(port: u16, sandbox: &str, err: &str) -> String {
    format!("error forwarding port {port} to pod {sandbox}: {err}")
}

pub(crate) async fn serve_spdy<IO>(
    io: IO,
    sandbox: String,
    backend: Arc<dyn Backend>,
    idle: Duration,
) where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (session, mut incoming) = Session::start(io);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwards = JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            s = incoming.recv() => {
                let Some(s) = s else { break };
                let Some((request_id, kind, port)) = describe(&s) else {
                    tracing::debug!("portforward stream {} lacks valid headers", s.id);
                    continue;
                };
                if !pairs.contains_key(&request_id) && pairs.len() >= MAX_PENDING_PAIRS {
                    tracing::debug!("too many unpaired portforward streams, dropping {}", s.id);
                    continue;
                }
                let pair = pairs.entry(request_id.clone()).or_default();
                pair.port = port;
                pair.since.get_or_insert_with(Instant::now);
                if kind == "error" { pair.error = Some(s.io) } else { pair.data = Some(s.io) }
                if pair.error.is_some() && pair.data.is_some() {
                    if let Some(Pair { error: Some(error), data: Some(data), port, .. }) = pairs.remove(&request_id) {
                        forwards.spawn(forward(backend.clone(), sandbox.clone(), port, error, data));
                    }
                }
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
            _ = sweep.tick() => {
                pairs.retain(|id, p| {
                    let fresh = p.since.is_some_and(|t| t.elapsed() < PAIR_TIMEOUT);
                    if !fresh {
                        tracing::debug!("portforward request {id} never got both streams");
                    }
                    fresh
                });
            }
            _ = session.idle(idle) => {
                tracing::debug!("portforward connection idle, closing");
                break;
            }
        }
    }
    forwards.abort_all();
    session.close().await;
}

/// requestID, stream type and port of a portforward stream.
fn describe(s: &IncomingStream) -> Option<(String, &'static str, u16)> {
    let kind = match headers::get(&s.headers, "streamtype")? {
        "error" => "error",
        "data" => "data",
        _ => return None,
    };
    let port = headers::get(&s.headers, "port")?
        .trim()
        .parse::<u16>()
        .ok()?;
    let request_id = match headers::get(&s.headers, "requestid") {
        Some(id) if !id.is_empty() => id.to_string(),
        // Clients predating requestID open the error stream, then the data
        // stream, so the pair shares the error stream's id (as kubelet does).
        _ if kind == "data" => s.id.checked_sub(2)?.to_string(),
        _ => s.id.to_string(),
    };
    Some((request_id, kind, port))
}

async fn forward(
    backend: Arc<dyn Backend>,
    sandbox: String,
    port: u16,
    mut error: DuplexStream,
    data: DuplexStream,
) {
    if let Err(e) = backend
        .port_forward(sandbox.clone(), port, Box::new(data))
        .await
    {
        let msg = forward_error(port, &sandbox, &e);
        let _ = error.write_all(msg.as_bytes()).await;
    }
    let _ = error.shutdown().await;
}
