//! Probes and lifecycle hooks: exec, httpGet, tcpSocket (and sleep for hooks).

use std::sync::Arc;
use std::time::Duration;

use crate::plan::Handler;
use crate::runtime::{PodStream, Running, Sandbox};

/// Runs a handler once; `Ok` means it succeeded, `Err` says why not.
pub async fn run_handler(
    sandbox: Arc<dyn Sandbox>,
    target: Arc<dyn Running>,
    handler: &Handler,
    timeout: Duration,
) -> Result<(), String> {
    match handler.clone() {
        Handler::Exec(argv) => {
            let out =
                tokio::task::spawn_blocking(move || sandbox.exec(target.as_ref(), &argv, timeout))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            if out.exit.success() {
                Ok(())
            } else {
                let text = String::from_utf8_lossy(&out.output);
                Err(format!("exit code {}: {}", out.exit.code, text.trim()))
            }
        }
        Handler::TcpSocket { port } => tokio::task::spawn_blocking(move || {
            sandbox
                .connect(port, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?,
        Handler::HttpGet {
            port,
            path,
            host,
            headers,
        } => tokio::task::spawn_blocking(move || {
            let mut stream = sandbox.connect(port, timeout).map_err(|e| e.to_string())?;
            http_get(stream.as_mut(), &path, host.as_deref(), &headers, timeout)
        })
        .await
        .map_err(|e| e.to_string())?,
        Handler::Sleep(d) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
    }
}

/// A minimal HTTP/1.1 GET: success is a status in 200..400, as the kubelet judges it.
fn http_get(
    stream: &mut dyn PodStream,
    path: &str,
    host: Option<&str>,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    stream.set_timeouts(timeout).map_err(|e| e.to_string())?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vmrun-probe\r\nConnection: close\r\n",
        host.unwrap_or("localhost")
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("reading the response: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn serve_once(response: &'static str) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(response.as_bytes()).unwrap();
        });
        port
    }

    #[test]
    fn http_status_decides() {
        let t = Duration::from_secs(5);
        let port = serve_once("HTTP/1.1 204 No Content\r\n\r\n");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(http_get(&mut s, "/", None, &[], t), Ok(()));
        let port = serve_once("HTTP/1.0 500 Oops\r\n\r\n");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(
            http_get(&mut s, "/", None, &[], t),
            Err("HTTP status 500".into())
        );
        let port = serve_once("garbage");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(http_get(&mut s, "/", None, &[], t)
            .unwrap_err()
            .contains("not an HTTP response"));
    }
}
