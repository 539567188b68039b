//! The server's lifecycle and its request API: validates requests and hands
//! out single-use URLs; the accept loop serves them (see `upgrade`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::tokens::{Pending, TokenCache, TokenError};
use crate::{upgrade, AttachRequest, Backend, Config, ExecRequest, PortForwardRequest};

/// Why [`Server::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a `get_*` call refused the request; the messages follow kubelet's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("missing required container_id")]
    MissingContainerId,
    #[error("missing required pod_sandbox_id")]
    MissingPodSandboxId,
    #[error("cmd must not be empty")]
    EmptyCommand,
    #[error("one of stdin, stdout, or stderr must be set")]
    NoStreams,
    #[error("tty and stderr cannot both be true")]
    TtyAndStderr,
    #[error("too many pending streaming requests, try again later")]
    TooManyPending,
    #[error("cannot create a token: {0}")]
    Token(String),
}

/// A running streaming server. Dropping it stops it as [`Server::shutdown`]
/// does, without waiting.
pub struct Server {
    addr: SocketAddr,
    tokens: Arc<TokenCache>,
    stop: watch::Sender<bool>,
    accept: std::sync::Mutex<Option<JoinHandle<()>>>,
}

pub(crate) struct Shared {
    pub(crate) tokens: Arc<TokenCache>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) idle: Duration,
    pub(crate) stop: watch::Receiver<bool>,
}

impl Server {
    /// Binds `config.addr` and starts accepting connections.
    pub async fn start(config: Config, backend: Arc<dyn Backend>) -> Result<Server, StartError> {
        let bind_err = |source| StartError::Bind {
            addr: config.addr,
            source,
        };
        let listener = TcpListener::bind(config.addr).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let tokens = Arc::new(TokenCache::new(config.token_ttl));
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            tokens: tokens.clone(),
            backend,
            idle: config.idle_timeout,
            stop: stop_rx,
        });
        let accept = tokio::spawn(accept_loop(listener, shared));
        Ok(Server {
            addr,
            tokens,
            stop,
            accept: std::sync::Mutex::new(Some(accept)),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Validates an exec and returns the URL the client should connect to.
    pub fn get_exec(&self, req: ExecRequest) -> Result<String, RequestError> {
        if req.container_id.is_empty() {
            return Err(RequestError::MissingContainerId);
        }
        if req.cmd.is_empty() {
            return Err(RequestError::EmptyCommand);
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.url("exec", Pending::Exec(req))
    }

    /// Validates an attach and returns the URL the client should connect to.
    pub fn get_attach(&self, req: AttachRequest) -> Result<String, RequestError> {
        if req.container_id.is_empty() {
            return Err(RequestError::MissingContainerId);
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.url("attach", Pending::Attach(req))
    }

    /// Validates a port-forward and returns the URL the client should connect to.
    pub fn get_port_forward(&self, req: PortForwardRequest) -> Result<String, RequestError> {
        if req.pod_sandbox_id.is_empty() {
            return Err(RequestError::MissingPodSandboxId);
        }
        self.url("portforward", Pending::PortForward(req))
    }

    /// Stops accepting and closes open streaming connections. Takes `&self`
    /// so that a server shared behind an `Arc` can be stopped; URLs handed
    /// out afterwards are dead.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let accept = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
    }

    fn url(&self, kind: &str, pending: Pending) -> Result<String, RequestError> {
        let token = self.tokens.insert(pending).map_err(|e| match e {
            TokenError::Full => RequestError::TooManyPending,
            TokenError::Random(e) => RequestError::Token(e),
        })?;
        Ok(format!("http://{}/{kind}/{token}", self.addr))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let accept = self.accept.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(accept) = accept.take() {
            accept.abort();
        }
    }
}

fn check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), RequestError> {
    if !(stdin || stdout || stderr) {
        return Err(RequestError::NoStreams);
    }
    if tty && stderr {
        return Err(RequestError::TtyAndStderr);
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Typically EMFILE; back off instead of spinning.
                tracing::warn!("streaming server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut stop = shared.stop.clone();
            let svc_shared = shared.clone();
            let svc = hyper::service::service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { Ok::<_, Infallible>(upgrade::handle(req, shared)) }
            });
            // A client gets 30 s to send its request head, so idle sockets
            // that never ask for anything do not pile up.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!("streaming connection from {peer}: {e}") },
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}
