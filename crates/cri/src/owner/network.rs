//! What CNI is told of a CRI pod (its Kubernetes names, host ports and DNS);
//! the attach and detach themselves are `vmrun_cni::pod_network`.

use std::path::Path;

use vmrun_cni::pod_network::POD_INTERFACE;
pub use vmrun_cni::{detach_orphan, NetworkSettings, PodNetwork, NETNS_FILE};
use vmrun_cni::{Attachment, DnsConfig, PortMapping};

use crate::api;

/// CRI's Protocol values, as CNI's portmap plugin names them.
pub(crate) fn protocol(p: i32) -> &'static str {
    match p {
        1 => "udp",
        2 => "sctp",
        _ => "tcp",
    }
}

/// The attachment of sandbox `id`, netns pinned at `netns`.
pub fn attachment(id: &str, netns: &Path, config: &api::PodSandboxConfig) -> Attachment {
    let meta = config.metadata.clone().unwrap_or_default();
    let mut a = Attachment::new(id, netns, POD_INTERFACE).with_kubernetes_args(
        &meta.namespace,
        &meta.name,
        &meta.uid,
    );
    // containerd leaves out mappings without a host port: nothing to map.
    a.runtime_config.port_mappings = config
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0)
        .map(|p| PortMapping {
            host_port: p.host_port as u16,
            container_port: p.container_port as u16,
            protocol: protocol(p.protocol).to_string(),
            host_ip: p.host_ip.clone(),
        })
        .collect();
    a.runtime_config.dns = config.dns_config.as_ref().map(|d| DnsConfig {
        servers: d.servers.clone(),
        searches: d.searches.clone(),
        options: d.options.clone(),
    });
    a
}
