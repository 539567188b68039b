//! The line protocol, and both host connectors against a fake VMM + agent.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;

use super::*;

/// What the fake saw: the VMM's CONNECT line, the agent's request line and
/// every byte after it until the client closed its write side.
#[derive(Debug)]
struct Seen {
    connect: String,
    request: String,
    rest: Vec<u8>,
}

/// A fake VMM + agent on a fresh socket, for one connection: answers
/// CONNECT with `vmm_reply`; if that was an OK, reads the request line,
/// answers `agent_reply`, shuts its write side and reads to EOF.
fn fake(
    vmm_reply: &'static [u8],
    agent_reply: &'static [u8],
) -> (tempfile::TempDir, PathBuf, JoinHandle<Seen>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut seen = Seen {
            connect: String::new(),
            request: String::new(),
            rest: Vec::new(),
        };
        reader.read_line(&mut seen.connect).unwrap();
        reader.get_mut().write_all(vmm_reply).unwrap();
        if !vmm_reply.starts_with(b"OK ") {
            return seen;
        }
        reader.read_line(&mut seen.request).unwrap();
        if agent_reply.is_empty() {
            // A wedged agent: hold the connection open until the client
            // gives up.
            let _ = reader.read_to_end(&mut seen.rest);
            return seen;
        }
        reader.get_mut().write_all(agent_reply).unwrap();
        reader
            .get_mut()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        reader.read_to_end(&mut seen.rest).unwrap();
        seen
    });
    (dir, path, task)
}

#[tokio::test]
async fn ok_gives_the_tcp_stream_both_ways() {
    let (_dir, path, agent) = fake(b"OK 77\n", b"OK\nfrom the pod");
    let mut stream = connect_guest_tcp(&path, 8080).await.unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "from the pod", "the reply must not eat TCP data");
    stream.write_all(b"from the host").await.unwrap();
    stream.shutdown().await.unwrap();
    let seen = tokio::task::spawn_blocking(move || agent.join().unwrap())
        .await
        .unwrap();
    assert_eq!(seen.connect, "CONNECT 1025\n");
    assert_eq!(seen.request, "8080\n");
    assert_eq!(seen.rest, b"from the host");
}

#[tokio::test]
async fn err_reply_is_a_typed_forward_error() {
    let (_dir, path, _agent) = fake(b"OK 77\n", b"ERR connection refused\n");
    let err = connect_guest_tcp(&path, 9).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::Forward { tcp_port: 9, reason } if reason == "connection refused"),
        "{err:?}"
    );
    assert!(err.is_connection_refused());
    assert!(!err.is_retryable());
    assert_eq!(err.to_string(), "guest TCP port 9: connection refused");

    let (_dir, path, _agent) = fake(b"OK 77\n", b"ERR network unreachable\r\n");
    let err = connect_guest_tcp(&path, 9).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::Forward { reason, .. } if reason == "network unreachable"),
        "{err:?}"
    );
    assert!(!err.is_connection_refused());
}

#[tokio::test]
async fn garbage_or_missing_agent_reply_is_bad_reply() {
    for reply in [&b"HTTP/1.1 200 OK\n"[..], b"OK", b"OKAY\n"] {
        let (_dir, path, _agent) = fake(b"OK 77\n", reply);
        let err = connect_guest_tcp(&path, 80).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::BadReply { port: 1025, .. }),
            "{reply:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn no_listener_on_1025_is_a_retryable_refusal() {
    let (_dir, path, _agent) = fake(b"", b"");
    let err = connect_guest_tcp(&path, 80).await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused { port: 1025 }), "{err}");
    assert!(err.is_retryable());
}

#[test]
fn blocking_ok_gives_a_blocking_stream() {
    let (_dir, path, agent) = fake(b"OK 77\n", b"OK\nfrom the pod");
    let mut stream = connect_guest_tcp_blocking(&path, 443, Duration::from_secs(5)).unwrap();
    assert_eq!(stream.read_timeout().unwrap(), None);
    assert_eq!(stream.write_timeout().unwrap(), None);
    let mut got = String::new();
    stream.read_to_string(&mut got).unwrap();
    assert_eq!(got, "from the pod");
    stream.write_all(b"from the host").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let seen = agent.join().unwrap();
    assert_eq!(seen.connect, "CONNECT 1025\n");
    assert_eq!(seen.request, "443\n");
    assert_eq!(seen.rest, b"from the host");
}

#[test]
fn blocking_errors_match_the_async_ones() {
    let (_dir, path, _agent) = fake(b"OK 77\n", b"ERR connection refused\n");
    let err = connect_guest_tcp_blocking(&path, 9, Duration::from_secs(5)).unwrap_err();
    assert!(err.is_connection_refused(), "{err:?}");

    let (_dir, path, _agent) = fake(b"", b"");
    let err = connect_guest_tcp_blocking(&path, 9, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, ConnectError::Refused { port: 1025 }), "{err}");

    let (_dir, path, _agent) = fake(b"NO\n", b"");
    let err = connect_guest_tcp_blocking(&path, 9, Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(&err, ConnectError::BadReply { port: 1025, reply } if reply == "NO"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let err = connect_guest_tcp_blocking(&dir.path().join("absent"), 9, Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, ConnectError::Socket { .. }), "{err}");
}

#[test]
fn blocking_times_out_on_a_silent_agent() {
    let (_dir, path, agent) = fake(b"OK 77\n", b"");
    let start = Instant::now();
    let err = connect_guest_tcp_blocking(&path, 9, Duration::from_millis(200)).unwrap_err();
    assert!(
        matches!(err, ConnectError::ForwardTimeout { tcp_port: 9, .. }),
        "{err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(agent.join().unwrap().request, "9\n");
}

#[test]
fn parses_request_lines() {
    assert_eq!(parse_request(b"80"), Ok(80));
    assert_eq!(parse_request(b"65535\r"), Ok(65535));
    assert_eq!(parse_request(b"1"), Ok(1));
    for bad in [
        &b""[..],
        b"\r",
        b"0",
        b"65536",
        b"99999999999999",
        b"+80",
        b"-1",
        b" 80",
        b"80 ",
        b"http",
        b"CONNECT 80",
    ] {
        assert!(
            parse_request(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        request_port(&Line::TooLong(b"1".repeat(16))),
        Err("request line too long")
    );
    assert!(request_port(&Line::Eof(b"80".to_vec())).is_err());
    assert_eq!(request_port(&Line::Complete(b"22".to_vec())), Ok(22));
}

#[test]
fn err_replies_are_one_bounded_line() {
    assert_eq!(err_reply(CONNECTION_REFUSED), b"ERR connection refused\n");
    assert_eq!(err_reply("a\nb\rc"), b"ERR a b c\n");
    let long = err_reply(&"é".repeat(500));
    assert!(long.len() <= MAX_REPLY_LINE, "{}", long.len());
    assert!(long.ends_with(b"\n"));
    assert!(std::str::from_utf8(&long).is_ok());
}

#[tokio::test]
async fn read_line_stops_at_the_newline_or_the_bound() {
    let mut input: &[u8] = b"8080\nrest";
    assert_eq!(
        read_line(&mut input, MAX_REQUEST_LINE).await.unwrap(),
        Line::Complete(b"8080".to_vec())
    );
    assert_eq!(input, b"rest");
    let mut input: &[u8] = b"12345678";
    assert_eq!(
        read_line(&mut input, 4).await.unwrap(),
        Line::TooLong(b"1234".to_vec())
    );
    assert_eq!(input, b"5678");
    let mut input: &[u8] = b"80";
    assert_eq!(
        read_line(&mut input, 4).await.unwrap(),
        Line::Eof(b"80".to_vec())
    );
}
