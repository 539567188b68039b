//! The container RPCs against the in-process agent on the host (root, real
//! namespaces and cgroups; the host's are v1, the guest's v2, and the
//! container library handles both).

mod common;

use std::collections::HashMap;

use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use vmrun_proto::v1::create_container_request::Rootfs;
use vmrun_proto::v1::*;
use vmrun_proto::AgentClient;

/// Collects a process's output until the agent closes the stream.
fn collect(
    mut client: AgentClient<Channel>,
    container_id: &str,
    exec_id: &str,
) -> tokio::task::JoinHandle<(String, String)> {
    let req = ReadOutputRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
    };
    tokio::spawn(async move {
        let mut stream = client.read_output(req).await.unwrap().into_inner();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            match chunk.stream() {
                output_chunk::Stream::Stdout => out.extend(chunk.data),
                output_chunk::Stream::Stderr => err.extend(chunk.data),
            }
        }
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    })
}

fn create_req(
    id: &str,
    spec: serde_json::Value,
    lower: &std::path::Path,
    stdin: bool,
) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: Some(Rootfs::LayerDirs(LayerDirs {
            lower: vec![lower.to_string_lossy().into_owned()],
        })),
        stdin,
    }
}

#[tokio::test]
async fn pod_lifecycle_over_grpc() {
    common::require_root("pod_lifecycle_over_grpc");
    let agent = common::start_agent("pod");
    let image = agent.tmp.path().join("image");
    common::busybox_rootfs(&image);
    let mut client = common::unix_client(&agent.socket).await;

    // Sandbox: shared namespaces, /etc files, a namespaced sysctl.
    let sandbox = client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "pod1".into(),
            hostname: "pod-host".into(),
            hosts: b"127.0.0.1 localhost pod-host\n".to_vec(),
            resolv_conf: b"nameserver 10.0.0.10\n".to_vec(),
            sysctls: HashMap::from([("net.ipv4.ip_unprivileged_port_start".into(), "80".into())]),
            new_network: true,
            new_ipc: true,
            new_uts: true,
            new_pid: false,
            shm_size_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sandbox.namespace_dir.starts_with("/proc/"), "{sandbox:?}");
    let hosts = sandbox.etc_files["hosts"].clone();
    let again = client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "pod2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    // CopyFile lands under the pod directory.
    let copied = client
        .copy_file(CopyFileRequest {
            path: "volumes/config/key".into(),
            mode: 0o640,
            data: b"value".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(std::fs::read(&copied.guest_path).unwrap(), b"value");
    assert!(copied.guest_path.starts_with(&sandbox.sandbox_dir));

    // A container that reads stdin and reports what it sees of the sandbox.
    let script = "echo out; echo err >&2; hostname; \
                  cat /proc/sys/net/ipv4/ip_unprivileged_port_start; head -n1 /etc/hosts; \
                  read line; echo got $line; exit 3";
    let spec = common::spec(&["sh", "-c", script], &sandbox.namespace_dir, &hosts);
    let created = client
        .create_container(create_req("main", spec.clone(), &image, true))
        .await
        .unwrap()
        .into_inner();
    assert!(created.pid > 0);
    let output = collect(client.clone(), "main", "");
    client
        .start_container(StartContainerRequest {
            container_id: "main".into(),
        })
        .await
        .unwrap();
    let twice = client
        .start_container(StartContainerRequest {
            container_id: "main".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition, "{twice:?}");
    client
        .write_stdin(WriteStdinRequest {
            container_id: "main".into(),
            exec_id: String::new(),
            data: b"hello\n".to_vec(),
            close: true,
        })
        .await
        .unwrap();
    let exit = client
        .wait_process(WaitProcessRequest {
            container_id: "main".into(),
            exec_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (exit.exit_code, exit.signal, exit.oom_killed),
        (3, 0, false)
    );
    let (out, err) = output.await.unwrap();
    assert_eq!(
        out,
        "out\npod-host\n80\n127.0.0.1 localhost pod-host\ngot hello\n"
    );
    assert_eq!(err, "err\n");

    // A long-running container: exec, stats, signals.
    let sleeper = common::spec(&["sleep", "1000"], &sandbox.namespace_dir, &hosts);
    client
        .create_container(create_req("sleeper", sleeper, &image, false))
        .await
        .unwrap();
    client
        .start_container(StartContainerRequest {
            container_id: "sleeper".into(),
        })
        .await
        .unwrap();
    let process = json!({"args": ["sh", "-c", "echo exec-out; hostname; exit 5"], "cwd": "/",
                         "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}});
    client
        .exec_process(ExecProcessRequest {
            container_id: "sleeper".into(),
            exec_id: "e1".into(),
            process_json: serde_json::to_vec(&process).unwrap(),
            stdin: false,
        })
        .await
        .unwrap();
    let exec_out = collect(client.clone(), "sleeper", "e1");
    let exit = client
        .wait_process(WaitProcessRequest {
            container_id: "sleeper".into(),
            exec_id: "e1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exit.exit_code, 5);
    assert_eq!(exec_out.await.unwrap().0, "exec-out\npod-host\n");

    let missing = json!({"args": ["no-such-binary"], "cwd": "/", "env": ["PATH=/bin"],
                         "user": {"uid": 0, "gid": 0}});
    let err = client
        .exec_process(ExecProcessRequest {
            container_id: "sleeper".into(),
            exec_id: "e2".into(),
            process_json: serde_json::to_vec(&missing).unwrap(),
            stdin: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no-such-binary"), "{err:?}");

    let stats = client
        .stats(StatsRequest {
            container_id: "sleeper".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.pids >= 1, "{stats:?}");
    assert!(stats.memory_usage_bytes > 0, "{stats:?}");

    client
        .signal_process(SignalProcessRequest {
            container_id: "sleeper".into(),
            exec_id: String::new(),
            signal: libc::SIGKILL,
        })
        .await
        .unwrap();
    let exit = client
        .wait_process(WaitProcessRequest {
            container_id: "sleeper".into(),
            exec_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((exit.exit_code, exit.signal), (137, libc::SIGKILL));

    // Remove; a created-but-never-started container is killed too.
    client
        .create_container(create_req("never", spec, &image, false))
        .await
        .unwrap();
    for id in ["main", "sleeper", "never", "main"] {
        client
            .remove_container(RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .unwrap();
    }
    let gone = client
        .wait_process(WaitProcessRequest {
            container_id: "main".into(),
            exec_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("\"main\""), "{gone:?}");

    client.shutdown(ShutdownRequest {}).await.unwrap();
    let containers = agent.state_dir().join("containers");
    agent.server.await.unwrap().unwrap();
    common::assert_no_cgroups(&agent.cgroup_parent);
    assert_eq!(std::fs::read_dir(&containers).unwrap().count(), 0);
}

#[tokio::test]
async fn bad_requests_name_what_failed() {
    common::require_root("bad_requests_name_what_failed");
    let agent = common::start_agent("bad");
    let mut client = common::unix_client(&agent.socket).await;

    let err = client
        .create_container(CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: b"{not json".to_vec(),
            rootfs: Some(Rootfs::LayerDirs(LayerDirs { lower: vec![] })),
            stdin: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("c1") && err.message().contains("OCI spec"),
        "{err:?}"
    );

    let err = client
        .create_container(CreateContainerRequest {
            container_id: "../escape".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let err = client
        .start_container(StartContainerRequest {
            container_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("nope"), "{err:?}");

    let err = client
        .copy_file(CopyFileRequest {
            path: "../../etc/passwd".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    client.shutdown(ShutdownRequest {}).await.unwrap();
    agent.server.await.unwrap().unwrap();
}
