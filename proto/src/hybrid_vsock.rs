//! Connecting to the guest agent through the VMM's hybrid vsock, the
//! Firecracker scheme: the VMM listens on a unix socket; a host client
//! connects, writes `CONNECT <port>\n`, reads `OK <hostport>\n`, and from then
//! on the stream is the guest's vsock connection to `<port>`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::v1::agent_client::AgentClient;

/// How long the VMM may take to answer `CONNECT`. It answers at once
/// (or closes) when the guest has or has no listener, so this only bounds
/// a wedged VMM.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest acceptable reply line ("OK 4294967295\n" is 14 bytes).
pub(crate) const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to the VMM's vsock socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hybrid vsock handshake for guest port {port}: {source}")]
    Io { port: u32, source: io::Error },
    /// The VMM closed the connection without a reply: nothing listens on
    /// the guest port (yet). Retry while the guest boots.
    #[error("guest port {port}: the VMM closed the connection (no guest listener on the port?)")]
    Refused { port: u32 },
    #[error("guest port {port}: unexpected reply from the VMM: {reply:?}")]
    BadReply { port: u32, reply: String },
    #[error("guest port {port}: the VMM did not answer CONNECT within {HANDSHAKE_TIMEOUT:?}")]
    Timeout { port: u32 },
    /// The agent's port-forward listener could not connect to the TCP port
    /// in the pod; `reason` is the agent's (`"connection refused"` when
    /// nothing listens, see [`ConnectError::is_connection_refused`]).
    #[error("guest TCP port {tcp_port}: {reason}")]
    Forward { tcp_port: u16, reason: String },
    /// The agent's port-forward listener did not answer in time.
    #[error("guest TCP port {tcp_port}: no answer from the agent within {after:?}")]
    ForwardTimeout { tcp_port: u16, after: Duration },
    #[error("gRPC channel to guest port {port}: {source}")]
    Channel {
        port: u32,
        source: tonic::transport::Error,
    },
}

impl ConnectError {
    /// True when the guest may simply not be listening yet (booting): the
    /// socket is not there yet, or the VMM refused the port.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Refused { .. } => true,
            ConnectError::Socket { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ),
            _ => false,
        }
    }

    /// True when the agent reached the pod's network namespace but nothing
    /// listens on the TCP port there (a failed `tcpSocket` probe, not a
    /// broken guest).
    pub fn is_connection_refused(&self) -> bool {
        matches!(self, ConnectError::Forward { reason, .. }
            if reason == crate::port_forward::CONNECTION_REFUSED)
    }
}

/// Performs the `CONNECT`/`OK` exchange on `stream` and returns the host
/// port the VMM reports. Reads the reply byte by byte: whatever follows the
/// newline already belongs to the guest (the HTTP/2 server preface).
pub async fn handshake(stream: &mut UnixStream, port: u32) -> Result<u32, ConnectError> {
    let exchange = async {
        let io_err = |source| ConnectError::Io { port, source };
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(io_err)?;
        let mut line = Vec::with_capacity(16);
        loop {
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await.map_err(io_err)? == 0 {
                return Err(if line.is_empty() {
                    ConnectError::Refused { port }
                } else {
                    ConnectError::BadReply {
                        port,
                        reply: String::from_utf8_lossy(&line).into_owned(),
                    }
                });
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
            if line.len() > MAX_REPLY {
                break;
            }
        }
        parse_ok(&line).ok_or_else(|| ConnectError::BadReply {
            port,
            reply: String::from_utf8_lossy(&line).into_owned(),
        })
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .unwrap_or(Err(ConnectError::Timeout { port }))
}

pub(crate) fn parse_ok(line: &[u8]) -> Option<u32> {
    std::str::from_utf8(line)
        .ok()?
        .strip_prefix("OK ")?
        .trim_end_matches('\r')
        .parse()
        .ok()
}

async fn open(uds: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| ConnectError::Socket {
            path: uds.to_path_buf(),
            source,
        })?;
    handshake(&mut stream, port).await?;
    Ok(stream)
}

/// A gRPC client of the agent behind the VMM's hybrid-vsock socket `uds`.
///
/// The first connection is made here, so its failure comes back as a
/// typed [`ConnectError`] (see [`ConnectError::is_retryable`]); should the
/// connection drop later, the channel reconnects with a new handshake.
pub async fn connect_hybrid_vsock(
    uds: &Path,
    port: u32,
) -> Result<AgentClient<Channel>, ConnectError> {
    let first = Arc::new(Mutex::new(Some(open(uds, port).await?)));
    let uds = uds.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let first = first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let uds = uds.clone();
        async move {
            let stream = match first {
                Some(s) => s,
                None => open(&uds, port).await?,
            };
            Ok::<_, ConnectError>(TokioIo::new(stream))
        }
    });
    // The URI is only a placeholder: the connector decides where to go.
    let channel = Endpoint::from_static("http://vmrun-agent.vsock")
        .connect_with_connector(connector)
        .await
        .map_err(|source| ConnectError::Channel { port, source })?;
    Ok(AgentClient::new(channel))
}

#[cfg(test)]
mod tests;
