//! Loading network configuration from a directory, as containerd does.

use std::fs;

use vmrun_cni::{load_default, LoadError, NetworkConfigList, ParseError};

const BRIDGE_LIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "podnet",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

const SINGLE: &str = r#"{"cniVersion": "0.4.0", "name": "single", "type": "ptp"}"#;

#[test]
fn a_list_keeps_plugins_in_order_with_their_capabilities() {
    let list = NetworkConfigList::from_bytes(BRIDGE_LIST.as_bytes()).expect("valid list");
    assert_eq!(list.name, "podnet");
    assert_eq!(list.cni_version, "1.0.0");
    let types: Vec<_> = list
        .plugins
        .iter()
        .map(|p| p.plugin_type.as_str())
        .collect();
    assert_eq!(types, ["bridge", "portmap"]);
    assert!(list.plugins[1].has_capability("portMappings"));
    assert!(!list.plugins[0].has_capability("portMappings"));
    assert_eq!(list.plugins[0].raw["bridge"], "cni0");
}

#[test]
fn files_are_taken_in_name_order_and_a_conf_is_wrapped_into_a_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("20-bridge.conflist"), BRIDGE_LIST).expect("write");
    fs::write(dir.path().join("10-single.conf"), SINGLE).expect("write");
    fs::write(dir.path().join("05-ignored.txt"), "not a config").expect("write");
    let list = load_default(dir.path()).expect("loads");
    assert_eq!(list.name, "single");
    assert_eq!(list.cni_version, "0.4.0");
    assert_eq!(list.plugins.len(), 1);
    assert_eq!(list.plugins[0].plugin_type, "ptp");
    assert_eq!(
        list.source.as_deref(),
        Some(dir.path().join("10-single.conf").as_path())
    );
}

#[test]
fn a_json_file_is_read_as_a_single_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("net.json"), SINGLE).expect("write");
    assert_eq!(load_default(dir.path()).expect("loads").name, "single");
}

#[test]
fn a_malformed_file_is_skipped_for_a_later_valid_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("00-broken.conflist"), "{ half written").expect("write");
    fs::write(dir.path().join("10-bridge.conflist"), BRIDGE_LIST).expect("write");
    assert_eq!(load_default(dir.path()).expect("loads").name, "podnet");
}

#[test]
fn when_nothing_is_valid_the_error_names_each_file_and_its_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("00-broken.conflist"), "{ half written").expect("write");
    fs::write(
        dir.path().join("10-noplugins.conflist"),
        r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
    )
    .expect("write");
    fs::write(
        dir.path().join("20-notype.conflist"),
        r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"bridge":"b"}]}"#,
    )
    .expect("write");
    let error = load_default(dir.path()).expect_err("nothing valid");
    let message = error.to_string();
    assert!(matches!(error, LoadError::AllInvalid { ref failures, .. } if failures.len() == 3));
    for name in [
        "00-broken.conflist",
        "10-noplugins.conflist",
        "20-notype.conflist",
    ] {
        assert!(message.contains(name), "{message}");
    }
    assert!(message.contains("`plugins` is empty"), "{message}");
    assert!(message.contains("plugin 0: field `type`"), "{message}");
}

#[test]
fn an_empty_directory_says_there_is_no_network_config_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = load_default(dir.path()).expect_err("empty dir");
    assert!(matches!(error, LoadError::NoConfig { .. }));
    assert_eq!(
        error.to_string(),
        format!(
            "no network config in {} (looked for *.conflist, *.conf, *.json)",
            dir.path().display()
        )
    );
}

#[test]
fn a_missing_directory_is_named() {
    let error = load_default("/nonexistent/cni/net.d".as_ref()).expect_err("no dir");
    assert!(
        error.to_string().contains("/nonexistent/cni/net.d"),
        "{error}"
    );
}

#[test]
fn bad_documents_say_what_is_wrong() {
    let cases = [
        (r#"[]"#, "not a JSON object"),
        (
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#,
            "`name`",
        ),
        (r#"{"name":"n","plugins":[{"type":"x"}]}"#, "`cniVersion`"),
        (
            r#"{"name":"a/b","cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#,
            "a/b",
        ),
        (r#"{"name":"n","cniVersion":"1.0.0"}"#, "`plugins`"),
        (
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"../sh"}]}"#,
            "not a plugin name",
        ),
        (
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"x","capabilities":{"dns":"yes"}}]}"#,
            "capability \"dns\"",
        ),
    ];
    for (text, expected) in cases {
        let error: ParseError = NetworkConfigList::from_bytes(text.as_bytes()).expect_err(text);
        assert!(error.to_string().contains(expected), "{text}: {error}");
    }
}
