//! The handshake against a fake VMM: a unix listener that reads the
//! `CONNECT` line and answers as scripted.

use std::path::PathBuf;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::*;

/// Starts a fake VMM on a fresh socket that answers one connection with
/// `reply` (then closes it) and returns the line the client sent.
fn fake_vmm(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        reader.get_mut().write_all(reply).await.unwrap();
        line
    });
    (dir, path, task)
}

#[tokio::test]
async fn ok_reply_returns_host_port_and_keeps_following_bytes() {
    let (_dir, path, vmm) = fake_vmm(b"OK 1073741824\nguest bytes");
    let mut stream = UnixStream::connect(&path).await.unwrap();
    assert_eq!(handshake(&mut stream, 1024).await.unwrap(), 1073741824);
    assert_eq!(vmm.await.unwrap(), "CONNECT 1024\n");
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "guest bytes", "the handshake must not eat guest data");
}

#[tokio::test]
async fn closed_without_reply_is_a_retryable_refusal() {
    let (_dir, path, _vmm) = fake_vmm(b"");
    let err = connect_hybrid_vsock(&path, 1024).await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused { port: 1024 }), "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("no guest listener"), "{err}");
}

#[tokio::test]
async fn garbage_reply_is_reported_verbatim() {
    let (_dir, path, _vmm) = fake_vmm(b"HTTP/1.1 400 Bad Request\n");
    let err = connect_hybrid_vsock(&path, 1024).await.unwrap_err();
    match &err {
        ConnectError::BadReply { port, reply } => {
            assert_eq!(*port, 1024);
            assert_eq!(reply, "HTTP/1.1 400 Bad Request");
        }
        other => panic!("expected BadReply, got {other}"),
    }
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn ok_without_a_port_number_is_rejected() {
    let (_dir, path, _vmm) = fake_vmm(b"OK\n");
    let err = connect_hybrid_vsock(&path, 7).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::BadReply { port: 7, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn reply_without_newline_is_cut_and_rejected() {
    let (_dir, path, _vmm) = fake_vmm(&[b'x'; 200]);
    let err = connect_hybrid_vsock(&path, 1024).await.unwrap_err();
    assert!(matches!(err, ConnectError::BadReply { .. }), "{err}");
}

#[tokio::test]
async fn missing_socket_is_retryable_and_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let err = connect_hybrid_vsock(&path, 1024).await.unwrap_err();
    assert!(matches!(err, ConnectError::Socket { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

#[test]
fn parses_ok_lines() {
    assert_eq!(parse_ok(b"OK 5"), Some(5));
    assert_eq!(parse_ok(b"OK 5\r"), Some(5));
    assert_eq!(parse_ok(b"OK -1"), None);
    assert_eq!(parse_ok(b"ok 5"), None);
}
