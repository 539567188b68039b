//! Tokens, routing and request validation.

use super::*;

#[tokio::test]
async fn tokens_are_single_use_and_checked() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["print", "x"], false, false)).unwrap();
    let upgrade = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n";
    let (tcp, status, _) = http(&url, upgrade).await;
    assert_eq!(status, 101);
    drop(tcp);
    let (tcp, status, h) = http(&url, upgrade).await;
    assert_eq!(status, 404);
    assert!(body(tcp, &h)
        .await
        .contains("not found, expired or already used"));

    let base = format!("http://{}", srv.local_addr());
    for path in ["/exec/bogus", "/nothing", "/exec/"] {
        let (_, status, _) = http(&format!("{base}{path}"), upgrade).await;
        assert_eq!(status, 404, "{path}");
    }
    // A token only works for its own kind.
    let url = srv.get_exec(exec(&["print", "x"], false, false)).unwrap();
    let (_, status, _) = http(&url.replace("/exec/", "/attach/"), upgrade).await;
    assert_eq!(status, 404);
    // Without an upgrade there is nothing to serve.
    let url = srv.get_exec(exec(&["print", "x"], false, false)).unwrap();
    let (_, status, _) = http(&url, "").await;
    assert_eq!(status, 400);
    // An unknown protocol is refused.
    let url = srv.get_exec(exec(&["print", "x"], false, false)).unwrap();
    let bad = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v9.channel.k8s.io\r\n";
    let (_, status, _) = http(&url, bad).await;
    assert_eq!(status, 403);
    srv.shutdown().await;
}

#[tokio::test]
async fn tokens_expire() {
    let fake = Arc::new(Fake::default());
    let config = Config {
        token_ttl: Duration::from_millis(50),
        ..Config::default()
    };
    let srv = Server::start(config, Arc::new(fake)).await.unwrap();
    let url = srv.get_exec(exec(&["print", "x"], false, false)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, status, _) = http(&url, "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n").await;
    assert_eq!(status, 404);
    srv.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_are_refused() {
    let (srv, _) = server().await;
    let mut r = exec(&["x"], false, false);
    r.stdout = false;
    assert_eq!(srv.get_exec(r), Err(RequestError::NoStreams));
    let mut r = exec(&["x"], false, true);
    r.stderr = true;
    assert_eq!(
        srv.get_exec(r).unwrap_err().to_string(),
        "tty and stderr cannot both be true"
    );
    assert_eq!(
        srv.get_exec(exec(&[], true, false)),
        Err(RequestError::EmptyCommand)
    );
    let mut r = exec(&["x"], true, false);
    r.container_id.clear();
    assert_eq!(srv.get_exec(r), Err(RequestError::MissingContainerId));
    let a = AttachRequest {
        container_id: "c".into(),
        tty: true,
        stdin: true,
        stdout: true,
        stderr: true,
    };
    assert_eq!(srv.get_attach(a), Err(RequestError::TtyAndStderr));
    let p = PortForwardRequest {
        pod_sandbox_id: String::new(),
        ports: vec![80],
    };
    assert_eq!(
        srv.get_port_forward(p),
        Err(RequestError::MissingPodSandboxId)
    );
    let url = srv.get_exec(exec(&["x"], true, false)).unwrap();
    assert!(url.starts_with(&format!("http://{}/exec/", srv.local_addr())));
    srv.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let fake = Arc::new(Fake::default());
    let config = Config {
        idle_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let srv = Server::start(config, Arc::new(fake)).await.unwrap();
    // An exec waiting for stdin that never comes, over each transport.
    let url = srv.get_exec(exec(&["echo"], true, false)).unwrap();
    let (mut c, _) = spdy::Spdy::connect(&url, &["v4.channel.k8s.io"]).await;
    c.open(&[("streamType", "error")]).await;
    c.open(&[("streamType", "stdin")]).await;
    c.open(&[("streamType", "stdout")]).await;
    let start = std::time::Instant::now();
    assert!(c.drain().await.values().all(|(d, _)| d.is_empty()));
    assert!(start.elapsed() >= Duration::from_millis(250));

    let url = srv.get_exec(exec(&["echo"], true, false)).unwrap();
    let (mut ws, _) = websocket::ws_connect(&url, "v5.channel.k8s.io").await;
    let got = websocket::ws_drain(&mut ws).await;
    assert!(!got.contains_key(&3), "no status after an idle close");
    srv.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_open_connections() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["echo"], true, false)).unwrap();
    let (mut c, _) = spdy::Spdy::connect(&url, &["v4.channel.k8s.io"]).await;
    c.open(&[("streamType", "error")]).await;
    c.open(&[("streamType", "stdin")]).await;
    c.open(&[("streamType", "stdout")]).await;
    let url = srv.get_exec(exec(&["echo"], true, false)).unwrap();
    let (mut ws, _) = websocket::ws_connect(&url, "v5.channel.k8s.io").await;
    let addr = srv.local_addr();
    srv.shutdown().await;
    assert!(c.drain().await.values().all(|(d, _)| d.is_empty()));
    // Shutdown is abrupt: the socket just closes.
    use futures::StreamExt;
    let end = tokio::time::timeout(T, async { while let Some(Ok(_)) = ws.next().await {} });
    end.await.expect("websocket closed");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}
