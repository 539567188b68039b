//! The server driven by a minimal SPDY/3.1 client built on the crate's codec.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::*;
use crate::spdy::frame::{self, Control, Head};
use crate::spdy::headers::{Decoder, Encoder};

pub(super) struct Spdy {
    rd: ReadHalf<TcpStream>,
    wr: WriteHalf<TcpStream>,
    enc: Encoder,
    dec: Decoder,
    next_id: u32,
}

#[derive(Debug, PartialEq)]
pub(super) enum Ev {
    Reply(u32),
    Data(u32, Vec<u8>, bool),
    Rst(u32),
    GoAway,
    Ping(u32),
    Eof,
}

impl Spdy {
    pub(super) async fn connect(url: &str, protocols: &[&str]) -> (Spdy, String) {
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

    pub(super) async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
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

    pub(super) async fn next(&mut self) -> Ev {
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
    pub(super) async fn drain(&mut self) -> HashMap<u32, (Vec<u8>, bool)> {
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

#[tokio::test]
async fn spdy_portforward_without_request_ids() {
    let (srv, _) = server().await;
    let req = PortForwardRequest {
        pod_sandbox_id: "pod1".into(),
        ports: vec![],
    };
    let url = srv.get_port_forward(req).unwrap();
    // No protocol header at all: old clients, paired by stream id.
    let (mut c, proto) = Spdy::connect(&url, &[]).await;
    assert_eq!(proto, "");
    let _err = c.open(&[("streamType", "error"), ("port", "81")]).await;
    let data = c.open(&[("streamType", "data"), ("port", "81")]).await;
    // Streams with missing or bad headers are ignored, not fatal.
    c.open(&[("streamType", "data"), ("port", "http")]).await;
    c.send(data, b"x", false).await;
    loop {
        match c.next().await {
            Ev::Data(id, d, _) if id == data => break assert_eq!(d, b"81:x"),
            // The ignored stream is finished by the server.
            Ev::Data(5, d, true) => assert!(d.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }
    srv.shutdown().await;
}
