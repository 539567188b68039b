//! End-to-end tests: the server driven by real protocol clients (a WebSocket
//! client, and a minimal SPDY/3.1 client built on the crate's own codec)
//! against a fake backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::spdy::frame::{self, Control, Head};
use crate::spdy::headers::{Decoder, Encoder};
use crate::*;

const T: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Fake {
    resizes: Mutex<Vec<TerminalSize>>,
}

async fn read_all(r: &mut (dyn AsyncRead + Send + Unpin)) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v).await;
    v
}

impl Backend for Arc<Fake> {
    fn exec(&self, req: ExecRequest, mut s: Streams) -> BoxFuture<'static, Result<i32, String>> {
        let me = self.clone();
        async move {
            let arg = req.cmd.get(1).cloned().unwrap_or_default();
            match req.cmd[0].as_str() {
                // Copies stdin to stdout; exits with the code in cmd[1].
                "echo" => {
                    if let (Some(i), Some(o)) = (s.stdin.as_mut(), s.stdout.as_mut()) {
                        tokio::io::copy(i, o).await.map_err(|e| e.to_string())?;
                    }
                    Ok(arg.parse().unwrap_or(0))
                }
                "print" => {
                    let out = if req.stderr {
                        s.stderr.as_mut()
                    } else {
                        s.stdout.as_mut()
                    };
                    out.unwrap()
                        .write_all(arg.as_bytes())
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(0)
                }
                // Reports cmd[1] resize events on stdout.
                "resize" => {
                    let mut rx = s.resize.take().ok_or("no resize channel")?;
                    for _ in 0..arg.parse::<usize>().unwrap_or(1) {
                        let Some(size) = rx.recv().await else { break };
                        me.resizes.lock().unwrap().push(size);
                        let line = format!("{}x{}\n", size.width, size.height);
                        s.stdout
                            .as_mut()
                            .unwrap()
                            .write_all(line.as_bytes())
                            .await
                            .unwrap();
                    }
                    Ok(0)
                }
                _ => Err("no such command".to_string()),
            }
        }
        .boxed()
    }

    fn attach(
        &self,
        _req: AttachRequest,
        mut s: Streams,
    ) -> BoxFuture<'static, Result<(), String>> {
        async move {
            let input = read_all(s.stdin.as_mut().unwrap().as_mut()).await;
            let out = s.stdout.as_mut().unwrap();
            out.write_all(b"attached:").await.unwrap();
            out.write_all(&input).await.unwrap();
            Ok(())
        }
        .boxed()
    }

    fn port_forward(
        &self,
        _sandbox: String,
        port: u16,
        stream: Box<dyn AsyncReadWrite>,
    ) -> BoxFuture<'static, Result<(), String>> {
        async move {
            if port == 1 {
                return Err("connection refused".into());
            }
            let (mut r, mut w) = tokio::io::split(stream);
            let mut buf = [0u8; 1024];
            loop {
                let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                w.write_all(format!("{port}:").as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                w.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
            }
        }
        .boxed()
    }
}

async fn server() -> (Server, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let backend: Arc<dyn Backend> = Arc::new(fake.clone());
    (
        Server::start(Config::default(), backend).await.unwrap(),
        fake,
    )
}

fn exec(cmd: &[&str], stdin: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: false,
    }
}

fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    (addr.to_string(), format!("/{path}"))
}

/// Sends a request and reads the response head; returns the stream, the
/// status code and the lower-cased headers.
async fn http(url: &str, extra: &str) -> (TcpStream, u16, HashMap<String, String>) {
    let (addr, path) = split_url(url);
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    let req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n{extra}\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1, "eof in response head");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (tcp, status, headers)
}

async fn body(mut tcp: TcpStream, headers: &HashMap<String, String>) -> String {
    let len: usize = headers["content-length"].parse().unwrap();
    let mut b = vec![0; len];
    tcp.read_exact(&mut b).await.unwrap();
    String::from_utf8(b).unwrap()
}

// ---------------------------------------------------------------- SPDY client

struct Spdy {
    rd: ReadHalf<TcpStream>,
    wr: WriteHalf<TcpStream>,
    enc: Encoder,
    dec: Decoder,
    next_id: u32,
}

#[derive(Debug, PartialEq)]
enum Ev {
    Reply(u32),
    Data(u32, Vec<u8>, bool),
    Rst(u32),
    GoAway,
    Ping(u32),
    Eof,
}

impl Spdy {
    async fn connect(url: &str, protocols: &[&str]) -> (Spdy, String) {
        let mut extra = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n".to_string();
        for p in protocols {
            extra.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
        }
        let (tcp, status, headers) = http(url, &extra).await;
        assert_eq!(status, 101);
        assert_eq!(headers["upgrade"], "SPDY/3.1");
        let chosen = headers
            .get("x-stream-protocol-version")
            .cloned()
            .unwrap_or_default();
        let (rd, wr) = tokio::io::split(tcp);
        let s = Spdy {
            rd,
            wr,
            enc: Encoder::new().unwrap(),
            dec: Decoder::new(),
            next_id: 1,
        };
        (s, chosen)
    }

    async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        let block = self.enc.encode(headers).unwrap();
        self.wr
            .write_all(&frame::encode_syn_stream(id, false, &block))
            .await
            .unwrap();
        // Like the Go client, wait for the reply before going on.
        loop {
            match self.next().await {
                Ev::Reply(r) if r == id => return id,
                Ev::Reply(_) | Ev::Ping(_) => {}
                other => panic!("waiting for reply to {id}: {other:?}"),
            }
        }
    }

    async fn send(&mut self, id: u32, data: &[u8], fin: bool) {
        self.wr
            .write_all(&frame::encode_data(id, fin, data))
            .await
            .unwrap();
    }

    async fn next(&mut self) -> Ev {
        tokio::time::timeout(T, self.next_inner())
            .await
            .expect("spdy frame in time")
    }

    async fn next_inner(&mut self) -> Ev {
        loop {
            let Some(head) = frame::read_head(&mut self.rd).await.unwrap() else {
                return Ev::Eof;
            };
            match head {
                Head::Data {
                    stream_id,
                    flags,
                    len,
                } => {
                    let mut b = vec![0; len];
                    self.rd.read_exact(&mut b).await.unwrap();
                    return Ev::Data(stream_id, b, flags & frame::FLAG_FIN != 0);
                }
                Head::Control { kind, flags, len } => {
                    let mut p = vec![0; len];
                    self.rd.read_exact(&mut p).await.unwrap();
                    match frame::parse_control(kind, flags, p).unwrap() {
                        Control::SynReply {
                            stream_id, block, ..
                        } => {
                            self.dec.decode(&block).unwrap();
                            return Ev::Reply(stream_id);
                        }
                        Control::RstStream { stream_id, .. } => return Ev::Rst(stream_id),
                        Control::GoAway => return Ev::GoAway,
                        Control::Ping { id } => return Ev::Ping(id),
                        Control::WindowUpdate { .. } => continue,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        }
    }

    /// Collects each stream's data until GOAWAY; the bool says FIN was seen.
    async fn drain(&mut self) -> HashMap<u32, (Vec<u8>, bool)> {
        let mut got: HashMap<u32, (Vec<u8>, bool)> = HashMap::new();
        loop {
            match self.next().await {
                Ev::Data(id, d, fin) => {
                    let e = got.entry(id).or_default();
                    e.0.extend(d);
                    e.1 |= fin;
                }
                Ev::GoAway | Ev::Eof => return got,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn status_of(raw: &[u8]) -> serde_json::Value {
    serde_json::from_slice(raw).unwrap()
}

#[tokio::test]
async fn spdy_exec_stdin_to_stdout() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["echo", "0"], true, false)).unwrap();
    let (mut c, proto) = Spdy::connect(&url, &["v4.channel.k8s.io", "v3.channel.k8s.io"]).await;
    assert_eq!(proto, "v4.channel.k8s.io");
    let err = c.open(&[("streamType", "error")]).await;
    let stdin = c.open(&[("streamType", "stdin")]).await;
    let stdout = c.open(&[("streamType", "stdout")]).await;
    c.send(stdin, b"hello ", false).await;
    c.send(stdin, b"world", true).await;
    let got = c.drain().await;
    assert_eq!(got[&stdout], (b"hello world".to_vec(), true));
    assert_eq!(
        status_of(&got[&err].0),
        serde_json::json!({"metadata": {}, "status": "Success"})
    );
    assert!(got[&err].1);
    srv.shutdown().await;
}

#[tokio::test]
async fn spdy_exec_nonzero_exit_and_big_input() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["echo", "3"], true, false)).unwrap();
    let (mut c, _) = Spdy::connect(&url, &["v4.channel.k8s.io"]).await;
    let err = c.open(&[("streamType", "error")]).await;
    let stdin = c.open(&[("streamType", "stdin")]).await;
    let stdout = c.open(&[("streamType", "stdout")]).await;
    // Larger than the pipes and the SPDY window: must flow, not deadlock.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd_half, big2) = (c, big.clone());
    let writer = async {
        for chunk in big2.chunks(32 * 1024) {
            rd_half.send(stdin, chunk, false).await;
        }
        rd_half.send(stdin, b"", true).await;
        rd_half
    };
    // The server's output must be read concurrently; do it after writing
    // since the fake echo is bounded by the pipes and TCP buffers.
    let mut c = tokio::time::timeout(T, writer)
        .await
        .expect("stdin written");
    let got = c.drain().await;
    assert_eq!(got[&stdout].0.len(), big.len());
    assert!(got[&stdout].0 == big);
    let st = status_of(&got[&err].0);
    assert_eq!(st["status"], "Failure");
    assert_eq!(st["reason"], "NonZeroExitCode");
    assert_eq!(
        st["details"]["causes"][0],
        serde_json::json!({"reason": "ExitCode", "message": "3"})
    );
    assert!(st["message"]
        .as_str()
        .unwrap()
        .starts_with("command terminated with non-zero exit code"));
    srv.shutdown().await;
}

#[tokio::test]
async fn spdy_v2_reports_errors_as_text() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["echo", "2"], false, false)).unwrap();
    let (mut c, proto) = Spdy::connect(&url, &["v2.channel.k8s.io"]).await;
    assert_eq!(proto, "v2.channel.k8s.io");
    let err = c.open(&[("streamType", "error")]).await;
    let _stdout = c.open(&[("streamType", "stdout")]).await;
    let got = c.drain().await;
    let text = String::from_utf8(got[&err].0.clone()).unwrap();
    assert!(
        text.contains("non-zero exit code") && text.ends_with("exited with 2"),
        "{text}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn spdy_tty_resize() {
    let (srv, fake) = server().await;
    let url = srv.get_exec(exec(&["resize", "2"], true, true)).unwrap();
    let (mut c, _) = Spdy::connect(&url, &["v4.channel.k8s.io"]).await;
    let err = c.open(&[("streamType", "error")]).await;
    let _stdin = c.open(&[("streamType", "stdin")]).await;
    let stdout = c.open(&[("streamType", "stdout")]).await;
    let resize = c.open(&[("streamType", "resize")]).await;
    c.send(resize, br#"{"Width":80,"Height":24}"#, false).await;
    c.send(resize, b"\n{\"Width\":100,", false).await;
    c.send(resize, b"\"Height\":50}\n", false).await;
    let got = c.drain().await;
    assert_eq!(got[&stdout].0, b"80x24\n100x50\n");
    assert_eq!(status_of(&got[&err].0)["status"], "Success");
    assert_eq!(
        *fake.resizes.lock().unwrap(),
        [
            TerminalSize {
                width: 80,
                height: 24
            },
            TerminalSize {
                width: 100,
                height: 50
            }
        ]
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn spdy_attach_and_ping() {
    let (srv, _) = server().await;
    let req = AttachRequest {
        container_id: "c1".into(),
        tty: false,
        stdin: true,
        stdout: true,
        stderr: false,
    };
    let url = srv.get_attach(req).unwrap();
    let (mut c, _) = Spdy::connect(&url, &["v4.channel.k8s.io"]).await;
    c.wr.write_all(&frame::encode_ping(1)).await.unwrap();
    assert_eq!(c.next().await, Ev::Ping(1));
    let err = c.open(&[("streamType", "error")]).await;
    let stdin = c.open(&[("streamType", "stdin")]).await;
    let stdout = c.open(&[("streamType", "stdout")]).await;
    c.send(stdin, b"hi", true).await;
    let got = c.drain().await;
    assert_eq!(got[&stdout].0, b"attached:hi");
    assert_eq!(status_of(&got[&err].0)["status"], "Success");
    srv.shutdown().await;
}

#[tokio::test]
async fn spdy_portforward_pairs_streams_by_request_id() {
    let (srv, _) = server().await;
    let url = srv
        .get_port_forward(PortForwardRequest {
            pod_sandbox_id: "pod1".into(),
            ports: vec![],
        })
        .unwrap();
    let (mut c, proto) = Spdy::connect(&url, &["portforward.k8s.io"]).await;
    assert_eq!(proto, "portforward.k8s.io");
    let e0 = c
        .open(&[("streamType", "error"), ("port", "80"), ("requestID", "0")])
        .await;
    let d0 = c
        .open(&[("streamType", "data"), ("port", "80"), ("requestID", "0")])
        .await;
    let e1 = c
        .open(&[("streamType", "error"), ("port", "1"), ("requestID", "1")])
        .await;
    let d1 = c
        .open(&[("streamType", "data"), ("port", "1"), ("requestID", "1")])
        .await;
    c.send(d0, b"ping", false).await;
    let mut data = Vec::new();
    let mut e1_text = Vec::new();
    let (mut e1_done, mut d1_done) = (false, false);
    while data != b"80:ping" || !e1_done || !d1_done {
        match c.next().await {
            Ev::Data(id, d, _) if id == d0 => data.extend(d),
            Ev::Data(id, d, fin) if id == e1 => {
                e1_text.extend(d);
                e1_done |= fin;
            }
            Ev::Data(id, _, fin) if id == d1 => d1_done |= fin,
            Ev::Data(id, d, _) if id == e0 => panic!("error on port 80: {d:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        String::from_utf8(e1_text).unwrap(),
        "error forwarding port 1 to pod pod1: connection refused"
    );
    // Closing our side ends the forward: data and error streams finish.
    c.send(d0, b"", true).await;
    let (mut d0_fin, mut e0_fin) = (false, false);
    while !(d0_fin && e0_fin) {
        match c.next().await {
            Ev::Data(id, d, fin) if id == d0 && d.is_empty() => d0_fin |= fin,
            Ev::Data(id, d, fin) if id == e0 && d.is_empty() => e0_fin |= fin,
            other => panic!("unexpected {other:?}"),
        }
    }
    srv.shutdown().await;
}

// ----------------------------------------------------------- WebSocket client

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(url: &str, protocols: &str) -> (Ws, String) {
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
async fn ws_drain(ws: &mut Ws) -> HashMap<u8, Vec<u8>> {
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

// ------------------------------------------------------- tokens, validation

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
async fn malformed_spdy_ends_only_that_connection() {
    let (srv, _) = server().await;
    let url = srv.get_exec(exec(&["print", "x"], false, false)).unwrap();
    let (mut c, _) = Spdy::connect(&url, &["v4.channel.k8s.io"]).await;
    // A SYN_STREAM whose header block is not zlib.
    let mut bad = frame::encode_syn_stream(1, false, b"garbage!");
    bad.extend(frame::encode_data(1, false, b"x"));
    c.wr.write_all(&bad).await.unwrap();
    assert!(matches!(c.next().await, Ev::GoAway | Ev::Eof));
    // The server still serves others.
    let url = srv.get_exec(exec(&["print", "ok"], false, false)).unwrap();
    let (mut c, _) = Spdy::connect(&url, &["v4.channel.k8s.io"]).await;
    let _err = c.open(&[("streamType", "error")]).await;
    let stdout = c.open(&[("streamType", "stdout")]).await;
    assert_eq!(c.drain().await[&stdout].0, b"ok");
    srv.shutdown().await;
}

// ------------------------------------------------------ client-go interop

/// Runs a client-go program (built from the vendored client-go of
/// cri-tools, see `testdata/interop.go`) against the server, when
/// `STREAMING_GO_CLIENT` names it; skipped otherwise.
async fn go_client(mode: &str, url: &str) -> Option<String> {
    let bin = std::env::var_os("STREAMING_GO_CLIENT")?;
    let out = tokio::process::Command::new(bin)
        .args([mode, url])
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{mode}: {text}");
    Some(text)
}

#[tokio::test]
async fn client_go_interop() {
    let (srv, fake) = server().await;
    for mode in ["exec-spdy", "exec-ws"] {
        let url = srv.get_exec(exec(&["echo", "3"], true, false)).unwrap();
        let Some(out) = go_client(mode, &url).await else {
            return;
        };
        assert!(out.contains("stdout=120000:"), "{mode}: {out}");
        assert!(
            out.contains("err=command terminated with exit code 3"),
            "{mode}: {out}"
        );
    }
    for mode in ["exec-spdy-tty", "exec-ws-tty"] {
        fake.resizes.lock().unwrap().clear();
        let url = srv.get_exec(exec(&["resize", "2"], true, true)).unwrap();
        let out = go_client(mode, &url).await.unwrap();
        assert!(out.contains("err=<nil>"), "{mode}: {out}");
        assert_eq!(fake.resizes.lock().unwrap().len(), 2, "{mode}");
    }
    for mode in ["pf-spdy", "pf-ws"] {
        let req = PortForwardRequest {
            pod_sandbox_id: "pod1".into(),
            ports: vec![80, 1],
        };
        let url = srv.get_port_forward(req).unwrap();
        let out = go_client(mode, &url).await.unwrap();
        assert!(out.contains(r#"port 80: "80:ping""#), "{mode}: {out}");
        // What the backend said reaches client-go on the error stream.
        let refused = "error forwarding port 1 to pod pod1: connection refused";
        assert!(out.contains(refused), "{mode}: {out}");
    }
    srv.shutdown().await;
}
