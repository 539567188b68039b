//! The port-forward listener: TCP into the pod's network namespace through
//! a fake VMM with the host's `connect_guest_tcp{,_blocking}`, and the raw
//! line protocol against the real binary (`--forward-unix`).

mod common;

use std::io::{BufRead, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmrun_proto::port_forward::{read_line, Line, MAX_REPLY_LINE};
use vmrun_proto::v1::create_container_request::Rootfs;
use vmrun_proto::v1::*;
use vmrun_proto::{connect_guest_tcp, connect_guest_tcp_blocking, ConnectError};

fn sandbox_request(id: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        sandbox_id: id.into(),
        hostname: id.into(),
        hosts: b"127.0.0.1 localhost\n".to_vec(),
        new_network: true,
        new_ipc: true,
        new_uts: true,
        ..Default::default()
    }
}

/// Reads the reply line of the raw protocol.
async fn reply(stream: &mut UnixStream) -> String {
    match read_line(stream, MAX_REPLY_LINE).await.unwrap() {
        Line::Complete(l) => String::from_utf8(l).unwrap(),
        other => panic!("no reply line: {other:?}"),
    }
}

/// A TCP server on 127.0.0.1 inside the network namespace `netns`, on a
/// thread that entered it. First connection: reads to EOF, answers
/// "sandbox got: <data>", closes. Second: sends "banner", shuts its write
/// side, reads to EOF and returns what it got.
fn server_in_netns(netns: &Path) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let netns = std::fs::File::open(netns).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(listener.local_addr().unwrap().port()).unwrap();

        let (mut a, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        a.read_to_end(&mut got).unwrap();
        a.write_all(b"sandbox got: ").unwrap();
        a.write_all(&got).unwrap();
        drop(a);

        let (mut b, _) = listener.accept().unwrap();
        b.write_all(b"banner").unwrap();
        b.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        got
    });
    (rx.recv().unwrap(), thread)
}

#[tokio::test]
async fn forwards_into_the_sandbox_network_namespace() {
    common::require_root("forwards_into_the_sandbox_network_namespace");
    let agent = common::start_agent("fwd");
    let vmm = common::fake_vmm(&agent);
    let mut client = vmrun_proto::connect_hybrid_vsock(&vmm, vmrun_proto::AGENT_VSOCK_PORT)
        .await
        .unwrap();

    // No sandbox yet: the guest's own namespace (here the host's).
    let host = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host_port = host.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        let (mut tcp, _) = host.accept().await.unwrap();
        tcp.write_all(b"guest netns").await.unwrap();
        host
    });
    let mut stream = connect_guest_tcp(&vmm, host_port).await.unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "guest netns");
    let host = accept.await.unwrap();

    let sandbox = client
        .create_sandbox(sandbox_request("fwd"))
        .await
        .unwrap()
        .into_inner();
    let netns = Path::new(&sandbox.namespace_dir).join("net");

    // Now the pod's namespace, where nothing listens on that port.
    let err = connect_guest_tcp(&vmm, host_port).await.unwrap_err();
    assert!(err.is_connection_refused(), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("guest TCP port {host_port}: connection refused")
    );
    drop(host);

    let (port, server) = server_in_netns(&netns);

    // Host -> pod bytes, then the host's half-close lets the pod answer.
    let mut stream = connect_guest_tcp(&vmm, port).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "sandbox got: ping");

    // The pod's half-close reaches the host, which still writes after it.
    let vmm2 = vmm.clone();
    tokio::task::spawn_blocking(move || {
        let mut stream = connect_guest_tcp_blocking(&vmm2, port, Duration::from_secs(5)).unwrap();
        let mut got = String::new();
        stream.read_to_string(&mut got).unwrap();
        assert_eq!(got, "banner");
        stream.write_all(b"after your EOF").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        assert_eq!(stream.read(&mut [0u8; 8]).unwrap(), 0);
    })
    .await
    .unwrap();
    let late = tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    assert_eq!(late, b"after your EOF");

    // Refused, from both helpers. A port below the ephemeral range: a
    // connect to a free ephemeral port on loopback can, rarely, pick that
    // same port as its source and connect to itself.
    let closed = 7;
    let err = connect_guest_tcp(&vmm, closed).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::Forward { tcp_port, reason }
            if *tcp_port == closed && reason == "connection refused"),
        "{err:?}"
    );
    let vmm2 = vmm.clone();
    let err = tokio::task::spawn_blocking(move || {
        connect_guest_tcp_blocking(&vmm2, closed, Duration::from_secs(5)).unwrap_err()
    })
    .await
    .unwrap();
    assert!(err.is_connection_refused(), "{err:?}");

    // Garbage through the VMM: ERR, then the agent closes.
    let mut raw = tokio::net::UnixStream::connect(&vmm).await.unwrap();
    vmrun_proto::handshake(&mut raw, vmrun_proto::PORT_FORWARD_VSOCK_PORT)
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let line = reply(&mut raw).await;
    assert!(line.starts_with("ERR not a port number"), "{line}");
    let mut rest = Vec::new();
    raw.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");

    client.shutdown(ShutdownRequest {}).await.unwrap();
    agent.server.await.unwrap().unwrap();
    common::assert_no_cgroups(&agent.cgroup_parent);
}

/// An httpGet-style probe of a container's server: busybox httpd in the
/// sandbox's namespace on 127.0.0.1:8080, refused until it listens.
#[tokio::test]
async fn probes_a_container_http_server() {
    common::require_root("probes_a_container_http_server");
    let agent = common::start_agent("fwd-http");
    let vmm = common::fake_vmm(&agent);
    let image = agent.tmp.path().join("image");
    common::busybox_rootfs(&image);
    std::fs::create_dir_all(image.join("www")).unwrap();
    std::fs::write(image.join("www/healthz"), "alive\n").unwrap();
    let mut client = common::unix_client(&agent.socket).await;
    let sandbox = client
        .create_sandbox(sandbox_request("http"))
        .await
        .unwrap()
        .into_inner();

    let err = connect_guest_tcp(&vmm, 8080).await.unwrap_err();
    assert!(err.is_connection_refused(), "{err:?}");

    let spec = common::spec(
        &["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/www"],
        &sandbox.namespace_dir,
        &sandbox.etc_files["hosts"],
    );
    client
        .create_container(CreateContainerRequest {
            container_id: "web".into(),
            oci_spec_json: serde_json::to_vec(&spec).unwrap(),
            rootfs: Some(Rootfs::LayerDirs(LayerDirs {
                lower: vec![image.to_string_lossy().into_owned()],
            })),
            stdin: false,
        })
        .await
        .unwrap();
    client
        .start_container(StartContainerRequest {
            container_id: "web".into(),
        })
        .await
        .unwrap();

    let vmm2 = vmm.clone();
    let response = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match connect_guest_tcp_blocking(&vmm2, 8080, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) if e.is_connection_refused() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("{e}"),
            }
        };
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .await
    .unwrap();
    // busybox httpd answers in HTTP/1.1 whatever the request's version.
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nalive\n"), "{response}");

    // tcpSocket-style: connect, then just close.
    drop(connect_guest_tcp(&vmm, 8080).await.unwrap());

    client.shutdown(ShutdownRequest {}).await.unwrap();
    agent.server.await.unwrap().unwrap();
    common::assert_no_cgroups(&agent.cgroup_parent);
}

#[tokio::test]
async fn binary_serves_port_forward_on_a_unix_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");
    let forward = tmp.path().join("forward.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmrun-agent"))
        .arg("--listen-unix")
        .arg(&socket)
        .arg("--forward-unix")
        .arg(&forward)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "READY\n");

    // No sandbox: the agent's own namespace. An echo server that reports
    // the EOF it sees.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut conn, _) = tcp.accept().await.unwrap();
        let (mut r, mut w) = conn.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.write_all(b" [eof]").await.unwrap();
    });
    let mut raw = UnixStream::connect(&forward).await.unwrap();
    raw.write_all(format!("{port}\n").as_bytes()).await.unwrap();
    assert_eq!(reply(&mut raw).await, "OK");
    raw.write_all(b"echo me").await.unwrap();
    raw.shutdown().await.unwrap();
    let mut got = String::new();
    raw.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "echo me [eof]");

    for (request, want) in [
        (&b"70000\n"[..], "ERR port out of range 1-65535"),
        (b"x\n", "ERR not a port number: expected \"<tcp port>\\n\""),
        (&[b'9'; 100], "ERR request line too long"),
    ] {
        let mut raw = UnixStream::connect(&forward).await.unwrap();
        raw.write_all(request).await.unwrap();
        assert_eq!(reply(&mut raw).await, want);
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    let mut client = common::unix_client(&socket).await;
    client.shutdown(ShutdownRequest {}).await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
