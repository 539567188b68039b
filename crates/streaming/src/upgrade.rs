//! The HTTP side of a streaming request: `/exec/TOKEN`, `/attach/TOKEN` and
//! `/portforward/TOKEN` redeem the token and upgrade the connection to
//! SPDY/3.1 or WebSocket, negotiating the subprotocol as kubelet does.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::remotecommand::{self, Op};
use crate::server::Shared;
use crate::tokens::Pending;
use crate::{portforward, websocket, PortForwardRequest};

const PROTOCOL_HEADER: &str = "x-stream-protocol-version";

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

pub(crate) fn handle(mut req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
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
