//! The pod's network through CNI, as containerd wires it: the pause
//! process's network namespace pinned in the pod's directory, ADD of the
//! node's network configuration on RunPodSandbox, DEL on StopPodSandbox.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmrun_cni::{Attachment, Cni, DnsConfig, NetNs, NetworkConfigList, PortMapping};

use crate::api;

/// The interface CNI creates in the pod, as kubelet and containerd name it.
const POD_INTERFACE: &str = "eth0";
/// Where the pod's namespace is pinned, inside its directory.
pub const NETNS_FILE: &str = "netns";

/// The node's CNI setup, as the daemon found it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkSettings {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    /// libcni's result cache (for DEL after a restart).
    pub cache_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network: {0}")]
    Load(#[from] vmrun_cni::LoadError),
    #[error("pod network: {0}")]
    Pin(#[from] vmrun_cni::NetNsError),
    #[error("pod network: {0}")]
    Add(#[from] vmrun_cni::AddError),
    #[error("pod network: {0}")]
    Del(#[from] vmrun_cni::DelError),
}

/// A pod attached to the node's network.
pub struct PodNetwork {
    cni: Cni,
    list: NetworkConfigList,
    attachment: Attachment,
    netns: NetNs,
    pub ips: Vec<IpAddr>,
}

/// CRI's Protocol values, as CNI's portmap plugin names them.
fn protocol(p: i32) -> &'static str {
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

impl PodNetwork {
    /// Pins the namespace of `holder_pid` at `dir/netns` and attaches it;
    /// on failure nothing stays attached or pinned.
    pub fn attach(
        settings: &NetworkSettings,
        id: &str,
        dir: &Path,
        holder_pid: i32,
        config: &api::PodSandboxConfig,
    ) -> Result<Self, NetworkError> {
        let list = vmrun_cni::load_default(&settings.conf_dir)?;
        let cni = Cni::new(settings.bin_dirs.clone(), settings.cache_dir.clone());
        let netns = NetNs::pin_process(holder_pid as u32, dir.join(NETNS_FILE))?;
        let attachment = attachment(id, netns.path(), config);
        match cni.add(&list, &attachment) {
            Ok(result) => Ok(Self {
                ips: result.pod_ips(),
                cni,
                list,
                attachment,
                netns,
            }),
            Err(e) => {
                let _ = netns.remove();
                Err(e.into())
            }
        }
    }

    /// Where the pod's network namespace is pinned.
    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    /// DEL, then the pin goes; repeatable (CNI DEL is idempotent).
    pub fn detach(&self) -> Result<(), NetworkError> {
        self.cni.del(&self.list, &self.attachment)?;
        vmrun_cni::netns::remove(self.netns.path())?;
        Ok(())
    }
}

/// Detaches a pod whose owner is gone, from its files alone: the pinned
/// namespace (if still there) and the node's configuration.
pub fn detach_orphan(
    settings: &NetworkSettings,
    id: &str,
    dir: &Path,
    config: &api::PodSandboxConfig,
) -> Result<(), NetworkError> {
    let list = vmrun_cni::load_default(&settings.conf_dir)?;
    let cni = Cni::new(settings.bin_dirs.clone(), settings.cache_dir.clone());
    let netns = dir.join(NETNS_FILE);
    cni.del(&list, &attachment(id, &netns, config))?;
    vmrun_cni::netns::remove(&netns)?;
    Ok(())
}
