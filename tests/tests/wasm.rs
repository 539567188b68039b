//! End-to-end tests of the wasm runtime through the `vmrun` CLI: test
//! programs built by the harness (`vmrun_tests::wasm_programs`: WAT and
//! Rust for wasm32-wasip1/-wasip2), packaged as OCI images and pulled from
//! the registry on 127.0.0.1, run with `--runtime wasm`.
//!
//! The runtime-parameterised cases of `pods.rs` do not run here: they are
//! written as shell commands in busybox containers. What each of them
//! covers is covered for wasm below with a wasm program where it applies
//! ([`COVERED`]); where it cannot apply it is listed in [`NOT_APPLICABLE`].
//! `every_pod_case_is_covered_or_listed` keeps both lists true to pods.rs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmrun_tests::pod::{assert_refused, describe, require_root, text, uid_of, Vmrun};
use vmrun_tests::wasm_programs as programs;

/// The runtime-parameterised cases of `pods.rs` whose subject applies to
/// wasm, each with the tests here that show it for wasm programs.
pub const COVERED: &[(&str, &[&str])] = &[
    (
        "init_container_fills_empty_dir_served_by_main",
        &[
            "init_container_fills_empty_dir_read_by_main",
            "component_http_server_is_reached_by_probe_and_native_container",
        ],
    ),
    (
        "containers_share_localhost_and_ipc",
        &["component_http_server_is_reached_by_probe_and_native_container"],
    ),
    (
        "oom_kill_is_reported",
        &["memory_bomb_is_oom_killed_at_its_limit"],
    ),
    (
        "cpu_and_memory_limits_reach_the_cgroup",
        &[
            "cpu_limit_caps_a_busy_loop",
            "memory_bomb_is_oom_killed_at_its_limit",
        ],
    ),
    (
        "config_secret_and_downward_files",
        &[
            "hello_with_args_and_env",
            "config_map_volume_is_read",
            "every_volume_kind_is_preopened",
        ],
    ),
    (
        "on_failure_restarts_with_backoff",
        &["on_failure_restarts_with_backoff"],
    ),
    (
        "ctrl_c_leaves_nothing_behind",
        &["ctrl_c_leaves_nothing_behind"],
    ),
    (
        "logs_and_exit_codes",
        &[
            "exit_code_3_is_reported",
            "a_trap_ends_the_container_with_its_message_in_the_log",
        ],
    ),
    (
        "bad_input_is_refused_cleanly",
        &[
            "bad_modules_fail_with_one_clear_error",
            "a_native_image_is_refused_by_name",
            "a_wrong_architecture_image_is_refused_by_name",
        ],
    ),
    // Its exec hooks cannot apply (no process to run a command in) and are
    // refused up front; httpGet hooks take the probes' path.
    (
        "lifecycle_hooks_run",
        &[
            "exec_probes_and_hooks_are_refused",
            "component_http_server_is_reached_by_probe_and_native_container",
        ],
    ),
    (
        "pod_joins_the_configured_cni_network",
        &["a_wasm_pod_joins_the_configured_cni_network"],
    ),
    (
        "supervisor_killed_pod_is_cleaned_up_by_rm",
        &["a_wasm_pod_whose_supervisor_was_killed_is_cleaned_up_by_rm"],
    ),
];

/// The runtime-parameterised cases of `pods.rs` that cannot apply to wasm
/// containers, and why.
pub const NOT_APPLICABLE: &[(&str, &str)] = &[
    (
        "supervisor_killed_while_stopping_is_cleaned_up_by_rm",
        "a wasm container cannot catch or ignore SIGTERM: a stop ends it at the next epoch tick, \
         so there is no grace period to kill the supervisor in (a supervisor killed while \
         running is a_wasm_pod_whose_supervisor_was_killed_is_cleaned_up_by_rm)",
    ),
    (
        "share_process_namespace_sees_other_containers",
        "a wasm container has no processes: there is nothing in a process namespace to see",
    ),
    (
        "container_sees_its_own_cgroup_and_limits",
        "WASI has no /proc or /sys: a module cannot read cgroup files; its limits are enforced by the engine (memory_bomb_is_oom_killed_at_its_limit, cpu_limit_caps_a_busy_loop)",
    ),
    (
        "empty_dir_size_limit_is_enforced",
        "the same tmpfs as native backs the emptyDir; WASI write errors surface as in any program, nothing wasm-specific to show",
    ),
    (
        "seccomp_profiles_filter_syscalls",
        "wasm code makes no system calls of its own: WASI calls are served by the engine, which reaches only the container's preopens and sockets",
    ),
    (
        "host_path_file_is_read_and_written",
        "WASI preopens directories only: a hostPath file mount is refused with an error naming it, directory hostPaths work (every_volume_kind_is_preopened)",
    ),
];

#[test]
fn every_pod_case_is_covered_or_listed() {
    let pods = include_str!("pods.rs");
    let this = include_str!("wasm.rs");
    let block = pods
        .split_once("macro_rules! runtime_cases")
        .and_then(|(_, rest)| rest.split_once("runtime_cases!("))
        .expect("pods.rs defines runtime_cases!")
        .0;
    let cases: Vec<&str> = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("case!(")?.strip_suffix(");"))
        .collect();
    assert!(cases.len() > 10, "found only {cases:?} in pods.rs");
    for case in &cases {
        let covered = COVERED.iter().any(|(c, _)| c == case);
        let listed = NOT_APPLICABLE.iter().any(|(c, _)| c == case);
        assert!(
            covered ^ listed,
            "pods.rs case {case}: must be in exactly one of COVERED and NOT_APPLICABLE"
        );
    }
    for (case, tests) in COVERED {
        assert!(
            cases.contains(case),
            "COVERED names {case}, not a pods.rs case"
        );
        for test in *tests {
            assert!(
                this.contains(&format!("#[test]\nfn {test}()")),
                "COVERED: {case} names {test}, not a test in wasm.rs"
            );
        }
    }
    for (case, _) in NOT_APPLICABLE {
        assert!(
            cases.contains(case),
            "NOT_APPLICABLE names {case}, not a pods.rs case"
        );
    }
}

fn pod(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: wasm\nspec:\n{spec}")
}

/// `wasm` packaged as `test/wasm-NAME:latest` in the test registry.
fn image(name: &str, wasm: &[u8]) -> String {
    static PUSHED: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let pushed = PUSHED.get_or_init(Mutex::default);
    if let Some(r) = pushed.lock().unwrap().get(name) {
        return r.clone();
    }
    let reference = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let registry = vmrun_tests::shared_registry().await?;
            // An ordinary OCI image whose one layer holds the module, its
            // entry point naming it, as runwasi's images are built.
            vmrun_tests::images::push_wasm_image(
                registry,
                &format!("test/wasm-{name}:latest"),
                wasm,
            )
            .await
        })
        .unwrap_or_else(|e| panic!("pushing wasm image {name}: {e:#}"));
    pushed
        .lock()
        .unwrap()
        .insert(name.to_string(), reference.clone());
    reference
}

fn wasm_box() -> String {
    image("box", programs::wasm_box_p1())
}

fn run(vm: &Vmrun, name: &str, yaml: &str, extra: &[&str]) -> std::process::Output {
    let path = vm.manifest(name, yaml);
    let mut args = vec!["run"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--runtime", "wasm", path.to_str().unwrap()]);
    vm.run(&args)
}

/// Nothing of pod `name` (uid) is left: mounts, cgroups, its engine.
fn assert_clean(vm: &Vmrun, uid: &str, name: &str) {
    let marker = vm.pod_dir(name).to_string_lossy().into_owned();
    let left = vm.leftovers(uid, &format!("--pod {marker}"));
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

#[test]
fn hello_with_args_and_env() {
    require_root("hello_with_args_and_env");
    let vm = Vmrun::new();
    let image = wasm_box();
    let yaml = pod(
        "hello",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: echo
    image: {image}
    args: ["echo", "hello", "$(WHO)"]
    env:
    - {{name: WHO, value: wasm}}
  - name: env
    image: {image}
    args: ["env"]
    env:
    - {{name: GREETING, value: hi}}
    - name: POD
      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
    - name: FROM_MAP
      valueFrom: {{configMapKeyRef: {{name: settings, key: colour}}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{colour: blue}}
"#
        ),
    );
    let out = run(&vm, "hello", &yaml, &[]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[echo] hello wasm"), "{}", describe(&out));
    for line in [
        "[env] GREETING=hi",
        "[env] POD=hello",
        "[env] FROM_MAP=blue",
    ] {
        assert!(stdout.contains(line), "no {line:?}: {}", describe(&out));
    }
}

#[test]
fn init_container_fills_empty_dir_read_by_main() {
    require_root("init_container_fills_empty_dir_read_by_main");
    let vm = Vmrun::new();
    let image = wasm_box();
    let yaml = pod(
        "shared",
        &format!(
            r#"  restartPolicy: Never
  initContainers:
  - name: fill
    image: {image}
    args: ["write", "/data/msg", "from the init container"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  containers:
  - name: read
    image: {image}
    args: ["cat", "/data/msg"]
    volumeMounts: [{{name: data, mountPath: /data, readOnly: true}}]
  volumes:
  - {{name: data, emptyDir: {{}}}}
"#
        ),
    );
    let out = run(&vm, "shared", &yaml, &["--keep"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("[read] from the init container"),
        "{}",
        describe(&out)
    );
    let record = vm.record("shared").expect("kept record");
    assert_clean(&vm, &uid_of(&record), "shared");
    assert!(vm.run(&["rm", "shared"]).status.success());
}

#[test]
fn read_only_mounts_and_image_files_cannot_be_written() {
    require_root("read_only_mounts_and_image_files_cannot_be_written");
    let vm = Vmrun::new();
    let image = wasm_box();
    let yaml = pod(
        "readonly",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: ro
    image: {image}
    args: ["write", "/ro/x", "nope"]
    volumeMounts: [{{name: data, mountPath: /ro, readOnly: true}}]
  - name: image
    image: {image}
    args: ["write", "/app.wasm", "nope"]
  - name: rw
    image: {image}
    args: ["write", "/rw/x", "yes"]
    volumeMounts: [{{name: data, mountPath: /rw}}]
  volumes:
  - {{name: data, emptyDir: {{}}}}
"#
        ),
    );
    let out = run(&vm, "readonly", &yaml, &["--keep"]);
    let record = vm.record("readonly").expect("kept record");
    let c = &record["containers"];
    assert_eq!(c["ro"]["last_exit"]["code"], 1, "{record}");
    assert_eq!(c["image"]["last_exit"]["code"], 1, "{record}");
    assert_eq!(
        c["rw"]["last_exit"]["code"],
        0,
        "{record}: {}",
        describe(&out)
    );
    assert!(vm.run(&["rm", "readonly"]).status.success());
}

#[test]
fn config_map_volume_is_read() {
    require_root("config_map_volume_is_read");
    let vm = Vmrun::new();
    let image = wasm_box();
    let yaml = pod(
        "configured",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: app
    image: {image}
    args: ["cat", "/etc/app/greeting", "/etc/app/sub/other"]
    volumeMounts: [{{name: config, mountPath: /etc/app}}]
  volumes:
  - name: config
    configMap:
      name: app-config
      items:
      - {{key: greeting, path: greeting}}
      - {{key: other, path: sub/other}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: app-config}}
data:
  greeting: "hello from a configMap\n"
  other: "second key\n"
"#
        ),
    );
    let out = run(&vm, "configured", &yaml, &[]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("[app] hello from a configMap"),
        "{}",
        describe(&out)
    );
    assert!(stdout.contains("[app] second key"), "{}", describe(&out));
}

/// Every volume kind a pod can mount is a preopened directory: secret,
/// downwardAPI, projected and hostPath (read-only honoured, writes reach
/// the host); a hostPath file, which WASI cannot preopen, is refused
/// naming the mount.
#[test]
fn every_volume_kind_is_preopened() {
    require_root("every_volume_kind_is_preopened");
    let vm = Vmrun::new();
    let image = wasm_box();
    let host = tempfile::tempdir().expect("temp dir");
    std::fs::write(host.path().join("in"), "from the host\n").unwrap();
    let yaml = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{colour: "blue\n"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
type: Opaque
data: {{password: aHVudGVyMgo=}}
---
{}"#,
        pod(
            "vols",
            &format!(
                r#"  restartPolicy: Never
  containers:
  - name: files
    image: {image}
    args: ["cat", "/etc/creds/password", "/etc/proj/sub/colour", "/host/in", "/etc/pod/name"]
    volumeMounts:
    - {{name: creds, mountPath: /etc/creds}}
    - {{name: podinfo, mountPath: /etc/pod}}
    - {{name: proj, mountPath: /etc/proj}}
    - {{name: host, mountPath: /host, readOnly: true}}
  - name: writer
    image: {image}
    args: ["write", "/host/out", "from wasm"]
    volumeMounts: [{{name: host, mountPath: /host}}]
  - name: denied
    image: {image}
    args: ["write", "/host/denied", "nope"]
    volumeMounts: [{{name: host, mountPath: /host, readOnly: true}}]
  volumes:
  - name: creds
    secret: {{secretName: creds}}
  - name: podinfo
    downwardAPI:
      items:
      - {{path: name, fieldRef: {{fieldPath: metadata.name}}}}
  - name: proj
    projected:
      sources:
      - configMap:
          name: settings
          items: [{{key: colour, path: sub/colour}}]
  - name: host
    hostPath: {{path: {host}, type: Directory}}
"#,
                host = host.path().display()
            ),
        )
    );
    let out = run(&vm, "vols", &yaml, &["--keep"]);
    let stdout = text(&out.stdout);
    for line in [
        "[files] hunter2",
        "[files] blue",
        "[files] from the host",
        "[files] vols",
    ] {
        assert!(stdout.contains(line), "no {line:?}: {}", describe(&out));
    }
    let record = vm.record("vols").expect("kept record");
    let c = &record["containers"];
    assert_eq!(c["files"]["last_exit"]["code"], 0, "{record}");
    assert_eq!(c["writer"]["last_exit"]["code"], 0, "{record}");
    assert_eq!(
        c["denied"]["last_exit"]["code"], 1,
        "a read-only hostPath was written: {record}"
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("out")).unwrap(),
        "from wasm"
    );
    assert!(!host.path().join("denied").exists());
    assert_clean(&vm, &uid_of(&record), "vols");
    assert!(vm.run(&["rm", "vols"]).status.success());

    let file = host.path().join("in");
    let yaml = pod(
        "hostfile",
        &format!(
            "  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n    args: [cat, /in]\n    volumeMounts: [{{name: f, mountPath: /in}}]\n  volumes:\n  - name: f\n    hostPath: {{path: {}, type: File}}\n",
            file.display()
        ),
    );
    let out = run(&vm, "hostfile", &yaml, &[]);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("volumeMount /in") && stderr.contains("is not a directory"),
        "{}",
        describe(&out)
    );
    assert!(!stderr.contains("panicked"), "{}", describe(&out));
    assert!(
        !vm.pod_dir("hostfile").exists(),
        "pod directory left behind"
    );
}

#[test]
fn exit_code_3_is_reported() {
    require_root("exit_code_3_is_reported");
    let vm = Vmrun::new();
    let image = image("exit3", &programs::exit_code_wat(3));
    let yaml = pod(
        "three",
        &format!("  restartPolicy: Never\n  containers:\n  - name: bad\n    image: {image}\n"),
    );
    let out = run(&vm, "three", &yaml, &["--keep"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("container \"bad\" failed: exit code 3"),
        "{}",
        describe(&out)
    );
    let record = vm.record("three").expect("kept record");
    assert_eq!(record["containers"]["bad"]["reason"], "Error", "{record}");
    assert_clean(&vm, &uid_of(&record), "three");
    assert!(vm.run(&["rm", "three"]).status.success());
}

#[test]
fn a_trap_ends_the_container_with_its_message_in_the_log() {
    require_root("a_trap_ends_the_container_with_its_message_in_the_log");
    let vm = Vmrun::new();
    let image = image("trap", &programs::trap_wat());
    let yaml = pod(
        "trapped",
        &format!("  restartPolicy: Never\n  containers:\n  - name: t\n    image: {image}\n"),
    );
    let out = run(&vm, "trapped", &yaml, &["--keep"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let record = vm.record("trapped").expect("kept record");
    assert_eq!(record["containers"]["t"]["reason"], "Error", "{record}");
    let logs = vm.run(&["logs", "trapped", "t"]);
    let all = text(&logs.stdout) + &text(&logs.stderr);
    assert!(all.contains("about to trap"), "{all}");
    assert!(
        all.contains("wasm trap") && all.contains("unreachable"),
        "{all}"
    );
    assert_clean(&vm, &uid_of(&record), "trapped");
    assert!(vm.run(&["rm", "trapped"]).status.success());
}

#[test]
fn memory_bomb_is_oom_killed_at_its_limit() {
    require_root("memory_bomb_is_oom_killed_at_its_limit");
    let vm = Vmrun::new();
    let image = image("bomb", &programs::memory_bomb_wat());
    let yaml = pod(
        "bomb",
        &format!(
            "  restartPolicy: Never\n  containers:\n  - name: hog\n    image: {image}\n    resources:\n      limits: {{memory: 32Mi}}\n"
        ),
    );
    let out = run(&vm, "bomb", &yaml, &["--keep"]);
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("OOMKilled"),
        "{}",
        describe(&out)
    );
    let record = vm.record("bomb").expect("kept record");
    let hog = &record["containers"]["hog"];
    assert_eq!(hog["reason"], "OOMKilled", "{record}");
    assert_eq!(hog["last_exit"]["oom_killed"], true, "{record}");
    let logs = vm.run(&["logs", "bomb", "hog"]);
    assert!(
        text(&logs.stdout).contains("memory limit") || text(&logs.stderr).contains("memory limit"),
        "{}",
        describe(&logs)
    );
    assert_clean(&vm, &uid_of(&record), "bomb");
    assert!(vm.run(&["rm", "bomb"]).status.success());
}

#[test]
fn an_infinite_loop_is_stopped_within_the_grace_period() {
    require_root("an_infinite_loop_is_stopped_within_the_grace_period");
    let vm = Vmrun::new();
    let image = image("spin", &programs::spin_wat());
    let yaml = pod(
        "spinner",
        &format!(
            "  terminationGracePeriodSeconds: 3\n  containers:\n  - name: spin\n    image: {image}\n"
        ),
    );
    let path = vm.manifest("spinner", &yaml);
    let out = vm.run(&["run", "-d", "--runtime", "wasm", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = vm.wait_record("spinner", Duration::from_secs(60), |r| {
        r["containers"]["spin"]["phase"] == "running"
    });
    let uid = uid_of(&record);
    let started = Instant::now();
    let stop = vm.run(&["stop", "spinner"]);
    assert!(stop.status.success(), "{}", describe(&stop));
    assert!(
        started.elapsed() < Duration::from_secs(3 + 10),
        "stop took {:?}",
        started.elapsed()
    );
    assert_clean(&vm, &uid, "spinner");
    assert!(vm.run(&["rm", "spinner"]).status.success());
}

#[test]
fn cpu_limit_caps_a_busy_loop() {
    require_root("cpu_limit_caps_a_busy_loop");
    let vm = Vmrun::new();
    let image = image("spin", &programs::spin_wat());
    let yaml = pod(
        "capped",
        &format!(
            "  terminationGracePeriodSeconds: 1\n  containers:\n  - name: spin\n    image: {image}\n    resources:\n      limits: {{cpu: 200m}}\n"
        ),
    );
    let path = vm.manifest("capped", &yaml);
    let out = vm.run(&["run", "-d", "--runtime", "wasm", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = vm.wait_record("capped", Duration::from_secs(60), |r| {
        r["containers"]["spin"]["phase"] == "running"
    });
    let pid = record["containers"]["spin"]["pid"]
        .as_i64()
        .expect("engine pid") as i32;
    let cpu = |pid: i32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks
            / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .unwrap()
                .unwrap() as f64
    };
    let (c0, t0) = (cpu(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let share = (cpu(pid) - c0) / t0.elapsed().as_secs_f64();
    // 0.2 CPU asked; the tick accounting may overshoot a little, a loop
    // without a limit takes a whole CPU.
    assert!(
        share < 0.45,
        "the busy loop used {share:.2} CPUs with a 200m limit"
    );
    assert!(
        share > 0.05,
        "the busy loop got only {share:.2} CPUs with a 200m limit"
    );
    assert!(vm.run(&["stop", "capped"]).status.success());
    assert_clean(&vm, &uid_of(&record), "capped");
    assert!(vm.run(&["rm", "capped"]).status.success());
}

#[test]
fn on_failure_restarts_with_backoff() {
    require_root("on_failure_restarts_with_backoff");
    let vm = Vmrun::new();
    let image = image("exit3", &programs::exit_code_wat(3));
    let yaml = pod(
        "flaky",
        &format!(
            "  restartPolicy: OnFailure\n  containers:\n  - name: flaky\n    image: {image}\n"
        ),
    );
    let path = vm.manifest("flaky", &yaml);
    let out = vm.run(&["run", "-d", "--runtime", "wasm", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = vm.wait_record("flaky", Duration::from_secs(60), |r| {
        r["containers"]["flaky"]["restarts"].as_u64() >= Some(2)
    });
    assert_eq!(
        record["containers"]["flaky"]["last_exit"]["code"], 3,
        "{record}"
    );
    assert!(vm.run(&["stop", "flaky"]).status.success());
    assert_clean(&vm, &uid_of(&record), "flaky");
    assert!(vm.run(&["rm", "flaky"]).status.success());
}

#[test]
fn ctrl_c_leaves_nothing_behind() {
    require_root("ctrl_c_leaves_nothing_behind");
    let vm = Vmrun::new();
    let image = wasm_box();
    let yaml = pod(
        "interrupted",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: a
    image: {image}
    args: ["echo", "up"]
  - name: b
    image: {image}
    args: ["sleep", "31337"]
    volumeMounts: [{{name: mem, mountPath: /mem}}]
  volumes:
  - name: mem
    emptyDir: {{medium: Memory}}
"#
        ),
    );
    let path = vm.manifest("interrupted", &yaml);
    let mut child = vm
        .cmd()
        .args(["run", "--runtime", "wasm", path.to_str().unwrap()])
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
    let marker = format!("--pod {}", vm.pod_dir("interrupted").display());
    assert!(
        !vm.leftovers(&uid, &marker).is_empty(),
        "the leak check must see a running engine"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let left = vm.leftovers(&uid, &marker);
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    assert!(
        !vm.pod_dir("interrupted").exists(),
        "pod directory left behind"
    );
}

#[test]
fn exec_probes_and_hooks_are_refused() {
    require_root("exec_probes_and_hooks_are_refused");
    let vm = Vmrun::new();
    let image = wasm_box();
    let yaml = pod(
        "probed",
        &format!(
            "  containers:\n  - name: app\n    image: {image}\n    args: [sleep, '60']\n    livenessProbe:\n      exec: {{command: [cat, /tmp/ok]}}\n"
        ),
    );
    let out = run(&vm, "probed", &yaml, &[]);
    assert_refused(
        &vm,
        &out,
        "probed",
        &["\"app\"", "livenessProbe exec", "no processes"],
    );
}

#[test]
fn a_native_image_is_refused_by_name() {
    require_root("a_native_image_is_refused_by_name");
    let vm = Vmrun::new();
    let busybox = vmrun_tests::busybox_reference();
    let yaml = pod(
        "native",
        &format!("  containers:\n  - name: sh\n    image: {busybox}\n    command: [/bin/sh]\n"),
    );
    let out = run(&vm, "native", &yaml, &[]);
    assert_refused(
        &vm,
        &out,
        "native",
        &[&busybox, "not a WebAssembly image", "ELF"],
    );
}

/// An image built for a CPU (here an arm64 ELF file where the module
/// should be) is refused naming the image and the CPU it was built for.
#[test]
fn a_wrong_architecture_image_is_refused_by_name() {
    require_root("a_wrong_architecture_image_is_refused_by_name");
    let vm = Vmrun::new();
    let mut elf = b"\x7fELF\x02\x01\x01\0".to_vec();
    elf.resize(18, 0);
    elf.extend_from_slice(&0xb7u16.to_le_bytes());
    elf.resize(64, 0);
    let image = image("arm64", &elf);
    let yaml = pod(
        "arm64",
        &format!("  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n"),
    );
    let out = run(&vm, "arm64", &yaml, &[]);
    assert_refused(
        &vm,
        &out,
        "arm64",
        &[
            &image,
            "not a WebAssembly image",
            "ELF executable for arm64",
        ],
    );
}

/// Broken module, missing `_start`, an import WASI does not give: one
/// error naming the problem, no panic, nothing left behind.
#[test]
fn bad_modules_fail_with_one_clear_error() {
    require_root("bad_modules_fail_with_one_clear_error");
    let cases: [(&str, Vec<u8>, &[&str]); 3] = [
        (
            "broken",
            programs::broken_wasm(),
            &["not a valid WebAssembly module"],
        ),
        (
            "nostart",
            programs::no_start_wat(),
            &["no `_start`", "not a WASI command"],
        ),
        (
            "badimport",
            programs::bad_import_wat(),
            &["does not provide", "not_in_wasi"],
        ),
    ];
    for (name, wasm, needles) in cases {
        let vm = Vmrun::new();
        let image = image(name, &wasm);
        let yaml = pod(
            name,
            &format!("  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n"),
        );
        let out = run(&vm, name, &yaml, &[]);
        assert!(!out.status.success(), "{name}: {}", describe(&out));
        let stderr = text(&out.stderr);
        for n in needles {
            assert!(
                stderr.contains(n),
                "{name}: no {n:?} in: {}",
                describe(&out)
            );
        }
        assert!(!stderr.contains("panicked"), "{name}: {}", describe(&out));
        assert!(
            !vm.pod_dir(name).exists(),
            "{name}: pod directory left behind"
        );
        let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("vmrun").is_dir())
            .flat_map(|e| {
                std::fs::read_dir(e.path().join("vmrun"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|e| e.file_name().to_string_lossy().contains(name))
            .collect();
        assert!(cgroups.is_empty(), "{name}: cgroups left: {cgroups:?}");
    }
}

/// A p2 component serves HTTP on a WASI socket in the pod's network
/// namespace: a tcpSocket probe and a native container of the same pod
/// reach it on localhost.
#[test]
fn component_http_server_is_reached_by_probe_and_native_container() {
    require_root("component_http_server_is_reached_by_probe_and_native_container");
    let vm = Vmrun::new();
    let server = image("http", programs::http_server_p2());
    let busybox = vmrun_tests::busybox_reference();
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  annotations:
    vmrun.io/native-containers: client
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: server
    image: {server}
    args: ["8080", "served by a component"]
    readinessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
    livenessProbe:
      httpGet: {{path: /healthz, port: 8080}}
      periodSeconds: 1
  - name: client
    image: {busybox}
    command: ["sh", "-c", "until printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 > /tmp/got && grep -q served /tmp/got; do sleep 0.2; done; cat /tmp/got; echo; sleep 3600"]
"#
    );
    let path = vm.manifest("web", &yaml);
    let out = vm.run(&["run", "-d", "--runtime", "wasm", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record = vm.record("web").expect("record");
        if record["containers"]["server"]["ready"] == true {
            break;
        }
        if Instant::now() > deadline {
            let logs = vm.run(&["logs", "web", "server"]);
            panic!(
                "the server never got ready: {record}\nits logs: {}",
                describe(&logs)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Err(logs) = wait_for_log(&vm, "web", "client", "served by a component") {
        let server = vm.run(&["logs", "web", "server"]);
        panic!(
            "client never got the page: {}\nserver: {}\n{:?}",
            describe(&logs),
            describe(&server),
            vm.record("web")
        );
    }
    // The kubelet-style httpGet liveness probe reached the component too.
    if let Err(logs) = wait_for_log(&vm, "web", "server", "request: GET /healthz") {
        panic!(
            "no httpGet probe request in the server's log: {}",
            describe(&logs)
        );
    }
    let record = vm.record("web").expect("record");
    assert_eq!(
        record["containers"]["server"]["restarts"], 0,
        "the liveness probe failed: {record}"
    );
    assert!(vm.run(&["stop", "web"]).status.success());
    assert_clean(&vm, &uid_of(&record), "web");
    assert!(vm.run(&["rm", "web"]).status.success());
}

/// Polls `vmrun logs POD CONTAINER` for up to 30 s until its stdout holds
/// `needle`; the last logs when it never does.
fn wait_for_log(
    vm: &Vmrun,
    pod: &str,
    container: &str,
    needle: &str,
) -> Result<(), std::process::Output> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = vm.run(&["logs", pod, container]);
        if text(&logs.stdout).contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(logs);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The engine keeps what it compiled: a second pod of the same module
/// loads it from the disk cache instead of compiling it again.
#[test]
fn compiled_modules_are_cached_on_disk() {
    require_root("compiled_modules_are_cached_on_disk");
    let vm = Vmrun::new();
    let image = image("hello", &programs::hello_wat());
    let yaml = pod(
        "cached",
        &format!("  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n"),
    );
    let out = run(&vm, "cached", &yaml, &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("[c] hello from wat"),
        "{}",
        describe(&out)
    );
    let digest = vmrun_tests::images::sha256(&programs::hello_wat());
    let hex = digest.trim_start_matches("sha256:");
    let cache = vmrun_tests::pod::shared_image_root().join("wasm-cache");
    let entries: Vec<_> = walk(&cache)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy() == format!("{hex}.cwasm"))
        })
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "cache entries for {hex} in {}: {entries:?}",
        cache.display()
    );
    let before = std::fs::metadata(&entries[0]).unwrap().modified().unwrap();
    let again = run(&vm, "cached", &yaml, &[]);
    assert!(again.status.success(), "{}", describe(&again));
    let after = std::fs::metadata(&entries[0]).unwrap().modified().unwrap();
    assert_eq!(before, after, "the cached module was compiled again");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The HTTP component's pod, serving "served by a component" on 8080.
fn http_pod() -> String {
    let server = image("http", programs::http_server_p2());
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: server
    image: {server}
    args: ["8080", "served by a component"]
"#
    )
}

/// `GET /` from `addr` until the page comes (the server may not listen yet).
fn get_page(addr: &str) -> String {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).and_then(
            |mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut page = String::new();
                s.read_to_string(&mut page)?;
                Ok(page)
            },
        );
        match got {
            Ok(page) if page.contains("served by a component") => return page,
            other => assert!(Instant::now() < deadline, "GET {addr}: {other:?}"),
        }
        // Each try waits for the server's answer; this only spaces refusals.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A wasm pod on the CNI network `[network] cni_conf_dir` names, as
/// pods.rs's `pod_joins_the_configured_cni_network` for native and vm: the
/// component serves the host by the pod IP, and stopping the pod releases
/// the address.
#[test]
fn a_wasm_pod_joins_the_configured_cni_network() {
    const TEST: &str = "a_wasm_pod_joins_the_configured_cni_network";
    require_root(TEST);
    if !vmrun_tests::cni::plugins_installed() {
        eprintln!("SKIPPED {TEST}: containernetworking-plugins not installed (/usr/lib/cni)");
        return;
    }
    let vm = Vmrun::new();
    let ipam = tempfile::tempdir().unwrap();
    let bridge = "vmrrunw0";
    vm.use_cni_network(&vmrun_tests::cni::bridge_network(
        bridge,
        "10.250.45.0/24",
        ipam.path(),
        true,
    ));
    let path = vm.manifest("web", &http_pod());
    let out = vm.run(&["run", "-d", "--runtime", "wasm", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = vm.record("web").expect("record");
    let ip = record["pod_ips"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ip.starts_with("10.250.45."),
        "pod IP in the record: {record}"
    );
    get_page(&format!("{ip}:8080"));
    let lease = ipam.path().join(bridge).join(&ip);
    assert!(lease.exists(), "host-local's lease {}", lease.display());
    assert!(vm.run(&["stop", "web"]).status.success());
    assert!(!lease.exists(), "CNI DEL released {}", lease.display());
    assert_clean(&vm, &uid_of(&record), "web");
    assert!(vm.run(&["rm", "web"]).status.success());
    let _ = std::process::Command::new("ip")
        .args(["link", "del", bridge])
        .status();
}

/// As pods.rs's `supervisor_killed_pod_is_cleaned_up_by_rm`: the pod's
/// wasm engine outlives its SIGKILLed supervisor until `vmrun rm`.
#[test]
fn a_wasm_pod_whose_supervisor_was_killed_is_cleaned_up_by_rm() {
    require_root("a_wasm_pod_whose_supervisor_was_killed_is_cleaned_up_by_rm");
    let vm = Vmrun::new();
    let path = vm.manifest("web", &http_pod());
    let out = vm.run(&["run", "-d", "--runtime", "wasm", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = vm.wait_record("web", Duration::from_secs(60), |r| {
        r["containers"]["server"]["phase"] == "running"
    });
    vm.kill_supervisor("web", &record);
    let out = vm.run(&["rm", "web"]);
    assert!(out.status.success(), "rm: {}", describe(&out));
    assert_clean(&vm, &uid_of(&record), "web");
}
