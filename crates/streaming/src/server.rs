//! The HTTP side: hands out URLs for validated requests, and serves
//! `/exec/TOKEN`, `/attach/TOKEN` and `/portforward/TOKEN` by upgrading the
//! connection to SPDY/3.1 or WebSocket.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::remotecommand::{self, Op};
use crate::tokens::{Pending, TokenCache, TokenError};
use crate::{
    portforward, websocket, AttachRequest, Backend, Config, ExecRequest, PortForwardRequest,
};

const PROTOCOL_HEADER: &str = "x-stream-protocol-version";

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

/// A running streaming server; dropping it without [`Server::shutdown`]
/// leaves the accept loop running until the runtime stops.
pub struct Server {
    addr: SocketAddr,
    tokens: Arc<TokenCache>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

struct Shared {
    tokens: Arc<TokenCache>,
    backend: Arc<dyn Backend>,
    idle: Duration,
    stop: watch::Receiver<bool>,
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
            accept,
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

    /// Stops accepting and closes open streaming connections.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.accept.abort();
        let _ = self.accept.await;
    }

    fn url(&self, kind: &str, pending: Pending) -> Result<String, RequestError> {
        let token = self.tokens.insert(pending).map_err(|e| match e {
            TokenError::Full => RequestError::TooManyPending,
            TokenError::Random(e) => RequestError::Token(e),
        })?;
        Ok(format!("http://{}/{kind}/{token}", self.addr))
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
                async move { Ok::<_, Infallible>(handle(req, shared)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!("streaming connection from {peer}: {e}") },
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

fn plain(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// All values of a header that may be repeated or comma-separated.
fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn handle(mut req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::POST {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and POST are supported\n",
        );
    }
    let path = req.uri().path().trim_end_matches('/');
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(kind), Some(token)) = (parts.next(), parts.next()) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if !matches!(kind, "exec" | "attach" | "portforward") || token.contains('/') {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    let pending = match shared.tokens.take(token) {
        Some(p) if kind_of(&p) == kind => p,
        // Unknown, expired, already used, or a token for another kind.
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "streaming token not found, expired or already used\n",
            )
        }
    };

    let headers = req.headers();
    let upgrade = has_token(headers, header::CONNECTION, "upgrade");
    let websocket = upgrade && has_token(headers, header::UPGRADE, "websocket");
    let spdy = upgrade && has_token(headers, header::UPGRADE, "SPDY/3.1");
    if websocket {
        upgrade_websocket(&mut req, pending, shared)
    } else if spdy {
        upgrade_spdy(&mut req, pending, shared)
    } else {
        plain(
            StatusCode::BAD_REQUEST,
            "an upgrade to SPDY/3.1 or websocket is required\n",
        )
    }
}

fn kind_of(p: &Pending) -> &'static str {
    match p {
        Pending::Exec(_) => "exec",
        Pending::Attach(_) => "attach",
        Pending::PortForward(_) => "portforward",
    }
}

fn upgrade_spdy(
    req: &mut Request<Incoming>,
    pending: Pending,
    shared: Arc<Shared>,
) -> Response<Full<Bytes>> {
    let offered = list(req.headers(), PROTOCOL_HEADER);
    let supported: &[&str] = match pending {
        Pending::PortForward(_) => &[portforward::PROTOCOL],
        _ => remotecommand::SPDY_PROTOCOLS,
    };
    // As httpstream.Handshake: the first of the client's protocols we know;
    // a client naming none gets the oldest protocol.
    let protocol = if offered.is_empty() {
        String::new()
    } else if let Some(p) = offered.iter().find(|o| supported.contains(&o.as_str())) {
        p.clone()
    } else {
        return plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {supported:?}\n"
            ),
        );
    };
    let chosen = supported.iter().copied().find(|p| *p == protocol);
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => return tracing::debug!("spdy upgrade failed: {e}"),
        };
        let (backend, idle) = (shared.backend.clone(), shared.idle);
        let mut stop = shared.stop.clone();
        let serve = async move {
            match pending {
                Pending::Exec(r) => {
                    remotecommand::serve_spdy(io, protocol, Op::Exec(r), backend, idle).await
                }
                Pending::Attach(r) => {
                    remotecommand::serve_spdy(io, protocol, Op::Attach(r), backend, idle).await
                }
                Pending::PortForward(r) => {
                    portforward::serve_spdy(io, r.pod_sandbox_id, backend, idle).await
                }
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    });
    let mut resp = plain(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = resp.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if let Some(p) = chosen {
        h.insert(PROTOCOL_HEADER, HeaderValue::from_static(p));
    }
    resp
}

fn upgrade_websocket(
    req: &mut Request<Incoming>,
    pending: Pending,
    shared: Arc<Shared>,
) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    let offered = list(req.headers(), header::SEC_WEBSOCKET_PROTOCOL.as_str());
    let supported = match pending {
        Pending::PortForward(_) => websocket::PORTFORWARD_PROTOCOLS,
        _ => websocket::REMOTECOMMAND_PROTOCOLS,
    };
    let Some(protocol) = websocket::choose(&offered, supported) else {
        return plain(
            StatusCode::BAD_REQUEST,
            format!(
                "requested protocol(s) are not supported: {offered:?}; supports {supported:?}\n"
            ),
        );
    };
    let pending = match pending {
        Pending::PortForward(r) if protocol == websocket::SPDY_TUNNEL => Pending::PortForward(r),
        Pending::PortForward(r) => match ports_from_query(req.uri().query(), &r.ports) {
            Ok(ports) => Pending::PortForward(PortForwardRequest { ports, ..r }),
            Err(msg) => return plain(StatusCode::BAD_REQUEST, msg),
        },
        p => p,
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => return tracing::debug!("websocket upgrade failed: {e}"),
        };
        let ws =
            WebSocketStream::from_raw_socket(io, Role::Server, Some(websocket::config())).await;
        let (backend, idle) = (shared.backend.clone(), shared.idle);
        let mut stop = shared.stop.clone();
        let serve = async move {
            match pending {
                Pending::Exec(r) => {
                    websocket::serve_remotecommand(ws, protocol, Op::Exec(r), backend, idle).await
                }
                Pending::Attach(r) => {
                    websocket::serve_remotecommand(ws, protocol, Op::Attach(r), backend, idle).await
                }
                Pending::PortForward(r) if protocol == websocket::SPDY_TUNNEL => {
                    websocket::serve_spdy_tunnel(ws, r.pod_sandbox_id, backend, idle).await
                }
                Pending::PortForward(r) => {
                    websocket::serve_portforward(
                        ws,
                        protocol,
                        r.pod_sandbox_id,
                        r.ports,
                        backend,
                        idle,
                    )
                    .await
                }
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    });
    let mut resp = plain(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = resp.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if !protocol.is_empty() {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    resp
}

/// `?port=80&port=8080` (or `port=80,8080`), as kubelet reads them; without
/// any, the ports of the CRI request.
fn ports_from_query(query: Option<&str>, default: &[u16]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        let Some(value) = pair.strip_prefix("port=") else {
            continue;
        };
        for p in value.split("%2C").flat_map(|v| v.split(',')) {
            match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => return Err(format!("invalid port {p:?}\n")),
            }
        }
    }
    if ports.is_empty() {
        ports = default.to_vec();
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required\n".into());
    }
    if ports.len() > websocket::MAX_WS_PORTS {
        return Err(format!(
            "at most {} ports per connection\n",
            websocket::MAX_WS_PORTS
        ));
    }
    Ok(ports)
}
