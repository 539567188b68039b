//! The Kubernetes channel protocols over WebSocket: every message starts with
//! a channel byte (for the base64 variants, an ASCII digit followed by base64
//! text). remotecommand uses 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize
//! and, from v5, `255 <channel>` to close a client stream; portforward uses
//! channels 2i (data) and 2i+1 (error) for the i-th port.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, WriteHalf};

use crate::inbound::{Budget, Feeder};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::task::Task;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::activity::Activity;
use crate::portforward::{self, forward_error};
use crate::remotecommand::{run, status_format, Op, V1, V4, V5};
use crate::Backend;

const V4_BASE64: &str = "v4.base64.channel.k8s.io";
const V1_BASE64: &str = "base64.channel.k8s.io";

/// Subprotocols for exec/attach, best first; "" is a client that named none.
pub(crate) const REMOTECOMMAND_PROTOCOLS: &[&str] = &[V5, V4, V4_BASE64, V1, V1_BASE64, ""];
/// Port-forward as SPDY carried in binary WebSocket messages (newer
/// client-go, `crictl port-forward --transport websocket`).
pub(crate) const SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
/// Subprotocols for port-forward over channels.
pub(crate) const PORTFORWARD_PROTOCOLS: &[&str] =
    &[SPDY_TUNNEL, V4, V4_BASE64, crate::portforward::PROTOCOL, ""];

/// Channel numbers are one byte and each port takes two.
pub(crate) const MAX_WS_PORTS: usize = 127;

const PIPE: usize = 64 * 1024;
const CHUNK: usize = 32 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_SIGNAL: u8 = 255;

/// Frame and message caps: clients send at most 32 KiB per message, so a
/// bigger one is a misbehaving peer and ends the connection.
pub(crate) fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Picks the subprotocol: the first the client offers that we support.
pub(crate) fn choose(offered: &[String], supported: &[&'static str]) -> Option<&'static str> {
    if offered.is_empty() {
        return supported.iter().copied().find(|p| p.is_empty());
    }
    offered
        .iter()
        .find_map(|o| supported.iter().copied().find(|s| !s.is_empty() && s == o))
}

#[derive(Clone, Copy)]
struct Codec {
    base64: bool,
}

impl Codec {
    fn for_protocol(protocol: &str) -> Self {
        Codec {
            base64: protocol.contains("base64"),
        }
    }

    fn encode(self, ch: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut s = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            s.push(char::from(b'0' + ch));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut s);
            Message::text(s)
        } else {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(ch);
            v.extend_from_slice(data);
            Message::binary(v)
        }
    }

    /// Channel and payload of a data message; `None` for control messages
    /// and for malformed ones, which are dropped as kubelet does.
    fn decode(self, msg: Message) -> Option<(u8, Vec<u8>)> {
        let raw: &[u8] = match &msg {
            Message::Binary(b) => b,
            Message::Text(t) => t.as_bytes(),
            _ => return None,
        };
        let (&first, rest) = raw.split_first()?;
        if self.base64 {
            let ch = first.checked_sub(b'0')?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            Some((ch, data))
        } else {
            Some((first, rest.to_vec()))
        }
    }
}

async fn write_loop<S>(mut sink: S, mut rx: mpsc::Receiver<Message>, activity: Activity)
where
    S: futures::Sink<Message, Error = WsError> + Unpin,
{
    while let Some(m) = rx.recv().await {
        let close = m.is_close();
        if sink.send(m).await.is_err() {
            return;
        }
        activity.touch();
        if close {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Sends what the handler writes into one pipe as messages on `ch`.
fn spawn_pump<R>(mut r: R, ch: u8, tx: mpsc::Sender<Message>, codec: Codec) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 || tx.send(codec.encode(ch, &buf[..n])).await.is_err() {
                break;
            }
        }
    })
}

fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// Queues for the client-to-server channels, fed by the reader task.
struct Inbound {
    sinks: Vec<(u8, Option<Feeder>)>,
    budget: Arc<Budget>,
}

impl Inbound {
    fn new() -> Self {
        Inbound {
            sinks: Vec::new(),
            budget: Budget::new(),
        }
    }

    fn add(&mut self, ch: u8, w: WriteHalf<DuplexStream>) {
        let feeder = Feeder::spawn(w, self.budget.clone());
        self.sinks.push((ch, Some(feeder)));
    }

    fn get(&mut self, ch: u8) -> Option<&mut Option<Feeder>> {
        self.sinks
            .iter_mut()
            .find(|(c, _)| *c == ch)
            .map(|(_, s)| s)
    }
}

async fn read_loop<St>(
    mut stream: St,
    mut inbound: Inbound,
    codec: Codec,
    v5: bool,
    activity: Activity,
) where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    while let Some(Ok(msg)) = stream.next().await {
        activity.touch();
        if msg.is_close() {
            break;
        }
        let Some((ch, data)) = codec.decode(msg) else {
            continue;
        };
        if v5 && ch == CLOSE_SIGNAL {
            if let Some(slot) = data.first().and_then(|c| inbound.get(*c)) {
                // Dropping the queue gives EOF after what it holds.
                slot.take();
            }
            continue;
        }
        if let Some(slot) = inbound.get(ch) {
            if let Some(feeder) = slot {
                if !feeder.send(data.into()).await {
                    *slot = None;
                }
            }
        }
    }
    // Dropping the pipes gives the handler EOF on every client stream.
}

/// A pipe whose one end the handler gets; the other end is split so that the
/// reader task writes the client's bytes and a pump sends the handler's.
fn pipe() -> (
    tokio::io::ReadHalf<DuplexStream>,
    WriteHalf<DuplexStream>,
    DuplexStream,
) {
    let (local, remote) = tokio::io::duplex(PIPE);
    let (r, w) = tokio::io::split(local);
    (r, w, remote)
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

pub(crate) async fn serve_remotecommand<S>(
    ws: WebSocketStream<S>,
    protocol: &'static str,
    op: Op,
    backend: Arc<dyn Backend>,
    idle: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let codec = Codec::for_protocol(protocol);
    let (sink, stream) = ws.split();
    let activity = Activity::new();
    let (tx, rx) = mpsc::channel::<Message>(32);
    let writer = Task::spawn(write_loop(sink, rx, activity.clone()));
    let wants = op.wants();

    let mut inbound = Inbound::new();
    let mut pumps = Vec::new();
    let mut stdin: Option<Reader> = None;
    let mut resize: Option<Reader> = None;
    let mut outs: [Option<Writer>; 2] = [None, None];
    if wants.stdin {
        let (_, w, remote) = pipe();
        inbound.add(0, w);
        stdin = Some(Box::new(remote));
    }
    if wants.tty && protocol != V1 && !protocol.is_empty() && protocol != V1_BASE64 {
        let (_, w, remote) = pipe();
        inbound.add(4, w);
        resize = Some(Box::new(remote));
    }
    // Kubelet greets with an empty message on the lowest writable channel so
    // that clients know the streams are set up.
    let greet = if wants.stdout {
        1
    } else if wants.stderr {
        2
    } else {
        3
    };
    let _ = tx.send(codec.encode(greet, &[])).await;
    for (i, (ch, want)) in [(1u8, wants.stdout), (2, wants.stderr)]
        .into_iter()
        .enumerate()
    {
        if want {
            let (r, _, remote) = pipe();
            pumps.push(spawn_pump(r, ch, tx.clone(), codec));
            outs[i] = Some(Box::new(remote));
        }
    }
    let _reader = Task::spawn(read_loop(
        stream,
        inbound,
        codec,
        protocol == V5,
        activity.clone(),
    ));

    let [stdout, stderr] = outs;
    let work = async {
        let outcome = run(op, &backend, stdin, stdout, stderr, resize).await;
        for p in pumps {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, p).await;
        }
        let status = outcome.encode(status_format(protocol));
        if !status.is_empty() {
            let _ = tx.send(codec.encode(3, &status)).await;
        }
        let _ = tx.send(normal_close()).await;
    };
    tokio::select! {
        _ = work => {}
        _ = activity.idle(idle) => tracing::debug!("websocket exec/attach connection idle, closing"),
    }
    drop(tx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, writer).await;
}

pub(crate) async fn serve_portforward<S>(
    ws: WebSocketStream<S>,
    protocol: &'static str,
    sandbox: String,
    ports: Vec<u16>,
    backend: Arc<dyn Backend>,
    idle: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let codec = Codec::for_protocol(protocol);
    let (sink, stream) = ws.split();
    let activity = Activity::new();
    let (tx, rx) = mpsc::channel::<Message>(32);
    let writer = Task::spawn(write_loop(sink, rx, activity.clone()));

    let mut inbound = Inbound::new();
    let mut pumps = Vec::new();
    let mut forwards = JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate().take(MAX_WS_PORTS) {
        let data_ch = (2 * i) as u8;
        // Clients learn which port a channel pair belongs to from its first
        // two bytes (little-endian), as kubelet sends them.
        let _ = tx.send(codec.encode(data_ch, &port.to_le_bytes())).await;
        let _ = tx
            .send(codec.encode(data_ch + 1, &port.to_le_bytes()))
            .await;
        let (r, w, remote) = pipe();
        inbound.add(data_ch, w);
        pumps.push(spawn_pump(r, data_ch, tx.clone(), codec));
        let (backend, sandbox) = (backend.clone(), sandbox.clone());
        forwards.spawn(async move {
            let result = backend.port_forward(sandbox, port, Box::new(remote)).await;
            (data_ch + 1, port, result)
        });
    }
    let mut reader = Task::spawn(read_loop(stream, inbound, codec, false, activity.clone()));
    loop {
        tokio::select! {
            done = forwards.join_next() => match done {
                None => break,
                Some(Ok((err_ch, port, Err(e)))) => {
                    let msg = forward_error(port, &sandbox, &e);
                    let _ = tx.send(codec.encode(err_ch, msg.as_bytes())).await;
                }
                Some(_) => {}
            },
            _ = &mut reader => {
                forwards.abort_all();
                break;
            }
            _ = activity.idle(idle) => {
                tracing::debug!("websocket portforward connection idle, closing");
                forwards.abort_all();
                break;
            }
        }
    }
    for p in pumps {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, p).await;
    }
    let _ = tx.send(normal_close()).await;
    drop(tx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, writer).await;
}

/// Serves port-forward over the SPDY-in-WebSocket tunnel: the WebSocket is
/// turned back into a byte stream and the SPDY port-forward runs on it.
pub(crate) async fn serve_spdy_tunnel<S>(
    ws: WebSocketStream<S>,
    sandbox: String,
    backend: Arc<dyn Backend>,
    idle: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (local, remote) = tokio::io::duplex(PIPE);
    let (mut from_spdy, mut to_spdy) = tokio::io::split(local);
    let (mut sink, mut stream) = ws.split();
    let inbound = Task::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Binary(b) = msg else {
                if msg.is_close() {
                    break;
                }
                continue;
            };
            if to_spdy.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = to_spdy.shutdown().await;
    });
    let outbound = Task::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n) = from_spdy.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
        let _ = sink.send(normal_close()).await;
        let _ = sink.close().await;
    });
    // The session shuts its side of the pipe down when done, which ends
    // `outbound` with a close message.
    portforward::serve_spdy(remote, sandbox, backend, idle).await;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, outbound).await;
    drop(inbound);
}
