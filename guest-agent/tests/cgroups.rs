//! UpdateResources and OomEvents against the in-process agent, checked in
//! the real cgroup files (v1 on this host, v2 in the guest; the helpers
//! read whichever the host has).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use vmrun_proto::v1::*;
use vmrun_proto::AgentClient;

/// Generous bound for an event that is due now; a failure, not a wait.
const DUE: Duration = Duration::from_secs(20);

fn v2_host() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A container's cgroup file: `v1` is (controller, file), `v2` the file.
fn cgroup_file(cgroup: &str, v1: (&str, &str), v2: &str) -> PathBuf {
    let rel = cgroup.trim_start_matches('/');
    if v2_host() {
        Path::new("/sys/fs/cgroup").join(rel).join(v2)
    } else {
        Path::new("/sys/fs/cgroup").join(v1.0).join(rel).join(v1.1)
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn update(id: &str, resources: serde_json::Value) -> UpdateResourcesRequest {
    UpdateResourcesRequest {
        container_id: id.into(),
        linux_resources_json: serde_json::to_vec(&resources).unwrap(),
    }
}

#[tokio::test]
async fn update_resources_rewrites_the_cgroup() {
    common::require_root("update_resources_rewrites_the_cgroup");
    let agent = common::start_agent("update");
    let _cleanup = common::kill_on_panic(&agent);
    let image = agent.tmp.path().join("image");
    common::busybox_rootfs(&image);
    let mut client = common::unix_client(&agent.socket).await;
    let sandbox = common::create_sandbox(&mut client, "update-pod").await;
    let (ns, hosts) = (&sandbox.namespace_dir, &sandbox.etc_files["hosts"]);
    let spec = common::spec(&["sleep", "1000"], ns, hosts);
    common::run_container(&mut client, "app", &spec, &image).await;
    let cg = format!("{}/app", agent.cgroup_parent);

    client
        .update_resources(update(
            "app",
            json!({
                "memory": {"limit": 64 << 20},
                "pids": {"limit": 42},
                "cpu": {"shares": 512, "quota": 50000, "period": 100000}
            }),
        ))
        .await
        .unwrap();
    let memory = cgroup_file(&cg, ("memory", "memory.limit_in_bytes"), "memory.max");
    assert_eq!(read(&memory), (64u64 << 20).to_string());
    assert_eq!(
        read(&cgroup_file(&cg, ("pids", "pids.max"), "pids.max")),
        "42"
    );
    if v2_host() {
        assert_eq!(read(&cgroup_file(&cg, ("", ""), "cpu.max")), "50000 100000");
        // shares 512 -> weight 1 + (512 - 2) * 9999 / 262142.
        assert_eq!(read(&cgroup_file(&cg, ("", ""), "cpu.weight")), "20");
    } else {
        assert_eq!(read(&cgroup_file(&cg, ("cpu", "cpu.shares"), "")), "512");
        assert_eq!(
            read(&cgroup_file(&cg, ("cpu", "cpu.cfs_quota_us"), "")),
            "50000"
        );
    }

    // Only what is given changes.
    client
        .update_resources(update("app", json!({"pids": {"limit": 7}})))
        .await
        .unwrap();
    assert_eq!(
        read(&cgroup_file(&cg, ("pids", "pids.max"), "pids.max")),
        "7"
    );
    assert_eq!(read(&memory), (64u64 << 20).to_string());

    // Bad input: a clear code and a message naming the container.
    let e = client
        .update_resources(update("nope", json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("nope"), "{e:?}");
    let e = client
        .update_resources(UpdateResourcesRequest {
            container_id: "app".into(),
            linux_resources_json: b"{\"memory\": 12".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("\"app\"") && e.message().contains("LinuxResources"),
        "{e:?}"
    );
    let e = client
        .update_resources(update("app", json!({"memory": {"limit": "lots"}})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = client
        .update_resources(update("app", json!({"memory": {"swappiness": 200}})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("swappiness"), "{e:?}");

    client
        .remove_container(RemoveContainerRequest {
            container_id: "app".into(),
        })
        .await
        .unwrap();
    let e = client
        .update_resources(update("app", json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    client.shutdown(ShutdownRequest {}).await.unwrap();
    agent.server.await.unwrap().unwrap();
    common::assert_no_cgroups(&agent.cgroup_parent);
}

/// The next event, failing the test if none comes in `DUE`.
async fn next_event(stream: &mut Streaming<OomEvent>) -> OomEvent {
    tokio::time::timeout(DUE, stream.message())
        .await
        .expect("an OOM event in time")
        .unwrap()
        .expect("the stream is open")
}

async fn oom_events(client: &mut AgentClient<Channel>, sandbox: &str) -> Streaming<OomEvent> {
    client
        .oom_events(OomEventsRequest {
            sandbox_id: sandbox.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn oom_events_report_containers_that_outgrow_their_memory() {
    common::require_root("oom_events_report_containers_that_outgrow_their_memory");
    let agent = common::start_agent("oom");
    let _cleanup = common::kill_on_panic(&agent);
    let image = agent.tmp.path().join("image");
    common::busybox_rootfs(&image);
    let mut client = common::unix_client(&agent.socket).await;

    let e = client
        .oom_events(OomEventsRequest {
            sandbox_id: "oom-pod".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no sandbox"), "{e:?}");
    let sandbox = common::create_sandbox(&mut client, "oom-pod").await;
    let e = client
        .oom_events(OomEventsRequest {
            sandbox_id: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("oom-pod"), "{e:?}");

    // The agent subscribes before answering, so nothing below is missed.
    let mut events = oom_events(&mut client, "oom-pod").await;
    let mut all_events = oom_events(&mut client, "").await;

    // 32 MiB of memory (and no swap) for a process that fills 128 MiB.
    let (ns, hosts) = (&sandbox.namespace_dir, &sandbox.etc_files["hosts"]);
    let limit = json!({"memory": {"limit": 32 << 20, "swap": 32 << 20}});
    let hog_args = ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"];

    // The container's init itself is killed: published before WaitProcess
    // reports the exit.
    let mut hog = common::spec(&hog_args, ns, hosts);
    hog["linux"]["resources"] = limit.clone();
    common::run_container(&mut client, "hog", &hog, &image).await;
    let exit = common::wait_process(&mut client, "hog", "").await;
    assert_eq!(
        (exit.signal, exit.oom_killed),
        (libc::SIGKILL, true),
        "{exit:?}"
    );
    let event = next_event(&mut events).await;
    assert_eq!((event.container_id.as_str(), event.oom_kills), ("hog", 1));
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!(
        event.timestamp_ns <= now_ns && now_ns - event.timestamp_ns < DUE.as_nanos() as i64,
        "{event:?}"
    );
    assert_eq!(next_event(&mut all_events).await, event);

    // An exec'd process is killed and the container lives on: the poller
    // finds it.
    let mut bystander = common::spec(&["sleep", "1000"], ns, hosts);
    bystander["linux"]["resources"] = limit;
    common::run_container(&mut client, "bystander", &bystander, &image).await;
    client
        .exec_process(ExecProcessRequest {
            container_id: "bystander".into(),
            exec_id: "dd".into(),
            process_json: serde_json::to_vec(&common::process(&hog_args)).unwrap(),
            stdin: false,
        })
        .await
        .unwrap();
    let exit = common::wait_process(&mut client, "bystander", "dd").await;
    assert_eq!(exit.signal, libc::SIGKILL, "{exit:?}");
    let event = next_event(&mut events).await;
    assert_eq!(
        (event.container_id.as_str(), event.oom_kills),
        ("bystander", 1)
    );
    assert_eq!(next_event(&mut all_events).await, event);
    let stats = client
        .stats(StatsRequest {
            container_id: "bystander".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.oom_kills, 1);

    // Shutdown ends the streams (they would otherwise hold the server up).
    client.shutdown(ShutdownRequest {}).await.unwrap();
    assert_eq!(events.message().await.unwrap(), None);
    agent.server.await.unwrap().unwrap();
    common::assert_no_cgroups(&agent.cgroup_parent);
}
