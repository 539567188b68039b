//! Plugin invocation with stand-in plugins (shell scripts) that record what
//! they were given: environment, stdin injection, chaining, caching, errors
//! and the timeout.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmrun_cni::{
    format_cni_args, AddError, Attachment, Cni, DelError, DnsConfig, NetworkConfigList,
    PluginRunError, PortMapping,
};

const RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"10.9.0.2/24","interface":0}]}"#;

struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Self {
        let bench = Bench {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        fs::create_dir_all(bench.bin()).expect("bin dir");
        fs::create_dir_all(bench.log()).expect("log dir");
        bench
    }
    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }
    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
    fn cni(&self) -> Cni {
        Cni::new(
            vec![self.dir.path().join("empty"), self.bin()],
            self.cache(),
        )
    }
    /// A plugin that records its stdin and CNI_ environment per command
    /// and then runs `body`.
    fn plugin(&self, name: &str, body: &str) {
        let log = self.log();
        let script = format!(
            "#!/bin/sh\necho {name} $CNI_COMMAND >> {log}/order\ncat > {log}/{name}.$CNI_COMMAND.stdin\nenv | grep ^CNI_ | sort > {log}/{name}.$CNI_COMMAND.env\n{body}\n",
            log = log.display()
        );
        let path = self.bin().join(name);
        fs::write(&path, script).expect("write plugin");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    /// A plugin that prints `RESULT` on ADD and nothing otherwise.
    fn ok_plugin(&self, name: &str) {
        self.plugin(
            name,
            &format!("[ \"$CNI_COMMAND\" = ADD ] && echo '{RESULT}'\nexit 0"),
        );
    }
    fn stdin(&self, name: &str, command: &str) -> Value {
        let path = self.log().join(format!("{name}.{command}.stdin"));
        let text = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&text).expect("stdin is JSON")
    }
    fn ran(&self, name: &str, command: &str) -> bool {
        self.log().join(format!("{name}.{command}.stdin")).exists()
    }
    fn env(&self, name: &str, command: &str) -> String {
        fs::read_to_string(self.log().join(format!("{name}.{command}.env"))).expect("env log")
    }
}

fn list(version: &str, plugins: &str) -> NetworkConfigList {
    let text = format!(r#"{{"cniVersion":"{version}","name":"testnet","plugins":[{plugins}]}}"#);
    NetworkConfigList::from_bytes(text.as_bytes()).expect("valid list")
}

fn attachment() -> Attachment {
    let mut attachment = Attachment::new("c0ffee", "/run/netns/x", "eth0");
    attachment.args = vec![
        ("IgnoreUnknown".into(), "1".into()),
        ("K8S_POD_NAME".into(), "web".into()),
    ];
    attachment.runtime_config.port_mappings = vec![PortMapping {
        host_port: 8080,
        container_port: 80,
        protocol: "tcp".into(),
        host_ip: "127.0.0.1".into(),
    }];
    attachment.runtime_config.dns = Some(DnsConfig {
        servers: vec!["10.96.0.10".into()],
        ..DnsConfig::default()
    });
    attachment
}

fn cache_file(bench: &Bench) -> PathBuf {
    bench.cache().join("testnet-c0ffee-eth0.json")
}

#[test]
fn cni_args_are_key_value_pairs_joined_by_semicolons() {
    let args = vec![
        ("A".to_string(), "1".to_string()),
        ("B".to_string(), "x=y".to_string()),
    ];
    assert_eq!(format_cni_args(&args).expect("valid"), "A=1;B=x=y");
    assert_eq!(format_cni_args(&[]).expect("valid"), "");
    assert!(format_cni_args(&[("A;B".into(), "1".into())]).is_err());
    assert!(format_cni_args(&[("A".into(), "1;B=2".into())]).is_err());
}

#[test]
fn add_gives_each_plugin_the_environment_the_spec_names() {
    let bench = Bench::new();
    bench.ok_plugin("first");
    let cni = bench.cni();
    cni.add(&list("1.0.0", r#"{"type":"first"}"#), &attachment())
        .expect("add");
    let env = bench.env("first", "ADD");
    let cni_path = format!(
        "CNI_PATH={}:{}",
        bench.dir.path().join("empty").display(),
        bench.bin().display()
    );
    for line in [
        "CNI_COMMAND=ADD",
        "CNI_CONTAINERID=c0ffee",
        "CNI_NETNS=/run/netns/x",
        "CNI_IFNAME=eth0",
        "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=web",
        cni_path.as_str(),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing in\n{env}");
    }
}

#[test]
fn runtime_config_goes_only_to_plugins_declaring_the_capability() {
    let bench = Bench::new();
    bench.ok_plugin("first");
    bench.plugin("second", "cat > /dev/null; exit 0");
    bench.plugin("ports", &format!("echo '{RESULT}'"));
    let network = list(
        "1.0.0",
        r#"{"type":"first","capabilities":{"portMappings":false}},
           {"type":"ports","capabilities":{"portMappings":true,"dns":true,"bandwidth":true}}"#,
    );
    bench.cni().add(&network, &attachment()).expect("add");

    let first = bench.stdin("first", "ADD");
    assert!(first.get("runtimeConfig").is_none(), "{first}");
    assert!(first.get("prevResult").is_none(), "{first}");
    assert_eq!(first["name"], "testnet");
    assert_eq!(first["cniVersion"], "1.0.0");

    let ports = bench.stdin("ports", "ADD");
    let runtime = &ports["runtimeConfig"];
    assert_eq!(
        runtime["portMappings"],
        serde_json::json!([{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"}])
    );
    assert_eq!(
        runtime["dns"],
        serde_json::json!({"servers":["10.96.0.10"]})
    );
    // Declared but not offered: not sent.
    assert!(runtime.get("bandwidth").is_none(), "{runtime}");
    assert_eq!(ports["prevResult"]["ips"][0]["address"], "10.9.0.2/24");
}

#[test]
fn add_caches_and_del_runs_in_reverse_with_the_cached_prev_result() {
    let bench = Bench::new();
    bench.ok_plugin("first");
    bench.ok_plugin("second");
    let network = list("1.0.0", r#"{"type":"first"},{"type":"second"}"#);
    let cni = bench.cni();
    let result = cni.add(&network, &attachment()).expect("add");
    assert_eq!(
        result.pod_ips(),
        vec!["10.9.0.2".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert!(cache_file(&bench).exists());
    assert_eq!(
        cni.cached_result(&network, &attachment())
            .expect("cache readable")
            .map(|r| r.ips),
        Some(result.ips.clone())
    );

    cni.check(&network, &attachment()).expect("check");
    assert_eq!(
        bench.stdin("first", "CHECK")["prevResult"]["ips"][0]["address"],
        "10.9.0.2/24"
    );

    cni.del(&network, &attachment()).expect("del");
    for name in ["first", "second"] {
        let stdin = bench.stdin(name, "DEL");
        assert_eq!(
            stdin["prevResult"]["ips"][0]["address"], "10.9.0.2/24",
            "{name}"
        );
    }
    let order = fs::read_to_string(bench.log().join("order")).expect("order log");
    assert_eq!(
        order.lines().collect::<Vec<_>>(),
        [
            "first ADD",
            "second ADD",
            "first CHECK",
            "second CHECK",
            "second DEL",
            "first DEL"
        ]
    );
    assert!(!cache_file(&bench).exists());

    // A second DEL has no cache entry: plugins run without prevResult.
    cni.del(&network, &attachment()).expect("second del");
    assert!(bench.stdin("first", "DEL").get("prevResult").is_none());
}

#[test]
fn del_before_0_4_gets_no_prev_result_and_check_is_refused() {
    let bench = Bench::new();
    bench.ok_plugin("first");
    let network = list("0.3.1", r#"{"type":"first"}"#);
    let cni = bench.cni();
    cni.add(&network, &attachment()).expect("add");
    cni.del(&network, &attachment()).expect("del");
    assert!(bench.stdin("first", "DEL").get("prevResult").is_none());
    assert!(cni.check(&network, &attachment()).is_err());
}

#[test]
fn a_missing_plugin_is_named_with_the_directories_searched() {
    let bench = Bench::new();
    let network = list("1.0.0", r#"{"type":"no-such-plugin"}"#);
    let error = bench
        .cni()
        .add(&network, &attachment())
        .expect_err("missing plugin");
    assert!(
        matches!(error, AddError::Plugin(PluginRunError::NotFound { .. })),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("\"no-such-plugin\""), "{message}");
    assert!(message.contains("\"testnet\""), "{message}");
    assert!(
        message.contains(&bench.bin().display().to_string()),
        "{message}"
    );
}

#[test]
fn a_plugin_error_names_plugin_network_and_message_and_undoes_the_add() {
    let bench = Bench::new();
    bench.ok_plugin("first");
    bench.plugin(
        "failing",
        r#"[ "$CNI_COMMAND" = DEL ] && exit 0
echo '{"cniVersion":"1.0.0","code":7,"msg":"invalid network config","details":"no subnet"}'
exit 1"#,
    );
    let network = list("1.0.0", r#"{"type":"first"},{"type":"failing"}"#);
    let error = bench
        .cni()
        .add(&network, &attachment())
        .expect_err("plugin fails");
    assert_eq!(
        error.to_string(),
        "CNI plugin \"failing\" of network \"testnet\" failed ADD: invalid network config (code 7): no subnet"
    );
    // The partial ADD was deleted again and nothing was cached.
    assert!(bench.ran("first", "DEL"));
    assert!(!cache_file(&bench).exists());
}

#[test]
fn a_plugin_without_error_json_is_reported_with_its_stderr() {
    let bench = Bench::new();
    bench.plugin("crashing", "echo 'panic: boom' >&2; exit 2");
    let network = list("1.0.0", r#"{"type":"crashing"}"#);
    let error = bench
        .cni()
        .del(&network, &attachment())
        .expect_err("plugin fails");
    assert!(
        matches!(error, DelError::Plugin(PluginRunError::Exited { .. })),
        "{error:?}"
    );
    assert!(error.to_string().contains("panic: boom"), "{error}");
}

#[test]
fn a_hung_plugin_is_killed_after_the_timeout() {
    let bench = Bench::new();
    bench.plugin("hanging", "sleep 30 & sleep 30");
    let network = list("1.0.0", r#"{"type":"hanging"}"#);
    let mut cni = bench.cni();
    cni.plugin_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let error = cni.del(&network, &attachment()).expect_err("times out");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        error.to_string().contains("did not finish within"),
        "{error}"
    );
}

#[test]
fn unusable_attachment_names_are_refused_before_any_plugin_runs() {
    let bench = Bench::new();
    bench.ok_plugin("first");
    let network = list("1.0.0", r#"{"type":"first"}"#);
    for attachment in [
        Attachment::new("../etc", "/run/netns/x", "eth0"),
        Attachment::new("c1", "/run/netns/x", "a-very-long-interface-name"),
    ] {
        assert!(bench.cni().add(&network, &attachment).is_err());
    }
    assert!(!bench.ran("first", "ADD"));
}

#[test]
fn a_daemon_left_holding_stdout_does_not_hang_the_runtime() {
    let bench = Bench::new();
    // Succeeds at once but leaves a background process with our pipes.
    bench.plugin("leaving", &format!("sleep 30 &\necho '{RESULT}'"));
    let network = list("1.0.0", r#"{"type":"leaving"}"#);
    let mut cni = bench.cni();
    cni.plugin_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let outcome = cni.add(&network, &attachment());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // The output came before the plugin exited, so the result is whole.
    assert_eq!(outcome.expect("add").ips.len(), 1);
}

#[test]
fn del_without_runtime_config_offers_what_add_had() {
    let bench = Bench::new();
    bench.ok_plugin("ports");
    let network = list(
        "1.0.0",
        r#"{"type":"ports","capabilities":{"portMappings":true}}"#,
    );
    let cni = bench.cni();
    cni.add(&network, &attachment()).expect("add");
    // As after a runtime restart: only the ids are known.
    let bare = Attachment::new("c0ffee", "/run/netns/x", "eth0");
    cni.del(&network, &bare).expect("del");
    let stdin = bench.stdin("ports", "DEL");
    assert_eq!(
        stdin["runtimeConfig"]["portMappings"][0]["hostPort"], 8080,
        "{stdin}"
    );
}
