//! TCP into the pod: the agent's port-forward listener on guest vsock port
//! [`PORT_FORWARD_VSOCK_PORT`](crate::PORT_FORWARD_VSOCK_PORT).
//!
//! The protocol, after the hybrid-vsock `CONNECT 1025` / `OK <hostport>`
//! exchange with the VMM:
//!
//! ```text
//! host  -> agent   "<tcp port>\n"         decimal 1..=65535 (a '\r' before the '\n' is allowed)
//! agent -> host    "OK\n"                 connected to 127.0.0.1:<tcp port> in the pod's
//!                                         network namespace; from here on the stream is that
//!                                         TCP connection (half-close is passed on both ways)
//!              or  "ERR <reason>\n"       then the agent closes; "ERR connection refused"
//!                                         when nothing listens on the port
//! ```
//!
//! The pod's network namespace is the one `CreateSandbox` made (held by the
//! pause process); without a sandbox, or with a sandbox sharing the guest's
//! network, it is the guest's own.
//!
//! Host side: [`connect_guest_tcp`] (tokio) and [`connect_guest_tcp_blocking`]
//! (plain std I/O, usable outside any runtime). Agent side: the line helpers
//! ([`read_line`], [`request_port`], [`err_reply`]).

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::hybrid_vsock::{handshake, parse_ok, ConnectError, MAX_REPLY};
use crate::PORT_FORWARD_VSOCK_PORT;

/// Longest request line the agent reads, newline included ("65535\r\n" is
/// 7 bytes).
pub const MAX_REQUEST_LINE: usize = 16;

/// Longest reply line the host reads, newline included; the agent cuts its
/// `ERR` reasons to fit.
pub const MAX_REPLY_LINE: usize = 256;

/// The agent's bound on its TCP connect (a loopback connect answers at once
/// unless the listener's backlog is full).
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`connect_guest_tcp`] waits for the agent's `OK`/`ERR`: the
/// agent's own connect bound plus slack.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(7);

/// The `ERR` reason when nothing listens on the port.
pub const CONNECTION_REFUSED: &str = "connection refused";

/// The success reply.
pub const OK_REPLY: &[u8] = b"OK\n";

/// One line read by [`read_line`], without its `\n`.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    /// The peer closed before a newline (possibly with no bytes at all).
    Eof(Vec<u8>),
    /// `max` bytes without a newline; nothing more was read.
    TooLong(Vec<u8>),
}

/// Reads up to and including the first `\n`, at most `max` bytes, one byte
/// at a time so nothing after the newline is consumed (it belongs to the
/// forwarded connection).
pub async fn read_line<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Line> {
    let mut line = Vec::with_capacity(8);
    while line.len() < max {
        let mut byte = [0u8; 1];
        if r.read(&mut byte).await? == 0 {
            return Ok(Line::Eof(line));
        }
        if byte[0] == b'\n' {
            return Ok(Line::Complete(line));
        }
        line.push(byte[0]);
    }
    Ok(Line::TooLong(line))
}

/// [`read_line`] on a blocking reader.
fn read_line_blocking<R: Read>(r: &mut R, max: usize) -> io::Result<Line> {
    let mut line = Vec::with_capacity(8);
    while line.len() < max {
        let mut byte = [0u8; 1];
        match r.read(&mut byte) {
            Ok(0) => return Ok(Line::Eof(line)),
            Ok(_) if byte[0] == b'\n' => return Ok(Line::Complete(line)),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Line::TooLong(line))
}

/// Parses a request line (without its `\n`): the TCP port, or the reason to
/// send back in `ERR`.
pub fn parse_request(line: &[u8]) -> Result<u16, &'static str> {
    let digits = line.strip_suffix(b"\r").unwrap_or(line);
    if digits.is_empty() {
        return Err("empty request: expected \"<tcp port>\\n\"");
    }
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err("not a port number: expected \"<tcp port>\\n\"");
    }
    // All ASCII digits, so UTF-8; too many of them overflow u16.
    match std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(0) | None => Err("port out of range 1-65535"),
        Some(port) => Ok(port),
    }
}

/// The port a [`read_line`] result asks for, or the reason (for `ERR`) it
/// is unusable, including how it ended.
pub fn request_port(line: &Line) -> Result<u16, &'static str> {
    match line {
        Line::Complete(l) => parse_request(l),
        Line::Eof(_) => Err("closed before the end of the request line"),
        Line::TooLong(_) => Err("request line too long"),
    }
}

/// `ERR <reason>\n`, the reason put on one line and cut to fit
/// [`MAX_REPLY_LINE`].
pub fn err_reply(reason: &str) -> Vec<u8> {
    let mut out = b"ERR ".to_vec();
    let room = MAX_REPLY_LINE - out.len() - 1;
    let mut cut = reason.replace(['\n', '\r'], " ");
    if cut.len() > room {
        let mut end = room;
        while !cut.is_char_boundary(end) {
            end -= 1;
        }
        cut.truncate(end);
    }
    out.extend_from_slice(cut.as_bytes());
    out.push(b'\n');
    out
}

/// Reads the agent's reply: `Ok` on `OK`, the typed error otherwise.
fn check_reply(tcp_port: u16, line: Line) -> Result<(), ConnectError> {
    let bad = |line: &[u8]| ConnectError::BadReply {
        port: PORT_FORWARD_VSOCK_PORT,
        reply: String::from_utf8_lossy(line).into_owned(),
    };
    let line = match line {
        Line::Complete(l) => l,
        Line::Eof(l) | Line::TooLong(l) => return Err(bad(&l)),
    };
    let text = line.strip_suffix(b"\r").unwrap_or(&line);
    if text == b"OK" {
        return Ok(());
    }
    match text.strip_prefix(b"ERR ") {
        Some(reason) => Err(ConnectError::Forward {
            tcp_port,
            reason: String::from_utf8_lossy(reason).into_owned(),
        }),
        None => Err(bad(&line)),
    }
}

fn request(tcp_port: u16) -> Vec<u8> {
    format!("{tcp_port}\n").into_bytes()
}

/// Opens a TCP connection to `127.0.0.1:<tcp_port>` in the pod's network
/// namespace inside the guest behind the VMM's hybrid-vsock socket `uds`.
///
/// The returned stream is the TCP connection: bytes go both ways and
/// `shutdown()` (write half) reaches the pod's socket as a FIN.
///
/// Errors: [`ConnectError::Forward`] when the agent could not connect
/// (see [`ConnectError::is_connection_refused`]);
/// [`ConnectError::Refused`] when the agent is not listening (yet);
/// [`ConnectError::ForwardTimeout`] when the agent does not answer within
/// [`REPLY_TIMEOUT`].
pub async fn connect_guest_tcp(uds: &Path, tcp_port: u16) -> Result<UnixStream, ConnectError> {
    let port = PORT_FORWARD_VSOCK_PORT;
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| ConnectError::Socket {
            path: uds.to_path_buf(),
            source,
        })?;
    handshake(&mut stream, port).await?;
    let exchange = async {
        let io_err = |source| ConnectError::Io { port, source };
        stream.write_all(&request(tcp_port)).await.map_err(io_err)?;
        let line = read_line(&mut stream, MAX_REPLY_LINE)
            .await
            .map_err(io_err)?;
        check_reply(tcp_port, line)
    };
    tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .unwrap_or(Err(ConnectError::ForwardTimeout {
            tcp_port,
            after: REPLY_TIMEOUT,
        }))?;
    Ok(stream)
}

/// [`connect_guest_tcp`] with plain blocking std I/O, for callers outside
/// any tokio runtime. `timeout` bounds the whole exchange (the VMM's
/// `CONNECT` reply and the agent's `OK`/`ERR`; connecting to `uds` itself
/// is not bounded, the VMM accepts at once). The returned stream is in
/// blocking mode without read/write timeouts.
pub fn connect_guest_tcp_blocking(
    uds: &Path,
    tcp_port: u16,
    timeout: Duration,
) -> Result<std::os::unix::net::UnixStream, ConnectError> {
    let port = PORT_FORWARD_VSOCK_PORT;
    let deadline = Instant::now() + timeout;
    let timed_out = || ConnectError::ForwardTimeout {
        tcp_port,
        after: timeout,
    };
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        _ => ConnectError::Io { port, source },
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(uds).map_err(|source| ConnectError::Socket {
            path: uds.to_path_buf(),
            source,
        })?;
    // Before each step, the time left; a zero timeout is an error for
    // set_*_timeout, so running out is reported here.
    let arm = |stream: &std::os::unix::net::UnixStream| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        stream.set_write_timeout(Some(left)).map_err(io_err)
    };

    arm(&stream)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    arm(&stream)?;
    match read_line_blocking(&mut stream, MAX_REPLY).map_err(io_err)? {
        Line::Complete(l) if parse_ok(&l).is_some() => {}
        Line::Eof(l) if l.is_empty() => return Err(ConnectError::Refused { port }),
        Line::Complete(l) | Line::Eof(l) | Line::TooLong(l) => {
            return Err(ConnectError::BadReply {
                port,
                reply: String::from_utf8_lossy(&l).into_owned(),
            })
        }
    }

    arm(&stream)?;
    stream.write_all(&request(tcp_port)).map_err(io_err)?;
    arm(&stream)?;
    let line = read_line_blocking(&mut stream, MAX_REPLY_LINE).map_err(io_err)?;
    check_reply(tcp_port, line)?;

    stream.set_read_timeout(None).map_err(io_err)?;
    stream.set_write_timeout(None).map_err(io_err)?;
    Ok(stream)
}

#[cfg(test)]
mod tests;
