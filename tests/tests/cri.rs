//! `vmrun serve` end to end through CRI, as kubelet and crictl drive it, on
//! the native runtime (handler `runc`/`native`/default).
//!
//! The vm handler's pods run in microVMs
//! (`the_vm_handler_runs_a_pod_in_a_microvm`, nested inside L1 where
//! /dev/kvm is not hardware KVM); see docs/cri.md for what is not there.

use std::time::Duration;

use vmrun_cri_api::v1 as api;
use vmrun_tests::cri::*;
use vmrun_tests::pod::require_root;

fn sh(script: &str) -> Vec<&str> {
    vec!["/bin/sh", "-c", script]
}

/// What a container reads as its own cgroup's CPU quota and memory limit
/// (cgroup v2 files where the container has them, else v1's).
const OWN_LIMITS: &str = "if [ -f /sys/fs/cgroup/cpu.max ]; then \
    cut -d' ' -f1 /sys/fs/cgroup/cpu.max; cat /sys/fs/cgroup/memory.max; \
    else cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/memory/memory.limit_in_bytes; fi";

/// UpdateContainerResources reaches the running container's own cgroup (a
/// vm container's is in the guest): the container reads the new CPU quota
/// and memory limit.
async fn resources_update_reaches_the_container(server: &CriServer, id: &str) {
    server
        .runtime()
        .await
        .update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(api::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 30_000,
                memory_limit_in_bytes: 200 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("UpdateContainerResources {id}: {e}"));
    let out = exec_sync(server, id, &sh(OWN_LIMITS)).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("30000\n{}\n", 200u64 << 20),
        "the container's own limits after the update (stderr: {})",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// ContainerStats and PodSandboxStats of a running container: CPU time and
/// memory counted (for a vm pod: the container's from the guest agent, the
/// pod's from its VMM process on the host).
async fn stats_count_cpu_and_memory(server: &CriServer, sandbox: &str, id: &str) {
    let mut rt = server.runtime().await;
    let stats = rt
        .container_stats(api::ContainerStatsRequest {
            container_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(stats.memory.unwrap().working_set_bytes.unwrap().value > 0);
    assert!(stats.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    let pod = rt
        .pod_sandbox_stats(api::PodSandboxStatsRequest {
            pod_sandbox_id: sandbox.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
        .linux
        .unwrap();
    assert!(pod.memory.unwrap().working_set_bytes.unwrap().value > 0);
    assert!(pod.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    assert!(pod.process.unwrap().process_count.unwrap().value >= 1);
    assert!(
        pod.containers
            .iter()
            .any(|c| c.attributes.as_ref().unwrap().id == id),
        "the pod's stats list its running container"
    );
}

async fn run_sandbox(
    server: &CriServer,
    config: &api::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    server
        .runtime()
        .await
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        })
        .await
        .map(|r| r.into_inner().pod_sandbox_id)
}

async fn create(
    server: &CriServer,
    sandbox: &str,
    config: api::ContainerConfig,
    sandbox_config: &api::PodSandboxConfig,
) -> Result<String, tonic::Status> {
    server
        .runtime()
        .await
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: sandbox.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .map(|r| r.into_inner().container_id)
}

async fn start(server: &CriServer, id: &str) {
    server
        .runtime()
        .await
        .start_container(api::StartContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer {id}: {e}"));
}

async fn stop_and_remove(server: &CriServer, sandbox: &str) {
    let mut rt = server.runtime().await;
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: sandbox.to_string(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: sandbox.to_string(),
    })
    .await
    .expect("RemovePodSandbox");
    let left = server.leftovers(sandbox);
    assert!(left.is_empty(), "pod {sandbox} left: {left:#?}");
}

async fn exec_sync(server: &CriServer, id: &str, cmd: &[&str]) -> api::ExecSyncResponse {
    server
        .runtime()
        .await
        .exec_sync(api::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
        .into_inner()
}

/// The CRI log lines of a file: (stream, tag, content).
fn log_records(path: &std::path::Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let time = parts.next().unwrap_or_default();
            assert!(
                chrono_like(time),
                "{}: {l:?} does not start with an RFC 3339 time",
                path.display()
            );
            (
                parts.next().unwrap_or_default().to_string(),
                parts.next().unwrap_or_default().to_string(),
                parts.next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The pod IP PodSandboxStatus reports.
async fn pod_ip(server: &CriServer, id: &str) -> String {
    server
        .runtime()
        .await
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .network
        .unwrap()
        .ip
}

/// How many VMM processes run for the pod directory `pod_dir`.
fn vmms_of(pod_dir: &std::path::Path) -> usize {
    vmrun_tests::pod::vmms_under(pod_dir).len()
}

fn chrono_like(t: &str) -> bool {
    t.len() >= 20 && t.as_bytes()[4] == b'-' && t.contains('T') && t.ends_with('Z')
}

#[tokio::test]
async fn version_status_and_runtime_config_answer_like_a_cri_runtime() {
    require_root("version_status_and_runtime_config_answer_like_a_cri_runtime");
    let server = CriServer::start().await;
    let mut rt = server.runtime().await;
    let v = rt
        .version(api::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "vmrun");
    assert_eq!(v.runtime_api_version, "v1");
    let status = rt
        .status(api::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conditions = status.status.unwrap().conditions;
    let runtime_ready = conditions
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .unwrap();
    assert!(runtime_ready.status);
    // No CNI configuration in this daemon's (empty) directory: the kubelet
    // must hear that pod networking is not ready, and why.
    let network = conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(!network.status);
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(network.message.contains("no-cni"), "{network:?}");
    let handlers: Vec<_> = status
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    for h in ["", "runc", "native", "vm", "wasm"] {
        assert!(handlers.contains(&h), "handler {h:?} in {handlers:?}");
    }
    let config = rt
        .runtime_config(api::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(config.linux.unwrap().cgroup_driver, 1, "cgroupfs");
    let fs = server
        .images()
        .await
        .image_fs_info(api::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(fs.image_filesystems[0].used_bytes.unwrap().value > 0);
}

#[tokio::test]
async fn a_pod_with_two_containers_runs_its_whole_lifecycle() {
    require_root("a_pod_with_two_containers_runs_its_whole_lifecycle");
    let server = CriServer::start().await;
    let image = vmrun_tests::shared_busybox().await.unwrap();
    let mut images = server.images().await;
    let image_ref = server.pull(&image).await;
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let status = images
        .image_status(api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    let listed = status.image.expect("the pulled image");
    assert_eq!(listed.id, image_ref);
    assert!(listed.repo_tags.contains(&image), "{listed:?}");
    let all = images
        .list_images(api::ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert!(all.images.iter().any(|i| i.id == image_ref));

    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("two", "uid-two", logs.path());
    let sandbox = run_sandbox(&server, &config, "").await.unwrap();
    let mut rt = server.runtime().await;
    let s = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(s.state, SANDBOX_READY);
    assert_eq!(s.metadata.unwrap().name, "two");
    assert_eq!(s.labels["app"], "two");

    // PID 1 of its pid namespace: it exits on SIGTERM only with a handler.
    let server_script = "trap 'exit 0' TERM; echo hello; echo oops >&2; cat /etc/resolv.conf; \
                         sleep 1000 & wait";
    let web = create(
        &server,
        &sandbox,
        kubelet_container_config("web", &image_ref, &sh(server_script), &config),
        &config,
    )
    .await
    .unwrap();
    let job = create(
        &server,
        &sandbox,
        kubelet_container_config("job", &image_ref, &sh("echo done; exit 3"), &config),
        &config,
    )
    .await
    .unwrap();
    let created = wait_container(&mut rt, &web, Duration::from_secs(5), |_| true).await;
    assert_eq!(created.state, CONTAINER_CREATED);
    start(&server, &web).await;
    start(&server, &job).await;

    let exited = wait_container(&mut rt, &job, Duration::from_secs(30), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!(exited.exit_code, 3);
    assert_eq!(exited.reason, "Error");
    assert!(exited.started_at > 0 && exited.finished_at >= exited.started_at);
    assert_eq!(exited.labels["io.kubernetes.container.name"], "job");
    assert_eq!(
        exited.log_path,
        logs.path().join("job/0.log").display().to_string()
    );
    let running = wait_container(&mut rt, &web, Duration::from_secs(30), |s| {
        s.state == CONTAINER_RUNNING
    })
    .await;
    assert_eq!(running.image_id, image_ref);

    // Logs in the CRI format, where the kubelet said.
    let web_log = logs.path().join("web/0.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !log_records(&web_log)
        .iter()
        .any(|r| r.2.starts_with("nameserver"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "web's log: {:?}",
            log_records(&web_log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = log_records(&web_log);
    assert!(
        records.contains(&("stdout".into(), "F".into(), "hello".into())),
        "{records:?}"
    );
    assert!(
        records.contains(&("stderr".into(), "F".into(), "oops".into())),
        "{records:?}"
    );
    assert!(
        records.iter().any(|r| r.2 == "nameserver 10.96.0.10"),
        "the kubelet's DNS config is the pod's resolv.conf: {records:?}"
    );
    let job_log = log_records(&logs.path().join("job/0.log"));
    assert_eq!(job_log, vec![("stdout".into(), "F".into(), "done".into())]);

    // ExecSync keeps stdout, stderr and the exit code apart.
    let out = exec_sync(&server, &web, &sh("echo out; echo err >&2; exit 4")).await;
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit_code, 4);

    // Stats from the container's cgroup and writable layer.
    writable_layer_counts_what_the_container_wrote(&server, &web).await;
    stats_count_cpu_and_memory(&server, &sandbox, &web).await;
    let all_stats = rt
        .list_container_stats(api::ListContainerStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all_stats.stats.len(),
        1,
        "only running containers have stats"
    );
    resources_update_reaches_the_container(&server, &web).await;

    // Lists, filtered as the kubelet filters them.
    let listed = rt
        .list_containers(api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                pod_sandbox_id: sandbox.clone(),
                state: Some(api::ContainerStateValue {
                    state: CONTAINER_RUNNING,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(listed.iter().map(|c| &c.id).collect::<Vec<_>>(), vec![&web]);
    let pods = rt
        .list_pod_sandbox(api::ListPodSandboxRequest {
            filter: Some(api::PodSandboxFilter {
                label_selector: [("app".to_string(), "two".to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1);

    // StopContainer: SIGTERM, then SIGKILL after the grace period.
    rt.stop_container(api::StopContainerRequest {
        container_id: web.clone(),
        timeout: 2,
    })
    .await
    .unwrap();
    let stopped = wait_container(&mut rt, &web, Duration::from_secs(5), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!(stopped.exit_code, 0, "the TERM handler ran: {stopped:?}");
    assert_eq!(stopped.reason, "Completed");
    rt.remove_container(api::RemoveContainerRequest {
        container_id: job.clone(),
    })
    .await
    .unwrap();
    let err = rt
        .container_status(api::ContainerStatusRequest {
            container_id: job.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await
    .unwrap();
    let s = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(s.state, SANDBOX_NOTREADY);
    stop_and_remove(&server, &sandbox).await;
    // The kubelet owns the log files: they stay.
    assert!(web_log.exists());
}

/// CRI's seccomp profiles: RuntimeDefault filters (and its ExecSync
/// processes with it), absent is unconfined, a Localhost profile that does
/// not exist fails the container naming the file.
#[tokio::test]
async fn seccomp_profiles_are_applied_as_the_kubelet_asks() {
    require_root("seccomp_profiles_are_applied_as_the_kubelet_asks");
    let server = CriServer::start().await;
    let image = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("sec", "uid-sec", logs.path());
    let sandbox = run_sandbox(&server, &config, "runc").await.unwrap();
    use api::security_profile::ProfileType;
    let with = |name: &str, profile: Option<api::SecurityProfile>| {
        let mut c = kubelet_container_config(name, &image, &["sleep", "3600"], &config);
        let linux = c.linux.get_or_insert_with(Default::default);
        linux
            .security_context
            .get_or_insert_with(Default::default)
            .seccomp = profile;
        c
    };
    let runtime_default = Some(api::SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let filtered = create(
        &server,
        &sandbox,
        with("filtered", runtime_default),
        &config,
    )
    .await
    .unwrap();
    start(&server, &filtered).await;
    let plain = create(&server, &sandbox, with("plain", None), &config)
        .await
        .unwrap();
    start(&server, &plain).await;
    let status = |out: api::ExecSyncResponse| String::from_utf8_lossy(&out.stdout).into_owned();
    let seccomp = ["grep", "Seccomp:", "/proc/self/status"];
    assert!(status(exec_sync(&server, &filtered, &seccomp).await).contains("Seccomp:\t2"));
    assert!(status(exec_sync(&server, &plain, &seccomp).await).contains("Seccomp:\t0"));
    let missing = Some(api::SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: "/nonexistent/vmrun-profile.json".into(),
    });
    let failed = match create(&server, &sandbox, with("missing", missing), &config).await {
        Err(e) => e.message().to_string(),
        Ok(id) => server
            .runtime()
            .await
            .start_container(api::StartContainerRequest { container_id: id })
            .await
            .expect_err("a container with a missing seccomp profile started")
            .message()
            .to_string(),
    };
    assert!(
        failed.contains("/nonexistent/vmrun-profile.json"),
        "{failed}"
    );
    stop_and_remove(&server, &sandbox).await;
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_reported_oom_killed() {
    require_root("a_container_over_its_memory_limit_is_reported_oom_killed");
    let server = CriServer::start().await;
    let image = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("hog", "uid-hog", logs.path());
    let sandbox = run_sandbox(&server, &config, "runc").await.unwrap();
    let mut hog = kubelet_container_config(
        "hog",
        &image,
        &["tail", "-c", "67108864", "/dev/zero"],
        &config,
    );
    hog.linux
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .memory_limit_in_bytes = 16 << 20;
    let id = create(&server, &sandbox, hog, &config).await.unwrap();
    start(&server, &id).await;
    let mut rt = server.runtime().await;
    let status = wait_container(&mut rt, &id, Duration::from_secs(60), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    assert_eq!(status.exit_code, 137);
    stop_and_remove(&server, &sandbox).await;
}

#[tokio::test]
async fn pods_survive_the_daemon_being_killed_and_are_served_again() {
    require_root("pods_survive_the_daemon_being_killed_and_are_served_again");
    let mut server = CriServer::start().await;
    let image = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("durable", "uid-durable", logs.path());
    let sandbox = run_sandbox(&server, &config, "native").await.unwrap();
    let ticker = create(
        &server,
        &sandbox,
        kubelet_container_config(
            "ticker",
            &image,
            &sh("i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done"),
            &config,
        ),
        &config,
    )
    .await
    .unwrap();
    start(&server, &ticker).await;
    let short = create(
        &server,
        &sandbox,
        kubelet_container_config("short", &image, &sh("exit 7"), &config),
        &config,
    )
    .await
    .unwrap();

    server.kill();
    // While no daemon runs, the pod runs on: its log grows.
    let log = logs.path().join("ticker/0.log");
    let before = log_records(&log).len();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log_records(&log).len() < before + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pod stopped logging without a daemon"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.restart().await;

    let mut rt = server.runtime().await;
    let pods = rt
        .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].id, sandbox);
    assert_eq!(pods[0].state, SANDBOX_READY);
    let status = wait_container(&mut rt, &ticker, Duration::from_secs(5), |_| true).await;
    assert_eq!(status.state, CONTAINER_RUNNING);
    // A container created before the restart starts after it, by a prefix of its id.
    start(&server, &short[..12]).await;
    let exited = wait_container(&mut rt, &short, Duration::from_secs(30), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!(exited.exit_code, 7);
    let out = exec_sync(&server, &ticker, &["echo", "still here"]).await;
    assert_eq!(out.stdout, b"still here\n");
    stop_and_remove(&server, &sandbox).await;
}

/// The pid of the pod's owner, from its verbose PodSandboxStatus.
async fn owner_pid(
    rt: &mut api::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    sandbox: &str,
) -> u64 {
    let info = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.to_string(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner()
        .info;
    let info: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
    info["ownerPid"].as_u64().expect("the owner's pid")
}

/// A pod's owner killed alone (the daemon runs on): the pod is reported
/// NOTREADY, calls on its containers say the owner is gone, and
/// StopPodSandbox/RemovePodSandbox undo what it left (container processes,
/// cgroups, mounts, the pod's directory).
#[tokio::test]
async fn a_killed_pod_owner_leaves_a_notready_pod_that_is_removed_cleanly() {
    require_root("a_killed_pod_owner_leaves_a_notready_pod_that_is_removed_cleanly");
    let server = CriServer::start().await;
    let image = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("orphan", "uid-orphan", logs.path());
    let sandbox = run_sandbox(&server, &config, "native").await.unwrap();
    let sleeper = create(
        &server,
        &sandbox,
        kubelet_container_config("sleeper", &image, &sh("sleep 1000 # 31337"), &config),
        &config,
    )
    .await
    .unwrap();
    start(&server, &sleeper).await;
    let mut rt = server.runtime().await;
    let owner = owner_pid(&mut rt, &sandbox).await as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(owner),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = rt
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if status.state == SANDBOX_NOTREADY {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pod is still {} after its owner was killed",
            status.state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = rt
        .container_status(api::ContainerStatusRequest {
            container_id: sleeper.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("owner process is gone"),
        "{}",
        e.message()
    );
    stop_and_remove(&server, &sandbox).await;
    let still: Vec<_> = vmrun_tests::pod::process_table()
        .into_iter()
        .filter(|(_, _, cmd)| cmd.contains("31337"))
        .collect();
    assert!(
        still.is_empty(),
        "the container outlived the removal: {still:?}"
    );
}

/// The `wasm` handler runs WebAssembly containers: output in CRI logs,
/// exit codes and reasons as kubelet reads them, exec refused with why, a
/// native image refused at CreateContainer naming it.
#[tokio::test]
async fn the_wasm_handler_runs_webassembly_containers() {
    require_root("the_wasm_handler_runs_webassembly_containers");
    let server = CriServer::start().await;
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let wasm_box = {
        use vmrun_tests::images::{layer_tar, push_image, Compression, Entry, ImageSpec, Layer};
        let wasm = vmrun_tests::wasm_programs::wasm_box_p1();
        let layer = Layer::new(
            layer_tar(&[Entry::file("app.wasm", wasm)]).unwrap(),
            Compression::Gzip,
        )
        .unwrap();
        let mut spec = ImageSpec::new(vec![layer]);
        spec.entrypoint = Some(vec!["/app.wasm".into()]);
        push_image(&registry.addr(), "test/cri-wasm-box:latest", &spec.build())
            .await
            .unwrap()
    };
    let wasm_box = server.pull(&wasm_box).await;
    let busybox = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("wasm", "uid-wasm", logs.path());
    let sandbox = run_sandbox(&server, &config, "wasm").await.unwrap();

    let hello = kubelet_container_config(
        "hello",
        &wasm_box,
        &["/app.wasm", "echo", "hello", "through", "cri"],
        &config,
    );
    let hello = create(&server, &sandbox, hello, &config).await.unwrap();
    start(&server, &hello).await;
    let failing = kubelet_container_config(
        "failing",
        &wasm_box,
        &["/app.wasm", "cat", "/no/such/file"],
        &config,
    );
    let failing = create(&server, &sandbox, failing, &config).await.unwrap();
    start(&server, &failing).await;
    let mut rt = server.runtime().await;
    let status = wait_container(&mut rt, &hello, Duration::from_secs(60), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (0, "Completed"),
        "{status:?}"
    );
    let records = log_records(&logs.path().join("hello/0.log"));
    assert_eq!(
        records,
        vec![(
            "stdout".to_string(),
            "F".to_string(),
            "hello through cri".to_string()
        )]
    );
    let status = wait_container(&mut rt, &failing, Duration::from_secs(60), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (1, "Error"),
        "{status:?}"
    );

    let sleeper = kubelet_container_config(
        "sleeper",
        &wasm_box,
        &["/app.wasm", "sleep", "3600"],
        &config,
    );
    let sleeper = create(&server, &sandbox, sleeper, &config).await.unwrap();
    start(&server, &sleeper).await;
    let e = rt
        .exec_sync(api::ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec!["ls".into()],
            timeout: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("no processes"), "{e:?}");

    let native = kubelet_container_config("native", &busybox, &["/bin/sh"], &config);
    let e = create(&server, &sandbox, native, &config)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a WebAssembly image"), "{e:?}");
    drop(rt);
    stop_and_remove(&server, &sandbox).await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_leave_nothing() {
    require_root("bad_requests_get_clear_errors_and_leave_nothing");
    let server = CriServer::start().await;
    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("bad", "uid-bad", logs.path());
    let no_pods = |server: &CriServer| {
        std::fs::read_dir(server.sandboxes_dir())
            .map(|d| d.count())
            .unwrap_or(0)
    };

    let e = run_sandbox(&server, &config, "kata").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("\"kata\""), "{e:?}");
    // This daemon's node has no guest for the vm handler: named, not run
    // natively (its image root holds no guest kernel).
    let e = run_sandbox(&server, &config, "vm").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("guest kernel"), "{e:?}");
    let mut malformed = config.clone();
    malformed.metadata = None;
    let e = run_sandbox(&server, &malformed, "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("config.metadata"), "{e:?}");
    let mut malformed = config.clone();
    malformed.hostname = "no_such host".into();
    let e = run_sandbox(&server, &malformed, "").await.unwrap_err();
    assert!(e.message().contains("config.hostname"), "{e:?}");
    assert_eq!(no_pods(&server), 0, "refused sandboxes leave no directory");

    let sandbox = run_sandbox(&server, &config, "").await.unwrap();
    let missing = "127.0.0.1:1/no/such-image:latest";
    let e = create(
        &server,
        &sandbox,
        kubelet_container_config("c", missing, &["true"], &config),
        &config,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(
        e.message().contains(missing) && e.message().contains("PullImage"),
        "{e:?}"
    );
    let mut no_image = kubelet_container_config("c", "x", &["true"], &config);
    no_image.image = None;
    let e = create(&server, &sandbox, no_image, &config)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("config.image.image"), "{e:?}");

    let mut rt = server.runtime().await;
    let unknown = "0123456789abcdef".repeat(4);
    let e = rt
        .container_status(api::ContainerStatusRequest {
            container_id: unknown.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains(&unknown), "{e:?}");
    let e = rt
        .start_container(api::StartContainerRequest {
            container_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: unknown.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Removing what is not there succeeds, as the kubelet expects.
    rt.remove_container(api::RemoveContainerRequest {
        container_id: unknown.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: unknown.clone(),
    })
    .await
    .unwrap();
    // Streaming requests are validated before a URL is handed out.
    let e = rt
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: sandbox.clone(),
            port: vec![70000],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("70000"), "{e:?}");
    let e = server
        .images()
        .await
        .pull_image(api::PullImageRequest {
            image: Some(api::ImageSpec {
                image: "not a reference!".into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    stop_and_remove(&server, &sandbox).await;
    assert_eq!(no_pods(&server), 0);
}

/// kubelet's standalone static-pod flow, in kubelet's order: Version and
/// Status, RunPodSandbox, image checks and PullImage, CreateContainer and
/// StartContainer with kubelet's mounts, log paths and labels, status
/// polling, then StopContainer, StopPodSandbox, RemoveContainer,
/// RemovePodSandbox.
#[tokio::test]
async fn the_kubelet_static_pod_flow_runs_in_kubelets_order() {
    require_root("the_kubelet_static_pod_flow_runs_in_kubelets_order");
    let server = CriServer::start().await;
    let image = vmrun_tests::shared_busybox().await.unwrap();
    let mut rt = server.runtime().await;
    let mut images = server.images().await;
    rt.version(api::VersionRequest {
        version: "0.1.0".into(),
    })
    .await
    .unwrap();
    rt.status(api::StatusRequest { verbose: false })
        .await
        .unwrap();

    let kubelet = tempfile::tempdir().unwrap();
    let uid = "8f1c6f2e-5f40-4c50-9d1e-0a1b2c3d4e5f";
    let log_dir = kubelet
        .path()
        .join(format!("pods/default_static-web_{uid}"));
    let config = kubelet_sandbox_config("static-web", uid, &log_dir);
    let sandbox = run_sandbox(&server, &config, "").await.unwrap();

    let spec = api::ImageSpec {
        image: image.clone(),
        ..Default::default()
    };
    let present = images
        .image_status(api::ImageStatusRequest {
            image: Some(spec.clone()),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    if present.image.is_none() {
        images
            .pull_image(api::PullImageRequest {
                image: Some(spec.clone()),
                auth: None,
                sandbox_config: Some(config.clone()),
            })
            .await
            .unwrap();
    }
    let image_ref = images
        .image_status(api::ImageStatusRequest {
            image: Some(spec),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap()
        .id;

    // kubelet's per-container files: /etc/hosts and the termination log.
    let pod_dir = kubelet.path().join(format!("pods/{uid}"));
    std::fs::create_dir_all(pod_dir.join("containers/web")).unwrap();
    std::fs::write(
        pod_dir.join("etc-hosts"),
        "127.0.0.1 localhost\n10.0.0.9 static-web\n",
    )
    .unwrap();
    let termination = pod_dir.join("containers/web/termination-log");
    std::fs::write(&termination, "").unwrap();
    let volume = pod_dir.join("volumes/kubernetes.io~empty-dir/data");
    std::fs::create_dir_all(&volume).unwrap();
    let mut web = kubelet_container_config(
        "web",
        &image_ref,
        &sh(
            "grep static-web /etc/hosts; echo bye > /dev/termination-log; echo kept > /data/f; \
             trap 'exit 0' TERM; sleep 1000 & wait",
        ),
        &config,
    );
    web.mounts = vec![
        api::Mount {
            container_path: "/etc/hosts".into(),
            host_path: pod_dir.join("etc-hosts").display().to_string(),
            ..Default::default()
        },
        api::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: termination.display().to_string(),
            ..Default::default()
        },
        api::Mount {
            container_path: "/data".into(),
            host_path: volume.display().to_string(),
            ..Default::default()
        },
    ];
    let web_id = create(&server, &sandbox, web, &config).await.unwrap();
    start(&server, &web_id).await;
    let running = wait_container(&mut rt, &web_id, Duration::from_secs(30), |s| {
        s.state == CONTAINER_RUNNING
    })
    .await;
    assert_eq!(running.mounts.len(), 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(volume.join("f")).unwrap_or_default() != "kept\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the emptyDir mount never got the file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_to_string(&termination).unwrap(), "bye\n");
    let records = log_records(&log_dir.join("web/0.log"));
    assert!(
        records.iter().any(|r| r.2 == "10.0.0.9 static-web"),
        "{records:?}"
    );
    // The kubelet's relist.
    let status = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status.unwrap().state, SANDBOX_READY);
    assert_eq!(status.containers_statuses.len(), 1);

    rt.stop_container(api::StopContainerRequest {
        container_id: web_id.clone(),
        timeout: 30,
    })
    .await
    .unwrap();
    let exited = wait_container(&mut rt, &web_id, Duration::from_secs(5), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!((exited.exit_code, exited.reason.as_str()), (0, "Completed"));
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await
    .unwrap();
    rt.remove_container(api::RemoveContainerRequest {
        container_id: web_id.clone(),
    })
    .await
    .unwrap();
    stop_and_remove(&server, &sandbox).await;
    // The kubelet's files are the kubelet's.
    assert!(volume.join("f").exists() && termination.exists());
}

#[tokio::test]
async fn a_rotated_log_is_reopened_and_written_again() {
    require_root("a_rotated_log_is_reopened_and_written_again");
    let server = CriServer::start().await;
    let image = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let config = kubelet_sandbox_config("rotate", "uid-rotate", logs.path());
    let sandbox = run_sandbox(&server, &config, "").await.unwrap();
    let id = create(
        &server,
        &sandbox,
        kubelet_container_config(
            "talker",
            &image,
            &sh("while :; do echo line; sleep 0.1; done"),
            &config,
        ),
        &config,
    )
    .await
    .unwrap();
    start(&server, &id).await;
    let log = logs.path().join("talker/0.log");
    let rotated = logs.path().join("talker/0.log.1");
    let wait_lines = |path: std::path::PathBuf| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log_records(&path).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} stays empty",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_lines(log.clone()).await;
    std::fs::rename(&log, &rotated).unwrap();
    server
        .runtime()
        .await
        .reopen_container_log(api::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    wait_lines(log.clone()).await;
    assert!(log_records(&log).iter().all(|r| r.2 == "line"));
    stop_and_remove(&server, &sandbox).await;
}

#[tokio::test]
async fn pull_image_uses_the_credentials_it_is_given() {
    require_root("pull_image_uses_the_credentials_it_is_given");
    // bcrypt (cost 4) of "vmrun-pass", as in the image store tests.
    const HASH: &str = "$2b$04$eYzYOZlA2gMMYE.K5ieW1OBkFelcNlwErpMGH0PwE1W3HTZoOWbTW";
    let registry = tokio::task::spawn_blocking(|| {
        vmrun_tests::registry::Registry::start_with_basic_auth("vmrun", HASH)
    })
    .await
    .unwrap()
    .unwrap();
    // An image of its own (a file more than busybox): removing it below must
    // not remove the busybox other tests of this process share.
    use vmrun_tests::images::{busybox_entries, layer_tar, Compression, Entry, ImageSpec, Layer};
    let layer =
        |entries: &[Entry]| Layer::new(layer_tar(entries).unwrap(), Compression::Gzip).unwrap();
    let img = ImageSpec::new(vec![
        layer(&busybox_entries().unwrap()),
        layer(&[Entry::file("private", b"cri auth")]),
    ])
    .build();
    let creds = oci_client::secrets::RegistryAuth::Basic("vmrun".into(), "vmrun-pass".into());
    let reference =
        vmrun_tests::images::push_image_as(&registry.addr(), "test/private:cri", &img, creds)
            .await
            .unwrap();
    let server = CriServer::start().await;
    let pull = |auth: Option<api::AuthConfig>| {
        let reference = reference.clone();
        let server = &server;
        async move {
            server
                .images()
                .await
                .pull_image(api::PullImageRequest {
                    image: Some(api::ImageSpec {
                        image: reference,
                        ..Default::default()
                    }),
                    auth,
                    sandbox_config: None,
                })
                .await
        }
    };
    let e = pull(None).await.unwrap_err();
    assert!(e.message().contains("test/private"), "{e:?}");
    let wrong = api::AuthConfig {
        username: "vmrun".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    pull(Some(wrong)).await.unwrap_err();
    let right = api::AuthConfig {
        username: "vmrun".into(),
        password: "vmrun-pass".into(),
        server_address: registry.addr(),
        ..Default::default()
    };
    let pulled = pull(Some(right)).await.unwrap().into_inner();
    assert!(pulled.image_ref.starts_with("sha256:"));
    // Removals at the same time (as critest's) all succeed: the ones that
    // find it gone already have nothing to do.
    let removals = (0..5).map(|_| {
        let image = pulled.image_ref.clone();
        async {
            server
                .images()
                .await
                .remove_image(api::RemoveImageRequest {
                    image: Some(api::ImageSpec {
                        image,
                        ..Default::default()
                    }),
                })
                .await
        }
    });
    for removed in futures::future::join_all(removals).await {
        removed.unwrap();
    }
    let gone = server
        .images()
        .await
        .image_status(api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: pulled.image_ref,
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.image.is_none());
}

#[tokio::test]
async fn pods_on_a_cni_network_reach_each_other_and_a_host_port() {
    const TEST: &str = "pods_on_a_cni_network_reach_each_other_and_a_host_port";
    require_root(TEST);
    let ipam = tempfile::tempdir().unwrap();
    let Some(conflist) = vmrun_tests::cni::test_network("vmrcri0", "10.250.41.0/24", ipam.path())
    else {
        eprintln!("SKIPPED {TEST}: containernetworking-plugins not installed (/usr/lib/cni)");
        return;
    };
    let server = CriServer::start_with_network(&conflist).await;
    let status = server
        .runtime()
        .await
        .status(api::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let network = status
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(network.status, "{network:?}");
    let image = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();

    let mut server_config = kubelet_sandbox_config("srv", "uid-srv", logs.path());
    server_config.port_mappings = vec![api::PortMapping {
        protocol: 0,
        container_port: 8080,
        host_port: 30880,
        host_ip: String::new(),
    }];
    let srv = run_sandbox(&server, &server_config, "").await.unwrap();
    let client_config = kubelet_sandbox_config("cli", "uid-cli", logs.path());
    let cli = run_sandbox(&server, &client_config, "").await.unwrap();
    let (srv_ip, cli_ip) = (pod_ip(&server, &srv).await, pod_ip(&server, &cli).await);
    assert!(srv_ip.starts_with("10.250.41."), "{srv_ip:?}");
    assert!(
        cli_ip.starts_with("10.250.41.") && cli_ip != srv_ip,
        "{cli_ip:?}"
    );

    // busybox nc answers each connection with a line, over and over.
    let web = create(
        &server,
        &srv,
        kubelet_container_config(
            "web",
            &image,
            &sh("trap 'exit 0' TERM; while :; do echo hello-from-srv | nc -l -p 8080; done & wait"),
            &server_config,
        ),
        &server_config,
    )
    .await
    .unwrap();
    start(&server, &web).await;
    let probe = create(
        &server,
        &cli,
        kubelet_container_config(
            "probe",
            &image,
            &sh("trap 'exit 0' TERM; sleep 1000 & wait"),
            &client_config,
        ),
        &client_config,
    )
    .await
    .unwrap();
    start(&server, &probe).await;

    // From the other pod, by pod IP, over TCP.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = exec_sync(
            &server,
            &probe,
            &sh(&format!("nc -w 2 {srv_ip} 8080 </dev/null")),
        )
        .await;
        if out.stdout == b"hello-from-srv\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pod cli never reached {srv_ip}:8080: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From the host, through the hostPort the portmap plugin set up on the
    // bridge's gateway address (an address of this test's own network).
    let gateway = "10.250.41.1:30880";
    let wait = Duration::from_secs(20);
    tokio::task::spawn_blocking(move || {
        vmrun_tests::cni::wait_for_line(gateway, "hello-from-srv\n", wait)
    })
    .await
    .unwrap();

    stop_and_remove(&server, &srv).await;
    stop_and_remove(&server, &cli).await;
    // DEL released the addresses and took the veths away.
    vmrun_tests::cni::assert_no_leases(ipam.path(), "vmrcri0", "10.250.41.");
    let _ = std::process::Command::new("ip")
        .args(["link", "del", "vmrcri0"])
        .status();
}

mod streaming {
    //! Exec, Attach and PortForward through the URLs vmrun's streaming server
    //! hands out, with a WebSocket client speaking the Kubernetes
    //! remotecommand (v5.channel.k8s.io) and portforward protocols as
    //! kubectl and crictl `--transport websocket` do. (SPDY, the other
    //! transport, is tested against the server in crates/streaming.)

    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn connect(url: &str, protocol: &str) -> Ws {
        let ws_url = url.replacen("http://", "ws://", 1);
        let mut request = ws_url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
        let (ws, response) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("connecting to {ws_url}: {e}"));
        assert_eq!(
            response.headers()["Sec-WebSocket-Protocol"]
                .to_str()
                .unwrap(),
            protocol
        );
        ws
    }

    /// Everything received, by channel, until the server closes or `done`
    /// holds (a port-forward connection stays open until the client goes).
    async fn collect_until(
        ws: &mut Ws,
        done: impl Fn(&std::collections::BTreeMap<u8, Vec<u8>>) -> bool,
    ) -> std::collections::BTreeMap<u8, Vec<u8>> {
        let mut by_channel = std::collections::BTreeMap::<u8, Vec<u8>>::new();
        let deadline = Duration::from_secs(30);
        while let Ok(Some(msg)) = tokio::time::timeout(deadline, ws.next()).await {
            match msg {
                Ok(Message::Binary(data)) if !data.is_empty() => {
                    by_channel
                        .entry(data[0])
                        .or_default()
                        .extend_from_slice(&data[1..]);
                }
                Ok(Message::Close(_)) | Err(_) => break,
                _ => {}
            }
            if done(&by_channel) {
                break;
            }
        }
        by_channel
    }

    /// A remotecommand session's output, up to its status (channel 3).
    async fn collect(ws: &mut Ws) -> std::collections::BTreeMap<u8, Vec<u8>> {
        collect_until(ws, |got| got.contains_key(&3)).await
    }

    async fn pod_with(
        server: &CriServer,
        name: &str,
        script: &str,
        logs: &std::path::Path,
    ) -> (String, String) {
        pod_with_container(server, name, &sh(script), logs, |_| {}).await
    }

    /// A running pod of one container running `command`, its config as
    /// `adjust` leaves it.
    async fn pod_with_container(
        server: &CriServer,
        name: &str,
        command: &[&str],
        logs: &std::path::Path,
        adjust: impl FnOnce(&mut api::ContainerConfig),
    ) -> (String, String) {
        let image = server
            .pull(&vmrun_tests::shared_busybox().await.unwrap())
            .await;
        let config = kubelet_sandbox_config(name, &format!("uid-{name}"), logs);
        let sandbox = run_sandbox(server, &config, "").await.unwrap();
        let mut container = kubelet_container_config("main", &image, command, &config);
        adjust(&mut container);
        let id = create(server, &sandbox, container, &config).await.unwrap();
        start(server, &id).await;
        let mut rt = server.runtime().await;
        wait_container(&mut rt, &id, Duration::from_secs(30), |s| {
            s.state == CONTAINER_RUNNING
        })
        .await;
        (sandbox, id)
    }

    #[tokio::test]
    async fn exec_streams_stdin_output_and_the_exit_code() {
        require_root("streaming::exec_streams_stdin_output_and_the_exit_code");
        let server = CriServer::start().await;
        let logs = tempfile::tempdir().unwrap();
        let idle = "trap 'exit 0' TERM; sleep 1000 & wait";
        let (sandbox, id) = pod_with(&server, "exec", idle, logs.path()).await;
        let url = server
            .runtime()
            .await
            .exec(api::ExecRequest {
                container_id: id.clone(),
                cmd: ["/bin/sh", "-c", "read x; echo got:$x; echo err >&2; exit 5"]
                    .map(String::from)
                    .to_vec(),
                tty: false,
                stdin: true,
                stdout: true,
                stderr: true,
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        ws.send(Message::Binary([&[0u8][..], b"hello\n"].concat().into()))
            .await
            .unwrap();
        // v5: channel 255 closes stdin.
        ws.send(Message::Binary(vec![255u8, 0].into()))
            .await
            .unwrap();
        let got = collect(&mut ws).await;
        assert_eq!(
            got.get(&1).map(Vec::as_slice),
            Some(&b"got:hello\n"[..]),
            "{got:?}"
        );
        assert_eq!(
            got.get(&2).map(Vec::as_slice),
            Some(&b"err\n"[..]),
            "{got:?}"
        );
        let status: serde_json::Value = serde_json::from_slice(&got[&3]).unwrap();
        assert_eq!(status["status"], "Failure", "{status}");
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0]["message"], "5");

        // A terminal: the command sees a tty of the size the client sent.
        let url = server
            .runtime()
            .await
            .exec(api::ExecRequest {
                container_id: id.clone(),
                cmd: ["/bin/sh", "-c", "read x; tty; stty size"]
                    .map(String::from)
                    .to_vec(),
                tty: true,
                stdin: true,
                stdout: true,
                stderr: false,
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        let size = br#"{"Width":100,"Height":40}"#;
        ws.send(Message::Binary([&[4u8][..], size].concat().into()))
            .await
            .unwrap();
        ws.send(Message::Binary([&[0u8][..], b"go\n"].concat().into()))
            .await
            .unwrap();
        let got = collect(&mut ws).await;
        let out = String::from_utf8_lossy(got.get(&1).map(Vec::as_slice).unwrap_or_default());
        assert!(out.contains("/dev/pts/"), "{out:?}");
        assert!(out.contains("40 100"), "{out:?}");
        let status: serde_json::Value = serde_json::from_slice(&got[&3]).unwrap();
        assert_eq!(status["status"], "Success", "{status}");

        // A container that is not running gets no URL.
        server
            .runtime()
            .await
            .stop_container(api::StopContainerRequest {
                container_id: id.clone(),
                timeout: 5,
            })
            .await
            .unwrap();
        let e = server
            .runtime()
            .await
            .exec(api::ExecRequest {
                container_id: id.clone(),
                cmd: vec!["true".into()],
                tty: false,
                stdin: false,
                stdout: true,
                stderr: true,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        stop_and_remove(&server, &sandbox).await;
    }

    #[tokio::test]
    async fn attach_follows_the_output_until_the_container_exits() {
        require_root("streaming::attach_follows_the_output_until_the_container_exits");
        let server = CriServer::start().await;
        let logs = tempfile::tempdir().unwrap();
        let script = "trap 'echo bye; exit 0' TERM; i=0; \
                      while :; do echo tick $i; i=$((i+1)); sleep 0.2; done & wait";
        let (sandbox, id) = pod_with(&server, "attach", script, logs.path()).await;
        // Its config has no stdin: an attach asking for one is refused, saying so.
        let e = attach_url(&server, &id, true, false).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("ContainerConfig.stdin"), "{e:?}");
        let url = server
            .runtime()
            .await
            .attach(api::AttachRequest {
                container_id: id.clone(),
                stdin: false,
                tty: false,
                stdout: true,
                stderr: true,
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("tick") {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Binary(d)))) if d.first() == Some(&1) => {
                    seen.extend_from_slice(&d[1..])
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("attach: no output ({other:?}), got {seen:?}"),
            }
        }
        let stopper = {
            let mut rt = server.runtime().await;
            let id = id.clone();
            tokio::spawn(async move {
                rt.stop_container(api::StopContainerRequest {
                    container_id: id,
                    timeout: 10,
                })
                .await
            })
        };
        let rest = collect(&mut ws).await;
        seen.extend_from_slice(rest.get(&1).map(Vec::as_slice).unwrap_or_default());
        stopper.await.unwrap().unwrap();
        assert!(
            String::from_utf8_lossy(&seen).contains("bye"),
            "attach ends with the container's last words: {:?}",
            String::from_utf8_lossy(&seen)
        );
        let e = attach_url(&server, &id, true, false).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(&id), "{e:?}");
        stop_and_remove(&server, &sandbox).await;
    }

    /// An Attach URL for stdout (and stdin/tty when asked), stderr without a tty.
    async fn attach_url(
        server: &CriServer,
        id: &str,
        stdin: bool,
        tty: bool,
    ) -> Result<String, tonic::Status> {
        server
            .runtime()
            .await
            .attach(api::AttachRequest {
                container_id: id.to_string(),
                stdin,
                tty,
                stdout: true,
                stderr: !tty,
            })
            .await
            .map(|r| r.into_inner().url)
    }

    /// Sends `text` on the session's stdin (channel 0).
    async fn type_in(ws: &mut Ws, text: &str) {
        ws.send(Message::Binary(
            [&[0u8][..], text.as_bytes()].concat().into(),
        ))
        .await
        .unwrap();
    }

    /// v5: channel 255 closes the client's stdin.
    async fn close_stdin(ws: &mut Ws) {
        ws.send(Message::Binary(vec![255u8, 0].into()))
            .await
            .unwrap();
    }

    /// Reads the session's stdout (channel 1) into `seen` until it contains `want`.
    /// Types `stty size` into a terminal until it prints `size` (a resize
    /// travels beside stdin, not in order with it; each answer is awaited,
    /// so nothing is guessed); what the terminal showed.
    async fn wait_for_size(ws: &mut Ws, size: &str) -> Vec<u8> {
        let mut seen = Vec::new();
        for n in 1.. {
            type_in(ws, &format!("stty size; echo size-{n}-$((0))\n")).await;
            read_until(ws, &mut seen, &format!("size-{n}-0")).await;
            if String::from_utf8_lossy(&seen).contains(size) {
                break;
            }
            assert!(
                n < 50,
                "the size never arrived: {:?}",
                String::from_utf8_lossy(&seen)
            );
        }
        seen
    }

    async fn read_until(ws: &mut Ws, seen: &mut Vec<u8>, want: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(seen).contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match tokio::time::timeout(left, ws.next()).await {
                Ok(Some(Ok(Message::Binary(d)))) if d.first() == Some(&1) => {
                    seen.extend_from_slice(&d[1..])
                }
                Ok(Some(Ok(Message::Binary(d)))) if d.first() == Some(&3) => panic!(
                    "the session ended ({}) before {want:?}; got {:?}",
                    String::from_utf8_lossy(&d[1..]),
                    String::from_utf8_lossy(seen)
                ),
                Ok(Some(Ok(_))) => {}
                other => panic!(
                    "no {want:?} ({other:?}); got {:?}",
                    String::from_utf8_lossy(seen)
                ),
            }
        }
    }

    /// The remotecommand status a session ended with (channel 3).
    fn session_status(got: &std::collections::BTreeMap<u8, Vec<u8>>) -> serde_json::Value {
        let status = got
            .get(&3)
            .unwrap_or_else(|| panic!("no status in {got:?}"));
        serde_json::from_slice(status).unwrap()
    }

    /// How many pty masters process `pid` holds open.
    fn pty_masters(pid: u64) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("ptmx"))
            })
            .count()
    }

    #[tokio::test]
    async fn attach_to_a_tty_container_types_resizes_and_outlives_a_daemon_restart() {
        require_root(
            "streaming::attach_to_a_tty_container_types_resizes_and_outlives_a_daemon_restart",
        );
        let mut server = CriServer::start().await;
        let logs = tempfile::tempdir().unwrap();
        // What `kubectl run -it` asks for.
        let (sandbox, id) = pod_with_container(&server, "tty", &["/bin/sh"], logs.path(), |c| {
            c.stdin = true;
            c.stdin_once = true;
            c.tty = true;
        })
        .await;

        // A command typed in comes back echoed by the terminal, then its
        // output. The end of a tty attach's stdin detaches it; the shell goes on.
        let url = attach_url(&server, &id, true, true).await.unwrap();
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        type_in(&mut ws, "echo first-$((1+1))\n").await;
        let mut seen = Vec::new();
        read_until(&mut ws, &mut seen, "first-2").await;
        let text = String::from_utf8_lossy(&seen).into_owned();
        assert!(text.contains("echo first-$((1+1))"), "no echo: {text:?}");
        // The terminal is the container's own, so it has a name there.
        let mut seen = Vec::new();
        type_in(&mut ws, "tty; echo tty-$((2+2))\n").await;
        read_until(&mut ws, &mut seen, "tty-4").await;
        let text = String::from_utf8_lossy(&seen).into_owned();
        assert!(text.contains("/dev/pts/0"), "tty: {text:?}");
        close_stdin(&mut ws).await;
        let got = collect(&mut ws).await;
        assert_eq!(session_status(&got)["status"], "Success", "{got:?}");
        let mut rt = server.runtime().await;
        let status = wait_container(&mut rt, &id, Duration::from_secs(5), |_| true).await;
        assert_eq!(status.state, CONTAINER_RUNNING, "detaching ended the shell");

        // The owner holds the terminal: a restarted daemon attaches again.
        server.kill();
        server.restart().await;
        let url = attach_url(&server, &id, true, true).await.unwrap();
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        let size = br#"{"Width":100,"Height":40}"#;
        ws.send(Message::Binary([&[4u8][..], size].concat().into()))
            .await
            .unwrap();
        // The resize travels beside stdin, not in order with it: ask until
        // the shell sees it (each answer is awaited, so nothing is guessed).
        wait_for_size(&mut ws, "40 100").await;
        // The shell's end is the session's and the container's.
        type_in(&mut ws, "exit 3\n").await;
        let got = collect(&mut ws).await;
        assert_eq!(session_status(&got)["status"], "Success", "{got:?}");
        let mut rt = server.runtime().await;
        let status = wait_container(&mut rt, &id, Duration::from_secs(30), |s| {
            s.state == CONTAINER_EXITED
        })
        .await;
        assert_eq!(status.exit_code, 3);

        // A terminal has one output: the log is stdout only, line ends
        // without the terminal's \r.
        let records = log_records(&logs.path().join("main/0.log"));
        assert!(records.iter().all(|r| r.0 == "stdout"), "{records:?}");
        assert!(
            records.iter().any(|r| r.2 == "first-2") && records.iter().any(|r| r.2 == "40 100"),
            "{records:?}"
        );

        // The pty goes with the container, not with the pod.
        let owner = super::owner_pid(&mut rt, &sandbox).await;
        assert!(
            pty_masters(owner) >= 1,
            "the exited container's terminal is kept"
        );
        rt.remove_container(api::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
        assert_eq!(pty_masters(owner), 0, "RemoveContainer left its pty open");
        stop_and_remove(&server, &sandbox).await;
    }

    #[tokio::test]
    async fn attach_with_stdin_once_feeds_a_container_until_eof() {
        require_root("streaming::attach_with_stdin_once_feeds_a_container_until_eof");
        let server = CriServer::start().await;
        let logs = tempfile::tempdir().unwrap();
        let (sandbox, id) = pod_with_container(&server, "cat", &["/bin/cat"], logs.path(), |c| {
            c.stdin = true;
            c.stdin_once = true;
        })
        .await;
        // A tty attach to a container made without one is refused, naming both.
        let e = attach_url(&server, &id, true, true).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains(&id) && e.message().contains("ContainerConfig.tty"),
            "{e:?}"
        );

        let url = attach_url(&server, &id, true, false).await.unwrap();
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        type_in(&mut ws, "line one\nline two\n").await;
        // stdin_once: the end of this attach's stdin is the container's EOF.
        close_stdin(&mut ws).await;
        let got = collect(&mut ws).await;
        assert_eq!(
            got.get(&1).map(Vec::as_slice),
            Some(&b"line one\nline two\n"[..]),
            "{got:?}"
        );
        assert_eq!(got.get(&2), None, "{got:?}");
        assert_eq!(session_status(&got)["status"], "Success", "{got:?}");
        let mut rt = server.runtime().await;
        let status = wait_container(&mut rt, &id, Duration::from_secs(30), |s| {
            s.state == CONTAINER_EXITED
        })
        .await;
        assert_eq!(status.exit_code, 0);
        assert_eq!(
            log_records(&logs.path().join("main/0.log")),
            vec![
                ("stdout".into(), "F".into(), "line one".into()),
                ("stdout".into(), "F".into(), "line two".into()),
            ]
        );

        // Exited: nothing to attach to, and the error says which container.
        let e = attach_url(&server, &id, false, false).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(&id), "{e:?}");
        stop_and_remove(&server, &sandbox).await;
    }

    #[tokio::test]
    async fn port_forward_reaches_a_server_on_the_pods_loopback() {
        require_root("streaming::port_forward_reaches_a_server_on_the_pods_loopback");
        let server = CriServer::start().await;
        let logs = tempfile::tempdir().unwrap();
        // The pod has no network but its own loopback (no CNI here): only
        // port-forward, entering the pod's namespace, can reach the server.
        let script = "trap 'exit 0' TERM; \
                      while :; do echo pong | nc -l -p 7070; done & wait";
        let (sandbox, _id) = pod_with(&server, "pf", script, logs.path()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            // URLs are single use: one per connection, as kubectl asks.
            let url = server
                .runtime()
                .await
                .port_forward(api::PortForwardRequest {
                    pod_sandbox_id: sandbox.clone(),
                    port: vec![7070],
                })
                .await
                .unwrap()
                .into_inner()
                .url;
            let mut ws = connect(&format!("{url}?port=7070"), "v4.channel.k8s.io").await;
            ws.send(Message::Binary([&[0u8][..], b"ping\n"].concat().into()))
                .await
                .unwrap();
            // Done at the answer, or at an error past the port prefix.
            let got = collect_until(&mut ws, |got| {
                got.get(&0).is_some_and(|d| d.ends_with(b"pong\n"))
                    || got.get(&1).is_some_and(|e| e.len() > 2)
            })
            .await;
            // Each channel starts with its port, little-endian.
            let data = got.get(&0).cloned().unwrap_or_default();
            if data.len() > 2 && &data[2..] == b"pong\n" {
                assert_eq!(&data[..2], &7070u16.to_le_bytes());
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "port-forward to 7070: {got:?}"
            );
            // The server in the pod may not listen yet.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let e = server
            .runtime()
            .await
            .port_forward(api::PortForwardRequest {
                pod_sandbox_id: "0".repeat(64),
                port: vec![80],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        stop_and_remove(&server, &sandbox).await;
    }

    /// Exec with stdin and a terminal, Attach to containers made with stdin
    /// (one with a terminal), and port-forward, into a vm pod: through the
    /// guest agent (its pty, its TCP forwarder in the guest).
    /// Nested inside L1 where /dev/kvm is not hardware KVM.
    #[tokio::test]
    async fn a_vm_pod_is_reached_by_exec_attach_and_port_forward() {
        const TEST: &str = "a_vm_pod_is_reached_by_exec_attach_and_port_forward";
        vmrun_tests::pod::vmrun_bin();
        vmrun_tests::pod::guest_assets();
        vmrun_tests::hardware_kvm_or_nested!(TEST);
        require_root(TEST);
        let server = CriServer::start_for_vm(None).await;
        let image = server
            .pull(&vmrun_tests::shared_busybox().await.unwrap())
            .await;
        let logs = tempfile::tempdir().unwrap();
        let mut config = kubelet_sandbox_config("vmstream", "uid-vmstream", logs.path());
        config.linux.get_or_insert_with(Default::default).resources =
            Some(api::LinuxContainerResources {
                memory_limit_in_bytes: 128 << 20,
                ..Default::default()
            });
        let sandbox = run_sandbox(&server, &config, "vm").await.unwrap();
        let script = "trap 'exit 0' TERM; while :; do echo pong | nc -l -p 7070; done & wait";
        let id = create(
            &server,
            &sandbox,
            kubelet_container_config("main", &image, &sh(script), &config),
            &config,
        )
        .await
        .unwrap();
        start(&server, &id).await;

        let url = server
            .runtime()
            .await
            .exec(api::ExecRequest {
                container_id: id.clone(),
                cmd: [
                    "/bin/sh",
                    "-c",
                    "read x; echo got:$x; tty; stty size; exit 7",
                ]
                .map(String::from)
                .to_vec(),
                tty: true,
                stdin: true,
                stdout: true,
                stderr: false,
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        let size = br#"{"Width":90,"Height":30}"#;
        ws.send(Message::Binary([&[4u8][..], size].concat().into()))
            .await
            .unwrap();
        ws.send(Message::Binary([&[0u8][..], b"hi\n"].concat().into()))
            .await
            .unwrap();
        let got = collect(&mut ws).await;
        let out = String::from_utf8_lossy(got.get(&1).map(Vec::as_slice).unwrap_or_default());
        assert!(out.contains("got:hi"), "{out:?}");
        // A terminal of the size sent, from the container's own devpts
        // (so `tty` names it there).
        assert!(out.contains("30 90"), "{out:?}");
        assert!(out.contains("/dev/pts/"), "{out:?}");
        let status: serde_json::Value = serde_json::from_slice(&got[&3]).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "7", "{status}");

        // Attach to a container made with a terminal (`kubectl run -it`):
        // typed in through the agent, echoed by the guest's pty, resized.
        let mut shell = kubelet_container_config("shell", &image, &["/bin/sh"], &config);
        (shell.stdin, shell.stdin_once, shell.tty) = (true, true, true);
        let shell = create(&server, &sandbox, shell, &config).await.unwrap();
        start(&server, &shell).await;
        let url = attach_url(&server, &shell, true, true).await.unwrap();
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        let size = br#"{"Width":100,"Height":40}"#;
        ws.send(Message::Binary([&[4u8][..], size].concat().into()))
            .await
            .unwrap();
        let seen = wait_for_size(&mut ws, "40 100").await;
        assert!(
            String::from_utf8_lossy(&seen).contains("stty size; echo size-1"),
            "the terminal echoes what is typed: {:?}",
            String::from_utf8_lossy(&seen)
        );
        // The terminal is the container's own (from its devpts in the guest).
        let mut seen = Vec::new();
        type_in(&mut ws, "tty; echo tty-$((2+2))\n").await;
        read_until(&mut ws, &mut seen, "tty-4").await;
        let text = String::from_utf8_lossy(&seen).into_owned();
        assert!(text.contains("/dev/pts/0"), "tty: {text:?}");
        type_in(&mut ws, "exit 3\n").await;
        let got = collect(&mut ws).await;
        assert_eq!(session_status(&got)["status"], "Success", "{got:?}");
        let mut rt = server.runtime().await;
        let status = wait_container(&mut rt, &shell, Duration::from_secs(30), |s| {
            s.state == CONTAINER_EXITED
        })
        .await;
        assert_eq!(status.exit_code, 3);
        let records = log_records(&logs.path().join("shell/0.log"));
        assert!(records.iter().all(|r| r.0 == "stdout"), "{records:?}");
        assert!(records.iter().any(|r| r.2 == "40 100"), "{records:?}");

        // A stdin_once container without a terminal: the attach's end of
        // input is the container's EOF.
        let mut cat = kubelet_container_config("cat", &image, &["/bin/cat"], &config);
        (cat.stdin, cat.stdin_once) = (true, true);
        let cat = create(&server, &sandbox, cat, &config).await.unwrap();
        start(&server, &cat).await;
        let url = attach_url(&server, &cat, true, false).await.unwrap();
        let mut ws = connect(&url, "v5.channel.k8s.io").await;
        type_in(&mut ws, "line one\nline two\n").await;
        close_stdin(&mut ws).await;
        let got = collect(&mut ws).await;
        assert_eq!(
            got.get(&1).map(Vec::as_slice),
            Some(&b"line one\nline two\n"[..]),
            "{got:?}"
        );
        let status = wait_container(&mut rt, &cat, Duration::from_secs(30), |s| {
            s.state == CONTAINER_EXITED
        })
        .await;
        assert_eq!(status.exit_code, 0);

        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let url = server
                .runtime()
                .await
                .port_forward(api::PortForwardRequest {
                    pod_sandbox_id: sandbox.clone(),
                    port: vec![7070],
                })
                .await
                .unwrap()
                .into_inner()
                .url;
            let mut ws = connect(&format!("{url}?port=7070"), "v4.channel.k8s.io").await;
            ws.send(Message::Binary([&[0u8][..], b"ping\n"].concat().into()))
                .await
                .unwrap();
            let got = collect_until(&mut ws, |got| {
                got.get(&0).is_some_and(|d| d.ends_with(b"pong\n"))
                    || got.get(&1).is_some_and(|e| e.len() > 2)
            })
            .await;
            let data = got.get(&0).cloned().unwrap_or_default();
            if data.len() > 2 && &data[2..] == b"pong\n" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "port-forward to 7070 in the pod VM: {got:?}"
            );
            // The server in the guest may not listen yet.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop_and_remove(&server, &sandbox).await;
    }
}

async fn writable_layer(server: &CriServer, id: &str) -> api::FilesystemUsage {
    server
        .runtime()
        .await
        .container_stats(api::ContainerStatsRequest {
            container_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
        .writable_layer
        .unwrap()
}

/// A megabyte written into the container's root shows in its
/// `writable_layer` stats (bytes and a new inode).
async fn writable_layer_counts_what_the_container_wrote(server: &CriServer, id: &str) {
    let before = writable_layer(server, id).await;
    exec_sync(server, id, &sh("head -c 1000000 /dev/zero > /big")).await;
    let after = writable_layer(server, id).await;
    let (bytes, inodes) = (
        after.used_bytes.unwrap().value,
        after.inodes_used.unwrap().value,
    );
    assert!(bytes >= 1_000_000, "writable layer: {after:?}");
    assert!(
        inodes > before.inodes_used.map_or(0, |v| v.value),
        "a new inode: {before:?} -> {after:?}"
    );
}

/// The `vm` handler: RunPodSandbox boots the pod's microVM before any
/// container is known; each container's image arrives as a disk in one of
/// the VM's spare slots when it starts (two images here), host paths the
/// kubelet mounts are copied into the guest, logs and ExecSync come back
/// as on native, and removing the pod leaves no VMM, file or mount.
/// Nested inside L1 where /dev/kvm is not hardware KVM.
#[tokio::test]
async fn the_vm_handler_runs_a_pod_in_a_microvm() {
    // Built here, not by the emulated L1.
    vmrun_tests::pod::vmrun_bin();
    vmrun_tests::pod::guest_assets();
    vmrun_tests::hardware_kvm_or_nested!("the_vm_handler_runs_a_pod_in_a_microvm");
    require_root("the_vm_handler_runs_a_pod_in_a_microvm");
    let server = CriServer::start_for_vm(None).await;
    let busybox = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let procps = server
        .pull(&vmrun_tests::shared_procps_image().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let mut config = kubelet_sandbox_config("vmpod", "uid-vmpod", logs.path());
    // The pod's total limits, as the kubelet sets them: the VM's size.
    config.linux.get_or_insert_with(Default::default).resources =
        Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 192 << 20,
            cpu_period: 100_000,
            cpu_quota: 100_000,
            ..Default::default()
        });
    let sandbox = run_sandbox(&server, &config, "vm").await.unwrap();
    let mut rt = server.runtime().await;
    let status = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state, SANDBOX_READY);
    let pod_dir = server.sandboxes_dir().join(&sandbox);
    let vmm = vmms_of(&pod_dir);
    assert_eq!(vmm, 1, "one VMM runs the pod");

    // What the kubelet mounts from the host: a file and a projected-style
    // directory whose file is a symlink into a data directory.
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("hosts"), "10.1.2.3 vm-test\n").unwrap();
    let secrets = host.path().join("secrets");
    std::fs::create_dir_all(secrets.join("..data_1")).unwrap();
    std::fs::write(secrets.join("..data_1/token"), "t0ken\n").unwrap();
    std::os::unix::fs::symlink("..data_1", secrets.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", secrets.join("token")).unwrap();
    let script = "trap 'exit 0' TERM; echo hello; echo oops >&2; cat /etc/test-hosts; \
                  cat /var/run/secrets/token; echo kernel $(uname -r); sleep 1000 & wait";
    let mut web = kubelet_container_config("web", &busybox, &sh(script), &config);
    web.mounts = vec![
        api::Mount {
            container_path: "/etc/test-hosts".into(),
            host_path: host.path().join("hosts").display().to_string(),
            readonly: true,
            ..Default::default()
        },
        api::Mount {
            container_path: "/var/run/secrets".into(),
            host_path: secrets.display().to_string(),
            readonly: true,
            ..Default::default()
        },
    ];
    let web = create(&server, &sandbox, web, &config).await.unwrap();
    let job = create(
        &server,
        &sandbox,
        kubelet_container_config("job", &procps, &sh("echo done; exit 3"), &config),
        &config,
    )
    .await
    .unwrap();
    start(&server, &web).await;
    start(&server, &job).await;
    let exited = wait_container(&mut rt, &job, Duration::from_secs(60), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!((exited.exit_code, exited.reason.as_str()), (3, "Error"));
    assert_eq!(exited.image_id, procps);
    let running = wait_container(&mut rt, &web, Duration::from_secs(60), |s| {
        s.state == CONTAINER_RUNNING
    })
    .await;
    assert_eq!(running.image_id, busybox);

    let web_log = logs.path().join("web/0.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !log_records(&web_log)
        .iter()
        .any(|r| r.2.starts_with("kernel"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "web's log: {:?}",
            log_records(&web_log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = log_records(&web_log);
    for want in [
        ("stdout", "hello"),
        ("stderr", "oops"),
        ("stdout", "10.1.2.3 vm-test"),
        ("stdout", "t0ken"),
    ] {
        assert!(
            records.contains(&(want.0.into(), "F".into(), want.1.into())),
            "{want:?} in {records:?}"
        );
    }
    let host_kernel = nix::sys::utsname::uname().unwrap();
    let guest_kernel = records
        .iter()
        .find_map(|r| r.2.strip_prefix("kernel "))
        .unwrap();
    assert_ne!(
        guest_kernel,
        host_kernel.release().to_string_lossy(),
        "the container runs on the pod VM's own kernel"
    );
    assert_eq!(
        log_records(&logs.path().join("job/0.log")),
        vec![("stdout".into(), "F".into(), "done".into())]
    );

    // ExecSync through the guest agent: stdout, stderr and the code apart.
    let out = exec_sync(&server, &web, &sh("echo out; echo err >&2; exit 4")).await;
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 4)
    );
    stats_count_cpu_and_memory(&server, &sandbox, &web).await;
    // Counted by the agent in the guest, where the layer lives.
    writable_layer_counts_what_the_container_wrote(&server, &web).await;
    resources_update_reaches_the_container(&server, &web).await;

    rt.stop_container(api::StopContainerRequest {
        container_id: web.clone(),
        timeout: 10,
    })
    .await
    .unwrap();
    let stopped = wait_container(&mut rt, &web, Duration::from_secs(30), |s| {
        s.state == CONTAINER_EXITED
    })
    .await;
    assert_eq!(
        (stopped.exit_code, stopped.reason.as_str()),
        (0, "Completed")
    );
    stop_and_remove(&server, &sandbox).await;
    let vmm = vmms_of(&pod_dir);
    assert_eq!(vmm, 0, "the VMM is gone with the pod");
}

/// A vm pod and a native pod on one CNI bridge network reach each other
/// over TCP by pod IP: the pod VM's tap is joined to its CNI interface and
/// the guest's eth0 has that interface's address and MAC; the host reaches
/// the vm pod through its hostPort (portmap). Nested inside L1 where
/// /dev/kvm is not hardware KVM.
#[tokio::test]
async fn a_vm_pod_and_a_native_pod_talk_over_cni() {
    const TEST: &str = "a_vm_pod_and_a_native_pod_talk_over_cni";
    // Built here, not by the emulated L1.
    vmrun_tests::pod::vmrun_bin();
    vmrun_tests::pod::guest_assets();
    vmrun_tests::hardware_kvm_or_nested!(TEST);
    require_root(TEST);
    if !vmrun_tests::cni::plugins_installed() {
        eprintln!("SKIPPED {TEST}: containernetworking-plugins not installed (/usr/lib/cni)");
        return;
    }
    let ipam = tempfile::tempdir().unwrap();
    let conflist = vmrun_tests::cni::bridge_network("vmrvm0", "10.250.42.0/24", ipam.path(), true);
    let server = CriServer::start_for_vm(Some(&conflist)).await;
    let image = server
        .pull(&vmrun_tests::shared_busybox().await.unwrap())
        .await;
    let logs = tempfile::tempdir().unwrap();
    let mut vm_config = kubelet_sandbox_config("vmnet", "uid-vmnet", logs.path());
    vm_config
        .linux
        .get_or_insert_with(Default::default)
        .resources = Some(api::LinuxContainerResources {
        memory_limit_in_bytes: 128 << 20,
        ..Default::default()
    });
    vm_config.port_mappings = vec![api::PortMapping {
        protocol: 0,
        container_port: 8080,
        host_port: 30881,
        host_ip: String::new(),
    }];
    let native_config = kubelet_sandbox_config("natnet", "uid-natnet", logs.path());
    let vm_pod = run_sandbox(&server, &vm_config, "vm").await.unwrap();
    let native_pod = run_sandbox(&server, &native_config, "runc").await.unwrap();
    let (vm_ip, native_ip) = (
        pod_ip(&server, &vm_pod).await,
        pod_ip(&server, &native_pod).await,
    );
    assert!(vm_ip.starts_with("10.250.42."), "{vm_ip:?}");
    assert!(
        native_ip.starts_with("10.250.42.") && native_ip != vm_ip,
        "{native_ip:?}"
    );

    // Each pod serves a line on 8080 and has a client to try the other.
    let serve = |line: &str| {
        format!("trap 'exit 0' TERM; while :; do echo {line} | nc -l -p 8080; done & wait")
    };
    let in_vm = create(
        &server,
        &vm_pod,
        kubelet_container_config("srv", &image, &sh(&serve("hello-from-vm")), &vm_config),
        &vm_config,
    )
    .await
    .unwrap();
    let in_native = create(
        &server,
        &native_pod,
        kubelet_container_config(
            "srv",
            &image,
            &sh(&serve("hello-from-native")),
            &native_config,
        ),
        &native_config,
    )
    .await
    .unwrap();
    start(&server, &in_vm).await;
    start(&server, &in_native).await;

    // The guest's eth0 holds the pod IP.
    let addr = exec_sync(&server, &in_vm, &["ip", "-4", "addr", "show", "eth0"]).await;
    let addr = String::from_utf8_lossy(&addr.stdout).into_owned();
    assert!(addr.contains(&format!("inet {vm_ip}/24")), "{addr}");

    for (from, to_ip, want) in [
        (&in_native, &vm_ip, "hello-from-vm\n"),
        (&in_vm, &native_ip, "hello-from-native\n"),
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = exec_sync(
                &server,
                from,
                &sh(&format!("nc -w 2 {to_ip} 8080 </dev/null")),
            )
            .await;
            if out.stdout == want.as_bytes() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{want:?} from {to_ip}:8080 never came: {out:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // From the host, through the vm pod's hostPort (portmap's DNAT on the
    // bridge's gateway address, then the CNI interface, tc, the tap).
    let gateway = "10.250.42.1:30881";
    let wait = Duration::from_secs(60);
    tokio::task::spawn_blocking(move || {
        vmrun_tests::cni::wait_for_line(gateway, "hello-from-vm\n", wait)
    })
    .await
    .unwrap();

    stop_and_remove(&server, &vm_pod).await;
    stop_and_remove(&server, &native_pod).await;
    vmrun_tests::cni::assert_no_leases(ipam.path(), "vmrvm0", "10.250.42.");
}
