//! A pod VM on the pod's CNI network.
//!
//! The VMM runs in a network namespace of its own, where it creates the
//! tap of the guest's NIC ([`TAP`]); CNI then puts the pod's interface in
//! that same namespace, as it does for a native pod's pause process. Here
//! the two are joined the way Kata Containers' `tcfilter` model does:
//! every frame arriving on the pod interface is redirected (tc `mirred`)
//! out of the tap, and every frame from the tap out of the pod interface,
//! so the guest's NIC is on the CNI network as if it were that interface.
//! The guest then gets that interface's MAC, MTU, addresses and routes
//! (read back from the namespace, whichever plugin made them) through the
//! agent's `ConfigureNetwork`.
//!
//! Uses `ip` and `tc` from iproute2, run inside the namespace with
//! `nsenter`.

use std::path::Path;
use std::process::Command;

use vmrun_proto::v1;

/// The tap the VMM creates in its namespace for the guest's eth0.
pub const TAP: &str = "tap0";
/// The guest's name of its first NIC.
const GUEST_NIC: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum VmNetworkError {
    #[error(
        "running {command}: {source} (iproute2's ip and tc and util-linux's nsenter are needed)"
    )]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{command} printed what is not ip's JSON: {message}")]
    Parse { command: String, message: String },
    #[error(
        "the pod's network namespace has {0} interfaces besides lo and the tap; a pod VM takes one (its eth0)"
    )]
    Interfaces(usize),
}

/// Runs `argv` in the network namespace at `netns`; its stdout.
fn in_netns(netns: &Path, argv: &[&str]) -> Result<Vec<u8>, VmNetworkError> {
    let command = format!("nsenter --net={} {}", netns.display(), argv.join(" "));
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(argv)
        .output()
        .map_err(|source| VmNetworkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmNetworkError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn json(netns: &Path, argv: &[&str]) -> Result<serde_json::Value, VmNetworkError> {
    let out = in_netns(netns, argv)?;
    serde_json::from_slice(&out).map_err(|e| VmNetworkError::Parse {
        command: argv.join(" "),
        message: e.to_string(),
    })
}

/// Joins the pod interface and the tap in `netns` and returns what the
/// guest must be told, renamed to the guest's NIC.
pub fn wire(netns: &Path) -> Result<v1::ConfigureNetworkRequest, VmNetworkError> {
    let links = json(netns, &["ip", "-j", "addr", "show"])?;
    let routes4 = json(netns, &["ip", "-j", "-4", "route", "show", "table", "main"])?;
    let routes6 = json(netns, &["ip", "-j", "-6", "route", "show", "table", "main"])?;
    let (pod_if, request) = guest_config(&links, &[routes4, routes6])?;
    let mtu = request.interfaces[0].mtu.to_string();
    in_netns(netns, &["ip", "link", "set", TAP, "mtu", &mtu, "up"])?;
    for (from, to) in [(pod_if.as_str(), TAP), (TAP, pod_if.as_str())] {
        in_netns(netns, &["tc", "qdisc", "add", "dev", from, "ingress"])?;
        in_netns(
            netns,
            &[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(request)
}

/// The pod interface's name and the guest's configuration, from `ip -j`'s
/// addresses and routes of the namespace.
fn guest_config(
    links: &serde_json::Value,
    routes: &[serde_json::Value],
) -> Result<(String, v1::ConfigureNetworkRequest), VmNetworkError> {
    let pod: Vec<&serde_json::Value> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| !matches!(l["ifname"].as_str(), Some("lo") | Some(TAP) | None))
        .collect();
    let [link] = pod[..] else {
        return Err(VmNetworkError::Interfaces(pod.len()));
    };
    let name = link["ifname"].as_str().unwrap_or_default().to_string();
    let addresses = link["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        // The guest makes its own link-local addresses.
        .filter(|a| a["scope"] != "link" && a["local"].is_string())
        .map(|a| {
            format!(
                "{}/{}",
                a["local"].as_str().unwrap_or_default(),
                a["prefixlen"]
            )
        })
        .collect();
    let interface = v1::NetworkInterface {
        name: GUEST_NIC.into(),
        mac: link["address"].as_str().unwrap_or_default().to_string(),
        mtu: link["mtu"].as_u64().unwrap_or(0) as u32,
        addresses,
    };
    let routes = routes
        .iter()
        .filter_map(|r| r.as_array())
        .flatten()
        // The guest's kernel adds the subnet routes of its addresses.
        .filter(|r| r["protocol"] != "kernel" && r["dev"] == name.as_str())
        .filter(|r| r["type"].is_null() || r["type"] == "unicast")
        .filter_map(|r| {
            let dst = r["dst"].as_str()?;
            let destination = if dst == "default" || dst.contains('/') {
                dst.to_string()
            } else if dst.contains(':') {
                format!("{dst}/128")
            } else {
                format!("{dst}/32")
            };
            Some(v1::NetworkRoute {
                destination,
                gateway: r["gateway"].as_str().unwrap_or_default().to_string(),
                device: GUEST_NIC.into(),
            })
        })
        .collect();
    Ok((
        name,
        v1::ConfigureNetworkRequest {
            interfaces: vec![interface],
            routes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `ip -j` says of a namespace after the bridge plugin's ADD.
    #[test]
    fn the_cni_interface_becomes_the_guests_eth0() {
        let links = json!([
            {"ifindex":1,"ifname":"lo","mtu":65536,"address":"00:00:00:00:00:00",
             "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
            {"ifindex":2,"ifname":"tap0","mtu":1500,"address":"52:54:00:12:34:56","addr_info":[]},
            {"ifindex":3,"ifname":"eth0","mtu":1450,"address":"0a:58:0a:58:00:05",
             "addr_info":[
                {"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"},
                {"family":"inet6","local":"fe80::858:aff:fe58:5","prefixlen":64,"scope":"link"}]}
        ]);
        let routes4 = json!([
            {"dst":"default","gateway":"10.88.0.1","dev":"eth0"},
            {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5"},
            {"dst":"10.99.0.7","gateway":"10.88.0.1","dev":"eth0"}
        ]);
        let routes6 = json!([
            {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256},
            {"type":"multicast","dst":"ff00::/8","dev":"eth0","protocol":"kernel"}
        ]);
        let (pod_if, req) = guest_config(&links, &[routes4, routes6]).unwrap();
        assert_eq!(pod_if, "eth0");
        assert_eq!(
            req.interfaces,
            vec![v1::NetworkInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:05".into(),
                mtu: 1450,
                addresses: vec!["10.88.0.5/16".into()],
            }]
        );
        let routes: Vec<(&str, &str)> = req
            .routes
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str()))
            .collect();
        assert_eq!(
            routes,
            vec![("default", "10.88.0.1"), ("10.99.0.7/32", "10.88.0.1")]
        );
    }

    #[test]
    fn a_namespace_without_one_pod_interface_is_refused() {
        let lo_only = json!([{"ifname":"lo"},{"ifname":"tap0"}]);
        let err = guest_config(&lo_only, &[]).unwrap_err();
        assert!(err.to_string().contains("has 0 interfaces"), "{err}");
        let two = json!([{"ifname":"eth0"},{"ifname":"net1"}]);
        assert!(matches!(
            guest_config(&two, &[]),
            Err(VmNetworkError::Interfaces(2))
        ));
    }
}
