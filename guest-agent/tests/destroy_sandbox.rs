//! DestroySandbox against the in-process agent (non-PID-1 mode, where it
//! tears down and stops serving instead of powering the guest off).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;
use vmrun_proto::v1::*;

/// Polls until /proc/<pid> is gone (exited and reaped); the exec'd
/// process is reaped by its own waiter thread, maybe a moment after the
/// kill.
fn assert_gone(what: &str, pid: i32) {
    let proc_dir = format!("/proc/{pid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&proc_dir).exists() {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is still there"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn destroy_sandbox_leaves_no_processes_mounts_or_cgroups() {
    common::require_root("destroy_sandbox_leaves_no_processes_mounts_or_cgroups");
    let agent = common::start_agent("destroy");
    let _cleanup = common::kill_on_panic(&agent);
    let image = agent.tmp.path().join("image");
    common::busybox_rootfs(&image);
    let mut client = common::unix_client(&agent.socket).await;
    let sandbox = common::create_sandbox(&mut client, "doomed").await;
    let pause: i32 = sandbox
        .namespace_dir
        .trim_start_matches("/proc/")
        .trim_end_matches("/ns")
        .parse()
        .unwrap();
    assert!(!sandbox.shm_dir.is_empty());
    let (ns, hosts) = (&sandbox.namespace_dir, &sandbox.etc_files["hosts"]);

    // A running container with an exec'd process, and a created one.
    let sleeper = common::spec(&["sleep", "1000"], ns, hosts);
    let running = common::run_container(&mut client, "running", &sleeper, &image).await;
    let exec = client
        .exec_process(ExecProcessRequest {
            container_id: "running".into(),
            exec_id: "extra".into(),
            process_json: serde_json::to_vec(&common::process(&["sleep", "1000"])).unwrap(),
            stdin: false,
        })
        .await
        .unwrap()
        .into_inner()
        .pid;
    let created = client
        .create_container(common::create_req("created", &sleeper, &image, false))
        .await
        .unwrap()
        .into_inner()
        .pid;
    let mut oom_events = client
        .oom_events(OomEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    // Wrong or missing ids touch nothing.
    let e = client
        .destroy_sandbox(DestroySandboxRequest {
            sandbox_id: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("doomed"), "{e:?}");
    let e = client
        .destroy_sandbox(DestroySandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let stats = client
        .stats(StatsRequest {
            container_id: "running".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.pids, 2, "{stats:?}");

    let shm = sandbox.shm_dir.clone();
    let containers = agent.state_dir().join("containers");
    let mountinfo = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mountinfo().contains(&shm), "the pod's /dev/shm is mounted");

    let response = client
        .destroy_sandbox(DestroySandboxRequest {
            sandbox_id: "doomed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.removed_containers, ["created", "running"]);
    assert!(response.cleanup_errors.is_empty(), "{response:?}");

    // Serving stops, as after Shutdown; open streams end rather than hold
    // it up.
    assert_eq!(oom_events.message().await.unwrap(), None);
    agent.server.await.unwrap().unwrap();

    for (what, pid) in [
        ("the pause process", pause),
        ("the running container", running),
        ("the exec'd process", exec),
        ("the created container", created),
    ] {
        assert_gone(what, pid);
    }
    let tmp = agent.tmp.path().to_string_lossy().into_owned();
    let left: Vec<String> = mountinfo()
        .lines()
        .filter(|l| l.contains(&tmp))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "mounts left behind: {left:#?}");
    common::assert_no_cgroups(&agent.cgroup_parent);
    assert_eq!(std::fs::read_dir(&containers).unwrap().count(), 0);
}
