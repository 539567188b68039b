//! Running containers from a busybox rootfs (root only).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vmrun_container::{Rootfs, StartError};

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn echo_hello_reaches_stdout() {
    let fx = Fixture::new("echo");
    let (code, out, err) = run(&fx, "c1", fx.spec("c1", &["echo", "hello"]));
    assert_eq!((code, out.as_str()), (0, "hello\n"), "stderr: {err}");
    fx.assert_clean();
}

#[test]
fn exit_code_and_signal_are_propagated() {
    let fx = Fixture::new("exitcode");
    let (code, _, err) = run(&fx, "c1", fx.spec("c1", &["sh", "-c", "exit 7"]));
    assert_eq!(code, 7, "stderr: {err}");

    let (c, _out) = start(
        "c2",
        fx.spec("c2", &["sleep", "100"]),
        Rootfs::Dir(fx.rootfs()),
    );
    // sleep is PID 1 of its namespace and has no handlers, so the kernel
    // drops SIGTERM; SIGKILL always gets through. Wait on another thread
    // while signalling from this one.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| c.wait().unwrap());
        std::thread::sleep(Duration::from_millis(100));
        c.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
        let st = waiter.join().unwrap();
        assert_eq!(st.signal, Some(libc::SIGKILL));
        assert_eq!(st.code, 128 + libc::SIGKILL);
    });
    assert_eq!(c.wait().unwrap().signal, Some(libc::SIGKILL));

    let (c3, _out) = start(
        "c3",
        fx.spec("c3", &["sh", "-c", "trap 'exit 3' TERM; sleep 100 & wait"]),
        Rootfs::Dir(fx.rootfs()),
    );
    std::thread::sleep(Duration::from_millis(300));
    c3.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(c3.wait().unwrap().code, 3);
    c3.destroy().unwrap();
    assert!(!c.oom_killed());
    // Signalling a reaped process is refused, not sent to a recycled pid.
    assert!(c.signal(nix::sys::signal::Signal::SIGKILL).is_err());
    c.destroy().unwrap();
    c.destroy().unwrap(); // idempotent
    fx.assert_clean();
}

#[test]
fn command_not_found_is_reported_by_start_and_cleaned_up() {
    let fx = Fixture::new("notfound");
    let (created, _out) = create(
        "c1",
        fx.spec("c1", &["no-such-cmd", "x"]),
        Rootfs::Dir(fx.rootfs()),
    );
    let created = created.unwrap();
    let pid = created.pid();
    match created.start() {
        Err(StartError::Exec { reason, .. }) => {
            assert_eq!(
                reason,
                r#"exec "no-such-cmd": executable file not found in $PATH"#
            )
        }
        other => panic!("expected exec error, got {other:?}"),
    }
    assert!(!process_alive(pid), "init {pid} still exists");
    fx.assert_clean();

    let (created, _out) = create(
        "c2",
        fx.spec("c2", &["/bin/nope"]),
        Rootfs::Dir(fx.rootfs()),
    );
    let err = created.unwrap().start().unwrap_err().to_string();
    assert!(
        err.contains(r#"exec "/bin/nope": stat /bin/nope: no such file or directory"#),
        "{err}"
    );
    fx.assert_clean();
}

#[test]
fn setup_errors_name_what_failed() {
    let fx = Fixture::new("setuperr");
    let mut spec = fx.spec("c1", &["true"]);
    spec["linux"]["sysctl"] = json!({"net.ipv4.no_such_key": "1"});
    let (created, _) = create("c1", spec, Rootfs::Dir(fx.rootfs()));
    let err = created.unwrap_err().to_string();
    assert!(
        err.contains(r#"sysctl "net.ipv4.no_such_key"="1": write /proc/sys/net/ipv4/no_such_key: no such file or directory"#),
        "{err}"
    );
    fx.assert_clean();

    let mut spec = fx.spec("c2", &["true"]);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/data", "type": "bind", "source": "/nonexistent/src", "options": ["rbind"]}));
    let (created, _) = create("c2", spec, Rootfs::Dir(fx.rootfs()));
    let err = created.unwrap_err().to_string();
    assert!(
        err.contains(r#"mount "/nonexistent/src" on "/data""#) && err.contains("no such file"),
        "{err}"
    );
    fx.assert_clean();

    let mut spec = fx.spec("c3", &["true"]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    let (created, _) = create("c3", spec, Rootfs::Dir(fx.rootfs()));
    assert!(created
        .unwrap_err()
        .to_string()
        .contains("user namespaces are not supported"));
    fx.assert_clean();
}

#[test]
fn hostname_sysctl_user_and_cwd() {
    let fx = Fixture::new("procattrs");
    let mut spec = fx.spec(
        "web",
        &[
            "sh",
            "-c",
            "hostname; cat /proc/sys/net/ipv4/ip_forward; id -u; id -g; id -G; pwd; echo $$",
        ],
    );
    spec["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [2000]});
    spec["process"]["cwd"] = json!("/work/dir");
    let (code, out, err) = run(&fx, "web", spec);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(
        out, "web\n1\n1000\n1001\n1001 2000\n/work/dir\n1\n",
        "stderr: {err}"
    );
    fx.assert_clean();
}

#[test]
fn no_descriptors_leak_into_the_container_and_home_is_set() {
    let fx = Fixture::new("fdleak");
    // A file the test process holds open must not be visible inside. ls is
    // the init itself (a shell would briefly hold pipe fds); its own
    // directory handle is fd 3.
    let _held = std::fs::File::open("/etc/hostname").unwrap();
    let (code, out, err) = run(&fx, "c1", fx.spec("c1", &["ls", "/proc/self/fd"]));
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "0\n1\n2\n3\n", "stderr: {err}");

    let mut spec = fx.spec("c2", &["sh", "-c", "echo $HOME"]);
    spec["process"]["env"] = json!(["PATH=/bin"]);
    let (code, out, err) = run(&fx, "c2", spec);
    assert_eq!((code, out.as_str()), (0, "/root\n"), "stderr: {err}");
    fx.assert_clean();
}

#[test]
fn negative_oom_score_adj_fails_clearly_without_cap_sys_resource() {
    let fx = Fixture::new("oomadj");
    let mut spec = fx.spec("c1", &["cat", "/proc/self/oom_score_adj"]);
    spec["process"]["oomScoreAdj"] = json!(500);
    let (code, out, _) = run(&fx, "c1", spec);
    assert_eq!((code, out.as_str()), (0, "500\n"));

    let has_sys_resource = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap();
    let mut spec = fx.spec("c2", &["true"]);
    spec["process"]["oomScoreAdj"] = json!(-500);
    let (created, _) = create("c2", spec, Rootfs::Dir(fx.rootfs()));
    if has_sys_resource {
        println!("negative_oom_score_adj: CAP_SYS_RESOURCE present, checking success instead");
        created.unwrap().abort();
    } else {
        let err = created.unwrap_err().to_string();
        assert!(
            err.contains("set oom_score_adj -500") && err.contains("requires CAP_SYS_RESOURCE"),
            "{err}"
        );
    }
    fx.assert_clean();
}

#[test]
fn memory_limit_oom_kills_and_is_reported() {
    let fx = Fixture::new("oom");
    let mut spec = fx.spec(
        "hog",
        &["sh", "-c", "x=0123456789; while true; do x=$x$x; done"],
    );
    spec["linux"]["resources"] =
        json!({"memory": {"limit": 8 * 1024 * 1024, "swap": 8 * 1024 * 1024}});
    let (c, _out) = start("hog", spec, Rootfs::Dir(fx.rootfs()));
    let limit_file = format!(
        "/sys/fs/cgroup/memory{}/memory.limit_in_bytes",
        fx.cgroup_path("hog")
    );
    if std::path::Path::new(&limit_file).exists() {
        assert_eq!(
            std::fs::read_to_string(&limit_file).unwrap().trim(),
            "8388608"
        );
    }
    let s = c.wait().unwrap();
    assert_eq!(s.signal, Some(libc::SIGKILL), "{s:?}");
    assert!(c.oom_killed());
    c.destroy().unwrap();
    assert!(c.oom_killed(), "the OOM verdict survives destroy");
    fx.assert_clean();
}

#[test]
fn pids_limit_stops_fork() {
    let fx = Fixture::new("pids");
    // The shell plus three sleeps fill the limit; the fourth fork fails and
    // a non-interactive ash gives up.
    let mut spec = fx.spec(
        "c1",
        &[
            "sh",
            "-c",
            "sleep 30 & sleep 30 & sleep 30 & sleep 30 & sleep 30 & echo unreachable",
        ],
    );
    spec["linux"]["resources"] = json!({"pids": {"limit": 4}});
    let (c, out) = start("c1", spec, Rootfs::Dir(fx.rootfs()));
    let pids_max = format!("/sys/fs/cgroup/pids{}/pids.max", fx.cgroup_path("c1"));
    if std::path::Path::new(&pids_max).exists() {
        assert_eq!(std::fs::read_to_string(&pids_max).unwrap().trim(), "4");
    }
    let code = c.wait().unwrap().code;
    c.destroy().unwrap();
    let err = out.stderr.text();
    assert_ne!(code, 0);
    assert!(err.contains("can't fork"), "stderr: {err}");
    assert_eq!(out.stdout.text(), "");
    fx.assert_clean();
}

#[test]
fn cpu_quota_and_shares_are_written() {
    let fx = Fixture::new("cpu");
    let mut spec = fx.spec("c1", &["sleep", "30"]);
    spec["linux"]["resources"] = json!({"cpu": {"quota": 50000, "period": 100000, "shares": 512}});
    let (c, _out) = start("c1", spec, Rootfs::Dir(fx.rootfs()));
    let v1 = format!("/sys/fs/cgroup/cpu{}", fx.cgroup_path("c1"));
    let v2 = format!("/sys/fs/cgroup{}", fx.cgroup_path("c1"));
    if std::path::Path::new(&v1).exists() {
        let read = |f: &str| {
            std::fs::read_to_string(format!("{v1}/{f}"))
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(read("cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu.shares"), "512");
    } else {
        let max = std::fs::read_to_string(format!("{v2}/cpu.max")).unwrap();
        assert_eq!(max.trim(), "50000 100000");
    }
    assert_eq!(c.cgroup().pids(), vec![c.pid()]);
    assert!(c.cgroup().stats().memory_usage_bytes > 0 || !std::path::Path::new(&v1).exists());
    c.destroy().unwrap();
    fx.assert_clean();
}

#[test]
fn masked_and_readonly_paths() {
    let fx = Fixture::new("masked");
    std::fs::create_dir_all(fx.rootfs().join("secret")).unwrap();
    std::fs::write(fx.rootfs().join("secret/key"), "s3cr3t").unwrap();
    std::fs::write(fx.rootfs().join("etc/token"), "t0ken").unwrap();
    let mut spec = fx.spec(
        "c1",
        &[
            "sh",
            "-c",
            "cat /proc/kcore | wc -c; ls /secret | wc -l; cat /etc/token | wc -c; \
             echo 1 > /proc/sys/kernel/shmmax && echo writable || echo readonly; \
             echo x > /tmp/ok && echo tmp-ok",
        ],
    );
    let masked = spec["linux"]["maskedPaths"].as_array_mut().unwrap();
    masked.push(json!("/secret"));
    masked.push(json!("/etc/token"));
    let (code, out, err) = run(&fx, "c1", spec);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "0\n0\n0\nreadonly\ntmp-ok\n", "stderr: {err}");
    // Masks are inside the container only.
    assert_eq!(
        std::fs::read_to_string(fx.rootfs().join("secret/key")).unwrap(),
        "s3cr3t"
    );
    fx.assert_clean();
}

#[test]
fn bind_mounts_with_flags() {
    let fx = Fixture::new("bind");
    let data = fx.tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("in"), "host data\n").unwrap();
    std::fs::write(fx.tmp.path().join("single"), "one file\n").unwrap();
    let mut spec = fx.spec(
        "c1",
        &["sh", "-c", "cat /data/in /etc/single; touch /data/x 2>/dev/null || echo ro; echo w > /rw/y && echo rw"],
    );
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro", "nosuid", "nodev"]}));
    mounts.push(json!({"destination": "/etc/single", "type": "bind", "source": fx.tmp.path().join("single"), "options": ["bind", "ro"]}));
    mounts.push(
        json!({"destination": "/rw", "type": "bind", "source": data, "options": ["rbind", "rw"]}),
    );
    let (code, out, err) = run(&fx, "c1", spec);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "host data\none file\nro\nrw\n", "stderr: {err}");
    assert!(data.join("y").exists());
    fx.assert_clean();
}

#[test]
fn readonly_rootfs() {
    let fx = Fixture::new("rootro");
    let mut spec = fx.spec(
        "c1",
        &[
            "sh",
            "-c",
            "touch /newfile; echo x > /dev/shm/f && echo shm-ok",
        ],
    );
    spec["root"]["readonly"] = json!(true);
    let (code, out, err) = run(&fx, "c1", spec);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "shm-ok\n");
    assert!(err.contains("Read-only file system"), "stderr: {err}");
    assert!(!fx.rootfs().join("newfile").exists());
    fx.assert_clean();
}

#[test]
fn dev_is_populated() {
    let fx = Fixture::new("dev");
    let script = "for f in null zero full random urandom tty; do test -c /dev/$f || echo missing $f; done; \
                  test -L /dev/ptmx && test -L /dev/fd && test -L /dev/stdout && test -d /dev/shm && test -d /dev/pts && echo links-ok; \
                  head -c 4 /dev/zero | wc -c; ls /sys/fs/cgroup/memory > /dev/null && echo cgroupfs-ok; \
                  test -e /sys/fs/cgroup/cpu && echo alias-ok; touch /sys/fs/cgroup/x 2>/dev/null || echo cgroupfs-ro";
    let (code, out, err) = run(&fx, "c1", fx.spec("c1", &["sh", "-c", script]));
    assert_eq!(code, 0, "stderr: {err}");
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists();
    let expected = if v1 {
        "links-ok\n4\ncgroupfs-ok\nalias-ok\ncgroupfs-ro\n"
    } else {
        "links-ok\n4\ncgroupfs-ro\n"
    };
    assert_eq!(out, expected, "stderr: {err}");
    fx.assert_clean();
}

#[test]
fn stdin_is_connected() {
    let fx = Fixture::new("stdin");
    let (r, w) = nix::unistd::pipe().unwrap();
    let (out_w, stdout) = pipe_capture();
    let cfg = vmrun_container::ContainerConfig {
        id: "c1".into(),
        spec: to_spec(fx.spec("c1", &["cat"])),
        rootfs: Rootfs::Dir(fx.rootfs()),
        stdio: vmrun_container::Stdio {
            stdin: Some(r),
            stdout: Some(out_w),
            stderr: None,
        },
        console: vmrun_container::Console::Passed,
    };
    let c = vmrun_container::create(cfg, &vmrun_container::LinuxSyscall)
        .unwrap()
        .start()
        .unwrap();
    nix::unistd::write(&w, b"through stdin\n").unwrap();
    drop(w);
    assert_eq!(c.wait().unwrap().code, 0);
    c.destroy().unwrap();
    assert_eq!(stdout.text(), "through stdin\n");
    fx.assert_clean();
}

#[test]
fn abort_and_drop_of_created_leave_nothing() {
    let fx = Fixture::new("abort");
    let (created, _o) = create("c1", fx.spec("c1", &["true"]), Rootfs::Dir(fx.rootfs()));
    let created = created.unwrap();
    let pid = created.pid();
    assert!(process_alive(pid));
    created.abort();
    assert!(!process_alive(pid));
    fx.assert_clean();

    let (created, _o) = create("c2", fx.spec("c2", &["true"]), Rootfs::Dir(fx.rootfs()));
    let pid = created.as_ref().unwrap().pid();
    drop(created);
    assert!(!process_alive(pid));
    fx.assert_clean();
}

#[test]
fn destroy_kills_everything_and_unmounts() {
    let fx = Fixture::new("destroy");
    let (c, _out) = start(
        "c1",
        fx.spec(
            "c1",
            &[
                "sh",
                "-c",
                "sleep 1000 & sleep 1000 & (sleep 1000 &) ; sleep 1000",
            ],
        ),
        Rootfs::Dir(fx.rootfs()),
    );
    // ash may exec the last command itself: sh (maybe) + four sleeps.
    assert!(wait_until(Duration::from_secs(5), || c
        .cgroup()
        .pids()
        .len()
        >= 4));
    let pids = c.cgroup().pids();
    c.destroy().unwrap();
    for p in pids {
        assert!(!process_alive(p), "pid {p} survived destroy");
    }
    fx.assert_clean();
}

#[test]
fn overlay_rootfs_is_private_to_the_container() {
    let fx = Fixture::new("overlay");
    let base = fx.tmp.path();
    std::fs::create_dir_all(base.join("layer2/etc")).unwrap();
    std::fs::write(base.join("layer2/etc/motd"), "from the top layer\n").unwrap();
    for d in ["upper", "work", "mnt"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    let mut spec = fx.spec("c1", &["sh", "-c", "cat /etc/motd; echo new > /created"]);
    spec["root"]["path"] = json!(base.join("mnt"));
    let rootfs = Rootfs::Overlay {
        lower: vec![fx.rootfs(), base.join("layer2")],
        upper: base.join("upper"),
        work: base.join("work"),
    };
    let (c, out) = start("c1", spec, rootfs);
    assert_eq!(c.wait().unwrap().code, 0);
    c.destroy().unwrap();
    assert_eq!(out.stdout.text(), "from the top layer\n");
    assert_eq!(
        std::fs::read_to_string(base.join("upper/created")).unwrap(),
        "new\n"
    );
    // The overlay was never visible on the host.
    assert!(std::fs::read_dir(base.join("mnt"))
        .unwrap()
        .next()
        .is_none());
    fx.assert_clean();
}

#[test]
fn many_containers_in_parallel_threads() {
    let fx = Fixture::new("parallel");
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let spec = fx.spec(&format!("p{i}"), &["sh", "-c", &format!("echo {i}")]);
            let rootfs = fx.rootfs();
            std::thread::spawn(move || {
                let (c, out) = start(&format!("p{i}"), spec, Rootfs::Dir(rootfs));
                let code = c.wait().unwrap().code;
                c.destroy().unwrap();
                (code, out.stdout.text())
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), (0, format!("{i}\n")));
    }
    fx.assert_clean();
}

/// With `Console::FromContainer` the init opens its terminal on the
/// container's own devpts: the process is in a session of its own on
/// `/dev/pts/0` (a name inside the container), owned by its user, and what
/// it writes comes out of the master the caller gets back.
#[test]
fn a_terminal_from_the_container_has_a_name_inside_it() {
    use std::io::Read;
    let fx = Fixture::new("console");
    let mut spec = fx.spec(
        "c1",
        &[
            "sh",
            "-c",
            "tty; stat -c 'owner %u' $(tty); test -t 0 && echo stdin-is-a-tty",
        ],
    );
    spec["process"]["terminal"] = json!(true);
    spec["process"]["user"] = json!({"uid": 1234, "gid": 1234});
    let cfg = vmrun_container::ContainerConfig {
        id: "c1".into(),
        spec: to_spec(spec),
        rootfs: Rootfs::Dir(fx.rootfs()),
        stdio: vmrun_container::Stdio::default(),
        console: vmrun_container::Console::FromContainer,
    };
    let mut created = vmrun_container::create(cfg, &vmrun_container::LinuxSyscall).unwrap();
    let master = created.take_terminal().expect("the init sent its terminal");
    assert!(created.take_terminal().is_none(), "taken once");
    let c = Guarded(created.start().unwrap());
    // The master reads EIO once the last slave holder is gone.
    let mut out = Vec::new();
    let mut master = std::fs::File::from(master);
    let mut buf = [0u8; 256];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("read the master: {e}"),
        }
    }
    assert_eq!(c.wait().unwrap().code, 0);
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    assert_eq!(out, "/dev/pts/0\nowner 1234\nstdin-is-a-tty\n");
    c.0.destroy().unwrap();
    drop(c);
    fx.assert_clean();
}

/// A terminal from the container needs `process.terminal`; without it the
/// request is refused before anything is made.
#[test]
fn a_console_without_process_terminal_is_refused() {
    let fx = Fixture::new("console-refused");
    let cfg = vmrun_container::ContainerConfig {
        id: "c1".into(),
        spec: to_spec(fx.spec("c1", &["true"])),
        rootfs: Rootfs::Dir(fx.rootfs()),
        stdio: vmrun_container::Stdio::default(),
        console: vmrun_container::Console::FromContainer,
    };
    let e = vmrun_container::create(cfg, &vmrun_container::LinuxSyscall).unwrap_err();
    assert!(e.to_string().contains("process.terminal is not set"), "{e}");
    fx.assert_clean();
}

/// Mounts a tmpfs named `name` on `dir` (on the host).
fn mount_tmpfs(name: &str, dir: &std::path::Path) {
    nix::mount::mount(
        Some(name),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
}

/// A host directory `mnt` made a shared mount of its own (what critest
/// does), with `from-host` and `from-ctr` below it; unmounted when dropped.
struct SharedSource {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl SharedSource {
    fn new() -> Self {
        use nix::mount::{mount, MsFlags};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        for sub in ["from-host", "from-ctr"] {
            std::fs::create_dir_all(path.join(sub)).unwrap();
        }
        let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
        mount(Some(&path), &path, None::<&str>, bind, None::<&str>).unwrap();
        let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
        mount(None::<&str>, &path, None::<&str>, shared, None::<&str>).unwrap();
        Self { _dir: dir, path }
    }
}

impl Drop for SharedSource {
    fn drop(&mut self) {
        use nix::mount::{umount2, MntFlags};
        for d in [
            self.path.join("from-ctr"),
            self.path.join("from-host"),
            self.path.clone(),
        ] {
            let _ = umount2(&d, MntFlags::MNT_DETACH);
        }
    }
}

/// A container with CAP_SYS_ADMIN running `script`, `source` bound on
/// /shared with `propagation` (and the rootfs's propagation the same).
fn propagation_spec(
    fx: &Fixture,
    source: &SharedSource,
    propagation: &str,
    script: &str,
) -> serde_json::Value {
    let mut spec = fx.spec("c1", &["sh", "-c", script]);
    let caps = json!(["CAP_SYS_ADMIN"]);
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = caps.clone();
    }
    spec["linux"]["rootfsPropagation"] = json!(propagation);
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/shared", "type": "bind", "source": source.path,
        "options": ["rbind", propagation],
    }));
    spec
}

/// The container mounts a tmpfs on /shared/from-ctr (saying `mounted`),
/// then waits up to 30 s for the host's flag file and says whether it came.
const PROPAGATION_SCRIPT: &str = "mount -t tmpfs ctr-made /shared/from-ctr && touch /shared/from-ctr/made-in-ctr && echo mounted; \
     i=0; while [ ! -e /shared/from-host/flag ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
     [ -e /shared/from-host/flag ] && echo saw-host-mount";

/// An `rshared` bind with `rootfsPropagation: rshared` (Kubernetes'
/// Bidirectional): a mount the host makes under the shared source appears
/// in the container, one the container makes appears on the host, and the
/// container's own rootfs never shows on the host.
#[test]
fn rshared_binds_propagate_both_ways() {
    let fx = Fixture::new("rshared");
    let src = SharedSource::new();
    let spec = propagation_spec(&fx, &src, "rshared", PROPAGATION_SCRIPT);
    let (c, out) = start("c1", spec, Rootfs::Dir(fx.rootfs()));
    // Container -> host.
    let made = src.path.join("from-ctr/made-in-ctr");
    let seen = wait_until(Duration::from_secs(20), || made.exists());
    // Host -> container.
    mount_tmpfs("host-made", &src.path.join("from-host"));
    std::fs::write(src.path.join("from-host/flag"), "x").unwrap();
    let status = c.wait().unwrap();
    c.0.destroy().unwrap();
    drop(c);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rootfs_on_host = info
        .lines()
        .any(|l| l.contains(&*fx.rootfs().to_string_lossy()));
    drop(src);
    assert!(seen, "the container's mount did not reach the host");
    assert_eq!(status.code, 0, "stderr: {}", out.stderr.text());
    assert_eq!(out.stdout.text(), "mounted\nsaw-host-mount\n");
    assert!(
        !rootfs_on_host,
        "the container's rootfs showed on the host:\n{info}"
    );
    fx.assert_clean();
}

/// `rslave` (HostToContainer): the host's new mounts reach the container,
/// the container's do not reach the host.
#[test]
fn rslave_binds_propagate_from_the_host_only() {
    let fx = Fixture::new("rslave");
    let src = SharedSource::new();
    let spec = propagation_spec(&fx, &src, "rslave", PROPAGATION_SCRIPT);
    let (c, out) = start("c1", spec, Rootfs::Dir(fx.rootfs()));
    mount_tmpfs("host-made", &src.path.join("from-host"));
    std::fs::write(src.path.join("from-host/flag"), "x").unwrap();
    let status = c.wait().unwrap();
    let leaked = src.path.join("from-ctr/made-in-ctr").exists();
    c.0.destroy().unwrap();
    drop(c);
    drop(src);
    assert_eq!(status.code, 0, "stderr: {}", out.stderr.text());
    assert_eq!(out.stdout.text(), "mounted\nsaw-host-mount\n");
    assert!(!leaked, "the container's mount reached the host");
    fx.assert_clean();
}
