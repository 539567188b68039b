//! End-to-end pod tests through the `vmrun` CLI: real namespaces, cgroups and
//! mounts, images pulled from a registry on 127.0.0.1.
//!
//! Every case is a function of the runtime name and is instantiated per runtime
//! by `runtime_cases!`, so a feature that works on one runtime and not another
//! shows as a named failure (`native::oom_kill_is_reported`, ...).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use vmrun_tests::pod::{assert_refused, describe, require_root, text, uid_of, Vmrun};

fn busybox() -> String {
    vmrun_tests::busybox_reference()
}

fn pod(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: demo\n    tier: test\n  annotations:\n    note: hello\nspec:\n{spec}")
}

fn assert_clean(vm: &Vmrun, uid: &str, marker: &str) {
    let left = vm.leftovers(uid, marker);
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

/// Starts a detached pod and waits until every app container runs.
/// `vmrun run --runtime RT` of `yaml` (saved as manifest `name`) to its end.
fn run_in_foreground(vm: &Vmrun, rt: &str, name: &str, yaml: &str) -> std::process::Output {
    let path = vm.manifest(name, yaml);
    vm.run(&["run", "--runtime", rt, path.to_str().unwrap()])
}

fn start_detached(vm: &Vmrun, rt: &str, name: &str, yaml: &str) -> serde_json::Value {
    let path = vm.manifest(name, yaml);
    let out = vm.run(&["run", "-d", "--runtime", rt, path.to_str().unwrap()]);
    assert!(out.status.success(), "run -d: {}", describe(&out));
    assert_eq!(text(&out.stdout).trim(), name);
    let record = vm.wait_record(name, Duration::from_secs(60), |r| {
        r["containers"]
            .as_object()
            .unwrap()
            .values()
            .filter(|c| c["init"] == false)
            .all(|c| c["phase"] == "running")
    });
    // The prepared pod `run -d` handed its supervisor holds secret volumes'
    // contents: the supervisor removes it as it reads it.
    let handoff = vm.pod_dir(name).join("prepared.json");
    assert!(
        !handoff.exists(),
        "{} outlived the pod's start",
        handoff.display()
    );
    record
}

fn exec(vm: &Vmrun, pod: &str, container: &str, cmd: &[&str]) -> std::process::Output {
    let mut args = vec!["exec", pod, "-c", container, "--"];
    args.extend_from_slice(cmd);
    vm.run(&args)
}

fn stop_and_rm(vm: &Vmrun, pod: &str) {
    let out = vm.run(&["stop", pod]);
    assert!(out.status.success(), "stop: {}", describe(&out));
    let out = vm.run(&["rm", pod]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert!(!vm.pod_dir(pod).exists());
}

pub fn init_container_fills_empty_dir_served_by_main(rt: &str) {
    require_root("init_container_fills_empty_dir_served_by_main");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "web",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  initContainers:
  - name: init
    image: {image}
    command: ["sh", "-c", "echo served-from-init > /data/index.html"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  containers:
  - name: server
    image: {image}
    command: ["httpd", "-f", "-p", "8080", "-h", "/data"]
    volumeMounts: [{{name: data, mountPath: /data}}]
    readinessProbe:
      httpGet: {{port: 8080, path: /index.html}}
      periodSeconds: 1
  - name: client
    image: {image}
    command: ["sleep", "3601"]
  volumes:
  - name: data
    emptyDir: {{}}
"#
        ),
    );
    let record = start_detached(&vm, rt, "web", &yaml);
    let ready = vm.wait_record("web", Duration::from_secs(30), |r| {
        r["containers"]["server"]["ready"] == true
    });
    assert_eq!(ready["containers"]["init"]["last_exit"]["code"], 0);
    let out = exec(
        &vm,
        "web",
        "client",
        &["wget", "-qO-", "http://127.0.0.1:8080/index.html"],
    );
    assert!(out.status.success(), "wget: {}", describe(&out));
    assert_eq!(text(&out.stdout).trim(), "served-from-init");
    let ps = vm.run(&["ps"]);
    assert!(text(&ps.stdout).contains("web"), "{}", describe(&ps));
    let uid = uid_of(&record);
    stop_and_rm(&vm, "web");
    assert_clean(&vm, &uid, "sleep 3601");
}

/// seccompProfile: RuntimeDefault installs vmrun's filter (the pod's
/// setting, inherited; also for a non-root container allowed to escalate,
/// without no_new_privs), Unconfined and privileged containers run without
/// one, a Localhost profile denies what it names with its errno, also to
/// processes exec'd into the container; a bad type and a missing profile
/// are refused naming them.
pub fn seccomp_profiles_filter_syscalls(rt: &str) {
    require_root("seccomp_profiles_filter_syscalls");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let root = std::path::Path::new(vmrun_pod::seccomp::LOCALHOST_ROOT);
    std::fs::create_dir_all(root).unwrap();
    let name = format!("vmrun-test-{}.json", std::process::id());
    let profile = root.join(&name);
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#,
    )
    .unwrap();
    let status = "grep -E '^Seccomp:' /proc/self/status";
    let yaml = pod(
        "filtered",
        &format!(
            r#"  restartPolicy: Never
  securityContext:
    seccompProfile: {{type: RuntimeDefault}}
  containers:
  - name: default
    image: {image}
    command: ["sh", "-c", "{status}"]
  - name: unconfined
    image: {image}
    command: ["sh", "-c", "{status}"]
    securityContext:
      seccompProfile: {{type: Unconfined}}
  - name: privileged
    image: {image}
    command: ["sh", "-c", "{status}"]
    securityContext:
      privileged: true
  - name: escalating
    image: {image}
    command: ["sh", "-c", "{status}; grep NoNewPrivs: /proc/self/status"]
    securityContext:
      runAsUser: 1000
      allowPrivilegeEscalation: true
  - name: local
    image: {image}
    command: ["sh", "-c", "{status}; mkdir /tmp/made 2>&1 || echo mkdir-denied; touch /tmp/file && echo touch-ok"]
    securityContext:
      seccompProfile: {{type: Localhost, localhostProfile: {name}}}
"#
        ),
    );
    let out = run_in_foreground(&vm, rt, "filtered", &yaml);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    for line in [
        "[default] Seccomp:\t2",
        "[unconfined] Seccomp:\t0",
        "[privileged] Seccomp:\t0",
        // Installed before the user switch, without no_new_privs.
        "[escalating] Seccomp:\t2",
        "[escalating] NoNewPrivs:\t0",
        "[local] Seccomp:\t2",
        "[local] mkdir-denied",
        "[local] touch-ok",
    ] {
        assert!(stdout.contains(line), "no {line:?}: {}", describe(&out));
    }
    assert!(
        stdout.contains("Operation not permitted"),
        "mkdir's error should be the profile's EPERM: {stdout}"
    );
    // A process exec'd into the container runs under its filter too.
    let yaml = pod(
        "execd",
        &format!(
            "  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {image}\n    command: [sleep, '3600']\n    securityContext:\n      seccompProfile: {{type: Localhost, localhostProfile: {name}}}\n"
        ),
    );
    start_detached(&vm, rt, "execd", &yaml);
    let denied = exec(&vm, "execd", "c", &["mkdir", "/tmp/by-exec"]);
    assert!(!denied.status.success(), "{}", describe(&denied));
    assert!(
        text(&denied.stdout).contains("Operation not permitted")
            || text(&denied.stderr).contains("Operation not permitted"),
        "{}",
        describe(&denied)
    );
    let status = exec(
        &vm,
        "execd",
        "c",
        &["grep", "Seccomp:", "/proc/self/status"],
    );
    assert!(
        text(&status.stdout).contains("Seccomp:\t2"),
        "{}",
        describe(&status)
    );
    stop_and_rm(&vm, "execd");
    let _ = std::fs::remove_file(&profile);

    let bad = |pod_name: &str, profile: &str| {
        pod(
            pod_name,
            &format!(
                "  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n    command: [\"true\"]\n    securityContext:\n      seccompProfile: {profile}\n"
            ),
        )
    };
    let out = run_in_foreground(&vm, rt, "badtype", &bad("badtype", "{type: Sometimes}"));
    assert_refused(
        &vm,
        &out,
        "badtype",
        &["securityContext.seccompProfile", "Sometimes"],
    );
    let out = run_in_foreground(
        &vm,
        rt,
        "noprofile",
        &bad(
            "noprofile",
            "{type: Localhost, localhostProfile: vmrun-no-such-profile.json}",
        ),
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("vmrun-no-such-profile.json"),
        "{}",
        describe(&out)
    );
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        describe(&out)
    );
}

pub fn containers_share_localhost_and_ipc(rt: &str) {
    require_root("containers_share_localhost_and_ipc");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "pair",
        &format!(
            r#"  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: server
    image: {image}
    command: ["sh", "-c", "echo shm-token > /dev/shm/token; echo net-ok | nc -l -p 9090; readlink /proc/self/ns/net; readlink /proc/self/ns/ipc"]
  - name: client
    image: {image}
    command: ["sh", "-c", "until nc 127.0.0.1 9090 > /tmp/got 2>/dev/null && [ -s /tmp/got ]; do usleep 50000; done; cat /tmp/got; cat /dev/shm/token; readlink /proc/self/ns/net; readlink /proc/self/ns/ipc"]
"#
        ),
    );
    let out = run_in_foreground(&vm, rt, "pair", &yaml);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[client] net-ok"), "{stdout}");
    assert!(stdout.contains("[client] shm-token"), "{stdout}");
    let ns = |c: &str, kind: &str| -> String {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("[{c}] {kind}:")))
            .unwrap_or_else(|| panic!("no {kind} ns line for {c}: {stdout}"))
            .to_string()
    };
    for kind in ["net", "ipc"] {
        let server = ns("server", kind).replace("[server] ", "");
        let client = ns("client", kind).replace("[client] ", "");
        assert_eq!(server, client, "{kind} namespace differs");
        let host = std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        assert_ne!(
            server,
            host.to_string_lossy(),
            "{kind} namespace is the host's"
        );
    }
}

pub fn share_process_namespace_sees_other_containers(rt: &str) {
    require_root("share_process_namespace_sees_other_containers");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "shared-pid",
        &format!(
            r#"  terminationGracePeriodSeconds: 1
  shareProcessNamespace: true
  containers:
  - name: sleeper
    image: {image}
    command: ["sleep", "4242"]
  - name: looker
    image: {image}
    command: ["sleep", "3603"]
"#
        ),
    );
    let record = start_detached(&vm, rt, "shared-pid", &yaml);
    let out = exec(&vm, "shared-pid", "looker", &["ps", "-o", "pid,args"]);
    assert!(out.status.success(), "{}", describe(&out));
    let ps = text(&out.stdout);
    assert!(
        ps.contains("sleep 4242"),
        "looker cannot see the sleeper:\n{ps}"
    );
    // The pause process is PID 1 of the shared namespace, not a container process.
    assert!(
        !ps.lines()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("sleep")),
        "{ps}"
    );
    let uid = uid_of(&record);
    stop_and_rm(&vm, "shared-pid");
    assert_clean(&vm, &uid, "sleep 4242");

    // Without it, each container has its own PID namespace.
    let vm = Vmrun::for_runtime(rt);
    let record = start_detached(
        &vm,
        rt,
        "own-pid",
        &yaml
            .replace(
                "shareProcessNamespace: true",
                "shareProcessNamespace: false",
            )
            .replace("shared-pid", "own-pid"),
    );
    let out = exec(&vm, "own-pid", "looker", &["ps", "-o", "pid,args"]);
    assert!(
        !text(&out.stdout).contains("sleep 4242"),
        "{}",
        describe(&out)
    );
    let uid = uid_of(&record);
    stop_and_rm(&vm, "own-pid");
    assert_clean(&vm, &uid, "sleep 4242");
}

pub fn oom_kill_is_reported(rt: &str) {
    require_root("oom_kill_is_reported");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "hog",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: hog
    image: {image}
    command: ["tail", "-c", "67108864", "/dev/zero"]
    resources:
      limits: {{memory: 16Mi}}
"#
        ),
    );
    let path = vm.manifest("hog", &yaml);
    let out = vm.run(&["run", "--keep", "--runtime", rt, path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("OOMKilled"), "{}", describe(&out));
    assert!(
        !text(&out.stdout).contains("survived"),
        "{}",
        describe(&out)
    );
    let record = vm.record("hog").expect("kept record");
    let hog = &record["containers"]["hog"];
    assert_eq!(hog["reason"], "OOMKilled", "{record}");
    assert_eq!(hog["last_exit"]["oom_killed"], true);
    assert_clean(&vm, &uid_of(&record), "");
    let out = vm.run(&["rm", "hog"]);
    assert!(out.status.success(), "{}", describe(&out));
}

pub fn cpu_and_memory_limits_reach_the_cgroup(rt: &str) {
    require_root("cpu_and_memory_limits_reach_the_cgroup");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "limits",
        &format!(
            r#"  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    command: ["sleep", "3602"]
    resources:
      requests: {{cpu: 250m, memory: 32Mi}}
      limits: {{cpu: 500m, memory: 64Mi}}
"#
        ),
    );
    let record = start_detached(&vm, rt, "limits", &yaml);
    let uid = uid_of(&record);
    if rt == "vm" {
        // The limits live in the guest's cgroup v2, seen from inside the
        // container through its cgroup namespace.
        let files = ["cpu.max", "cpu.weight", "memory.max", "pids.max"];
        let mut cmd = vec!["cat"];
        let paths: Vec<String> = files
            .iter()
            .map(|f| format!("/sys/fs/cgroup/{f}"))
            .collect();
        cmd.extend(paths.iter().map(String::as_str));
        let out = exec(&vm, "limits", "app", &cmd);
        assert!(out.status.success(), "cat: {}", describe(&out));
        let weight = 1 + (256 - 2) * 9999 / 262_142;
        assert_eq!(
            text(&out.stdout),
            format!("50000 100000\n{weight}\n{}\n1024\n", 64u64 << 20),
            "{}",
            describe(&out)
        );
        stop_and_rm(&vm, "limits");
        assert_clean(&vm, &uid, "");
        return;
    }
    let cg = |controller: &str, file: &str| -> String {
        let v1 = format!("/sys/fs/cgroup/{controller}/vmrun/{uid}/app/{file}");
        std::fs::read_to_string(&v1)
            .unwrap_or_else(|e| panic!("{v1}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(cg("cpu", "cpu.shares"), "256");
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(cg("pids", "pids.max"), "1024");
    let pid = record["containers"]["app"]["pid"].as_i64().unwrap();
    let procs = cg("cpu", "cgroup.procs");
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "pid {pid} not in cgroup: {procs}"
    );
    stop_and_rm(&vm, "limits");
    assert_clean(&vm, &uid, "");
}

pub fn config_secret_and_downward_files(rt: &str) {
    require_root("config_secret_and_downward_files");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  color: blue
  app.conf: |
    mode=fast
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
type: Opaque
data:
  password: aHVudGVyMg==
---
{}"#,
        pod(
            "files",
            &format!(
                r#"  restartPolicy: Never
  containers:
  - name: app
    image: {image}
    command: ["sh", "-c", "cat /etc/cfg/color; echo; cat /etc/cfg/app.conf; cat /etc/creds/password; echo; ls -l /etc/creds/password; cat /etc/pod/labels; echo; cat /etc/pod/name; echo; cat /etc/proj/sub/color; echo; echo env=$COLOR/$PASSWORD/$POD_NAME/$POD_NS; touch /etc/cfg/x 2>/dev/null && echo writable || echo read-only"]
    env:
    - name: COLOR
      valueFrom: {{configMapKeyRef: {{name: settings, key: color}}}}
    - name: PASSWORD
      valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}
    - name: POD_NAME
      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
    - name: POD_NS
      valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
    volumeMounts:
    - {{name: cfg, mountPath: /etc/cfg, readOnly: true}}
    - {{name: creds, mountPath: /etc/creds}}
    - {{name: podinfo, mountPath: /etc/pod}}
    - {{name: proj, mountPath: /etc/proj}}
  volumes:
  - name: cfg
    configMap: {{name: settings}}
  - name: creds
    secret: {{secretName: creds, defaultMode: 256}}
  - name: podinfo
    downwardAPI:
      items:
      - {{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}
      - {{path: name, fieldRef: {{fieldPath: metadata.name}}}}
  - name: proj
    projected:
      sources:
      - configMap:
          name: settings
          items: [{{key: color, path: sub/color}}]
"#
            )
        )
    );
    let out = run_in_foreground(&vm, rt, "files", &yaml);
    assert!(out.status.success(), "{}", describe(&out));
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("[app] ").to_string())
        .collect();
    let expect = ["blue", "mode=fast", "hunter2"];
    assert_eq!(&lines[..3], &expect, "{lines:?}");
    assert!(lines[3].starts_with("-r--------"), "secret mode: {lines:?}");
    assert_eq!(lines[4], "app=\"demo\"");
    assert_eq!(lines[5], "tier=\"test\"");
    assert_eq!(lines[6], "files");
    assert_eq!(lines[7], "blue");
    assert_eq!(lines[8], "env=blue/hunter2/files/default");
    assert_eq!(lines[9], "read-only");
}

pub fn lifecycle_hooks_run(rt: &str) {
    require_root("lifecycle_hooks_run");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    // The hooks write into the app's own stdout (PID 1 of its namespace), so
    // the order lands in its log, which outlives the pod on every runtime.
    // The grace period includes preStop, which is slow under emulation (a
    // nested vm exec takes seconds); the app ends at SIGTERM anyway.
    let yaml = pod(
        "hooks",
        &format!(
            r#"  terminationGracePeriodSeconds: 30
  containers:
  - name: app
    image: {image}
    command: ["sh", "-c", "trap 'echo got-term; exit 0' TERM; while true; do usleep 20000; done"]
    lifecycle:
      postStart:
        exec: {{command: ["sh", "-c", "echo post-start > /proc/1/fd/1"]}}
      preStop:
        exec: {{command: ["sh", "-c", "echo pre-stop > /proc/1/fd/1"]}}
"#
        ),
    );
    let record = start_detached(&vm, rt, "hooks", &yaml);
    let logs = || text(&vm.run(&["logs", "hooks", "app"]).stdout);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !logs().contains("post-start") {
        assert!(Instant::now() < deadline, "postStart never ran: {}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = vm.run(&["stop", "hooks"]);
    assert!(out.status.success(), "stop: {}", describe(&out));
    let log = logs();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["post-start", "pre-stop", "got-term"],
        "hooks out of order: {log}\npod record: {:#}",
        vm.record("hooks").unwrap_or_default()
    );
    let out = vm.run(&["rm", "hooks"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert_clean(&vm, &uid_of(&record), "");
}

pub fn on_failure_restarts_with_backoff(rt: &str) {
    require_root("on_failure_restarts_with_backoff");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    // The attempt counter lives in an emptyDir, which survives container restarts.
    let yaml = pod(
        "flaky",
        &format!(
            r#"  restartPolicy: OnFailure
  containers:
  - name: app
    image: {image}
    command: ["sh", "-c", "n=$(cat /s/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /s/n; echo attempt $n $(date +%s.%N 2>/dev/null); [ $n -ge 3 ]"]
    volumeMounts: [{{name: s, mountPath: /s}}]
  volumes:
  - name: s
    emptyDir: {{}}
"#
        ),
    );
    let path = vm.manifest("flaky", &yaml);
    let started = Instant::now();
    let out = vm.run(&[
        "run",
        "--keep",
        "--restart-backoff",
        "300ms",
        "--runtime",
        rt,
        path.to_str().unwrap(),
    ]);
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    for n in 1..=3 {
        assert!(stdout.contains(&format!("[app] attempt {n}")), "{stdout}");
    }
    let stderr = text(&out.stderr);
    assert!(stderr.contains("restarting in 300ms"), "{stderr}");
    assert!(
        stderr.contains("restarting in 600ms"),
        "back-off did not double: {stderr}"
    );
    assert!(
        elapsed >= Duration::from_millis(900),
        "restarted faster than the back-off: {elapsed:?}"
    );
    let record = vm.record("flaky").unwrap();
    assert_eq!(record["containers"]["app"]["restarts"], 2);
    assert_eq!(record["phase"], "succeeded");
    // Each attempt has its own CRI log file, as the kubelet keeps them.
    let logs = vm.run(&["logs", "flaky", "app"]);
    assert_eq!(
        text(&logs.stdout)
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>(),
        ["attempt", "3"],
        "{}",
        describe(&logs)
    );
    let raw = std::fs::read_to_string(vm.pod_dir("flaky").join("logs/app/0.log")).unwrap();
    assert!(raw.contains(" stdout F attempt 1"), "CRI format: {raw}");
}

pub fn ctrl_c_leaves_nothing_behind(rt: &str) {
    require_root("ctrl_c_leaves_nothing_behind");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "interrupted",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: a
    image: {image}
    command: ["sh", "-c", "echo up; exec sleep 31337"]
    resources:
      limits: {{memory: 32Mi}}
    volumeMounts: [{{name: mem, mountPath: /mem}}]
  - name: b
    image: {image}
    command: ["sleep", "31337"]
  volumes:
  - name: mem
    emptyDir: {{medium: Memory}}
"#
        ),
    );
    let path = vm.manifest("interrupted", &yaml);
    let mut child = vm
        .cmd()
        .args(["run", "--runtime", rt, path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "[a] up");
    let record = vm.wait_record("interrupted", Duration::from_secs(30), |r| {
        r["containers"]["b"]["phase"] == "running"
    });
    let uid = uid_of(&record);
    assert!(
        !vm.leftovers(&uid, "sleep 31337").is_empty(),
        "the leak check must see a running pod"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_clean(&vm, &uid, "sleep 31337");
    assert!(
        !vm.pod_dir("interrupted").exists(),
        "pod directory left behind"
    );
}

pub fn logs_and_exit_codes(rt: &str) {
    require_root("logs_and_exit_codes");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "exit7",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: ok
    image: {image}
    command: ["sh", "-c", "echo fine; echo warn >&2"]
  - name: bad
    image: {image}
    command: ["sh", "-c", "exit 7"]
"#
        ),
    );
    let out = run_in_foreground(&vm, rt, "exit7", &yaml);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(text(&out.stdout).contains("[ok] fine"));
    assert!(text(&out.stderr).contains("[ok] warn"));
    assert!(
        text(&out.stderr).contains("container \"bad\" failed: exit code 7"),
        "{}",
        describe(&out)
    );
}

/// A memory-backed emptyDir with a sizeLimit is a tmpfs of that size: half
/// of it can be written, twice of it cannot (ENOSPC). On vm every emptyDir
/// lives in guest memory and gets its own tmpfs from the agent.
pub fn empty_dir_size_limit_is_enforced(rt: &str) {
    require_root("empty_dir_size_limit_is_enforced");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "limited",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: c
    image: {image}
    command:
    - sh
    - -c
    - |
      dd if=/dev/zero of=/data/half bs=1024 count=512 2>/dev/null && echo half-fits
      if dd if=/dev/zero of=/data/twice bs=1024 count=2048 2>/dev/null; then echo twice-fits; else echo twice-refused; fi
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - name: data
    emptyDir: {{medium: Memory, sizeLimit: 1Mi}}
"#
        ),
    );
    let out = run_in_foreground(&vm, rt, "limited", &yaml);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[c] half-fits"), "{}", describe(&out));
    assert!(
        stdout.contains("[c] twice-refused"),
        "a 2 MiB file fit in a 1Mi emptyDir: {}",
        describe(&out)
    );
}

/// Each bad input: non-zero exit, one clear `vmrun: error:` line naming the
/// problem, and no pod directory, cgroup or mount left behind.
pub fn bad_input_is_refused_cleanly(rt: &str) {
    require_root("bad_input_is_refused_cleanly");
    let image = busybox();
    let registry = image.split('/').next().unwrap().to_string();
    let c = |extra: &str| {
        pod(
            "bad",
            &format!(
                "  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n{extra}"
            ),
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("yaml syntax", "kind: Pod\nmetadata: [unclosed\n".into(), "YAML error"),
        ("wrong field type", c("    ports:\n    - containerPort: eighty\n"), "spec.containers[0].ports[0].containerPort"),
        ("unknown field", c("    commandd: [sh]\n"), "spec.containers[0].commandd: unknown field"),
        ("missing image", pod("bad", &format!("  containers:\n  - name: c\n    image: {registry}/nope/missing:1.0\n")), "nope/missing"),
        ("missing configMap key", format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\ndata:\n  a: b\n---\n{}", c("    env:\n    - name: X\n      valueFrom:\n        configMapKeyRef: {name: cm, key: nope}\n")), "configMap \"cm\" has no key \"nope\""),
        ("command not found", c("    command: [\"no-such-binary\"]\n"), "no-such-binary"),
        ("relative mountPath", c("    volumeMounts: [{name: v, mountPath: data}]\n  volumes:\n  - name: v\n    emptyDir: {}\n"), "spec.containers[0].volumeMounts[0].mountPath"),
        ("hostPath escaping", c("    volumeMounts: [{name: v, mountPath: /data}]\n  volumes:\n  - name: v\n    hostPath: {path: /tmp/../etc}\n"), "spec.volumes[0].hostPath.path"),
        ("hostPath missing", c("    volumeMounts: [{name: v, mountPath: /data}]\n  volumes:\n  - name: v\n    hostPath: {path: /nonexistent/vmrun-test, type: Directory}\n"), "/nonexistent/vmrun-test"),
        ("unknown runtime class", pod("bad", &format!("  runtimeClassName: gvisor\n  containers:\n  - name: c\n    image: {image}\n")), "unknown runtime \"gvisor\""),
        // Hostile manifests (docs/security.md, "Hostile input"); @STATE@ is the case's state root.
        ("hostPath into the state", c("    volumeMounts: [{name: v, mountPath: /data}]\n  volumes:\n  - name: v\n    hostPath: {path: @STATE@/pods}\n"), "is inside vmrun's state directory"),
        ("YAML alias bomb", format!("{}  a: &a [{}]\n  b: [{}]\n", c(""), vec!["x"; 20_000].join(","), vec!["*a"; 20_000].join(",")), "once aliases are expanded (an alias bomb?)"),
        ("deeply nested YAML", c(&format!("    args: {}{}\n", "[".repeat(1 << 20), "]".repeat(1 << 20))), "nested more than 128 deep"),
        ("huge manifest", c(&format!("# {}\n", "x".repeat(9 << 20))), "the manifest is larger than 8 MiB"),
        ("hostPort without a network", c("    ports:\n    - containerPort: 80\n      hostPort: 8080\n"), "publishing a port needs a pod network"),
        ("unknown kind", format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n---\n{}", c("")), "kind \"Deployment\" is not supported"),
    ];
    for (what, yaml, needle) in cases {
        let vm = Vmrun::for_runtime(rt);
        let yaml = yaml.replace("@STATE@", &vm.state.path().display().to_string());
        let path = vm.manifest("bad", &yaml);
        let mut args = vec!["run"];
        if what != "unknown runtime class" {
            args.extend(["--runtime", rt]);
        }
        args.push(path.to_str().unwrap());
        let out = vm.run(&args);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: accepted\n{}",
            describe(&out)
        );
        assert!(
            stderr.contains(needle),
            "{what}: error does not name {needle:?}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: panic\n{stderr}");
        let error_lines = stderr.lines().filter(|l| l.contains("error")).count();
        assert!(
            error_lines <= 2,
            "{what}: expected one clear error, got:\n{stderr}"
        );
        assert!(
            !vm.pod_dir("bad").exists(),
            "{what}: pod directory left behind"
        );
        let left = vm.leftovers("", "");
        assert!(
            left.iter().all(|l| !l.starts_with("mount")),
            "{what}: {left:?}"
        );
    }
}

/// A hostPath file read and written by a container, the writes landing in the
/// host file; a hostPath directory is shared on native and refused by name on
/// vm (which passes a hostPath to the guest only as a block device).
pub fn host_path_file_is_read_and_written(rt: &str) {
    require_root("host_path_file_is_read_and_written");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk.img");
    let mut content = b"hello-from-host".to_vec();
    content.resize(64 * 1024, 0);
    std::fs::write(&disk, &content).unwrap();
    let yaml = pod(
        "hostdisk",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: io
    image: {image}
    command: ["sh", "-c", "head -c 15 /data; echo; echo -n written-by-pod | dd of=/data bs=512 seek=1 conv=notrunc,fsync 2>/dev/null && echo wrote"]
    volumeMounts: [{{name: disk, mountPath: /data}}]
  volumes:
  - name: disk
    hostPath: {{path: {disk}, type: File}}
"#,
            disk = disk.display()
        ),
    );
    let out = run_in_foreground(&vm, rt, "hostdisk", &yaml);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[io] hello-from-host"), "{stdout}");
    assert!(stdout.contains("[io] wrote"), "{stdout}");
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), content.len(), "the host file changed size");
    assert_eq!(
        &after[512..526],
        b"written-by-pod",
        "the write did not reach the host file"
    );
    assert_eq!(&after[..15], b"hello-from-host");

    // A directory: shared on native; on vm, refused naming the limitation.
    std::fs::write(dir.path().join("marker"), "x").unwrap();
    let yaml = pod(
        "hostdir",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: ls
    image: {image}
    command: ["ls", "/data"]
    volumeMounts: [{{name: d, mountPath: /data}}]
  volumes:
  - name: d
    hostPath: {{path: {dir}}}
"#,
            dir = dir.path().display()
        ),
    );
    let out = run_in_foreground(&vm, rt, "hostdir", &yaml);
    if rt == "vm" {
        assert_refused(&vm, &out, "hostdir", &["volume \"d\"", "is a directory"]);
    } else {
        assert!(out.status.success(), "{}", describe(&out));
        assert!(
            text(&out.stdout).contains("[ls] marker"),
            "{}",
            describe(&out)
        );
    }
}

/// What a process in a container reads about itself: its own cgroup
/// (read-only, at the top of /sys/fs/cgroup through its cgroup namespace)
/// and a /proc that tells its limits, from the container's command and from
/// `vmrun exec`. `free` is procps's, which reads /proc/meminfo.
const SELF_REPORT: &str = r#"
if [ -f /sys/fs/cgroup/cpu.max ]; then
  q=/sys/fs/cgroup/cpu.max; echo "quota=$(cat $q)"; echo "mem=$(cat /sys/fs/cgroup/memory.max)"
else
  q=/sys/fs/cgroup/cpu/cpu.cfs_quota_us; echo "quota=$(cat $q)"; echo "mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
fi
if echo 50000 > $q 2>/dev/null; then echo write=ok; else echo write=refused; fi
echo "cgroups=$(grep -vc ':/$' /proc/self/cgroup)"
echo "nproc=$(nproc)"
echo "cpuinfo=$(grep -c ^processor /proc/cpuinfo)"
echo "statcpus=$(grep -c '^cpu[0-9]' /proc/stat)"
echo "online=$(cat /sys/devices/system/cpu/online)"
echo "free=$(/usr/bin/free -m | awk '/^Mem:/ {print $2}')"
echo "memtotal=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
echo "uptime=$(cut -d. -f1 /proc/uptime)"
echo "loadavg=$(wc -w < /proc/loadavg)"
echo done
"#;

fn report_value<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| {
            // `vmrun run` prefixes a container's lines with "[name] ".
            let l = l.split_once("] ").map_or(l, |(_, rest)| rest);
            l.trim().strip_prefix(key)?.strip_prefix('=')
        })
        .unwrap_or_else(|| panic!("no {key}= in:\n{report}"))
}

fn assert_own_limits(report: &str, v2: bool) {
    let v = |k| report_value(report, k);
    assert_eq!(
        v("quota"),
        if v2 { "20000 100000" } else { "20000" },
        "{report}"
    );
    assert_eq!(v("mem"), (64u64 << 20).to_string(), "{report}");
    assert_eq!(
        v("write"),
        "refused",
        "the cgroup fs is read-only: {report}"
    );
    assert_eq!(
        v("cgroups"),
        "0",
        "every hierarchy is rooted at the container: {report}"
    );
    assert_eq!(v("nproc"), "1", "{report}");
    assert_eq!(v("cpuinfo"), "1", "{report}");
    assert_eq!(v("statcpus"), "1", "{report}");
    assert_eq!(v("online"), "0", "{report}");
    assert_eq!(v("free"), "64", "{report}");
    assert_eq!(v("memtotal"), "65536", "{report}");
    assert_eq!(v("loadavg"), "5", "{report}");
    let up: u64 = v("uptime").parse().unwrap();
    assert!(
        up < 120,
        "uptime {up}s for a container just started: {report}"
    );
}

pub fn container_sees_its_own_cgroup_and_limits(rt: &str) {
    require_root("container_sees_its_own_cgroup_and_limits");
    let vm = Vmrun::for_runtime(rt);
    // procps's `free` (busybox's asks sysinfo(2), which no /proc view changes).
    let image = vmrun_tests::pod::procps_reference();
    let yaml = pod(
        "selfview",
        &format!(
            r#"  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    command: ["sh", "-c", {script:?}]
    resources:
      limits: {{cpu: 200m, memory: 64Mi}}
"#,
            script = format!("{SELF_REPORT}\nexec sleep 3603")
        ),
    );
    let record = start_detached(&vm, rt, "selfview", &yaml);
    let uid = uid_of(&record);
    // The vm guest has only cgroup v2; a native container has the host's.
    let v2 = rt == "vm" || std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let out = vm.run(&["logs", "selfview", "app"]);
        let stdout = text(&out.stdout);
        if stdout.contains("done") || Instant::now() > deadline {
            break stdout;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_own_limits(&logs, v2);
    let out = exec(&vm, "selfview", "app", &["sh", "-c", SELF_REPORT]);
    assert!(out.status.success(), "exec: {}", describe(&out));
    assert_own_limits(&text(&out.stdout), v2);
    stop_and_rm(&vm, "selfview");
    assert_clean(&vm, &uid, "sleep 3603");
}

/// vm only: the container runs on the guest's own kernel, and sees neither
/// the host's processes nor its files.
pub fn guest_kernel_hides_the_host(rt: &str) {
    require_root("guest_kernel_hides_the_host");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let marker_dir = tempfile::tempdir().expect("temp dir");
    let marker_file = marker_dir.path().join("host-only-marker");
    std::fs::write(&marker_file, "host secret").unwrap();
    let mut host_sleeper = std::process::Command::new("sleep")
        .arg("24680")
        .spawn()
        .expect("host sleep");
    let yaml = pod(
        "isolated",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: probe
    image: {image}
    command: ["sh", "-c", "echo kernel=$(uname -r); ps -o args; ls {marker} 2>&1; echo done"]
"#,
            marker = marker_file.display()
        ),
    );
    let out = run_in_foreground(&vm, rt, "isolated", &yaml);
    let _ = host_sleeper.kill();
    let _ = host_sleeper.wait();
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let host_kernel = nix::sys::utsname::uname().unwrap();
    let host_kernel = host_kernel.release().to_string_lossy();
    let guest_kernel = stdout
        .lines()
        .find_map(|l| l.strip_prefix("[probe] kernel="))
        .unwrap_or_else(|| panic!("no kernel line: {stdout}"));
    assert_ne!(
        guest_kernel, host_kernel,
        "the container runs on the host's kernel"
    );
    assert!(!guest_kernel.is_empty(), "{stdout}");
    assert!(stdout.contains("[probe] done"), "{stdout}");
    assert!(
        !stdout.contains("sleep 24680"),
        "the guest sees a host process: {stdout}"
    );
    assert!(
        stdout.contains("No such file or directory"),
        "the guest sees a host file: {stdout}"
    );
}

/// vm only: a VMM killed under a running pod fails the pod with the reason,
/// instead of restarting its containers, and nothing is left behind.
pub fn vmm_killed_fails_the_pod(rt: &str) {
    require_root("vmm_killed_fails_the_pod");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "doomed",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  restartPolicy: Always
  containers:
  - name: app
    image: {image}
    command: ["sleep", "13579"]
"#
        ),
    );
    let record = start_detached(&vm, rt, "doomed", &yaml);
    let uid = uid_of(&record);
    let vmms = vm.vmm_pids("doomed");
    assert_eq!(vmms.len(), 1, "one VMM per pod: {vmms:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmms[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failed = vm.wait_record("doomed", Duration::from_secs(60), |r| {
        r["phase"] == "failed"
    });
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("pod VM died") && message.contains("signal: 9"),
        "{failed:#}"
    );
    assert_eq!(
        failed["containers"]["app"]["reason"], "SandboxLost",
        "{failed:#}"
    );
    assert_eq!(failed["containers"]["app"]["restarts"], 0, "{failed:#}");
    let ps = vm.run(&["ps"]);
    assert!(
        text(&ps.stdout)
            .lines()
            .any(|l| l.contains("doomed") && l.contains("failed")),
        "{}",
        describe(&ps)
    );
    let out = vm.run(&["rm", "doomed"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert!(!vm.pod_dir("doomed").exists());
    assert_clean(&vm, &uid, "sleep 13579");
}

/// A pod's VMM runs jailed (its own mount namespace rooted in the VM
/// directory, uid 65534, no capabilities) with a seccomp filter on every
/// thread; a system call outside its filter (the control socket's test
/// hook) ends the VMM, and the pod is reported failed with the reason.
pub fn vmm_is_jailed_and_a_forbidden_syscall_fails_the_pod(rt: &str) {
    require_root("vmm_is_jailed_and_a_forbidden_syscall_fails_the_pod");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "jailed",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {image}
    command: ["sleep", "97531"]
"#
        ),
    );
    let record = start_detached(&vm, rt, "jailed", &yaml);
    let uid = uid_of(&record);
    let vmms = vm.vmm_pids("jailed");
    assert_eq!(vmms.len(), 1, "one VMM per pod: {vmms:?}");
    let pid = vmms[0];
    let threads = Vmrun::thread_statuses(pid);
    // KVM's own NX huge page worker is listed with the VMM's threads.
    let ours: Vec<_> = threads
        .iter()
        .filter(|(name, _)| !name.starts_with("kvm-nx-lpage"))
        .collect();
    let names: Vec<&str> = ours.iter().map(|(name, _)| name.as_str()).collect();
    for wanted in ["vmrun-vmm", "vcpu0", "api", "spawner", "vsock"] {
        assert!(names.contains(&wanted), "no {wanted} thread in {names:?}");
    }
    for (name, status) in ours {
        let field = |f| vmrun_tests::pod::status_field(status, f);
        assert_eq!(field("Seccomp"), "2", "thread {name}");
        assert_eq!(field("NoNewPrivs"), "1", "thread {name}");
        assert_eq!(field("CapEff"), "0000000000000000", "thread {name}");
        assert_eq!(field("CapBnd"), "0000000000000000", "thread {name}");
        assert!(
            field("Uid").split_whitespace().all(|id| id == "65534"),
            "thread {name}: Uid {}",
            field("Uid")
        );
    }
    assert_ne!(
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        "the VMM shares the host's mount namespace"
    );
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in &root {
        assert!(
            vm.pod_dir("jailed").join("vm").join(name).exists(),
            "{name} in the VMM's root is not in the pod's VM directory: {root:?}"
        );
    }
    assert!(root.iter().any(|n| n == "vsock.sock"), "{root:?}");

    let api = format!("/proc/{pid}/fd/3/api.sock");
    let stream = std::os::unix::net::UnixStream::connect(&api).unwrap();
    std::io::Write::write_all(&mut &stream, b"{\"action\":\"test_forbidden_syscall\"}\n").unwrap();
    let failed = vm.wait_record("jailed", Duration::from_secs(60), |r| {
        r["phase"] == "failed"
    });
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("pod VM died")
            && message.contains("exit status: 159")
            && message.contains("the api thread made system call"),
        "{failed:#}"
    );
    let out = vm.run(&["rm", "jailed"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert!(!vm.pod_dir("jailed").exists());
    assert_clean(&vm, &uid, "sleep 97531");
}

/// A VMM SIGKILLed while its pod starts (as soon as it exists, before
/// the guest agent answers): the pod fails naming the VMM's end, and `rm`
/// leaves nothing.
pub fn vmm_killed_while_starting_fails_the_pod(rt: &str) {
    require_root("vmm_killed_while_starting_fails_the_pod");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "stillborn",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {image}
    command: ["sleep", "75319"]
"#
        ),
    );
    let path = vm.manifest("stillborn", &yaml);
    let out = vm.run(&["run", "-d", "--runtime", rt, path.to_str().unwrap()]);
    assert!(out.status.success(), "run -d: {}", describe(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    let vmm = loop {
        if let Some(&pid) = vm.vmm_pids("stillborn").first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no VMM started within 60 s");
        std::thread::yield_now();
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failed = vm.wait_record("stillborn", Duration::from_secs(120), |r| {
        r["phase"] == "failed"
    });
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(message.contains("signal: 9"), "{failed:#}");
    let uid = uid_of(&failed);
    let out = vm.run(&["rm", "stillborn"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert!(!vm.pod_dir("stillborn").exists());
    assert_clean(&vm, &uid, "sleep 75319");
}

/// The guest agent's server dying (its test hook: it exits with status 3;
/// the guest's PID 1 then powers the guest off) fails a running pod with
/// the reason, and `rm` leaves nothing.
pub fn agent_exit_fails_the_pod(rt: &str) {
    require_root("agent_exit_fails_the_pod");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "agentless",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  restartPolicy: Always
  containers:
  - name: app
    image: {image}
    command: ["sleep", "86420"]
"#
        ),
    );
    let record = start_detached(&vm, rt, "agentless", &yaml);
    let uid = uid_of(&record);
    let vmms = vm.vmm_pids("agentless");
    assert_eq!(vmms.len(), 1, "one VMM per pod: {vmms:?}");
    let vsock = std::path::PathBuf::from(format!("/proc/{}/fd/3/vsock.sock", vmms[0]));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut agent = vmrun_proto::connect_hybrid_vsock(&vsock, vmrun_proto::AGENT_VSOCK_PORT)
            .await
            .expect("reach the guest agent");
        // The agent exits before it could answer.
        let answer = agent
            .test_exit(vmrun_proto::v1::TestExitRequest { code: 3 })
            .await;
        assert!(answer.is_err(), "the agent answered: {answer:?}");
    });
    let failed = vm.wait_record("agentless", Duration::from_secs(60), |r| {
        r["phase"] == "failed"
    });
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("pod VM died") && message.contains("agent server exited with status 3"),
        "{failed:#}"
    );
    assert_eq!(
        failed["containers"]["app"]["reason"], "SandboxLost",
        "{failed:#}"
    );
    let out = vm.run(&["rm", "agentless"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert!(!vm.pod_dir("agentless").exists());
    assert_clean(&vm, &uid, "sleep 86420");
}

/// A SIGKILLed `vmrun-supervisor` leaves its pod running with nobody to
/// tear it down: `vmrun ps` says so, and `vmrun rm` undoes what is left
/// (the containers' processes and cgroups, a pod VM's VMM, the mounts).
pub fn supervisor_killed_pod_is_cleaned_up_by_rm(rt: &str) {
    require_root("supervisor_killed_pod_is_cleaned_up_by_rm");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "orphan",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {image}
    command: ["sleep", "24681"]
"#
        ),
    );
    let record = start_detached(&vm, rt, "orphan", &yaml);
    let uid = uid_of(&record);
    vm.kill_supervisor("orphan", &record);
    if rt == "native" {
        assert!(
            !vm.leftovers(&uid, "sleep 24681").is_empty(),
            "the pod outlives its supervisor until rm"
        );
    }
    let out = vm.run(&["rm", "orphan"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert!(!vm.pod_dir("orphan").exists());
    assert_clean(&vm, &uid, "sleep 24681");
}

/// The supervisor SIGKILLed while the pod stops (its container ignores
/// SIGTERM, so the grace period is running): `vmrun stop` returns, saying
/// so, and `vmrun rm` undoes what is left.
pub fn supervisor_killed_while_stopping_is_cleaned_up_by_rm(rt: &str) {
    require_root("supervisor_killed_while_stopping_is_cleaned_up_by_rm");
    let vm = Vmrun::for_runtime(rt);
    let image = busybox();
    let yaml = pod(
        "stopping",
        &format!(
            r#"  terminationGracePeriodSeconds: 60
  containers:
  - name: app
    image: {image}
    command: ["sh", "-c", "trap '' TERM; sleep 24683 & while :; do wait; done"]
"#
        ),
    );
    let record = start_detached(&vm, rt, "stopping", &yaml);
    let uid = uid_of(&record);
    let mut stop = vm.cmd();
    stop.args(["stop", "stopping"]);
    let stop = stop
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vmrun stop");
    vm.wait_record("stopping", Duration::from_secs(30), |r| {
        r["phase"] == "stopping"
    });
    vm.kill_supervisor("stopping", &record);
    let out = stop.wait_with_output().expect("vmrun stop");
    let said = describe(&out);
    assert!(
        out.status.success() || said.contains("supervisor"),
        "vmrun stop after the supervisor died: {said}"
    );
    let out = vm.run(&["rm", "stopping"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert!(!vm.pod_dir("stopping").exists());
    assert_clean(&vm, &uid, "sleep 24683");
}

/// With `[network] cni_conf_dir` set, `vmrun run` puts the pod on that CNI
/// network as a CRI pod is (ADD at start, DEL at the end): the record and
/// the container's eth0 show the pod IP, the host reaches a server in the
/// pod by it and through its hostPort (the portmap plugin's DNAT on the
/// bridge's gateway address), and after `vmrun stop` the address lease,
/// the port's NAT rules and the netns pin are gone. A pod VM's guest gets
/// the address.
pub fn pod_joins_the_configured_cni_network(rt: &str) {
    const TEST: &str = "pod_joins_the_configured_cni_network";
    require_root(TEST);
    if !vmrun_tests::cni::plugins_installed() {
        eprintln!("SKIPPED {TEST}: containernetworking-plugins not installed (/usr/lib/cni)");
        return;
    }
    let vm = Vmrun::for_runtime(rt);
    // A bridge and subnet per runtime: the two may run at once.
    let (bridge, subnet, prefix, host_port) = if rt == "vm" {
        ("vmrrunv0", "10.250.44.0/24", "10.250.44.", 30883)
    } else {
        ("vmrrunn0", "10.250.43.0/24", "10.250.43.", 30882)
    };
    let ipam = tempfile::tempdir().unwrap();
    vm.use_cni_network(&vmrun_tests::cni::bridge_network(
        bridge,
        subnet,
        ipam.path(),
        true,
    ));

    let image = busybox();
    let yaml = pod(
        "netpod",
        &format!(
            r#"  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while :; do echo hello-from-run | nc -l -p 8080; done & wait # 24680"]
    ports:
    - containerPort: 8080
      hostPort: {host_port}
"#
        ),
    );
    let record = start_detached(&vm, rt, "netpod", &yaml);
    let uid = uid_of(&record);
    let ip = record["pod_ips"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(ip.starts_with(prefix), "pod IP in the record: {record}");
    let out = exec(&vm, "netpod", "web", &["ip", "-4", "addr", "show", "eth0"]);
    assert!(
        text(&out.stdout).contains(&format!("inet {ip}/24")),
        "eth0 in the pod: {}",
        describe(&out)
    );
    vmrun_tests::cni::wait_for_line(
        &format!("{ip}:8080"),
        "hello-from-run
",
        Duration::from_secs(30),
    );
    // From the host through the hostPort, on this test's own bridge.
    vmrun_tests::cni::wait_for_line(
        &format!("{prefix}1:{host_port}"),
        "hello-from-run\n",
        Duration::from_secs(30),
    );
    let lease = ipam.path().join(bridge).join(&ip);
    assert!(lease.exists(), "host-local's lease {}", lease.display());
    stop_and_rm(&vm, "netpod");
    assert!(!lease.exists(), "CNI DEL released {}", lease.display());
    let nat = std::process::Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .expect("iptables");
    let port_rules: Vec<_> = text(&nat.stdout)
        .lines()
        .filter(|l| l.contains(&format!("--dport {host_port}")))
        .map(str::to_string)
        .collect();
    assert!(port_rules.is_empty(), "NAT rules left: {port_rules:?}");
    assert_clean(&vm, &uid, "24680");
    let _ = std::process::Command::new("ip")
        .args(["link", "del", bridge])
        .status();
}

macro_rules! runtime_cases {
    ($($rt:ident),*) => {$(
        mod $rt {
            macro_rules! case {
                ($name:ident) => {
                    #[test]
                    fn $name() {
                        super::$name(stringify!($rt));
                    }
                };
            }
            case!(init_container_fills_empty_dir_served_by_main);
            case!(containers_share_localhost_and_ipc);
            case!(share_process_namespace_sees_other_containers);
            case!(oom_kill_is_reported);
            case!(cpu_and_memory_limits_reach_the_cgroup);
            case!(config_secret_and_downward_files);
            case!(lifecycle_hooks_run);
            case!(on_failure_restarts_with_backoff);
            case!(ctrl_c_leaves_nothing_behind);
            case!(logs_and_exit_codes);
            case!(bad_input_is_refused_cleanly);
            case!(host_path_file_is_read_and_written);
            case!(empty_dir_size_limit_is_enforced);
            case!(container_sees_its_own_cgroup_and_limits);
            case!(seccomp_profiles_filter_syscalls);
            case!(pod_joins_the_configured_cni_network);
            case!(supervisor_killed_pod_is_cleaned_up_by_rm);
            case!(supervisor_killed_while_stopping_is_cleaned_up_by_rm);
        }
    )*};
}

runtime_cases!(native);

// The wasm runtime runs these cases' subjects with wasm programs in
// tests/wasm.rs (these are busybox shell scripts); the ones that cannot
// apply to wasm are listed there in `NOT_APPLICABLE`, each with its reason.

/// The same cases on the vm runtime, each in a microVM.
///
/// On hardware KVM each case runs directly. Where `/dev/kvm` is not hardware
/// KVM (`kvm_pvm`), each batch test (`vm::nested_1`, ...) runs its cases
/// inside one nested L1 guest (`vmrun_tests::nested`), after building the
/// binaries and the guest on the host; each case then says by name on the host
/// where it ran. Batches keep each L1's life short (docs/vm-runtime.md).
mod vm {
    macro_rules! cases {
        ($($batch:ident: [$($name:ident),* $(,)?]),* $(,)?) => {
            $(
                $(
                    #[test]
                    fn $name() {
                        if vmrun_tests::nested::needs_nesting() {
                            println!(concat!(
                                "vm::", stringify!($name), ": runs inside L1 in vm::", stringify!($batch)
                            ));
                            return;
                        }
                        vmrun_tests::nested::note_where_running(module_path!(), stringify!($name));
                        super::$name("vm");
                    }
                )*

                #[test]
                fn $batch() {
                    if !vmrun_tests::nested::needs_nesting() {
                        println!(concat!(
                            "vm::", stringify!($batch), ": /dev/kvm is hardware KVM: its cases ran directly"
                        ));
                        return;
                    }
                    vmrun_tests::pod::vmrun_bin();
                    vmrun_tests::pod::guest_assets();
                    vmrun_tests::nested::run_tests_nested(module_path!(), &[$(stringify!($name)),*]);
                }
            )*
        };
    }

    cases! {
        nested_1: [
            logs_and_exit_codes,
            lifecycle_hooks_run,
            share_process_namespace_sees_other_containers,
            containers_share_localhost_and_ipc,
            init_container_fills_empty_dir_served_by_main,
            oom_kill_is_reported,
            cpu_and_memory_limits_reach_the_cgroup,
            container_sees_its_own_cgroup_and_limits,
            supervisor_killed_pod_is_cleaned_up_by_rm,
            supervisor_killed_while_stopping_is_cleaned_up_by_rm,
            vmm_is_jailed_and_a_forbidden_syscall_fails_the_pod,
        ],
        nested_2: [
            config_secret_and_downward_files,
            on_failure_restarts_with_backoff,
            ctrl_c_leaves_nothing_behind,
            bad_input_is_refused_cleanly,
            host_path_file_is_read_and_written,
            guest_kernel_hides_the_host,
            vmm_killed_fails_the_pod,
            agent_exit_fails_the_pod,
            vmm_killed_while_starting_fails_the_pod,
            empty_dir_size_limit_is_enforced,
            seccomp_profiles_filter_syscalls,
            pod_joins_the_configured_cni_network,
        ],
    }
}

/// The pod that reads its own view, annotated with `vmrun.io/proc-view: VALUE`.
fn view_pod(name: &str, view: &str, sleep: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations:
    vmrun.io/proc-view: "{view}"
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    command: ["sleep", "{sleep}"]
    resources:
      limits: {{cpu: 200m, memory: 64Mi}}
"#,
        image = vmrun_tests::pod::procps_reference()
    )
}

/// native: `vmrun.io/proc-view: "false"` gives the container the host's
/// /proc (and no cpuset), as runc does; its own cgroup fs stays.
#[test]
fn proc_view_can_be_turned_off() {
    require_root("proc_view_can_be_turned_off");
    let vm = Vmrun::new();
    let record = start_detached(
        &vm,
        "native",
        "hostview",
        &view_pod("hostview", "false", 3604),
    );
    let uid = uid_of(&record);
    let out = exec(&vm, "hostview", "app", &["sh", "-c", SELF_REPORT]);
    assert!(out.status.success(), "exec: {}", describe(&out));
    let report = text(&out.stdout);
    let host_total = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_total = host_total
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap();
    assert_eq!(report_value(&report, "memtotal"), host_total, "{report}");
    let host_cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        report_value(&report, "nproc"),
        host_cpus.to_string(),
        "{report}"
    );
    assert_eq!(
        report_value(&report, "mem"),
        (64u64 << 20).to_string(),
        "{report}"
    );
    stop_and_rm(&vm, "hostview");
    assert_clean(&vm, &uid, "sleep 3604");

    let path = vm.manifest("badview", &view_pod("badview", "maybe", 3604));
    let out = vm.run(&["run", path.to_str().unwrap()]);
    assert_refused(&vm, &out, "badview", &["vmrun.io/proc-view", "\"maybe\""]);
}

/// The keeper serving `mountpoint` and its current worker.
fn view_daemon(mountpoint: &std::path::Path) -> (i32, i32) {
    let table = vmrun_tests::pod::process_table();
    let want = format!("vmrun-procview start {}", mountpoint.display());
    // The worker is forked from the keeper: same command line, keeper as parent.
    let ours: Vec<_> = table
        .iter()
        .filter(|(_, _, cmd)| cmd.contains(&want))
        .collect();
    let keeper = ours
        .iter()
        .find(|(_, ppid, _)| !ours.iter().any(|(pid, _, _)| pid == ppid))
        .map(|(pid, _, _)| *pid)
        .unwrap_or_else(|| panic!("no keeper for {}", mountpoint.display()));
    let worker = table
        .iter()
        .find(|(_, ppid, _)| *ppid == keeper)
        .map(|(pid, _, _)| *pid)
        .unwrap_or_else(|| panic!("keeper {keeper} has no worker"));
    (keeper, worker)
}

/// native: the view's worker hung or killed under a running container:
/// reads fail with EIO within the keeper's timeout instead of hanging, and
/// the next read is served by a new worker; a stopped keeper leaves no mount.
#[test]
fn proc_view_survives_its_worker() {
    require_root("proc_view_survives_its_worker");
    let vm = Vmrun::new();
    // Outside the state directory, which must hold no mount after the pod.
    let view_dir = tempfile::tempdir().unwrap();
    let mountpoint = view_dir.path().join("procview");
    std::fs::write(
        &vm.config,
        format!(
            "pids_limit = 1024\n[proc_view]\nmountpoint = {:?}\n",
            mountpoint
        ),
    )
    .unwrap();
    let record = start_detached(
        &vm,
        "native",
        "crashview",
        &view_pod("crashview", "true", 3606),
    );
    let uid = uid_of(&record);
    let memtotal = |vm: &Vmrun| {
        exec(
            vm,
            "crashview",
            "app",
            &["grep", "MemTotal", "/proc/meminfo"],
        )
    };
    let out = memtotal(&vm);
    assert!(
        text(&out.stdout).contains(" 65536 kB"),
        "{}",
        describe(&out)
    );

    let (keeper, worker) = view_daemon(&mountpoint);
    let signal = |pid: i32, s| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s).unwrap();
    signal(worker, nix::sys::signal::Signal::SIGSTOP);
    let started = Instant::now();
    let out = memtotal(&vm);
    let took = started.elapsed();
    assert!(
        !out.status.success(),
        "a hung worker answered: {}",
        describe(&out)
    );
    assert!(
        text(&out.stderr).contains("Input/output error"),
        "not EIO: {}",
        describe(&out)
    );
    assert!(took < Duration::from_secs(20), "the read took {took:?}");
    let (same_keeper, new_worker) = view_daemon(&mountpoint);
    assert_eq!(same_keeper, keeper);
    assert_ne!(new_worker, worker, "the hung worker was not replaced");
    let out = memtotal(&vm);
    assert!(
        text(&out.stdout).contains(" 65536 kB"),
        "after restart: {}",
        describe(&out)
    );

    signal(new_worker, nix::sys::signal::Signal::SIGKILL);
    // The keeper sees the worker gone at once and starts another; at most a
    // read racing the kill fails.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = memtotal(&vm);
        if text(&out.stdout).contains(" 65536 kB") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {}",
            describe(&out)
        );
    }
    stop_and_rm(&vm, "crashview");
    assert_clean(&vm, &uid, "sleep 3606");

    signal(keeper, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(mountpoint.to_str().unwrap())
    {
        assert!(
            Instant::now() < deadline,
            "the view stayed mounted after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `run -d` hands the pod to `vmrun-supervisor` beside `vmrun`: without it,
/// the error names the missing binary and nothing of the pod is left.
#[test]
fn detached_without_the_supervisor_binary_is_a_clear_error() {
    require_root("detached_without_the_supervisor_binary_is_a_clear_error");
    let vm = Vmrun::new();
    let bin = vmrun_tests::pod::vmrun_bin();
    // A hard link in a directory of its own (same filesystem as the build):
    // `vmrun` looks for the supervisor beside the path it runs from.
    let lone = tempfile::tempdir_in(bin.parent().unwrap()).unwrap();
    let lone_vmrun = lone.path().join("vmrun");
    std::fs::hard_link(bin, &lone_vmrun).unwrap();
    let path = vm.manifest(
        "lonely",
        &pod(
            "lonely",
            &format!("  containers:\n  - name: c\n    image: {}\n", busybox()),
        ),
    );
    let mut cmd = vm.cmd();
    cmd.args(["run", "-d", path.to_str().unwrap()]);
    let out = std::process::Command::new(&lone_vmrun)
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_refused(&vm, &out, "lonely", &["vmrun-supervisor", "not found"]);
}

/// A detached pod whose sandbox cannot be made (here: a vm pod whose guest
/// kernel is missing, found before any VM starts, so this runs anywhere):
/// `run -d` says why, and once its supervisor has torn down, nothing of the
/// pod is left, neither its directory nor the supervisor.
#[test]
fn detached_pod_whose_sandbox_fails_leaves_nothing() {
    require_root("detached_pod_whose_sandbox_fails_leaves_nothing");
    let vm = Vmrun::new();
    std::fs::write(
        &vm.config,
        "pids_limit = 1024\n[vm]\nkernel = \"/nonexistent/vmlinux\"\n",
    )
    .unwrap();
    let path = vm.manifest(
        "nokernel",
        &pod(
            "nokernel",
            &format!("  containers:\n  - name: c\n    image: {}\n", busybox()),
        ),
    );
    let out = vm.run(&["run", "-d", "--runtime", "vm", path.to_str().unwrap()]);
    assert_refused(
        &vm,
        &out,
        "nokernel",
        &["guest kernel /nonexistent/vmlinux not found"],
    );
    // No pod uid survives to look its cgroups up by (a vm pod makes none on
    // the host): processes (the supervisor names the state dir) and mounts.
    let state = vm.state.path().to_string_lossy().into_owned();
    let left: Vec<String> = vm
        .leftovers("", &state)
        .into_iter()
        .filter(|l| !l.starts_with("cgroup:"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A small tmpfs over a test installation's `pods/` (its pods' state), unmounted when
/// dropped, a failing test included.
struct FullPodsDir(std::path::PathBuf);

impl FullPodsDir {
    fn mount(vm: &Vmrun, kib: u64) -> Self {
        let dir = vm.state.path().join("pods");
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={kib}k,mode=0755").as_str()),
        )
        .unwrap();
        FullPodsDir(dir)
    }
}

impl Drop for FullPodsDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `vmrun run` whose pods' state directory fills up (a 256 KiB tmpfs) while
/// the container writes 2 MiB to stdout: the container is not stopped, the
/// terminal shows everything, the log keeps only whole records and the first
/// one lost is named with the log's path; `rm` then removes the pod.
#[test]
fn native_pod_state_on_a_full_disk() {
    require_root("native_pod_state_on_a_full_disk");
    let image = busybox();
    let vm = Vmrun::new();
    let full = FullPodsDir::mount(&vm, 256);
    let yaml = pod(
        "fill",
        &format!(
            "  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n    command: [sh, -c, 'yes 0123456789abcdef0123456789abcdef0123456789abcdef012345678 | head -c 2097152; echo; echo done']\n"
        ),
    );
    let path = vm.manifest("fill", &yaml);
    let out = vm.run(&[
        "run",
        "--keep",
        "--runtime",
        "native",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.ends_with("[c] done\n"), "{}", describe(&out));
    assert_eq!(
        stdout.lines().count(),
        2_097_152 / 58 + 2,
        "{}",
        describe(&out)
    );
    let log = vmrun_pod::logs::log_path(&vm.pod_dir("fill"), "c", 0);
    let stderr = text(&out.stderr);
    let warning = format!(
        "log {}: No space left on device (os error 28); records are dropped until it can be written again",
        log.display()
    );
    assert!(stderr.contains(&warning), "{}", describe(&out));
    // Once a record fits again (`done`, in what is left of the last page), the loss is counted.
    assert!(
        stderr.contains("records lost while it could not be written"),
        "{}",
        describe(&out)
    );
    let content = std::fs::read_to_string(&log).unwrap();
    assert!(!content.is_empty() && content.ends_with('\n'));
    for line in content.lines() {
        let record = vmrun_pod::logs::parse_record(line).unwrap();
        assert_eq!(record.stream, "stdout");
        assert!(
            record.content.starts_with("0123456789abcdef") || record.content == "done",
            "a torn record: {line:?}"
        );
    }
    let out = vm.run(&["rm", "fill"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!vm.pod_dir("fill").exists());
    drop(full);
}
