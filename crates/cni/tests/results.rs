//! Results of every supported version read into one shape.

use std::net::IpAddr;

use vmrun_cni::{Cidr, CniResult};

const V1: &str = r#"{
  "cniVersion": "1.0.0",
  "interfaces": [
    {"name": "vmrcni0", "mac": "aa:bb:cc:00:00:01"},
    {"name": "veth1234", "mac": "aa:bb:cc:00:00:02"},
    {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "mtu": 1500, "sandbox": "/run/netns/pod"}
  ],
  "ips": [
    {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 2},
    {"address": "10.250.37.5/24", "gateway": "10.250.37.1", "interface": 2}
  ],
  "routes": [{"dst": "0.0.0.0/0", "gw": "10.250.37.1"}],
  "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
}"#;

#[test]
fn a_1_0_and_a_0_4_result_read_the_same() {
    let v04 = V1
        .replace("\"1.0.0\"", "\"0.4.0\"")
        .replace(
            r#"{"address": "fd00"#,
            r#"{"version": "6", "address": "fd00"#,
        )
        .replace(r#"{"address": "10."#, r#"{"version": "4", "address": "10."#);
    let new = CniResult::from_bytes(V1.as_bytes()).expect("1.0.0 result");
    let old = CniResult::from_bytes(v04.as_bytes()).expect("0.4.0 result");
    assert_eq!(old.cni_version, "0.4.0");
    assert_eq!(new.interfaces, old.interfaces);
    assert_eq!(new.ips, old.ips);
    assert_eq!(new.routes, old.routes);
    assert_eq!(new.dns, old.dns);
    assert_eq!(
        new.ips[1].address,
        Cidr {
            addr: "10.250.37.5".parse().expect("ip"),
            prefix_len: 24
        }
    );
    assert_eq!(new.ips[1].interface, Some(2));
    assert_eq!(new.dns.nameservers, ["10.96.0.10"]);
    assert_eq!(new.interfaces[2].sandbox.as_deref(), Some("/run/netns/pod"));
}

#[test]
fn pod_ips_are_the_sandbox_addresses_ipv4_first() {
    let result = CniResult::from_bytes(V1.as_bytes()).expect("result");
    let expected: Vec<IpAddr> = vec![
        "10.250.37.5".parse().expect("ip"),
        "fd00::5".parse().expect("ip"),
    ];
    assert_eq!(result.pod_ips(), expected);
    assert_eq!(
        result.sandbox_interface().map(|i| i.name.as_str()),
        Some("eth0")
    );
}

#[test]
fn addresses_on_host_interfaces_are_not_pod_ips() {
    let text = r#"{"cniVersion":"1.0.0",
      "interfaces":[{"name":"br0"},{"name":"eth0","sandbox":"/run/netns/p"}],
      "ips":[{"address":"10.0.0.1/24","interface":0},{"address":"10.0.0.7/24","interface":1}]}"#;
    let result = CniResult::from_bytes(text.as_bytes()).expect("result");
    assert_eq!(
        result.pod_ips(),
        vec!["10.0.0.7".parse::<IpAddr>().expect("ip")]
    );
}

#[test]
fn a_0_2_result_gives_its_ip4_and_ip6() {
    let text = r#"{"cniVersion":"0.2.0",
      "ip4":{"ip":"10.1.0.3/16","gateway":"10.1.0.1","routes":[{"dst":"0.0.0.0/0"}]},
      "ip6":{"ip":"fd00::3/64"}}"#;
    let result = CniResult::from_bytes(text.as_bytes()).expect("result");
    assert_eq!(result.ips.len(), 2);
    assert_eq!(result.routes.len(), 1);
    assert_eq!(
        result.pod_ips()[0],
        "10.1.0.3".parse::<IpAddr>().expect("ip")
    );
}

#[test]
fn malformed_results_name_the_field() {
    let cases = [
        (r#"{"ips":[{"address":"10.0.0.1"}]}"#, "ips[0].address"),
        (r#"{"ips":[{"address":"10.0.0.1/33"}]}"#, "ips[0].address"),
        (
            r#"{"ips":[{"address":"10.0.0.1/8","version":"6"}]}"#,
            "ips[0].version",
        ),
        (
            r#"{"ips":[{"address":"10.0.0.1/8","interface":-1}]}"#,
            "ips[0].interface",
        ),
        (
            r#"{"ips":[{"address":"10.0.0.1/8","gateway":"nope"}]}"#,
            "ips[0].gateway",
        ),
        (r#"{"interfaces":[{"mac":"x"}]}"#, "interfaces[0]"),
        (r#"{"routes":[{"gw":"10.0.0.1"}]}"#, "routes[0].dst"),
        (r#"{"dns":[]}"#, "dns"),
    ];
    for (text, field) in cases {
        let error = CniResult::from_bytes(text.as_bytes()).expect_err(text);
        assert!(error.to_string().contains(field), "{text}: {error}");
    }
}
