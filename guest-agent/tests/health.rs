//! Health and Shutdown over gRPC: in-process, through a fake VMM's hybrid
//! vsock socket, and against the real binary in non-PID-1 mode.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use vmrun_proto::v1::{HealthRequest, HealthResponse, ShutdownRequest};

fn check_health(h: &HealthResponse) {
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.protocol_version, vmrun_proto::PROTOCOL_VERSION);
    assert_eq!(h.protocol_revision, vmrun_proto::PROTOCOL_REVISION);
    let release = nix::sys::utsname::uname().unwrap();
    assert_eq!(h.kernel_release, release.release().to_string_lossy());
    let nproc = Command::new("nproc").arg("--all").output().unwrap();
    let nproc: u32 = String::from_utf8_lossy(&nproc.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(h.num_cpus, nproc);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(h.mem_total_bytes, kib * 1024);
    assert!(h.boot_timestamp_ns > 0 && h.boot_timestamp_ns <= vmrun_agent::boottime_ns());
}

#[tokio::test]
async fn health_then_shutdown_stops_the_server() {
    let agent = common::start_agent("health");
    let mut client = common::unix_client(&agent.socket).await;
    let h = client.health(HealthRequest {}).await.unwrap().into_inner();
    check_health(&h);
    client.shutdown(ShutdownRequest {}).await.unwrap();
    agent.server.await.unwrap().unwrap();
}

/// A fake VMM: accepts on `vmm`, expects `CONNECT 1024`, answers `OK`,
/// then splices the connection to the agent's socket, as the VMM splices
/// it to the guest's vsock listener.
async fn fake_vmm(vmm: UnixListener, agent: std::path::PathBuf) {
    loop {
        let Ok((conn, _)) = vmm.accept().await else {
            return;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut conn = BufReader::new(conn);
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut conn = conn.into_inner();
            conn.write_all(b"OK 1073741824\n").await.unwrap();
            let mut upstream = UnixStream::connect(&agent).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
        });
    }
}

#[tokio::test]
async fn health_through_hybrid_vsock() {
    let agent = common::start_agent("hvsock");
    let vmm_socket = agent.tmp.path().join("vmm-vsock.sock");
    let vmm = UnixListener::bind(&vmm_socket).unwrap();
    tokio::spawn(fake_vmm(vmm, agent.socket.clone()));
    let mut client = vmrun_proto::connect_hybrid_vsock(&vmm_socket, vmrun_proto::AGENT_VSOCK_PORT)
        .await
        .unwrap();
    let h = client.health(HealthRequest {}).await.unwrap().into_inner();
    check_health(&h);
    client.shutdown(ShutdownRequest {}).await.unwrap();
    agent.server.await.unwrap().unwrap();
}

#[tokio::test]
async fn binary_serves_on_a_unix_socket_and_exits_on_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmrun-agent"))
        .arg("--listen-unix")
        .arg(&socket)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The agent prints READY once it listens.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "READY\n");
    let mut client = common::unix_client(&socket).await;
    check_health(&client.health(HealthRequest {}).await.unwrap().into_inner());
    client.shutdown(ShutdownRequest {}).await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
