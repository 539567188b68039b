//! The port-forward listener (guest vsock port 1025): TCP connections to
//! `127.0.0.1:<port>` inside the pod's network namespace, for the host's
//! `httpGet`/`tcpSocket` probes and hooks. The line protocol and the host
//! side are in `vmrun_proto::port_forward`.
//!
//! Connecting inside the pod's namespace: a short-lived thread enters it
//! with `setns(CLONE_NEWNET)` (network namespaces are per thread), connects
//! and exits; the socket stays in the namespace it was created in. The
//! runtime's own threads never change namespace.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sched::CloneFlags;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use vmrun_proto::port_forward as pf;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// After an `ERR`: how long (and how many bytes) to read what the client
/// still sends, so closing does not turn into a reset that could hide the
/// `ERR` line from it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_BYTES: u64 = 64 << 10;

/// Serves one connection: request line, connect, `OK`, then bytes both
/// ways until both sides have closed (EOF on one side becomes a write
/// shutdown of the other). `netns` yields the namespace to connect in
/// (`None`: the agent's own); it is awaited only once the request is valid.
pub(crate) async fn serve_connection<S>(mut conn: S, netns: impl Future<Output = Option<Arc<File>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let line = tokio::time::timeout(
        REQUEST_TIMEOUT,
        pf::read_line(&mut conn, pf::MAX_REQUEST_LINE),
    )
    .await;
    let line = match line {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            tracing::debug!("port forward: read the request: {e}");
            return;
        }
        Err(_) => return reject(&mut conn, "timed out waiting for the request line").await,
    };
    let port = match pf::request_port(&line) {
        Ok(port) => port,
        Err(reason) => return reject(&mut conn, reason).await,
    };
    let mut tcp = match connect(port, netns.await).await {
        Ok(tcp) => tcp,
        Err(reason) => return reject(&mut conn, &reason).await,
    };
    if conn.write_all(pf::OK_REPLY).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut conn, &mut tcp).await {
        Ok((up, down)) => tracing::debug!("port forward {port}: closed ({up} B in, {down} B out)"),
        Err(e) => tracing::debug!("port forward {port}: {e}"),
    }
}

async fn reject<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut S, reason: &str) {
    tracing::debug!("port forward: {reason}");
    if conn.write_all(&pf::err_reply(reason)).await.is_err() {
        return;
    }
    let _ = conn.shutdown().await;
    let mut rest = (&mut *conn).take(DRAIN_BYTES);
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tokio::io::copy(&mut rest, &mut sink)).await;
}

/// The `ERR` reason for a failed connect.
fn connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => pf::CONNECTION_REFUSED.into(),
        io::ErrorKind::TimedOut => {
            format!("connect timed out after {:?}", pf::AGENT_CONNECT_TIMEOUT)
        }
        _ => format!("connect: {e}"),
    }
}

/// Connects to 127.0.0.1:`port`, inside `netns` if given.
async fn connect(port: u16, netns: Option<Arc<File>>) -> Result<TcpStream, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Some(netns) = netns else {
        return match tokio::time::timeout(pf::AGENT_CONNECT_TIMEOUT, TcpStream::connect(addr)).await
        {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => Err(connect_error(&e)),
            Err(_) => Err(connect_error(&io::ErrorKind::TimedOut.into())),
        };
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-connect".into())
        .spawn(move || {
            let _ = tx.send(connect_in(&netns, addr));
        })
        .map_err(|e| format!("spawn the connect thread: {e}"))?;
    let tcp = rx
        .await
        .map_err(|_| "the connect thread failed".to_string())??;
    let _ = tcp.set_nodelay(true);
    tcp.set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(tcp))
        .map_err(|e| format!("register the socket: {e}"))
}

/// Runs on its own thread, which ends right after: enters `netns` (this
/// thread only) and connects; the socket keeps that namespace.
fn connect_in(netns: &File, addr: SocketAddr) -> Result<std::net::TcpStream, String> {
    nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter the pod's network namespace: {e}"))?;
    std::net::TcpStream::connect_timeout(&addr, pf::AGENT_CONNECT_TIMEOUT)
        .map_err(|e| connect_error(&e))
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;
    use tokio::net::TcpListener;

    use super::*;

    /// Runs `serve_connection` in the agent's own namespace on one end of
    /// an in-memory pipe and returns the other end.
    fn serve() -> tokio::io::DuplexStream {
        let (client, server) = duplex(4096);
        tokio::spawn(serve_connection(server, async { None }));
        client
    }

    async fn reply(client: &mut tokio::io::DuplexStream) -> String {
        match pf::read_line(client, pf::MAX_REPLY_LINE).await.unwrap() {
            pf::Line::Complete(l) => String::from_utf8(l).unwrap(),
            other => panic!("no reply line: {other:?}"),
        }
    }

    #[tokio::test]
    async fn forwards_both_ways_with_half_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            tcp.read_to_end(&mut got).await.unwrap();
            tcp.write_all(b"got ").await.unwrap();
            tcp.write_all(&got).await.unwrap();
        });
        let mut client = serve();
        client
            .write_all(format!("{port}\nhello").as_bytes())
            .await
            .unwrap();
        assert_eq!(reply(&mut client).await, "OK");
        client.shutdown().await.unwrap();
        let mut back = String::new();
        client.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, "got hello");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refused_and_garbage_get_err() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let cases = [
            (format!("{port}\n"), "ERR connection refused".to_string()),
            (
                "http\n".into(),
                format!("ERR {}", pf::parse_request(b"x").unwrap_err()),
            ),
            ("0\n".into(), "ERR port out of range 1-65535".into()),
            ("1".repeat(40), "ERR request line too long".into()),
        ];
        for (request, want) in cases {
            let mut client = serve();
            client.write_all(request.as_bytes()).await.unwrap();
            assert_eq!(reply(&mut client).await, want, "{request:?}");
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{request:?}: {rest:?}");
        }
        let mut client = serve();
        client.write_all(b"80").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(
            reply(&mut client).await,
            "ERR closed before the end of the request line"
        );
    }
}
