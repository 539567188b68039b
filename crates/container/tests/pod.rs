//! A pod: a sandbox (pause process) holding the shared namespaces, and
//! containers joining them; plus `exec` into running containers.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vmrun_container::sandbox::{create_sandbox, Sandbox, SandboxConfig};
use vmrun_container::{exec, LinuxSyscall, Rootfs, Stdio};

/// Destroys the sandbox when dropped, so a failed assertion does not leave
/// a pause process behind.
struct SandboxGuard(Sandbox);

impl std::ops::Deref for SandboxGuard {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.0
    }
}

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

fn sandbox(fx: &Fixture) -> SandboxGuard {
    let cfg = SandboxConfig {
        id: fx.name.clone(),
        hostname: Some("podhost".into()),
        new_network: true,
        new_ipc: true,
        new_uts: true,
        new_pid: true,
        cgroup_path: Some(fx.cgroup_path("pause")),
    };
    SandboxGuard(create_sandbox(&cfg, &LinuxSyscall).expect("create sandbox"))
}

/// A container spec joining the sandbox's net, ipc, uts and pid namespaces.
fn pod_spec(fx: &Fixture, sb: &Sandbox, ctr: &str, args: &[&str]) -> Value {
    let mut spec = fx.spec(ctr, args);
    spec["linux"]["namespaces"] = json!([
        {"type": "network", "path": sb.namespace_path("net")},
        {"type": "ipc", "path": sb.namespace_path("ipc")},
        {"type": "uts", "path": sb.namespace_path("uts")},
        {"type": "pid", "path": sb.namespace_path("pid")},
        {"type": "mount"},
        {"type": "cgroup"}
    ]);
    spec
}

#[test]
fn containers_in_a_sandbox_share_network_hostname_and_pids() {
    let fx = Fixture::new("pod");
    let sb = sandbox(&fx);
    assert!(process_alive(sb.pid()));

    // busybox nc stops at EOF on its stdin, possibly before reading the
    // client's data: give the server a stdin that stays open.
    let (stdin_r, stdin_w) = nix::unistd::pipe().unwrap();
    let (server, server_out) = start_with_stdin(
        "server",
        pod_spec(&fx, &sb, "server", &["nc", "-l", "-p", "8080"]),
        Rootfs::Dir(fx.rootfs()),
        Some(stdin_r),
    );
    let client_script = "i=0; while [ $i -lt 100 ]; do echo ping | nc 127.0.0.1 8080 && exit 0; \
                         i=$((i+1)); usleep 50000; done; exit 1";
    let (code, _, err) = run(
        &fx,
        "client",
        pod_spec(&fx, &sb, "client", &["sh", "-c", client_script]),
    );
    assert_eq!(code, 0, "client stderr: {err}");
    assert_eq!(server.wait().unwrap().code, 0);
    drop(stdin_w);
    server.destroy().unwrap();
    assert_eq!(server_out.stdout.text(), "ping\n");

    let (code, out, err) = run(
        &fx,
        "looker",
        pod_spec(
            &fx,
            &sb,
            "looker",
            &["sh", "-c", "hostname; ps -o pid,comm"],
        ),
    );
    assert_eq!(code, 0, "stderr: {err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("podhost"));
    // The pause process is PID 1 of the pod's PID namespace.
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "vmrun-pause"]),
        "{out}"
    );

    // Destroying the sandbox takes the pod's PID namespace down with it.
    // The pause process can only finish exiting once the container's init
    // (our child) is reaped: without a waiter, destroy says so instead of
    // hanging; with one (as the pod layer has), it succeeds.
    let (long, _o) = start(
        "long",
        pod_spec(&fx, &sb, "long", &["sleep", "1000"]),
        Rootfs::Dir(fx.rootfs()),
    );
    let err = sb.destroy().unwrap_err();
    assert!(
        matches!(err, vmrun_container::SandboxError::Busy { .. }),
        "{err}"
    );
    std::thread::scope(|s| {
        let waiter = s.spawn(|| long.wait().unwrap());
        sb.destroy().unwrap();
        sb.destroy().unwrap();
        assert_eq!(waiter.join().unwrap().signal, Some(libc::SIGKILL));
    });
    assert!(!process_alive(sb.pid()));
    long.destroy().unwrap();
    fx.assert_clean();
}

#[test]
fn exec_sees_the_container_filesystem_pids_and_cgroup() {
    let fx = Fixture::new("exec");
    std::fs::write(fx.rootfs().join("marker"), "inside\n").unwrap();
    let (c, _out) = start(
        "c1",
        fx.spec("c1", &["sleep", "1000"]),
        Rootfs::Dir(fx.rootfs()),
    );
    let cg = fx.cgroup_path("c1");

    let process: oci_spec::runtime::Process = serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "cat /marker; hostname; ps -o pid,args"],
        "env": ["PATH=/bin"],
        "cwd": "/"
    }))
    .unwrap();
    let (w, stdout) = pipe_capture();
    let p = exec(
        c.pid(),
        &process,
        None,
        Some(&cg),
        Stdio {
            stdin: None,
            stdout: Some(w),
            stderr: None,
        },
        &LinuxSyscall,
    )
    .expect("exec");
    assert_eq!(p.wait().unwrap().code, 0);
    let out = stdout.text();
    assert!(out.starts_with("inside\nc1\n"), "{out}");
    assert!(out.lines().any(|l| l.trim() == "1 sleep 1000"), "{out}");

    // The exec'd process joins the container's cgroup.
    let mut sleeper = process.clone();
    sleeper.set_args(Some(vec!["sleep".into(), "1000".into()]));
    let p = exec(
        c.pid(),
        &sleeper,
        None,
        Some(&cg),
        Stdio::default(),
        &LinuxSyscall,
    )
    .unwrap();
    assert!(
        c.cgroup().pids().contains(&p.pid()),
        "{:?} vs {}",
        c.cgroup().pids(),
        p.pid()
    );
    p.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(p.wait().unwrap().signal, Some(libc::SIGKILL));

    let mut missing = process.clone();
    missing.set_args(Some(vec!["not-there".into()]));
    let err = exec(
        c.pid(),
        &missing,
        None,
        Some(&cg),
        Stdio::default(),
        &LinuxSyscall,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains(r#"exec "not-there": executable file not found in $PATH"#),
        "{err}"
    );

    // From a different process than the one that created the container.
    let me = std::env::current_exe().unwrap();
    let out = std::process::Command::new(me)
        .args([
            "--exact",
            "exec_helper_in_another_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VMRUN_EXEC_TARGET", c.pid().to_string())
        .env("VMRUN_EXEC_CGROUP", &cg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("EXEC-OUTPUT:inside"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    c.destroy().unwrap();
    fx.assert_clean();
}

/// Run by `exec_sees_the_container_filesystem_pids_and_cgroup` in a separate
/// process; does nothing when run on its own.
#[test]
fn exec_helper_in_another_process() {
    let (Ok(pid), Ok(cg)) = (
        std::env::var("VMRUN_EXEC_TARGET"),
        std::env::var("VMRUN_EXEC_CGROUP"),
    ) else {
        return;
    };
    let process: oci_spec::runtime::Process = serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0}, "args": ["cat", "/marker"], "env": ["PATH=/bin"], "cwd": "/"
    }))
    .unwrap();
    let (w, stdout) = pipe_capture();
    let p = exec(
        pid.parse().unwrap(),
        &process,
        None,
        Some(&cg),
        Stdio {
            stdin: None,
            stdout: Some(w),
            stderr: None,
        },
        &LinuxSyscall,
    )
    .unwrap();
    assert_eq!(p.wait().unwrap().code, 0);
    println!("EXEC-OUTPUT:{}", stdout.text().trim());
}

#[test]
fn a_container_can_join_another_containers_mount_namespace() {
    let fx = Fixture::new("joinmnt");
    std::fs::write(fx.rootfs().join("shared-marker"), "same fs\n").unwrap();
    let (owner, _o) = start(
        "owner",
        fx.spec("owner", &["sleep", "1000"]),
        Rootfs::Dir(fx.rootfs()),
    );
    let mut spec = fx.spec("guest", &["cat", "/shared-marker"]);
    spec["linux"]["namespaces"] = json!([
        {"type": "mount", "path": format!("/proc/{}/ns/mnt", owner.pid())},
        {"type": "pid"}, {"type": "uts"}
    ]);
    let (code, out, err) = run(&fx, "guest", spec);
    assert_eq!((code, out.as_str()), (0, "same fs\n"), "stderr: {err}");
    owner.destroy().unwrap();
    fx.assert_clean();
}

#[test]
fn sandbox_without_new_pid_and_bad_config() {
    let fx = Fixture::new("sbplain");
    let cfg = SandboxConfig {
        id: "plain".into(),
        new_network: true,
        ..Default::default()
    };
    let sb = SandboxGuard(create_sandbox(&cfg, &LinuxSyscall).unwrap());
    // lo is up in the new network namespace.
    let (code, out, err) = {
        let mut spec = fx.spec(
            "c1",
            &[
                "cat",
                "/sys/class/net/lo/operstate",
                "/sys/class/net/lo/flags",
            ],
        );
        spec["linux"]["namespaces"] =
            json!([{"type": "network", "path": sb.namespace_path("net")}, {"type": "mount"}]);
        spec["hostname"] = json!(null);
        run(&fx, "c1", spec)
    };
    assert_eq!(code, 0, "{err}");
    let flags =
        u32::from_str_radix(out.lines().nth(1).unwrap().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & libc::IFF_UP as u32, libc::IFF_UP as u32, "{out}");
    sb.destroy().unwrap();
    std::thread::sleep(Duration::from_millis(10));
    assert!(!process_alive(sb.pid()));

    let bad = SandboxConfig {
        id: "bad".into(),
        hostname: Some("x".into()),
        ..Default::default()
    };
    assert!(create_sandbox(&bad, &LinuxSyscall)
        .unwrap_err()
        .to_string()
        .contains("needs new_uts"));
    fx.assert_clean();
}
