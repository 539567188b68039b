//! The server driven by a WebSocket client.

use std::collections::HashMap;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::*;

pub(super) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub(super) async fn ws_connect(url: &str, protocols: &str) -> (Ws, String) {
    let mut req = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    let proto = resp.headers()["sec-websocket-protocol"]
        .to_str()
        .unwrap()
        .to_string();
    (ws, proto)
}

/// Reads messages until the server closes; returns the data per channel.
pub(super) async fn ws_drain(ws: &mut Ws) -> HashMap<u8, Vec<u8>> {
    let mut got: HashMap<u8, Vec<u8>> = HashMap::new();
    loop {
        let msg = tokio::time::timeout(T, ws.next())
            .await
            .expect("message in time");
        match msg {
            Some(Ok(Message::Binary(b))) => got.entry(b[0]).or_default().extend_from_slice(&b[1..]),
            Some(Ok(Message::Close(_))) | None => return got,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn websocket_v5_exec_with_stdin_close() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["echo", "7"], true, false)).unwrap();
    let (mut ws, proto) = ws_connect(&url, "v5.channel.k8s.io, v4.channel.k8s.io").await;
    assert_eq!(proto, "v5.channel.k8s.io");
    ws.send(Message::binary(b"\x00hello".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![255, 0])).await.unwrap();
    let got = ws_drain(&mut ws).await;
    assert_eq!(got[&1], b"hello");
    let st = status_of(&got[&3]);
    assert_eq!(st["reason"], "NonZeroExitCode");
    assert_eq!(st["details"]["causes"][0]["message"], "7");
    srv.shutdown().await;
}

#[tokio::test]
async fn websocket_v4_exec() {
    let (srv, _) = server().await;
    let url = srv
        .get_exec(exec(&["print", "hi there"], false, false))
        .unwrap();
    let (mut ws, proto) = ws_connect(&url, "v4.channel.k8s.io").await;
    assert_eq!(proto, "v4.channel.k8s.io");
    let got = ws_drain(&mut ws).await;
    assert_eq!(got[&1], b"hi there");
    assert_eq!(
        status_of(&got[&3]),
        serde_json::json!({"metadata": {}, "status": "Success"})
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn websocket_v4_base64_exec() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["print", "b64"], false, false)).unwrap();
    let (mut ws, proto) = ws_connect(&url, "v4.base64.channel.k8s.io").await;
    assert_eq!(proto, "v4.base64.channel.k8s.io");
    let mut out = Vec::new();
    while let Some(Ok(m)) = tokio::time::timeout(T, ws.next()).await.unwrap() {
        if let Message::Text(t) = m {
            if let Some(b) = t.strip_prefix('1') {
                use base64::Engine;
                out.extend(base64::engine::general_purpose::STANDARD.decode(b).unwrap());
            }
        }
    }
    assert_eq!(out, b"b64");
    srv.shutdown().await;
}

#[tokio::test]
async fn websocket_portforward() {
    let (srv, _) = server().await;
    let req = PortForwardRequest {
        pod_sandbox_id: "pod1".into(),
        ports: vec![],
    };
    let url = srv.get_port_forward(req).unwrap() + "?port=8080&port=1";
    let (mut ws, proto) = ws_connect(&url, "v4.channel.k8s.io").await;
    assert_eq!(proto, "v4.channel.k8s.io");
    ws.send(Message::binary(b"\x00abc".to_vec())).await.unwrap();
    let mut got: HashMap<u8, Vec<u8>> = HashMap::new();
    let want_err = b"\x01\x00error forwarding port 1 to pod pod1: connection refused".to_vec();
    while got.get(&0).map(|v| v.as_slice()) != Some(b"\x90\x1f8080:abc")
        || got.get(&3) != Some(&want_err)
    {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = m {
            got.entry(b[0]).or_default().extend_from_slice(&b[1..]);
        }
    }
    assert_eq!(got[&1], b"\x90\x1f");
    ws.close(None).await.unwrap();
    srv.shutdown().await;
}

#[tokio::test]
async fn backend_errors_are_reported_as_status() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["no-such"], false, false)).unwrap();
    let (mut ws, _) = ws_connect(&url, "v4.channel.k8s.io").await;
    let st = status_of(&ws_drain(&mut ws).await[&3]);
    assert_eq!(st["status"], "Failure");
    assert_eq!(st["message"], "no such command");
    srv.shutdown().await;
}
