//! The CRI streaming server.
//!
//! The CRI `Exec`, `Attach` and `PortForward` RPCs do not stream anything
//! themselves: they return a URL of this server, and the client (crictl, the
//! kubelet's proxy) connects to it and upgrades the HTTP connection to the
//! Kubernetes remotecommand or portforward protocol, over SPDY/3.1 or
//! WebSocket. This crate is the server side of that, in the role kubelet's
//! `k8s.io/kubelet/pkg/cri/streaming` package plays for containerd and CRI-O;
//! the runtime plugs in through [`Backend`].
//!
//! Served protocols (checked against client-go, which crictl and kubelet use):
//!
//! | URL | transport | subprotocols |
//! | --- | --- | --- |
//! | `/exec/T`, `/attach/T` | SPDY/3.1 | `v5`/`v4`/`v3`/`v2.channel.k8s.io`, `channel.k8s.io` |
//! | `/exec/T`, `/attach/T` | WebSocket | `v5`/`v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, `channel.k8s.io`, `base64.channel.k8s.io` |
//! | `/portforward/T` | SPDY/3.1 | `portforward.k8s.io` |
//! | `/portforward/T` | WebSocket | `SPDY/3.1+portforward.k8s.io` (SPDY tunnelled), `v4.channel.k8s.io`, `v4.base64.channel.k8s.io` (`?port=N`) |

mod activity;
mod inbound;
mod portforward;
mod remotecommand;
mod server;
mod spdy;
mod status;
mod task;
mod tokens;
mod upgrade;
mod websocket;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

pub use server::{RequestError, Server, StartError};

/// Where the server listens and how long its tokens and connections live.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind; port 0 picks a free one (see [`Server::local_addr`]).
    pub addr: SocketAddr,
    /// How long a URL handed out by `get_*` stays usable (kubelet: 1 minute).
    pub token_ttl: Duration,
    /// A streaming connection with no traffic for this long is closed
    /// (kubelet's `streamingConnectionIdleTimeout`, 4 hours by default).
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            token_ttl: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(4 * 3600),
        }
    }
}

/// A command to run in a container, as in the CRI `ExecRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// An attach to a container's main process, as in the CRI `AttachRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// A port-forward into a pod's network namespace, as in the CRI
/// `PortForwardRequest`. As with kubelet, the ports actually forwarded are
/// the ones the client names when it connects; `ports` is only the default
/// for WebSocket clients that name none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardRequest {
    pub pod_sandbox_id: String,
    pub ports: Vec<u16>,
}

/// A terminal size sent by the client of a tty session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub width: u16,
    pub height: u16,
}

/// The client's streams for one exec or attach, as the request asked for.
///
/// Reading `stdin` gives EOF when the client closes its stdin. Dropping (or
/// shutting down) `stdout`/`stderr` ends that stream for the client. `resize`
/// is present for tty sessions whose protocol carries resize events.
pub struct Streams {
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub resize: Option<tokio::sync::mpsc::Receiver<TerminalSize>>,
}

/// A bidirectional byte stream (one forwarded connection).
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

/// Implemented by the CRI server: runs the actual process or connection.
///
/// The streams given to each call are finished when the returned future
/// completes (the server then reports the outcome to the client), so an
/// implementation must be done with them by then. The future is dropped
/// unfinished when the connection idles out or the server shuts down; an
/// implementation that must clean up (kill the process) does so on drop.
pub trait Backend: Send + Sync + 'static {
    /// Runs `req.cmd` in the container; the `Ok` value is its exit code.
    /// `Err` is reported to the client as an internal error.
    fn exec(&self, req: ExecRequest, streams: Streams) -> BoxFuture<'static, Result<i32, String>>;
    /// Connects the streams to the container's main process until it exits
    /// or the client goes away.
    fn attach(
        &self,
        req: AttachRequest,
        streams: Streams,
    ) -> BoxFuture<'static, Result<(), String>>;
    /// Connects `stream` to `port` inside the sandbox's network namespace and
    /// copies both ways until either side closes.
    fn port_forward(
        &self,
        pod_sandbox_id: String,
        port: u16,
        stream: Box<dyn AsyncReadWrite>,
    ) -> BoxFuture<'static, Result<(), String>>;
}
