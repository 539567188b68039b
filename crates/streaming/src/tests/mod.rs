//! End-to-end tests: the server driven by real protocol clients (a WebSocket
//! client, and a minimal SPDY/3.1 client built on the crate's own codec)
//! against a fake backend.

mod interop;
mod server;
mod spdy;
mod websocket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::*;

pub(super) const T: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct Fake {
    pub(super) resizes: Mutex<Vec<TerminalSize>>,
}

pub(super) async fn read_all(r: &mut (dyn AsyncRead + Send + Unpin)) -> Vec<u8> {
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

pub(super) async fn server() -> (Server, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let backend: Arc<dyn Backend> = Arc::new(fake.clone());
    (
        Server::start(Config::default(), backend).await.unwrap(),
        fake,
    )
}

pub(super) fn exec(cmd: &[&str], stdin: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: false,
    }
}

pub(super) fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    (addr.to_string(), format!("/{path}"))
}

/// Sends a request and reads the response head; returns the stream, the
/// status code and the lower-cased headers.
pub(super) async fn http(url: &str, extra: &str) -> (TcpStream, u16, HashMap<String, String>) {
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

pub(super) async fn body(mut tcp: TcpStream, headers: &HashMap<String, String>) -> String {
    let len: usize = headers["content-length"].parse().unwrap();
    let mut b = vec![0; len];
    tcp.read_exact(&mut b).await.unwrap();
    String::from_utf8(b).unwrap()
}

pub(super) fn status_of(raw: &[u8]) -> serde_json::Value {
    serde_json::from_slice(raw).unwrap()
}
