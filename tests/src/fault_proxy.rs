//! A fault-injecting HTTP proxy on 127.0.0.1 in front of a test registry: it forwards every
//! request, one per connection (it asks both sides for `Connection: close`), and cuts the
//! responses to `GET`s of paths containing a chosen string (a blob digest) after a number of
//! body bytes, by dropping the connection or by sending a shorter, complete response.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What happens to a matching response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it whole.
    Pass,
    /// Forward the head and this many body bytes, then close the connection mid-body.
    DropAfter(u64),
    /// Forward a complete response of only this many body bytes (its `Content-Length` says
    /// so): a registry serving the wrong content.
    ShortAfter(u64),
}

#[derive(Debug)]
struct State {
    path_contains: String,
    fault: Fault,
    /// Responses cut so far.
    faulted: u64,
}

/// A running proxy; dropping it stops accepting (connections in flight are cut).
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port in front of `upstream` (`host:port`), passing
    /// everything until told otherwise.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let upstream: SocketAddr = upstream
            .parse()
            .with_context(|| format!("upstream {upstream:?} is not an address"))?;
        anyhow::ensure!(
            upstream.ip().is_loopback(),
            "upstream {upstream} is not loopback"
        );
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            path_contains: String::new(),
            fault: Fault::Pass,
            faulted: 0,
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    // A failed connection is the client's to notice.
                    let _ = serve(client, upstream, state).await;
                });
            }
        });
        Ok(FaultProxy { addr, state, task })
    }

    /// `host:port` of the proxy, as used in image references.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Applies `fault` to responses to GETs whose path contains `path_contains`.
    pub fn set_fault(&self, path_contains: &str, fault: Fault) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.path_contains = path_contains.to_string();
        state.fault = fault;
    }

    /// Passes everything from now on.
    pub fn heal(&self) {
        self.set_fault("", Fault::Pass);
    }

    /// How many responses were cut so far.
    pub fn faulted(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).faulted
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads an HTTP head (request or response) up to its empty line, at most 64 KiB; the lines
/// without their line ends.
async fn read_head<R: AsyncBufReadExt + Unpin>(r: &mut R) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).await?;
        anyhow::ensure!(n > 0, "connection closed inside an HTTP head");
        total += n;
        anyhow::ensure!(total <= 64 * 1024, "HTTP head over 64 KiB");
        let text = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if text.is_empty() {
            return Ok(lines);
        }
        lines.push(text);
    }
}

/// The head again, with `Connection: close` and, if given, another `Content-Length`.
fn rewrite_head(lines: &[String], content_length: Option<u64>) -> Vec<u8> {
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if i > 0 && (name == "connection" || (content_length.is_some() && name == "content-length"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n");
    if let Some(len) = content_length {
        out.push_str(&format!("Content-Length: {len}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) -> anyhow::Result<()> {
    let (client_read, mut client_write) = client.into_split();
    let mut client_read = BufReader::new(client_read);
    let request = read_head(&mut client_read).await?;
    let mut words = request
        .first()
        .map(|l| l.split_whitespace())
        .into_iter()
        .flatten();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let fault = {
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        let matches = method == "GET"
            && !state.path_contains.is_empty()
            && path.contains(&state.path_contains);
        if matches {
            state.fault
        } else {
            Fault::Pass
        }
    };

    let up = TcpStream::connect(upstream).await?;
    let (up_read, mut up_write) = up.into_split();
    up_write.write_all(&rewrite_head(&request, None)).await?;
    // A request body (if any) follows as it comes.
    let upload = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
    });
    let mut up_read = BufReader::new(up_read);
    let result = async {
        let response = read_head(&mut up_read).await?;
        match fault {
            Fault::Pass => {
                client_write
                    .write_all(&rewrite_head(&response, None))
                    .await?;
                tokio::io::copy(&mut up_read, &mut client_write).await?;
            }
            Fault::DropAfter(n) | Fault::ShortAfter(n) => {
                let length = match fault {
                    Fault::ShortAfter(_) => Some(n),
                    _ => None,
                };
                client_write
                    .write_all(&rewrite_head(&response, length))
                    .await?;
                let mut body = (&mut up_read).take(n);
                tokio::io::copy(&mut body, &mut client_write).await?;
                client_write.flush().await?;
                state.lock().unwrap_or_else(|p| p.into_inner()).faulted += 1;
            }
        }
        client_write.shutdown().await?;
        anyhow::Ok(())
    }
    .await;
    upload.abort();
    result
}
